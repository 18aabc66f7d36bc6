//! `data check`: load every question, run its gold SQL, compare the result
//! with the stored answers.

use std::time::Instant;

use serde::Serialize;

use crate::answer::{Answer, ResultSet};
use crate::load::Dataset;
use crate::matching::exact_match;
use crate::progress::Reporter;
use crate::question::Provenance;
use crate::sql::{is_ordered, ExecLimits, Executor, FailureKind};

/// One question that did not pass cleanly.
#[derive(Debug, Clone, Serialize)]
pub struct CheckIssue {
    /// The question, or the file location of an item that did not load.
    pub question_id: String,
    /// `load_error`, `sql_error`, `sql_timeout`, `sql_setup`,
    /// `disagrees_executed` or `disagrees_published`.
    pub kind: &'static str,
    /// Details.
    pub message: String,
}

/// Counts from a check, plus every issue found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Items seen (loaded + failed to load).
    pub questions: usize,
    /// Questions loaded.
    pub loaded: usize,
    /// Items that failed to load.
    pub load_errors: usize,
    /// Loaded questions without gold SQL.
    pub no_sql: usize,
    /// Gold queries that ran.
    pub sql_ok: usize,
    /// Gold queries that failed (time-outs included).
    pub sql_error: usize,
    /// Of `sql_error`, those that ran past the time limit.
    pub sql_timeout: usize,
    /// Questions that ran and carry a stored executed answer.
    pub with_executed_label: usize,
    /// Of those, results that agree with it.
    pub agree_executed: usize,
    /// Questions that ran and carry a published answer.
    pub with_published_label: usize,
    /// Of those, results whose values match it (value-set exact match).
    pub agree_published: usize,
    /// Wall time of the check, loading excluded.
    pub seconds: f64,
    /// Every item that did not pass, in order.
    pub issues: Vec<CheckIssue>,
}

/// Runs every loaded question's gold SQL and compares the result with the
/// stored answers: executed answers row by row ([`ResultSet::agrees_with`]),
/// published answers by value-set exact match.
pub fn check(dataset: &Dataset, limits: ExecLimits, reporter: &dyn Reporter) -> CheckReport {
    let start = Instant::now();
    let mut r = CheckReport {
        questions: dataset.items(),
        loaded: dataset.questions.len(),
        load_errors: dataset.errors.len(),
        ..CheckReport::default()
    };
    for e in &dataset.errors {
        r.issues.push(CheckIssue { question_id: e.location.clone(), kind: "load_error", message: e.message.clone() });
    }
    let mut exec = Executor::new(limits);
    reporter.start(dataset.questions.len() as u64, "checking gold SQL");
    for q in &dataset.questions {
        reporter.advance(1);
        let Some(sql) = &q.gold_sql else {
            r.no_sql += 1;
            continue;
        };
        let _span = tracing::debug_span!("check", question_id = %q.id).entered();
        let result = match exec.run(&q.tables, sql) {
            Ok(rs) => rs,
            Err(f) => {
                r.sql_error += 1;
                let kind = match f.kind {
                    FailureKind::Timeout => {
                        r.sql_timeout += 1;
                        "sql_timeout"
                    }
                    FailureKind::Setup => "sql_setup",
                    FailureKind::Error => "sql_error",
                };
                r.issues.push(CheckIssue { question_id: q.id.to_string(), kind, message: f.message });
                continue;
            }
        };
        r.sql_ok += 1;
        if let Some(gold) = q.gold(Provenance::Executed) {
            r.with_executed_label += 1;
            let agrees = match gold {
                Answer::Table(stored) => result.agrees_with(stored, is_ordered(sql)),
                Answer::Text { text } => exact_match(text, &Answer::Table(result.clone())),
            };
            if agrees {
                r.agree_executed += 1;
            } else {
                r.issues.push(CheckIssue {
                    question_id: q.id.to_string(),
                    kind: "disagrees_executed",
                    message: format!("stored {} but the SQL gives {}", brief(gold), brief_rows(&result)),
                });
            }
        }
        if let Some(gold) = q.gold(Provenance::Published) {
            r.with_published_label += 1;
            let executed = Answer::Table(result.clone());
            let agrees = match gold {
                Answer::Text { text } => exact_match(text, &executed),
                Answer::Table(t) => exact_match(&Answer::Table(t.clone()).values().join("; "), &executed),
            };
            if agrees {
                r.agree_published += 1;
            } else {
                r.issues.push(CheckIssue {
                    question_id: q.id.to_string(),
                    kind: "disagrees_published",
                    message: format!("published {} but the SQL gives {}", brief(gold), brief_rows(&result)),
                });
            }
        }
    }
    reporter.finish();
    r.seconds = start.elapsed().as_secs_f64();
    r
}

fn brief(a: &Answer) -> String {
    match a {
        Answer::Text { text } => format!("{text:?}"),
        Answer::Table(rs) => brief_rows(rs),
    }
}

fn brief_rows(rs: &ResultSet) -> String {
    let line = Answer::Table(ResultSet { rows: rs.rows.iter().take(3).cloned().collect(), ..rs.clone() }).to_line();
    let more = if rs.n_rows > 3 { format!(" … ({} rows)", rs.n_rows) } else { String::new() };
    format!("[{line}]{more}")
}
