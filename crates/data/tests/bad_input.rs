//! Bad input gets a clear error or a recorded failure, never a panic.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tabletrace_data::{
    check, load, load_csv_dir, render_tables, Budget, Database, Error, ExecLimits, FailureKind, LoadOptions, RowFormat,
    Silent, Table, TableDb, TableRef, TableSource, Value,
};

use crate::util::sample;

fn inline(tables: Vec<Table>) -> TableSource {
    TableSource::Inline {
        db: Arc::new(Database { name: "t".into(), tables, foreign_keys: vec![] }),
        declared_types: true,
    }
}

#[test]
fn truncated_json_file_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(sample().join("mmqa/mmqa_two_table_original_records.json")).unwrap();
    let path = dir.path().join("records.json");
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let err = load(&path, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Json { line: Some(_), .. }), "{msg}");
    assert!(msg.contains("records.json:") && msg.contains("truncated"), "{msg}");
}

#[test]
fn truncated_jsonl_line_is_a_load_error_and_the_rest_loads() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sample().join("mmqa/mmqa_two_table.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().take(3).collect();
    let path = dir.path().join("mmqa_two_table.jsonl");
    std::fs::write(&path, format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..lines[2].len() / 2])).unwrap();
    let opts = LoadOptions { db_dir: Some(sample().join("spider/database")), ..Default::default() };
    let ds = load(&path, &opts).unwrap();
    assert_eq!(ds.questions.len(), 2);
    assert_eq!(ds.errors.len(), 1);
    assert!(ds.errors[0].location.ends_with("mmqa_two_table.jsonl:3"), "{}", ds.errors[0]);
    assert!(ds.errors[0].message.contains("invalid JSON"), "{}", ds.errors[0]);
}

#[test]
fn non_utf8_bytes_are_reported_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sample().join("mmqa/mmqa_two_table.jsonl")).unwrap();
    let first = text.lines().next().unwrap();
    let mut bytes = first.as_bytes().to_vec();
    bytes.push(b'\n');
    bytes.extend_from_slice(
        &first.as_bytes().to_vec().iter().map(|&b| if b == b'W' { 0xE9 } else { b }).collect::<Vec<_>>(),
    );
    let path = dir.path().join("latin1.jsonl");
    std::fs::write(&path, bytes).unwrap();
    let opts = LoadOptions { db_dir: Some(sample().join("spider/database")), ..Default::default() };
    let ds = load(&path, &opts).unwrap();
    assert_eq!(ds.questions.len(), 1);
    assert_eq!(ds.errors.len(), 1);
    assert!(ds.errors[0].location.ends_with("latin1.jsonl:2"), "{}", ds.errors[0]);
    assert!(ds.errors[0].message.contains("UTF-8"), "{}", ds.errors[0]);

    // A CSV file with a Latin-1 byte names the file and line.
    let csv_dir = dir.path().join("csv");
    std::fs::create_dir(&csv_dir).unwrap();
    std::fs::write(csv_dir.join("people.csv"), b"id,name\n1,Ann\n2,Jos\xe9\n").unwrap();
    let err = load_csv_dir(&csv_dir).unwrap_err().to_string();
    assert!(err.contains("people.csv") && err.contains("line 3") && err.contains("UTF-8"), "{err}");
}

#[test]
fn missing_database_file_is_a_load_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sample().join("mmqa/mmqa_two_table.jsonl")).unwrap();
    let line = text
        .lines()
        .next()
        .unwrap()
        .replace("\"spider_db_id\": \"department_management\"", "\"spider_db_id\": \"nowhere_db\"");
    assert!(line.contains("nowhere_db"), "the fixture line names department_management");
    let path = dir.path().join("q.jsonl");
    let good = text.lines().nth(1).unwrap();
    std::fs::write(&path, format!("{line}\n{good}\n")).unwrap();
    let opts = LoadOptions { db_dir: Some(sample().join("spider/database")), ..Default::default() };
    let ds = load(&path, &opts).unwrap();
    assert_eq!(ds.errors.len(), 1);
    let e = &ds.errors[0];
    assert!(e.location.contains("q.jsonl:1") && e.location.contains("question q:0"), "{e}");
    assert!(e.message.contains("nowhere_db/nowhere_db.sqlite") && e.message.contains("not found"), "{e}");

    // Spider: the same for a db_id without a folder.
    let spider = dir.path().join("spider.json");
    std::fs::write(&spider, r#"[{"question": "How many?", "query": "SELECT count(*) FROM t", "db_id": "ghost_db"}]"#)
        .unwrap();
    // Its only question fails, so nothing loads: the error carries the reason.
    let e = load(&spider, &LoadOptions { db_dir: Some(dir.path().to_path_buf()), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("none of its 1 items loaded") && e.to_string().contains("ghost_db.sqlite"), "{e}");
}

#[test]
fn table_named_in_sql_but_absent_is_a_recorded_failure() {
    let t = Table::from_rows("present", vec!["x".into()], vec![vec![Value::Integer(1)]]);
    let db = TableDb::open(&inline(vec![t])).unwrap();
    let f = db.query("SELECT x FROM ghost", &ExecLimits::default()).unwrap_err();
    assert_eq!(f.kind, FailureKind::Error);
    assert!(f.message.contains("no such table: ghost"), "{}", f.message);

    // A MMQA question whose SQL reaches outside its two tables fails the same way in `check`.
    let ds = load(&sample().join("mmqa/mmqa_two_table.jsonl"), &LoadOptions::default()).unwrap();
    let report = check(&ds, ExecLimits::default(), &Silent);
    let issue =
        report.issues.iter().find(|i| i.question_id == "mmqa_two_table:2242").expect("question 2242 uses table movie");
    assert_eq!(issue.kind, "sql_error");
    assert!(issue.message.contains("no such table: movie"));

    // A table the dataset names but the database lacks.
    let source = TableSource::Sqlite {
        path: sample().join("spider/database/farm/farm.sqlite"),
        tables: vec![TableRef { name: "barn".into(), source: "barn".into(), rename: None }],
        isolate: true,
        declared_types: false,
    };
    let f = TableDb::open(&source).unwrap_err();
    assert_eq!(f.kind, FailureKind::Setup);
    assert!(f.message.contains("farm.sqlite") && f.message.contains("\"barn\""), "{}", f.message);
}

#[test]
fn empty_table_loads_queries_and_renders() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.csv"), "id,name\n").unwrap();
    std::fs::write(dir.path().join("full.csv"), "id,empty_id\n1,\n").unwrap();
    let ds = load_csv_dir(dir.path()).unwrap();
    let (_, source) = &ds.databases[0];
    let db = TableDb::open(source).unwrap();
    let rs = db.query("SELECT count(*) FROM empty", &ExecLimits::default()).unwrap();
    assert_eq!(rs.rows, vec![vec![Value::Integer(0)]]);
    let rs = db.query("SELECT * FROM empty", &ExecLimits::default()).unwrap();
    assert_eq!((rs.n_rows, rs.columns.len()), (0, 2));
    let q = tabletrace_data::Question {
        id: tabletrace_data::QuestionId("csv:1".into()),
        text: "Who?".into(),
        tables: source.clone(),
        gold_sql: None,
        gold: vec![],
        split: None,
        key_hints: Default::default(),
        origin: tabletrace_data::Origin { path: dir.path().into(), line: None },
    };
    let r = render_tables(&db, q.asked(), RowFormat::Markdown, &Budget::default(), &tabletrace_data::approx_tokens)
        .unwrap();
    assert!(r.text.contains("Table: empty\nColumns: id, name\n| id | name |\n|---|---|\n\n"), "{}", r.text);
    assert_eq!((r.rows_shown, r.rows_total), (1, 1));
}

#[test]
fn hundred_thousand_rows_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.sqlite");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE big (id INTEGER PRIMARY KEY, label TEXT, score REAL);
             WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 100000)
             INSERT INTO big SELECT i, 'row ' || i, i * 0.5 FROM c;",
        )
        .unwrap();
    }
    let source = TableSource::Sqlite {
        path: path.clone(),
        tables: vec![TableRef { name: "big".into(), source: "big".into(), rename: None }],
        isolate: true,
        declared_types: true,
    };
    let db = TableDb::open(&source).unwrap();
    let limits = ExecLimits { max_rows: 100, ..ExecLimits::default() };
    let rs = db.query("SELECT * FROM big", &limits).unwrap();
    assert_eq!(rs.rows.len(), 100, "only max_rows rows are kept");
    assert_eq!(rs.n_rows, 100_000, "every row is counted");
    assert!(rs.truncated);

    // The prompt keeps the row the SQL asks for, within a 20-row budget.
    let q = tabletrace_data::Question {
        id: tabletrace_data::QuestionId("big:1".into()),
        text: "What is the score of row 77777?".into(),
        tables: source.clone(),
        gold_sql: Some("SELECT score FROM big WHERE label = 'row 77777'".into()),
        gold: vec![],
        split: None,
        key_hints: Default::default(),
        origin: tabletrace_data::Origin { path, line: None },
    };
    let budget = Budget { max_rows_per_table: Some(20), max_tokens: None };
    let r = render_tables(&db, q.asked(), RowFormat::Csv, &budget, &tabletrace_data::approx_tokens).unwrap();
    assert_eq!((r.rows_shown, r.rows_total), (20, 100_000));
    assert!(r.text.contains("77777,row 77777,38888.5"), "{}", &r.text[..400.min(r.text.len())]);
    assert!(r.text.contains("(20 of 100000 rows shown; 99980 rows left out)"));
}

#[test]
fn a_query_that_never_ends_times_out() {
    let db = TableDb::open(&inline(vec![])).unwrap();
    let limits = ExecLimits { timeout: Duration::from_millis(200), max_rows: 10 };
    let sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    let f = db.query(sql, &limits).unwrap_err();
    assert_eq!(f.kind, FailureKind::Timeout, "{}", f.message);
    // The connection is usable afterwards.
    let rs = db.query("SELECT 1", &limits).unwrap();
    assert_eq!(rs.rows, vec![vec![Value::Integer(1)]]);
}

#[test]
fn unknown_format_and_missing_path_say_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::File::create(&p).unwrap().write_all(b"hello").unwrap();
    let msg = load(&p, &LoadOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("notes.txt") && msg.contains("expected"), "{msg}");
    let p = dir.path().join("other.json");
    std::fs::write(&p, r#"[{"a": 1}]"#).unwrap();
    let msg = load(&p, &LoadOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("other.json") && msg.contains("Spider questions"), "{msg}");
    let p = dir.path().join("fake.sqlite");
    std::fs::write(&p, b"not a database at all, just text").unwrap();
    let msg = load(&p, &LoadOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("fake.sqlite") && msg.contains("not a database"), "{msg}");
}

#[test]
fn a_csv_folder_with_keys_json_loads_through_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dept.csv"), "id,name\n1,Treasury\n2,Defense\n").unwrap();
    std::fs::write(dir.path().join("head.csv"), "id,dept_id,age\n1,1,56\n2,2,61\n").unwrap();
    std::fs::write(
        dir.path().join("keys.json"),
        r#"{"primary_keys": {"dept": ["id"]}, "foreign_keys": [{"from": "head.dept_id", "to": "dept.id"}]}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("questions.jsonl"), "{\"id\": 1, \"question\": \"How many heads?\"}\n").unwrap();
    let ds = load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!((ds.questions.len(), ds.errors.len()), (1, 0), "{:?}", ds.errors);
    let TableSource::Inline { db, .. } = &ds.questions[0].tables else { panic!("CSV tables are inline") };
    assert_eq!(db.foreign_keys.len(), 1);
}

#[test]
fn nothing_loaded_is_an_error_and_a_json_array_named_jsonl_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let msg = load(&empty, &LoadOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("empty.jsonl: nothing loaded") && msg.contains("is the file empty?"), "{msg}");
    // Every line fails: the error says so with the first failure.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"a\": 1}\n{\"a\": 2}\n").unwrap();
    let msg = load(&bad, &LoadOptions::default()).unwrap_err().to_string();
    assert!(
        msg.contains("bad.jsonl: nothing loaded: none of its 2 items loaded; the first: ")
            && msg.contains("bad.jsonl:1"),
        "{msg}"
    );
    // A pretty-printed JSON array saved as .jsonl: one error naming the format.
    let array = dir.path().join("records.jsonl");
    std::fs::copy(sample().join("mmqa/mmqa_two_table_original_records.json"), &array).unwrap();
    let msg = load(&array, &LoadOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("records.jsonl") && msg.contains("holds a JSON array, not JSON lines"), "{msg}");
}
