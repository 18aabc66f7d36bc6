//! `tabletrace report`: runs side by side in Markdown, with PNG charts and
//! a machine-readable `summary.json`.
//!
//! A run directory holds `eval.json` and `predictions.jsonl` (from
//! `tabletrace eval`) and, when it was trained, `metrics.jsonl`; it may
//! hold further evaluation sets in sub-folders of the same layout (e.g.
//! `cross_db/`). The report names each run by its folder. With
//! [`Comparison`], it also scores each run on subsets of its questions
//! (e.g. the unseen-SQL subset) and gives every run's EM difference from a
//! baseline run with a paired bootstrap 95% interval.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use tabletrace_plot::{bar_chart, interval_chart, line_charts, Interval, Panel, Series};

use crate::compare::{paired_bootstrap, Difference, Outcomes, RESAMPLES};
use crate::{Error, EvalReport, Prediction, Result};

/// One evaluation of a run: its `eval.json` and per-question outcomes.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Its `eval.json`.
    pub eval: EvalReport,
    /// EM per question, from `predictions.jsonl` (empty when absent).
    pub outcomes: Outcomes,
}

/// One run's evaluation.
#[derive(Debug, Clone)]
pub struct Run {
    /// Display name (the folder name).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// Its `eval.json`.
    pub eval: EvalReport,
    /// EM per question of the main evaluation.
    pub outcomes: Outcomes,
    /// Further evaluation sets, by sub-folder name.
    pub sets: BTreeMap<String, Evaluation>,
}

/// What to compare beyond the main tables.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    /// Named subsets of the main evaluation's questions (e.g. `unseen_sql`).
    pub subsets: Vec<(String, HashSet<String>)>,
    /// Further evaluation sets: sub-folders of every run (e.g. `cross_db`).
    pub sets: Vec<String>,
    /// The run differences are taken from (default: the first run).
    pub baseline: Option<String>,
}

fn load_evaluation(dir: &Path) -> Result<Evaluation> {
    let path = dir.join("eval.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::File { path: path.clone(), message: format!("{e} (run `tabletrace eval` first)") })?;
    let eval: EvalReport =
        serde_json::from_str(&text).map_err(|e| Error::File { path: path.clone(), message: e.to_string() })?;
    let preds = dir.join("predictions.jsonl");
    let mut outcomes = Outcomes::default();
    if let Ok(text) = std::fs::read_to_string(&preds) {
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let p: Prediction = serde_json::from_str(line)
                .map_err(|e| Error::File { path: preds.clone(), message: format!("line {}: {e}", i + 1) })?;
            outcomes.0.insert(p.id, p.em);
        }
        if outcomes.n() != eval.n {
            return Err(Error::File {
                path: preds,
                message: format!("{} predictions but eval.json counts {} questions", outcomes.n(), eval.n),
            });
        }
    }
    Ok(Evaluation { eval, outcomes })
}

/// Reads `eval.json` (and `predictions.jsonl`) of each run directory, and
/// of each named set's sub-folder.
pub fn load_runs_with_sets(dirs: &[PathBuf], sets: &[String]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for dir in dirs {
        let main = load_evaluation(dir)?;
        let mut by_set = BTreeMap::new();
        for set in sets {
            by_set.insert(set.clone(), load_evaluation(&dir.join(set))?);
        }
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        runs.push(Run { name, dir: dir.clone(), eval: main.eval, outcomes: main.outcomes, sets: by_set });
    }
    if runs.is_empty() {
        return Err(Error::Empty("no run directories given".into()));
    }
    // Runs of different run directories may share a folder name (`cpo`):
    // those are named `PARENT/NAME` (`mmqa-qwen-onpolicy/cpo`).
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for r in &mut runs {
        if names.iter().filter(|n| **n == r.name).count() > 1 {
            let parent = r.dir.parent().and_then(|p| p.file_name()).map(|p| p.to_string_lossy().into_owned());
            r.name = format!("{}/{}", parent.unwrap_or_else(|| ".".into()), r.name);
        }
    }
    Ok(runs)
}

/// Reads `eval.json` of each run directory.
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<Run>> {
    load_runs_with_sets(dirs, &[])
}

/// One score of a run in the comparison: EM on some questions, and its
/// difference from the baseline on them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scored {
    /// Questions.
    pub n: usize,
    /// Exact match.
    pub em: f64,
    /// Difference from the baseline (absent for the baseline itself).
    pub vs_baseline: Option<Difference>,
}

/// Every run's scores on every column of the comparison: `all`, each
/// subset, each set. Columns in that order.
pub fn compare(runs: &[Run], cmp: &Comparison) -> Result<(String, Vec<String>, Vec<Vec<Scored>>)> {
    let base_name = cmp.baseline.clone().unwrap_or_else(|| runs[0].name.clone());
    let base = runs
        .iter()
        .find(|r| r.name == base_name)
        .ok_or_else(|| Error::Empty(format!("the baseline run {base_name:?} is not among the runs")))?;
    let mut columns = vec!["all".to_string()];
    columns.extend(cmp.subsets.iter().map(|(n, _)| n.clone()));
    columns.extend(cmp.sets.iter().cloned());
    let pick = |r: &Run, c: usize| -> Outcomes {
        if c == 0 {
            r.outcomes.clone()
        } else if c <= cmp.subsets.len() {
            r.outcomes.within(Some(&cmp.subsets[c - 1].1))
        } else {
            r.sets.get(&cmp.sets[c - 1 - cmp.subsets.len()]).map(|e| e.outcomes.clone()).unwrap_or_default()
        }
    };
    let rows = runs
        .iter()
        .map(|r| {
            (0..columns.len())
                .map(|c| {
                    let o = pick(r, c);
                    let vs = (r.name != base.name).then(|| paired_bootstrap(&o, &pick(base, c), RESAMPLES, c as u64));
                    Scored { n: o.n(), em: o.em(), vs_baseline: vs }
                })
                .collect()
        })
        .collect();
    Ok((base.name.clone(), columns, rows))
}

/// `summary.json`: per run, EM and n overall and per subset and set
/// (`em_<name>`, `n_<name>`), the adapter and the evaluation flags used.
pub fn summary_json(runs: &[Run], columns: &[String], rows: &[Vec<Scored>]) -> serde_json::Value {
    let mut arms = serde_json::Map::new();
    for (r, scores) in runs.iter().zip(rows) {
        let mut arm = serde_json::Map::new();
        for (c, s) in columns.iter().zip(scores) {
            let suffix = if c == "all" { String::new() } else { format!("_{c}") };
            arm.insert(format!("em{suffix}"), s.em.into());
            arm.insert(format!("n{suffix}"), s.n.into());
        }
        arm.insert("not_run".into(), r.eval.not_run.into());
        if let Some(a) = r.eval.setup.get("adapter").filter(|a| !a.is_null()) {
            arm.insert("adapter".into(), a.clone());
        }
        arm.insert("eval_args".into(), r.eval.setup.get("eval_args").cloned().unwrap_or_else(|| serde_json::json!([])));
        arms.insert(r.name.clone(), arm.into());
    }
    serde_json::json!({ "arms": arms })
}

fn comparison_markdown(base: &str, columns: &[String], runs: &[Run], rows: &[Vec<Scored>]) -> String {
    let mut md = format!(
        "\n## EM by question set, and the difference from {base}\n\nEM in %; Δ is the run's EM minus {base}'s on the \
         same questions, with its paired bootstrap 95% interval ({RESAMPLES} resamples) and the questions only the \
         run (+) or only {base} (−) got right.\n\n| run |"
    );
    for c in columns {
        md.push_str(&format!(" {c} (n) | Δ {c} [95% CI] |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|---:|".repeat(columns.len()));
    md.push('\n');
    for (r, scores) in runs.iter().zip(rows) {
        md.push_str(&format!("| {} |", r.name));
        for s in scores {
            md.push_str(&format!(" {} ({}) |", pct(s.em), s.n));
            match &s.vs_baseline {
                Some(d) => md.push_str(&format!(
                    " {:+.1} [{:+.1}, {:+.1}] +{}/−{} |",
                    d.diff * 100.0,
                    d.lo * 100.0,
                    d.hi * 100.0,
                    d.wins,
                    d.losses
                )),
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md
}

/// Writes what [`write_report`] writes, plus the comparison section of the
/// Markdown and `summary.json`; returns the Markdown.
pub fn write_report_comparing(runs: &[Run], cmp: &Comparison, out: &Path) -> Result<String> {
    let mut md = write_report(runs, out)?;
    let (base, columns, rows) = compare(runs, cmp)?;
    md.push_str(&comparison_markdown(&base, &columns, runs, &rows));
    if runs.len() > 1 {
        let png = out.join("differences.png");
        differences_chart(&base, &columns, runs, &rows, &png)
            .map_err(|e| Error::File { path: png.clone(), message: e.to_string() })?;
        md.push_str(&format!("\n![difference from {base} by question set, with 95% intervals](differences.png)\n"));
    }
    let path = out.join("report.md");
    std::fs::write(&path, &md).map_err(|e| Error::File { path, message: e.to_string() })?;
    let summary = out.join("summary.json");
    let text = serde_json::to_string_pretty(&summary_json(runs, &columns, &rows)).expect("summary serialises");
    std::fs::write(&summary, text).map_err(|e| Error::File { path: summary, message: e.to_string() })?;
    Ok(md)
}

/// `differences.png`: each run's EM difference from the baseline with its
/// interval, a panel per question set (colours as in `accuracy.png`).
fn differences_chart(
    base: &str,
    columns: &[String],
    runs: &[Run],
    rows: &[Vec<Scored>],
    png: &Path,
) -> tabletrace_plot::Result<()> {
    let panels: Vec<(String, Vec<Interval>)> = columns
        .iter()
        .enumerate()
        .map(|(c, column)| {
            let n = rows.iter().map(|r| r[c].n).max().unwrap_or(0);
            let intervals = runs
                .iter()
                .zip(rows)
                .enumerate()
                .filter(|(_, (r, _))| r.name != base)
                .map(|(i, (r, scores))| {
                    let d = scores[c].vs_baseline.as_ref();
                    let at = |f: fn(&Difference) -> f64| d.map_or(f64::NAN, f);
                    Interval {
                        label: r.name.clone(),
                        series: i,
                        value: at(|d| d.diff),
                        lo: at(|d| d.lo),
                        hi: at(|d| d.hi),
                    }
                })
                .collect();
            (format!("{column} (n={n})"), intervals)
        })
        .collect();
    interval_chart(&format!("EM MINUS {base}, 95% INTERVALS"), &panels, png)
}

fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

/// Writes `report.md`, `accuracy.png` and (when runs were trained)
/// `training.png` into `out`; returns the Markdown.
pub fn write_report(runs: &[Run], out: &Path) -> Result<String> {
    std::fs::create_dir_all(out).map_err(|e| Error::File { path: out.to_path_buf(), message: e.to_string() })?;
    let mut tables: Vec<String> = runs.iter().flat_map(|r| r.eval.by_tables.keys().cloned()).collect();
    tables.sort();
    tables.dedup();
    let mut kinds: Vec<String> = runs.iter().flat_map(|r| r.eval.by_kind.keys().cloned()).collect();
    kinds.sort();
    kinds.dedup();
    let mut md = String::from("# tabletrace report\n\n");
    md.push_str(&format!("Labels: {}. Scores in %.\n\n", runs[0].eval.labels));
    md.push_str("| run | n | EM | PM | F1 | numeric |");
    for t in &tables {
        md.push_str(&format!(" EM {t}-table |"));
    }
    md.push_str(" no final line |\n|---|---:|---:|---:|---:|---:|");
    for _ in &tables {
        md.push_str("---:|");
    }
    md.push_str("---:|\n");
    for r in runs {
        let e = &r.eval;
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            e.n,
            pct(e.em),
            pct(e.pm),
            pct(e.f1),
            pct(e.num)
        ));
        for t in &tables {
            md.push_str(&format!(" {} |", e.by_tables.get(t).map_or("-".into(), |b| pct(b.em))));
        }
        md.push_str(&format!(" {} |\n", e.no_final_line));
    }
    let not_run: Vec<String> =
        runs.iter().filter(|r| r.eval.not_run > 0).map(|r| format!("{} {}", r.name, r.eval.not_run)).collect();
    if !not_run.is_empty() {
        md.push_str(&format!(
            "\nQuestions counted as wrong because the model was not asked (preparation failed or the prompt \
             exceeds the context; see `predictions.jsonl`): {}.\n",
            not_run.join(", ")
        ));
    }
    md.push_str("\nEM by question kind:\n\n| run |");
    for k in &kinds {
        md.push_str(&format!(" {k} |"));
    }
    md.push_str("\n|---|");
    for _ in &kinds {
        md.push_str("---:|");
    }
    md.push('\n');
    for r in runs {
        md.push_str(&format!("| {} |", r.name));
        for k in &kinds {
            md.push_str(&format!(
                " {} |",
                r.eval.by_kind.get(k).map_or("-".into(), |b| format!("{} (n={})", pct(b.em), b.n))
            ));
        }
        md.push('\n');
    }
    // Each category says how many questions it holds (the first run's count):
    // a 50% bar over two questions is no finding.
    let mut cats = vec![format!("all\n(n={})", runs[0].eval.n)];
    cats.extend(tables.iter().map(|t| {
        let n = runs.iter().find_map(|r| r.eval.by_tables.get(t)).map_or(0, |b| b.n);
        format!("{t} tables\n(n={n})")
    }));
    let series: Vec<(String, Vec<f64>)> = runs
        .iter()
        .map(|r| {
            let mut v = vec![r.eval.em];
            v.extend(tables.iter().map(|t| r.eval.by_tables.get(t).map_or(f64::NAN, |b| b.em)));
            (r.name.clone(), v)
        })
        .collect();
    let acc = out.join("accuracy.png");
    bar_chart("EXACT MATCH BY SPLIT", &cats, &series, &acc)
        .map_err(|e| Error::File { path: acc.clone(), message: e.to_string() })?;
    md.push_str("\n![accuracy by split](accuracy.png)\n");
    let curves: Vec<Series> = runs
        .iter()
        .filter_map(|r| {
            let text = std::fs::read_to_string(r.dir.join("metrics.jsonl")).ok()?;
            let points: Vec<(f64, f64)> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?)))
                .collect();
            (!points.is_empty()).then(|| Series { name: r.name.clone(), points })
        })
        .collect();
    if !curves.is_empty() {
        let png = out.join("training.png");
        line_charts(&[Panel { title: "TRAINING LOSS".into(), x_label: "STEP".into(), series: curves }], &png)
            .map_err(|e| Error::File { path: png.clone(), message: e.to_string() })?;
        md.push_str("\n![training loss](training.png)\n");
    }
    let path = out.join("report.md");
    std::fs::write(&path, &md).map_err(|e| Error::File { path, message: e.to_string() })?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder with an eval.json and predictions: `right` says which of q0..qN it got right.
    fn run(dir: &Path, right: &[bool]) {
        std::fs::create_dir_all(dir).unwrap();
        let preds: Vec<String> = right
            .iter()
            .enumerate()
            .map(|(i, r)| {
                serde_json::json!({"id": format!("q{i}"), "prompt": "", "output": "", "answer": "", "gold": "",
                    "n_tables": 2, "kind": "count", "em": r, "pm": 0.0, "f1": 0.0, "num": r})
                .to_string()
            })
            .collect();
        std::fs::write(dir.join("predictions.jsonl"), preds.join("\n")).unwrap();
        let em = right.iter().filter(|r| **r).count() as f64 / right.len() as f64;
        let eval = serde_json::json!({"n": right.len(), "em": em, "pm": 0.0, "f1": 0.0, "num": em, "by_tables": {},
            "by_kind": {}, "labels": "executed", "no_final_line": 0, "setup": {"adapter": "a", "eval_args": ["--x"]}});
        std::fs::write(dir.join("eval.json"), eval.to_string()).unwrap();
    }

    #[test]
    fn runs_are_compared_on_subsets_with_the_baseline_and_named_uniquely() {
        let d = tempfile::tempdir().unwrap();
        run(&d.path().join("a/sft-qa"), &[true, false, false, true]);
        run(&d.path().join("a/cpo"), &[true, true, false, false]);
        run(&d.path().join("b/cpo"), &[true, true, true, true]);
        let dirs: Vec<PathBuf> = ["a/sft-qa", "a/cpo", "b/cpo"].iter().map(|p| d.path().join(p)).collect();
        let runs = load_runs(&dirs).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["sft-qa", "a/cpo", "b/cpo"]);
        let subset: HashSet<String> = ["q1", "q2"].iter().map(|s| s.to_string()).collect();
        let cmp =
            Comparison { subsets: vec![("unseen".into(), subset)], sets: vec![], baseline: Some("sft-qa".into()) };
        let (base, columns, rows) = compare(&runs, &cmp).unwrap();
        assert_eq!((base.as_str(), columns.clone()), ("sft-qa", vec!["all".to_string(), "unseen".to_string()]));
        // a/cpo: 2/4 overall like the baseline; on {q1, q2} 1/2 against 0/2.
        assert_eq!((rows[1][0].em, rows[1][1].em, rows[1][1].n), (0.5, 0.5, 2));
        let d1 = rows[1][1].vs_baseline.as_ref().unwrap();
        assert_eq!((d1.wins, d1.losses), (1, 0));
        assert!((d1.diff - 0.5).abs() < 1e-12);
        assert!(rows[0][0].vs_baseline.is_none(), "no difference for the baseline itself");
        let summary = summary_json(&runs, &columns, &rows);
        assert_eq!(summary["arms"]["b/cpo"]["em"], 1.0);
        assert_eq!(summary["arms"]["b/cpo"]["em_unseen"], 1.0);
        assert_eq!(summary["arms"]["a/cpo"]["n_unseen"], 2);
        assert_eq!(summary["arms"]["sft-qa"]["eval_args"], serde_json::json!(["--x"]));
        // The written report shows the differences as a chart, and says how many
        // questions each bar of the accuracy chart holds.
        let out = d.path().join("report");
        let md = write_report_comparing(&runs, &cmp, &out).unwrap();
        assert!(md.contains("![difference from sft-qa by question set, with 95% intervals](differences.png)"), "{md}");
        let png = std::fs::read(out.join("differences.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // An unknown baseline is named.
        let bad = Comparison { baseline: Some("dpo".into()), ..cmp };
        assert!(compare(&runs, &bad).unwrap_err().to_string().contains("\"dpo\""));
    }
}
