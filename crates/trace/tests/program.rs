//! The program tracer: positives reach gold, negatives hold one typed error.

use std::path::PathBuf;

use tabletrace_data::{load, ErrorType, LoadOptions, Polarity, Question, Trace};
use tabletrace_trace::{program_traces, ProgramTracer, Prompter, Wanted, NOT_WHOLE};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn questions(path: &str) -> Vec<Question> {
    load(&root().join(path), &LoadOptions::default()).unwrap().questions
}

/// The tracer's own rates: prompts without a token budget show every table
/// whole, so no question is refused for its size.
fn traces_for(qs: &[Question]) -> (Vec<Trace>, usize) {
    let tracer = ProgramTracer::default();
    let whole = Prompter {
        budget: tabletrace_data::Budget { max_rows_per_table: None, max_tokens: None },
        ..Prompter::default()
    };
    let mut out = Vec::new();
    let mut traced = 0;
    for (i, q) in qs.iter().enumerate() {
        if let Ok(t) = program_traces(q, &tracer, &whole, Wanted { positive: true, negatives: 2 }, i as u64) {
            traced += 1;
            out.extend(t);
        }
    }
    (out, traced)
}

fn questions_with(traces: &[Trace], p: Polarity) -> usize {
    let mut ids: Vec<&str> =
        traces.iter().filter(|t| t.polarity == p && t.valid).map(|t| t.question_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    ids.len()
}

#[test]
fn the_department_question_reads_step_by_step() {
    let qs = questions("data/sample/mmqa/mmqa_two_table.jsonl");
    let q = qs.iter().find(|q| q.id.0 == "mmqa_two_table:0").unwrap();
    let t =
        program_traces(q, &ProgramTracer::default(), &Prompter::default(), Wanted { positive: true, negatives: 3 }, 0)
            .unwrap();
    let pos = &t[0];
    assert_eq!(pos.polarity, Polarity::Positive);
    assert!(pos.valid, "{:?}", pos.invalid_reason);
    let expected = "Step 1: Look at the tables department (15 rows) and management (5 rows).
Step 2: Match management to the rows so far where department.Department_ID = management.department_ID: 5 rows match.
Step 3: Keep the rows where management.temporary_acting = 'Yes': 3 rows left.
Step 4: Group the 3 rows by department.Name: 2 groups, with (Name = Homeland Security, SUM(department.Num_Employees) = 208000.0); (Name = Treasury, SUM(department.Num_Employees) = 231794.0).
Step 5: Sort by SUM(department.Num_Employees) from highest to lowest and take the first one.
Step 6: Report department.Name, SUM(department.Num_Employees): Treasury, 231794.0.
Final answer: Treasury, 231794.0";
    assert_eq!(pos.text, expected);
    assert_eq!(pos.final_answer.as_deref(), Some("Treasury, 231794.0"));
    assert!(pos.faithfulness > 0.95, "{}", pos.faithfulness);
    let negs: Vec<&Trace> = t.iter().filter(|t| t.polarity == Polarity::Negative).collect();
    assert_eq!(negs.len(), 3);
    for n in &negs {
        assert!(n.valid, "{:?}: {:?}", n.error_type, n.invalid_reason);
        assert!(n.error_type.is_some());
        assert_ne!(n.final_answer, pos.final_answer);
        assert_eq!(n.final_answer.as_ref().unwrap().split(", ").count(), 2, "same kind: two values");
    }
    let mut types: Vec<ErrorType> = negs.iter().filter_map(|n| n.error_type).collect();
    types.dedup();
    assert_eq!(types.len(), 3, "distinct error types");
}

#[test]
fn sample_rates() {
    let mut qs = questions("data/sample/mmqa/mmqa_two_table.jsonl");
    qs.extend(questions("data/sample/mmqa/mmqa_three_table.jsonl"));
    let (traces, traced) = traces_for(&qs);
    let pos = questions_with(&traces, Polarity::Positive);
    let neg = questions_with(&traces, Polarity::Negative);
    assert!(pos as f64 >= 0.9 * traced as f64, "{pos} of {traced} questions have a valid positive");
    assert!(neg as f64 >= 0.7 * traced as f64, "{neg} of {traced} questions have a valid negative");
    // Every negative that validated has a typed error and a wrong answer.
    for t in traces.iter().filter(|t| t.polarity == Polarity::Negative && t.valid) {
        assert!(t.error_type.is_some() && t.final_answer.is_some());
    }
}

#[test]
fn each_error_type_occurs_on_the_sample() {
    let mut qs = questions("data/sample/mmqa/mmqa_two_table.jsonl");
    qs.extend(questions("data/sample/mmqa/mmqa_three_table.jsonl"));
    let tracer = ProgramTracer::default();
    let mut seen = std::collections::BTreeSet::new();
    for (i, q) in qs.iter().enumerate() {
        if let Ok(ts) =
            program_traces(q, &tracer, &Prompter::default(), Wanted { positive: false, negatives: 9 }, i as u64)
        {
            seen.extend(ts.iter().filter(|t| t.valid).filter_map(|t| t.error_type));
        }
    }
    let missing: Vec<ErrorType> = ErrorType::ALL.iter().copied().filter(|e| !seen.contains(e)).collect();
    assert!(missing.is_empty(), "never produced: {missing:?}");
}

#[test]
fn full_mmqa_rates() {
    let data = root().join("../shared/data/mmqa");
    if !data.is_dir() {
        eprintln!("skipped: {} is not present", data.display());
        return;
    }
    let mut qs = questions("../shared/data/mmqa/mmqa_two_table.jsonl");
    qs.extend(questions("../shared/data/mmqa/mmqa_three_table.jsonl"));
    let tracer = ProgramTracer::default();
    // Questions whose SQL executes, the base of the rates.
    let runs = qs
        .iter()
        .filter(|q| {
            tabletrace_data::TableDb::open(&q.tables)
                .ok()
                .and_then(|db| db.query(q.gold_sql.as_deref()?, &tracer.limits).ok())
                .is_some()
        })
        .count();
    let (traces, _) = traces_for(&qs);
    let pos = questions_with(&traces, Polarity::Positive);
    let neg = questions_with(&traces, Polarity::Negative);
    assert!(pos as f64 >= 0.9 * runs as f64, "{pos} of {runs}");
    assert!(neg as f64 >= 0.8 * runs as f64, "{neg} of {runs}");
}

/// A program trace cites whole tables, so it is only made when the prompt
/// shows them whole: with a budget too small for the tables, the question
/// is refused, naming why.
#[test]
fn no_program_trace_when_the_prompt_shows_part_of_the_tables() {
    let qs = questions("data/sample/mmqa/mmqa_two_table.jsonl");
    let q = qs.iter().find(|q| q.id.0 == "mmqa_two_table:0").unwrap();
    let tight = Prompter {
        budget: tabletrace_data::Budget { max_rows_per_table: None, max_tokens: Some(150) },
        ..Prompter::default()
    };
    let e =
        program_traces(q, &ProgramTracer::default(), &tight, Wanted { positive: true, negatives: 1 }, 0).unwrap_err();
    assert!(e.contains(NOT_WHOLE) && e.contains("mmqa_two_table:0") && e.contains("of 20 rows"), "{e}");
    let rows = Prompter {
        budget: tabletrace_data::Budget { max_rows_per_table: Some(6), max_tokens: None },
        ..Prompter::default()
    };
    assert!(program_traces(q, &ProgramTracer::default(), &rows, Wanted { positive: true, negatives: 1 }, 0).is_err());
}

/// With `list_rows`, the join and condition steps write out the rows they
/// leave (the columns the rest of the query reads), so the group sums can
/// be checked against rows in the trace; every listed value is a table cell.
#[test]
fn listed_rows_show_what_a_step_leaves() {
    let qs = questions("data/sample/mmqa/mmqa_two_table.jsonl");
    let q = qs.iter().find(|q| q.id.0 == "mmqa_two_table:0").unwrap();
    let tracer = ProgramTracer { list_rows: 5, ..ProgramTracer::default() };
    let t = program_traces(q, &tracer, &Prompter::default(), Wanted { positive: true, negatives: 3 }, 0).unwrap();
    let pos = &t[0];
    assert!(pos.valid, "{:?}", pos.invalid_reason);
    let expected = "Step 1: Look at the tables department (15 rows) and management (5 rows).
Step 2: Match management to the rows so far where department.Department_ID = management.department_ID: 5 rows match: (department.Name, department.Num_Employees, management.temporary_acting) = (Treasury, 115897.0, Yes); (Treasury, 115897.0, Yes); (Commerce, 36000.0, No); (Transportation, 58622.0, No); (Homeland Security, 208000.0, Yes).
Step 3: Keep the rows where management.temporary_acting = 'Yes': 3 rows left: (department.Name, department.Num_Employees, management.temporary_acting) = (Treasury, 115897.0, Yes); (Treasury, 115897.0, Yes); (Homeland Security, 208000.0, Yes).
Step 4: Group the 3 rows by department.Name: 2 groups, with (Name = Homeland Security, SUM(department.Num_Employees) = 208000.0); (Name = Treasury, SUM(department.Num_Employees) = 231794.0).
Step 5: Sort by SUM(department.Num_Employees) from highest to lowest and take the first one.
Step 6: Report department.Name, SUM(department.Num_Employees): Treasury, 231794.0.
Final answer: Treasury, 231794.0";
    assert_eq!(pos.text, expected);
    assert!(pos.faithfulness > 0.95, "{}", pos.faithfulness);
    // A step over more rows than list_rows states its count only.
    let few = ProgramTracer { list_rows: 4, ..ProgramTracer::default() };
    let t4 = program_traces(q, &few, &Prompter::default(), Wanted { positive: true, negatives: 0 }, 0).unwrap();
    assert!(t4[0].text.contains("5 rows match.\n"), "{}", t4[0].text);
    assert!(t4[0].text.contains("3 rows left: (department.Name, "), "{}", t4[0].text);
    // Negatives list the rows of their own (perturbed) query and still validate.
    let negs: Vec<&Trace> = t.iter().filter(|t| t.polarity == Polarity::Negative).collect();
    assert!(!negs.is_empty() && negs.iter().all(|n| n.valid), "{negs:?}");
}
