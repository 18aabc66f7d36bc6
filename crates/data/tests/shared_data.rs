//! The full public data in ../shared/data (present in CI): the figures the
//! data layer must reach. Each test returns early, saying so, without it.

use tabletrace_data::{check, load, Answer, ExecLimits, LoadOptions, Provenance, Silent};

use crate::util::shared_data;

#[test]
fn spider_train_loads_and_runs() {
    let Some(data) = shared_data() else { return };
    let ds = load(&data.join("spider/train_spider.json"), &LoadOptions::default()).unwrap();
    assert_eq!(ds.items(), 7000);
    assert_eq!(ds.errors.len(), 96, "the 96 questions on baseball_1 and soccer_1");
    assert!(ds.errors.iter().all(|e| e.message.contains("baseball_1") || e.message.contains("soccer_1")));
    assert!(ds.errors.iter().all(|e| e.message.contains("not found")));
    let r = check(&ds, ExecLimits::default(), &Silent);
    assert!(r.sql_ok >= 6895, "{} gold queries ran", r.sql_ok);
}

#[test]
fn mmqa_loads_runs_and_agrees_with_executed_labels() {
    let Some(data) = shared_data() else { return };
    let mut items = 0;
    let (mut load_errors, mut ok, mut with, mut agree) = (0, 0, 0, 0);
    for f in ["mmqa_two_table.jsonl", "mmqa_three_table.jsonl"] {
        let ds = load(&data.join("mmqa").join(f), &LoadOptions::default()).unwrap();
        items += ds.items();
        load_errors += ds.errors.len();
        assert!(ds.errors.iter().all(|e| e.message.contains("spider_db_id is null")), "{:?}", ds.errors.first());
        let r = check(&ds, ExecLimits::default(), &Silent);
        ok += r.sql_ok;
        with += r.with_executed_label;
        agree += r.agree_executed;
    }
    assert_eq!(items, 2981);
    assert_eq!(load_errors, 69);
    assert!(ok >= 2735, "{ok} gold queries ran");
    assert!(agree as f64 >= 0.99 * ok as f64, "{agree} of {with} agree");
}

#[test]
fn the_21_original_records_parse() {
    let Some(data) = shared_data() else { return };
    let ds = load(&data.join("mmqa/mmqa_two_table_original_records.json"), &LoadOptions::default()).unwrap();
    assert_eq!(ds.questions.len(), 21);
    assert!(ds.errors.is_empty());
    assert!(ds.questions.iter().all(|q| q.gold(Provenance::Published).is_some()));
    assert!(ds.questions.iter().any(|q| matches!(q.gold(Provenance::Published), Some(Answer::Table(_)))));
}
