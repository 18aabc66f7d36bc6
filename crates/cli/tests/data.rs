//! `tabletrace data inspect|check|prompt`.

use crate::{stderr, stdout, tabletrace};

#[test]
fn check_json_has_the_documented_fields() {
    let o = tabletrace(&["data", "check", "data/sample", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("stdout is JSON alone");
    for key in
        ["questions", "loaded", "load_errors", "sql_ok", "sql_error", "agree_executed", "agree_published", "seconds"]
    {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["questions"], 435);
    assert_eq!(v["load_errors"], 0);
    assert_eq!(v["sql_error"], 12);
    assert_eq!(v["agree_executed"], v["with_executed_label"]);
}

#[test]
fn strict_turns_failures_into_a_nonzero_exit() {
    let o = tabletrace(&["data", "check", "data/sample/mmqa/mmqa_two_table.jsonl"]);
    assert!(o.status.success());
    let o = tabletrace(&["data", "check", "data/sample/mmqa/mmqa_two_table.jsonl", "--strict"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("12 gold queries failed"), "{}", stderr(&o));
    let o = tabletrace(&["data", "check", "data/sample/mmqa/mmqa_three_table.jsonl", "--strict"]);
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn spider_with_db_dir() {
    let o = tabletrace(&[
        "data",
        "check",
        "data/sample/spider/train_spider.json",
        "--db-dir",
        "data/sample/spider/database",
        "--tables",
        "data/sample/spider/tables.json",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["sql_ok"], 166);
}

#[test]
fn inspect_summarises_questions_and_databases() {
    let o = tabletrace(&["data", "inspect", "data/sample/mmqa/mmqa_three_table.jsonl"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("questions: 136 loaded, 0 failed to load"), "{out}");
    assert!(out.contains("tables per question: 3 126, 4 7, 5 3"), "{out}");
    let o = tabletrace(&["data", "inspect", "data/sample/spider/database/farm/farm.sqlite"]);
    let out = stdout(&o);
    assert!(out.contains("farm_competition") && out.contains("foreign key"), "{out}");
}

#[test]
fn prompt_prints_question_tables_and_gold() {
    let o = tabletrace(&[
        "data",
        "prompt",
        "data/sample/mmqa/mmqa_two_table.jsonl",
        "--id",
        "mmqa_two_table:0",
        "--max-rows",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("# Question mmqa_two_table:0\nWhich department"), "{out}");
    assert!(out.contains("(3 of 15 rows shown; 12 rows left out)"), "{out}");
    assert!(out.contains("# Gold answer (Executed)\nTreasury, 231794.0"), "{out}");
}

#[test]
fn errors_name_the_path_or_id() {
    let o = tabletrace(&["data", "check", "no/such/file.jsonl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no/such/file.jsonl does not exist"), "{}", stderr(&o));
    let o = tabletrace(&["data", "prompt", "data/sample/mmqa/mmqa_two_table.jsonl", "--id", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no question with id \"nope\""), "{}", stderr(&o));
    let o = tabletrace(&["data", "check", "data/sample/mmqa/mmqa_two_table.jsonl", "--db-dir", "missing_dir"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--db-dir missing_dir is not a folder"), "{}", stderr(&o));
}
