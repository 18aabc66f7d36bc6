//! Prompt rendering: schema header, keys, budgets, determinism.

use tabletrace_data::{approx_tokens, load, render_tables, Budget, LoadOptions, RowFormat, TableDb};

use crate::util::sample;

fn question(id: &str) -> tabletrace_data::Question {
    let ds = load(&sample().join("mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap();
    ds.questions.into_iter().find(|q| q.id.0 == id).unwrap()
}

#[test]
fn header_names_columns_types_and_keys() {
    let q = question("mmqa_two_table:0");
    let db = TableDb::open(&q.tables).unwrap();
    let r = render_tables(&db, q.asked(), RowFormat::Markdown, &Budget::default(), &approx_tokens).unwrap();
    assert!(r.text.starts_with("Table: department\nColumns: Department_ID (integer), Name (text),"), "{}", r.text);
    assert!(r.text.contains("Primary key: department_ID, head_ID"));
    assert!(r.text.contains("- management.department_ID -> department.Department_ID"));
    assert!(r.text.contains("| 2 | Treasury | 1789 | 2 | 11.1 | 115897.0 |"));
    assert_eq!((r.rows_shown, r.rows_total), (20, 20));
    let again = render_tables(&db, q.asked(), RowFormat::Markdown, &Budget::default(), &approx_tokens).unwrap();
    assert_eq!(r, again, "rendering is deterministic");
}

#[test]
fn row_budget_keeps_rows_the_question_text_mentions() {
    let mut q = question("mmqa_two_table:0");
    let db = TableDb::open(&q.tables).unwrap();
    let budget = Budget { max_rows_per_table: Some(2), max_tokens: None };
    let r = render_tables(&db, q.asked(), RowFormat::Csv, &budget, &approx_tokens).unwrap();
    assert!(r.text.contains("(2 of 15 rows shown; 13 rows left out)"));
    assert!(r.text.contains("(2 of 5 rows shown; 3 rows left out)"));
    // Without a mention, rows come in storage order; a department the
    // question names comes first.
    let mgmt = r.text.split("Table: management").nth(1).unwrap();
    assert!(mgmt.contains("department_ID,head_ID,temporary_acting\n2,5,Yes\n15,4,Yes\n"), "{mgmt}");
    q.text = "How many employees does the Treasury have?".into();
    let r = render_tables(&db, q.asked(), RowFormat::Csv, &budget, &approx_tokens).unwrap();
    let dept = r.text.split("Table: management").next().unwrap();
    assert!(dept.contains(",Treasury,"), "{dept}");
}

/// The prompt is built from the question as asked: changing its gold SQL
/// and gold answers changes nothing, under every budget, while changing its
/// text can change the rows picked.
#[test]
fn prompts_do_not_depend_on_gold() {
    use tabletrace_data::{Answer, GoldAnswer, Provenance};
    let q = question("mmqa_two_table:0");
    let db = TableDb::open(&q.tables).unwrap();
    let mut forged = q.clone();
    forged.gold_sql = Some("SELECT * FROM management WHERE temporary_acting = 'No' AND head_ID = 10".into());
    forged.gold =
        vec![GoldAnswer { provenance: Provenance::Executed, answer: Answer::Text { text: "Commerce, 36000".into() } }];
    for budget in [
        Budget::default(),
        Budget { max_rows_per_table: Some(2), max_tokens: None },
        Budget { max_rows_per_table: None, max_tokens: Some(200) },
    ] {
        let a = render_tables(&db, q.asked(), RowFormat::Markdown, &budget, &approx_tokens).unwrap();
        let b = render_tables(&db, forged.asked(), RowFormat::Markdown, &budget, &approx_tokens).unwrap();
        assert_eq!(a, b, "budget {budget:?}");
    }
    let mut asked_otherwise = q.clone();
    asked_otherwise.text = "Which department has head 10 as a non-acting manager?".into();
    let budget = Budget { max_rows_per_table: Some(2), max_tokens: None };
    let a = render_tables(&db, q.asked(), RowFormat::Markdown, &budget, &approx_tokens).unwrap();
    let c = render_tables(&db, asked_otherwise.asked(), RowFormat::Markdown, &budget, &approx_tokens).unwrap();
    assert_ne!(a.text, c.text, "the question text picks rows");
}

#[test]
fn whole_tables_by_default() {
    let q = question("mmqa_two_table:0");
    let db = TableDb::open(&q.tables).unwrap();
    let r = render_tables(&db, q.asked(), RowFormat::Markdown, &Budget::default(), &approx_tokens).unwrap();
    assert!(r.is_whole() && r.fits && !r.text.contains("left out"), "{}", r.text);
}

#[test]
fn token_budget_is_respected() {
    let q = question("mmqa_two_table:0");
    let db = TableDb::open(&q.tables).unwrap();
    let skeleton = render_tables(
        &db,
        q.asked(),
        RowFormat::Markdown,
        &Budget { max_rows_per_table: None, max_tokens: Some(1) },
        &approx_tokens,
    )
    .unwrap();
    assert!(!skeleton.fits);
    assert_eq!(skeleton.rows_shown, 0);
    let mut shown = Vec::new();
    for max in [skeleton.tokens, skeleton.tokens + 40, skeleton.tokens + 120, 10_000] {
        let budget = Budget { max_rows_per_table: None, max_tokens: Some(max) };
        let r = render_tables(&db, q.asked(), RowFormat::Markdown, &budget, &approx_tokens).unwrap();
        assert!(r.fits && r.tokens <= max, "{} tokens for a budget of {max}", r.tokens);
        shown.push(r.rows_shown);
    }
    assert_eq!(shown[0], 0);
    assert!(shown[0] < shown[1] && shown[1] < shown[2] && shown[3] == 20, "{shown:?}");
}
