//! Turning a question into validated [`Trace`] records with the program
//! tracer: one positive (the gold SQL traced) and negatives (typed
//! perturbations).
//!
//! A program trace states counts and values computed over whole tables, so
//! it is only made for questions whose prompt shows every row of every
//! table (see [`program_traces`]): a trace never cites rows the model could
//! not see.

use tabletrace_data::{Answer, ErrorType, Polarity, Provenance, Question, ResultSet, TableDb, Trace, Value};

use crate::perturb::negatives;
use crate::program::{ProgramTrace, ProgramTracer, StepCache};
use crate::prompts::Prompter;
use crate::validate::{extract_final_answer, faithfulness, matches_gold, Evidence};

/// Why a question gets no program trace when its tables do not fit.
pub const NOT_WHOLE: &str = "its tables do not fit the prompt whole, and a program trace would cite rows the model \
                             cannot see";

/// Which traces to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// Make the positive trace.
    pub positive: bool,
    /// Negatives per question at most (0 for none).
    pub negatives: usize,
}

/// The gold answer traces are validated against: the stored executed answer,
/// else the result of running the gold SQL.
pub fn gold_answer(q: &Question, db: &TableDb, tracer: &ProgramTracer) -> Result<Answer, String> {
    if let Some(a) = q.gold(Provenance::Executed) {
        return Ok(a.clone());
    }
    let sql = q.gold_sql.as_deref().ok_or("the question has no gold SQL and no executed answer")?;
    db.query(sql, &tracer.limits).map(Answer::Table).map_err(|f| format!("gold SQL fails: {}", f.message))
}

/// Program traces for one question, validated. Questions whose gold SQL
/// cannot be traced, or whose tables the prompt (built by `prompter`) does
/// not show whole, give an error naming why.
pub fn program_traces(
    q: &Question,
    tracer: &ProgramTracer,
    prompter: &Prompter,
    wanted: Wanted,
    seed: u64,
) -> Result<Vec<Trace>, String> {
    let sql = q.gold_sql.as_deref().ok_or("no gold SQL")?;
    let db = TableDb::open(&q.tables).map_err(|f| f.message)?;
    let shown = prompter.tables(&db, q).map_err(|f| f.message)?;
    if !shown.is_whole() {
        return Err(format!(
            "{}: {} (the prompt shows {} of {} rows within its budget of {} tokens)",
            q.id,
            NOT_WHOLE,
            shown.rows_shown,
            shown.rows_total,
            prompter.budget.max_tokens.map_or("unlimited".to_string(), |t| t.to_string())
        ));
    }
    let gold = gold_answer(q, &db, tracer)?;
    let cache = StepCache::default();
    let positive = tracer.trace(&db, sql, &cache)?;
    // What a trace may cite: table cells, schema names and the question's words.
    let (table_evidence, schema_names) = question_evidence(q, &db);
    let mut out = Vec::new();
    let record = |t: &ProgramTrace, polarity: Polarity, valid: Result<(), String>| {
        let mut evidence = table_evidence.clone();
        for e in &t.evidence {
            evidence.add(e);
        }
        Trace {
            question_id: q.id.to_string(),
            generator: "program".into(),
            polarity,
            text: t.text.clone(),
            final_answer: extract_final_answer(&t.text),
            valid: valid.is_ok(),
            invalid_reason: valid.err(),
            error_type: t.error_type,
            faithfulness: faithfulness(&t.text, &evidence),
            prompt: String::new(),
            params: serde_json::json!({"sql": t.sql}),
        }
    };
    if wanted.positive {
        let valid = match extract_final_answer(&positive.text) {
            Some(a) if matches_gold(&a, &gold) => Ok(()),
            Some(a) => Err(format!("final answer {a:?} does not match gold {:?}", gold.to_line())),
            None => Err("no final answer line".into()),
        };
        out.push(record(&positive, Polarity::Positive, valid));
    }
    if wanted.negatives > 0 {
        let gold_rs = match &gold {
            Answer::Table(rs) => rs.clone(),
            Answer::Text { .. } => return Ok(out),
        };
        for t in negatives(tracer, &db, &gold_rs, &positive, wanted.negatives, seed, &cache) {
            let valid = validate_negative(&t, &gold, &gold_rs, &positive, &schema_names);
            out.push(record(&t, Polarity::Negative, valid));
        }
    }
    Ok(out)
}

/// A negative is valid when it has a final answer that does not match gold,
/// names a real table or column, gives as many values as gold, and is not a
/// copy of the positive.
pub fn validate_negative(
    t: &ProgramTrace,
    gold: &Answer,
    gold_rs: &ResultSet,
    positive: &ProgramTrace,
    schema_names: &[String],
) -> Result<(), String> {
    let a = extract_final_answer(&t.text).ok_or("no final answer line")?;
    if matches_gold(&a, gold) {
        return Err("its final answer matches gold".into());
    }
    if t.text == positive.text {
        return Err("it copies the positive".into());
    }
    let lower = t.text.to_lowercase();
    if !schema_names.iter().any(|n| lower.contains(&n.to_lowercase())) {
        return Err("it names no table or column".into());
    }
    if t.result.rows.len() * t.result.columns.len() != gold_rs.rows.len() * gold_rs.columns.len() {
        return Err("its answer has another number of values than gold".into());
    }
    Ok(())
}

/// What any trace of a question may cite — cell values of its tables (up
/// to 5,000 rows a table, so memory stays bounded), table and column names,
/// and the question's words — with the table and column names themselves.
pub(crate) fn question_evidence(q: &Question, db: &TableDb) -> (Evidence, Vec<String>) {
    let Ok(schema) = db.schema() else { return (Evidence::default(), Vec::new()) };
    let names: Vec<String> = schema
        .tables
        .iter()
        .flat_map(|t| std::iter::once(t.name.clone()).chain(t.columns.iter().map(|c| c.name.clone())))
        .collect();
    let mut evidence: Evidence = names.iter().collect();
    for t in &schema.tables {
        let mut n = 0;
        let _ = db.scan(&t.name, |row| {
            row.iter().filter(|v| !matches!(v, Value::Null)).for_each(|v| evidence.add(&v.to_string()));
            n += 1;
            n < 5_000
        });
    }
    q.text.split_whitespace().for_each(|w| evidence.add(w.trim_matches(|c: char| !c.is_alphanumeric())));
    (evidence, names)
}

/// Which error types a set of traces covers (for reports).
pub fn error_types(traces: &[Trace]) -> Vec<ErrorType> {
    traces.iter().filter_map(|t| t.error_type).collect()
}
