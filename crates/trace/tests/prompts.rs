//! The one prompt builder: what a model reads never depends on gold.

use std::path::PathBuf;

use tabletrace_data::{load, Answer, Budget, GoldAnswer, LoadOptions, Provenance, TableDb};
use tabletrace_trace::{PromptStyle, Prompter};

/// Every question of the sample, under whole-table and tight budgets and in
/// both prompt styles: replacing the gold SQL and the gold answers leaves
/// the prompt byte for byte the same.
#[test]
fn prompts_are_the_same_whatever_the_gold() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let qs = load(&root.join("data/sample/mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap().questions;
    let prompters = [
        Prompter::default(),
        Prompter { budget: Budget { max_rows_per_table: None, max_tokens: Some(250) }, ..Prompter::default() },
        Prompter { budget: Budget { max_rows_per_table: Some(3), max_tokens: None }, ..Prompter::default() },
    ];
    let mut cut = 0;
    for q in qs.iter().take(40) {
        let db = TableDb::open(&q.tables).unwrap();
        let mut forged = q.clone();
        forged.gold_sql = Some(format!("SELECT 'decoy {}' , 4242 FROM sqlite_master", q.id));
        forged.gold =
            vec![GoldAnswer { provenance: Provenance::Executed, answer: Answer::Text { text: "decoy, 4242".into() } }];
        for p in &prompters {
            for style in [PromptStyle::Trace, PromptStyle::Qa] {
                let a = p.prompt(&db, q, style).unwrap();
                let b = p.prompt(&db, &forged, style).unwrap();
                assert_eq!(a, b, "{} under {p:?}", q.id);
                cut += usize::from(!a.tables.is_whole());
            }
        }
    }
    assert!(cut > 40, "the tight budgets cut tables ({cut} prompts cut): the row choice was exercised");
}

#[test]
fn the_styles_ask_for_steps_or_the_answer_alone() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let qs = load(&root.join("data/sample/mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap().questions;
    let db = TableDb::open(&qs[0].tables).unwrap();
    let p = Prompter::default();
    let trace = p.prompt(&db, &qs[0], PromptStyle::Trace).unwrap().text;
    let qa = p.prompt(&db, &qs[0], PromptStyle::Qa).unwrap().text;
    assert!(trace.contains("Reason step by step") && trace.contains(&qs[0].text), "{trace}");
    assert!(qa.contains("Give only the answer") && qa.contains("Table: department"), "{qa}");
}
