//! Batched generation, answer extraction and scoring.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tabletrace_data::matching::{extract_final_answer, score};
use tabletrace_data::{Answer, Reporter};
use tabletrace_model::{generate, ChatMessage, GenerateOptions, LoadedModel};

use crate::Result;

/// The shape of a question, from its gold SQL (and answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `COUNT(…)`.
    Count,
    /// `SUM`, `AVG`, `MIN`, `MAX`.
    Aggregate,
    /// `ORDER BY … LIMIT`: the largest, the first, …
    Superlative,
    /// Several values.
    List,
    /// One value looked up.
    Lookup,
}

impl Kind {
    /// Classifies a question by its gold SQL and gold answer.
    pub fn of(sql: Option<&str>, gold: &Answer) -> Kind {
        let s = sql.unwrap_or("").to_ascii_uppercase().replace(' ', "");
        if s.contains("COUNT(") {
            Kind::Count
        } else if ["SUM(", "AVG(", "MIN(", "MAX("].iter().any(|f| s.contains(f)) {
            Kind::Aggregate
        } else if s.contains("ORDERBY") && s.contains("LIMIT") {
            Kind::Superlative
        } else if gold.values().len() > 1 {
            Kind::List
        } else {
            Kind::Lookup
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Count => "count",
            Kind::Aggregate => "aggregate",
            Kind::Superlative => "superlative",
            Kind::List => "list",
            Kind::Lookup => "lookup",
        }
    }
}

/// One question to evaluate.
#[derive(Debug, Clone)]
pub struct EvalItem {
    /// Question id.
    pub id: String,
    /// The prompt (question and rendered tables), before any chat template.
    pub prompt: String,
    /// The gold answer.
    pub gold: Answer,
    /// Tables the question is asked over.
    pub n_tables: usize,
    /// Its kind.
    pub kind: Kind,
    /// Why the question cannot be asked (its tables or gold could not be
    /// prepared), if so. It still counts in `n`, as wrong, and in
    /// [`EvalReport::not_run`].
    pub not_run: Option<String>,
}

/// How answers are generated.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Questions per generation batch. Default 8.
    pub batch_size: usize,
    /// New tokens per answer at most. Default 256.
    pub max_new_tokens: usize,
    /// Wrap the prompt in the model's chat template (user turn). Default true.
    pub chat_template: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { batch_size: 8, max_new_tokens: 256, chat_template: true }
    }
}

/// One scored answer; a line of `predictions.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    /// Question id.
    pub id: String,
    /// The prompt given (after the chat template).
    pub prompt: String,
    /// The model's whole output.
    pub output: String,
    /// The extracted answer.
    pub answer: String,
    /// The gold answer as one line.
    pub gold: String,
    /// Tables of the question.
    pub n_tables: usize,
    /// Its kind.
    pub kind: Kind,
    /// Exact (value-set) match.
    pub em: bool,
    /// Partial match (share of gold values found).
    pub pm: f64,
    /// Token F1.
    pub f1: f64,
    /// Numeric match at 1% relative tolerance (exact for non-numbers).
    pub num: bool,
    /// Why the model was not asked (preparation failed, or the prompt does
    /// not fit the model's context); the prediction then counts as wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
}

/// Mean scores of a group of predictions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// Predictions.
    pub n: usize,
    /// Exact match.
    pub em: f64,
    /// Partial match.
    pub pm: f64,
    /// Token F1.
    pub f1: f64,
    /// Numeric-tolerant match.
    pub num: f64,
}

impl Breakdown {
    fn of<'a>(ps: impl Iterator<Item = &'a Prediction>) -> Breakdown {
        let mut b = Breakdown::default();
        for p in ps {
            b.n += 1;
            b.em += p.em as u8 as f64;
            b.pm += p.pm;
            b.f1 += p.f1;
            b.num += p.num as u8 as f64;
        }
        let n = b.n.max(1) as f64;
        Breakdown { n: b.n, em: b.em / n, pm: b.pm / n, f1: b.f1 / n, num: b.num / n }
    }
}

/// Scores of a whole evaluation; `eval.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Questions evaluated.
    pub n: usize,
    /// Exact match.
    pub em: f64,
    /// Partial match.
    pub pm: f64,
    /// Token F1.
    pub f1: f64,
    /// Numeric-tolerant match.
    pub num: f64,
    /// By number of tables (`"2"`, `"3"`).
    pub by_tables: BTreeMap<String, Breakdown>,
    /// By question kind.
    pub by_kind: BTreeMap<String, Breakdown>,
    /// Which gold labels were used.
    pub labels: String,
    /// Answers without a `Final answer:` line (the last line was scored).
    pub no_final_line: usize,
    /// Questions counted in `n` as wrong because the model was not asked
    /// (see each prediction's `not_run`).
    #[serde(default)]
    pub not_run: usize,
    /// Model, adapter, prompt format, data.
    pub setup: serde_json::Value,
}

impl EvalReport {
    /// Aggregates predictions.
    pub fn from_predictions(ps: &[Prediction], labels: &str, no_final_line: usize) -> EvalReport {
        let all = Breakdown::of(ps.iter());
        let mut by_tables = BTreeMap::new();
        let mut by_kind = BTreeMap::new();
        let mut tables: Vec<usize> = ps.iter().map(|p| p.n_tables).collect();
        tables.sort();
        tables.dedup();
        for t in tables {
            by_tables.insert(t.to_string(), Breakdown::of(ps.iter().filter(|p| p.n_tables == t)));
        }
        let mut kinds: Vec<Kind> = ps.iter().map(|p| p.kind).collect();
        kinds.sort();
        kinds.dedup();
        for k in kinds {
            by_kind.insert(k.name().to_string(), Breakdown::of(ps.iter().filter(|p| p.kind == k)));
        }
        EvalReport {
            n: all.n,
            em: all.em,
            pm: all.pm,
            f1: all.f1,
            num: all.num,
            by_tables,
            by_kind,
            labels: labels.to_string(),
            no_final_line,
            not_run: ps.iter().filter(|p| p.not_run.is_some()).count(),
            setup: serde_json::Value::Null,
        }
    }
}

/// The answer in a model's output: the last `Final answer:` line, else the
/// last non-empty line. The flag says whether a final line was found.
pub fn extract_answer(output: &str) -> (String, bool) {
    match extract_final_answer(output) {
        Some(a) => (a, true),
        None => (output.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string(), false),
    }
}

/// Generates and scores an answer for every item (greedy, batched).
/// Returns the report (without `setup`) and the predictions in item order.
///
/// No item is lost: one that was not prepared, or whose prompt does not fit
/// the model's context with `max_new_tokens`, gets a prediction marked
/// `not_run` that counts as wrong; the rest of its batch runs as usual.
pub fn evaluate(
    m: &LoadedModel,
    items: &[EvalItem],
    opts: &EvalOptions,
    reporter: &dyn Reporter,
) -> Result<(EvalReport, Vec<Prediction>)> {
    let gen = GenerateOptions { max_new_tokens: opts.max_new_tokens, ..GenerateOptions::default() };
    let mut out = Vec::with_capacity(items.len());
    let mut missing = 0;
    reporter.start(items.len() as u64, "eval");
    // Similar lengths together: less padding per batch.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].prompt.len());
    let mut done: Vec<Option<Prediction>> = vec![None; items.len()];
    let context = m.model.config().max_position_embeddings;
    // Questions the model cannot be asked are decided before batching.
    let mut runnable = Vec::with_capacity(items.len());
    for &i in &order {
        let item = &items[i];
        let prepared = match &item.not_run {
            Some(why) => Err(why.clone()),
            None => {
                let p = if opts.chat_template && m.tokenizer.chat_template().is_some() {
                    m.tokenizer.apply_chat_template(&[ChatMessage::new("user", item.prompt.clone())], true)?
                } else {
                    item.prompt.clone()
                };
                let ids = m.tokenizer.encode(&p, true)?;
                if ids.is_empty() {
                    Err("the prompt is empty".to_string())
                } else if ids.len() + opts.max_new_tokens > context {
                    Err(format!(
                        "a prompt of {} tokens plus {} new tokens exceeds the model's context of {context} tokens",
                        ids.len(),
                        opts.max_new_tokens
                    ))
                } else {
                    Ok((p, ids))
                }
            }
        };
        match prepared {
            Ok((p, ids)) => runnable.push((i, p, ids)),
            Err(why) => {
                done[i] = Some(unasked(item, why));
                reporter.advance(1);
            }
        }
    }
    for chunk in runnable.chunks(opts.batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, _, ids)| ids.clone()).collect();
        let gens = generate(&m.model, &m.tokenizer, &ids, &gen)?;
        for ((i, prompt, _), g) in chunk.iter().zip(gens) {
            let (i, prompt) = (*i, prompt.clone());
            let item = &items[i];
            let (answer, found) = extract_answer(&g.text);
            missing += (!found) as usize;
            let s = score(&answer, &item.gold);
            done[i] = Some(Prediction {
                id: item.id.clone(),
                prompt,
                output: g.text,
                answer,
                gold: item.gold.to_line(),
                n_tables: item.n_tables,
                kind: item.kind,
                em: s.em,
                pm: s.pm,
                f1: s.f1,
                num: s.num,
                not_run: None,
            });
        }
        reporter.advance(chunk.len() as u64);
    }
    reporter.finish();
    out.extend(done.into_iter().map(|p| p.expect("every item was generated")));
    Ok((EvalReport::from_predictions(&out, "", missing), out))
}

/// The prediction of a question the model was not asked: wrong, with why.
fn unasked(item: &EvalItem, why: String) -> Prediction {
    Prediction {
        id: item.id.clone(),
        prompt: item.prompt.clone(),
        output: String::new(),
        answer: String::new(),
        gold: item.gold.to_line(),
        n_tables: item.n_tables,
        kind: item.kind,
        em: false,
        pm: 0.0,
        f1: 0.0,
        num: false,
        not_run: Some(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_average_every_score_overall_by_table_count_and_by_kind() {
        let p = |id: &str, n_tables: usize, kind: Kind, em: bool, pm: f64, f1: f64, not_run: bool| Prediction {
            id: id.into(),
            prompt: String::new(),
            output: String::new(),
            answer: String::new(),
            gold: String::new(),
            n_tables,
            kind,
            em,
            pm,
            f1,
            num: em,
            not_run: not_run.then(|| "too long".to_string()),
        };
        let ps = [
            p("a", 2, Kind::Count, true, 1.0, 1.0, false),
            p("b", 2, Kind::List, false, 0.5, 0.25, false),
            p("c", 3, Kind::Count, false, 0.0, 0.5, false),
            p("d", 3, Kind::Count, false, 0.0, 0.0, true),
        ];
        let r = EvalReport::from_predictions(&ps, "executed", 1);
        assert_eq!((r.n, r.em, r.pm, r.f1, r.num), (4, 0.25, 0.375, 0.4375, 0.25));
        assert_eq!((r.not_run, r.no_final_line), (1, 1));
        let two = &r.by_tables["2"];
        assert_eq!((two.n, two.em, two.pm, two.f1), (2, 0.5, 0.75, 0.625));
        let three = &r.by_tables["3"];
        assert_eq!((three.n, three.em, three.f1), (2, 0.0, 0.25), "a not-run question counts as wrong, in n");
        let count = &r.by_kind["count"];
        assert_eq!((count.n, count.em, count.pm), (3, 1.0 / 3.0, 1.0 / 3.0));
        assert_eq!(r.by_kind["list"].n, 1);
        assert!(!r.by_kind.contains_key("lookup"), "kinds without questions are left out");
    }

    #[test]
    fn answers_are_extracted_from_the_final_line() {
        assert_eq!(extract_answer("step 1\n**Final answer:** Paris.\n"), ("Paris".into(), true));
        assert_eq!(extract_answer("I think\n42\n\n"), ("42".into(), false));
        assert_eq!(extract_answer("Final answer: Final answer: 7"), ("7".into(), true));
    }

    #[test]
    fn kinds_come_from_the_sql() {
        let one = Answer::Text { text: "x".into() };
        assert_eq!(Kind::of(Some("SELECT count(*) FROM t"), &one), Kind::Count);
        assert_eq!(Kind::of(Some("SELECT avg (x) FROM t"), &one), Kind::Aggregate);
        assert_eq!(Kind::of(Some("SELECT x FROM t ORDER BY y DESC LIMIT 1"), &one), Kind::Superlative);
        assert_eq!(Kind::of(Some("SELECT x FROM t"), &one), Kind::Lookup);
    }

    #[test]
    fn breakdowns_average_by_group() {
        let p = |t, em| Prediction {
            id: "q".into(),
            prompt: String::new(),
            output: String::new(),
            answer: String::new(),
            gold: String::new(),
            n_tables: t,
            kind: Kind::Count,
            em,
            pm: if em { 1.0 } else { 0.0 },
            f1: 0.5,
            num: em,
            not_run: None,
        };
        let r = EvalReport::from_predictions(&[p(2, true), p(2, false), p(3, true)], "executed", 0);
        assert_eq!(r.n, 3);
        assert!((r.em - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.by_tables["2"].em, 0.5);
        assert_eq!(r.by_tables["3"].em, 1.0);
        assert_eq!(r.by_kind["count"].n, 3);
    }
}
