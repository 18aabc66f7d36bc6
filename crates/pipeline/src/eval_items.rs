//! Evaluation items: each question's gold-free prompt (built by the one
//! [`Prompter`]) and the gold answer it is scored against. A question that
//! cannot be prepared stays in the list as a `not_run` item, counted as
//! wrong, never dropped.

use serde::Serialize;
use tabletrace_data::{Answer, Provenance, Question, TableDb};
use tabletrace_eval::{EvalItem, Kind};
use tabletrace_trace::{gold_answer, ProgramTracer, PromptStyle, Prompter};

/// What the prompts of an evaluation showed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PromptStats {
    /// Questions whose prompt shows every row of their tables.
    pub whole_tables: usize,
    /// Questions whose tables exceed the budget (rows chosen from the question text).
    pub part_tables: usize,
    /// Questions that could not be prepared (counted as wrong).
    pub not_prepared: usize,
    /// Mean tokens of the rendered tables.
    pub mean_table_tokens: f64,
}

/// The items of `questions`, scored against the executed gold answer or,
/// with `labels` = [`Provenance::Published`], the published one where the
/// dataset has it.
pub fn eval_items(
    questions: &[Question],
    labels: Provenance,
    prompter: &Prompter,
    style: PromptStyle,
) -> (Vec<EvalItem>, PromptStats) {
    let tracer = ProgramTracer::default();
    let mut stats = PromptStats::default();
    let items = questions.iter().map(|q| eval_item(q, labels, prompter, style, &tracer, &mut stats)).collect();
    (items, stats)
}

/// An item that is not asked (counted as wrong), with the reason.
pub fn not_run_item(id: &str, why: String) -> EvalItem {
    EvalItem {
        id: id.to_string(),
        prompt: String::new(),
        gold: Answer::Text { text: String::new() },
        n_tables: 0,
        kind: Kind::Lookup,
        not_run: Some(why),
    }
}

fn eval_item(
    q: &Question,
    labels: Provenance,
    prompter: &Prompter,
    style: PromptStyle,
    tracer: &ProgramTracer,
    stats: &mut PromptStats,
) -> EvalItem {
    let unprepared = |why: String, gold: Option<Answer>| EvalItem {
        id: q.id.0.clone(),
        prompt: String::new(),
        kind: Kind::of(q.gold_sql.as_deref(), gold.as_ref().unwrap_or(&Answer::Text { text: String::new() })),
        gold: gold.unwrap_or(Answer::Text { text: String::new() }),
        n_tables: q.n_tables(),
        not_run: Some(why),
    };
    let db = match TableDb::open(&q.tables) {
        Ok(db) => db,
        Err(f) => {
            stats.not_prepared += 1;
            return unprepared(format!("its tables cannot be opened: {}", f.message), None);
        }
    };
    let gold = match (labels, q.gold(Provenance::Published)) {
        (Provenance::Published, Some(p)) => Ok(p.clone()),
        _ => gold_answer(q, &db, tracer),
    };
    let gold = match gold {
        Ok(g) => g,
        Err(e) => {
            stats.not_prepared += 1;
            return unprepared(format!("no gold answer: {e}"), None);
        }
    };
    match prompter.prompt(&db, q, style) {
        Ok(p) => {
            let n = (stats.whole_tables + stats.part_tables) as f64;
            stats.mean_table_tokens = (stats.mean_table_tokens * n + p.tables.tokens as f64) / (n + 1.0);
            if p.tables.is_whole() {
                stats.whole_tables += 1;
            } else {
                stats.part_tables += 1;
            }
            EvalItem {
                id: q.id.0.clone(),
                prompt: p.text,
                kind: Kind::of(q.gold_sql.as_deref(), &gold),
                gold,
                n_tables: q.n_tables(),
                not_run: None,
            }
        }
        Err(f) => {
            stats.not_prepared += 1;
            unprepared(f.to_string(), Some(gold))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_without_gold_stays_as_a_not_run_item() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/sample/mmqa/mmqa_two_table.jsonl");
        let mut qs = tabletrace_data::load(std::path::Path::new(path), &Default::default()).unwrap().questions;
        qs.truncate(3);
        qs[1].gold.clear();
        qs[1].gold_sql = Some("SELECT nothing FROM nowhere".into());
        let (items, stats) = eval_items(&qs, Provenance::Executed, &Prompter::default(), PromptStyle::Qa);
        assert_eq!(items.len(), 3, "no question disappears");
        assert!(items[1].not_run.as_deref().is_some_and(|w| w.starts_with("no gold answer")), "{:?}", items[1]);
        assert!(items[0].not_run.is_none() && items[0].prompt.contains(&qs[0].text));
        assert_eq!((stats.not_prepared, stats.whole_tables + stats.part_tables), (1, 2));
    }
}
