//! The bundled sample loads and checks completely.

use tabletrace_data::{check, load, Answer, ExecLimits, LoadOptions, Provenance, Silent, Split, TableSource};

use crate::util::sample;

#[test]
fn sample_loads_and_every_executed_label_agrees() {
    let ds = load(&sample(), &LoadOptions::default()).unwrap();
    assert!(ds.errors.is_empty(), "{:?}", ds.errors.first());
    assert_eq!(ds.sources.len(), 4, "two MMQA jsonl, the original records, Spider questions");
    let report = check(&ds, ExecLimits::default(), &Silent);
    assert_eq!(report.questions, 435);
    assert!(report.with_executed_label > 200);
    assert_eq!(
        report.agree_executed,
        report.with_executed_label,
        "{:?}",
        report.issues.iter().find(|i| i.kind == "disagrees_executed")
    );
    // The only failing gold queries are the 12 that reach a table outside the question's two.
    assert_eq!(report.sql_error, 12);
    assert!(report.issues.iter().filter(|i| i.kind == "sql_error").all(|i| i.message.contains("no such table")));
}

#[test]
fn mmqa_questions_have_splits_ids_and_both_labels() {
    let ds = load(&sample().join("mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap();
    let q = ds.questions.iter().find(|q| q.id.0 == "mmqa_two_table:0").unwrap();
    assert_eq!(q.split, Some(Split::Train));
    assert_eq!(q.n_tables(), 2);
    assert!(matches!(q.tables, TableSource::Sqlite { isolate: true, .. }));
    assert_eq!(q.gold(Provenance::Published).unwrap().values(), vec!["Treasury", "115897"]);
    assert_eq!(q.gold(Provenance::Executed).unwrap().values(), vec!["Treasury", "231794.0"]);
    assert!(ds.questions.iter().any(|q| q.split == Some(Split::Val)));
}

#[test]
fn original_records_parse_dict_answers() {
    let ds = load(&sample().join("mmqa/mmqa_two_table_original_records.json"), &LoadOptions::default()).unwrap();
    assert_eq!(ds.questions.len(), 21);
    let dicts: Vec<_> =
        ds.questions.iter().filter(|q| matches!(q.gold(Provenance::Published), Some(Answer::Table(_)))).collect();
    assert_eq!(dicts.len(), 1);
    assert_eq!(dicts[0].gold(Provenance::Published).unwrap().values().len(), 13);
    let TableSource::Inline { db, .. } = &ds.questions[0].tables else { panic!("records embed rows") };
    assert_eq!(db.tables[0].rows.len(), 15);
    assert_eq!(db.tables[0].name, "department");
}

#[test]
fn spider_questions_take_tables_from_their_sql() {
    let ds = load(&sample().join("spider/train_spider.json"), &LoadOptions::default()).unwrap();
    assert_eq!(ds.questions.len(), 166);
    let joins = ds.questions.iter().filter(|q| q.n_tables() >= 2).count();
    assert!(joins > 20, "{joins}");
    assert!(ds.questions.iter().all(|q| q.split == Some(Split::Train)));
}
