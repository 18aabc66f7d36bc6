//! `report.html` in a real headless browser (Chromium, installed by
//! scripts/setup.sh): it loads without console messages, and its filters —
//! set through the URL's fragment, as the page's own controls set them —
//! change which questions and pairs are shown.

use std::path::Path;
use std::process::Command;

use crate::{stderr, tabletrace};

/// Two runs over six questions (tables, kind, which run got it right) and three pairs.
fn fixture(dir: &Path) {
    let questions = [
        ("q1", 2, "count", [true, true]),
        ("q2", 2, "list", [false, true]),
        ("q3", 2, "lookup", [false, false]),
        ("q4", 3, "count", [true, false]),
        ("q5", 3, "list", [false, true]),
        ("q6", 3, "aggregate", [false, false]),
    ];
    for (r, run) in ["base", "cpo"].iter().enumerate() {
        let d = dir.join(run);
        std::fs::create_dir_all(&d).unwrap();
        let preds: Vec<String> = questions
            .iter()
            .map(|(id, tables, kind, right)| {
                serde_json::json!({
                    "id": id, "prompt": format!("Table: t\n| a |\n| <b>{id}</b> |\nQuestion: how many?"),
                    "output": "Step 1: …\nFinal answer: 3", "answer": if right[r] { "3" } else { "4" }, "gold": "3",
                    "n_tables": tables, "kind": kind, "em": right[r], "pm": 0.0, "f1": 0.0, "num": right[r]
                })
                .to_string()
            })
            .collect();
        std::fs::write(d.join("predictions.jsonl"), preds.join("\n") + "\n").unwrap();
        let right = questions.iter().filter(|q| q.3[r]).count() as f64;
        let eval = serde_json::json!({
            "n": 6, "em": right / 6.0, "pm": 0.0, "f1": 0.0, "num": right / 6.0, "by_tables": {}, "by_kind": {},
            "labels": "executed", "no_final_line": 0, "not_run": 0, "setup": {"eval_args": []}
        });
        std::fs::write(d.join("eval.json"), eval.to_string()).unwrap();
    }
    std::fs::write(dir.join("unseen.txt"), "q2\nq3\nq4\n").unwrap();
    let pair = |q: &str, e: &str| {
        serde_json::json!({
            "prompt": [{"role": "user", "content": "Tables… Question?"}],
            "chosen": [{"role": "assistant", "content": "Step 1: read t.\nStep 2: 3 rows.\nFinal answer: 3"}],
            "rejected": [{"role": "assistant", "content": "Step 1: read t.\nStep 2: 4 rows.\nFinal answer: 4"}],
            "metadata": {"question_id": q, "chosen_generator": "program", "rejected_generator": "program",
                         "error_type": e, "chosen_faithfulness": 1.0, "rejected_faithfulness": 0.5}
        })
        .to_string()
    };
    let pairs = [pair("t1", "flipped_filter"), pair("t2", "wrong_join_key"), pair("t3", "flipped_filter")];
    std::fs::write(dir.join("pairs.jsonl"), pairs.join("\n") + "\n").unwrap();
}

/// The page's DOM after its script ran, and any console lines.
fn load(page: &Path, fragment: &str) -> (String, Vec<String>) {
    let url = format!("file://{}#{fragment}", page.display());
    let o = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=1", "--dump-dom", &url])
        .output()
        .expect("chromium runs (scripts/setup.sh installs it: apt-get install chromium)");
    assert!(o.status.success(), "chromium failed: {}", String::from_utf8_lossy(&o.stderr));
    let console =
        String::from_utf8_lossy(&o.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(String::from).collect();
    (String::from_utf8_lossy(&o.stdout).into_owned(), console)
}

/// The count the page shows in `N of M questions shown` (or pairs).
fn shown(dom: &str, what: &str) -> usize {
    let end = dom.find(&format!(" {what} shown")).unwrap_or_else(|| panic!("no {what} count in the page"));
    let start = dom[..end].rfind('>').unwrap() + 1;
    dom[start..end].split(" of ").next().unwrap().parse().unwrap()
}

#[test]
fn report_html_loads_cleanly_and_its_filters_select_questions_and_pairs() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let p = |f: &str| dir.path().join(f).display().to_string();
    let o = tabletrace(&[
        "report",
        &p("base"),
        &p("cpo"),
        "--out",
        &p(""),
        "--subset",
        &format!("unseen_sql={}", p("unseen.txt")),
        "--baseline",
        "base",
        "--pairs",
        &p("pairs.jsonl"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let page = dir.path().join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page must not need the network");
    assert!(html.contains("&lt;b&gt;q1&lt;/b&gt;"), "table cells are escaped");
    assert!(html.contains("<mark>Step 2: 3 rows.</mark>"), "the divergent step is marked");

    let (dom, console) = load(&page, "");
    assert!(console.is_empty(), "console messages: {console:?}");
    assert_eq!((shown(&dom, "questions"), shown(&dom, "pairs")), (6, 3));
    for (fragment, questions, pairs) in [
        ("tables=3", 3, 3),
        ("kind=count", 2, 3),
        ("run=1&result=right", 3, 3),
        ("run=0&result=wrong&subset=unseen_sql", 2, 3),
        ("tables=2&run=1&result=wrong", 1, 3),
        ("error=flipped_filter", 6, 2),
    ] {
        let (dom, console) = load(&page, fragment);
        assert!(console.is_empty(), "#{fragment}: console messages: {console:?}");
        assert_eq!((shown(&dom, "questions"), shown(&dom, "pairs")), (questions, pairs), "#{fragment}");
    }
}
