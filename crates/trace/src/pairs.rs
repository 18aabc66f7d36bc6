//! Preference pairs from validated traces, in TRL's formats, with a report.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tabletrace_data::{PairMetadata, Polarity, PreferencePair, Trace};

/// Which generators a pair may draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairPolicy {
    /// Chosen and rejected come from different generators (the method's default).
    Heterogeneous,
    /// Chosen and rejected come from the same generator (the ablation).
    Homogeneous,
}

impl PairPolicy {
    /// The name in configs and on `tabletrace pairs --policy`.
    pub fn name(self) -> &'static str {
        match self {
            PairPolicy::Heterogeneous => "heterogeneous",
            PairPolicy::Homogeneous => "homogeneous",
        }
    }
}

/// How pairs are built.
#[derive(Debug, Clone, Copy)]
pub struct PairOptions {
    /// Generator policy. Default heterogeneous.
    pub policy: PairPolicy,
    /// Pairs per question at most. Default 4.
    pub max_per_question: usize,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions { policy: PairPolicy::Heterogeneous, max_per_question: 4 }
    }
}

/// What pairing made and dropped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairReport {
    /// Pairs written.
    pub pairs: usize,
    /// Questions with at least one pair.
    pub questions_with_pairs: usize,
    /// Questions seen in the traces.
    pub questions: usize,
    /// Questions dropped, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Per generator and polarity: traces seen and valid.
    pub generators: BTreeMap<String, GeneratorStats>,
    /// Error types of the rejected traces of the pairs.
    pub error_types: BTreeMap<String, usize>,
    /// Mean faithfulness of chosen and rejected traces in pairs.
    pub mean_faithfulness_chosen: f64,
    /// See `mean_faithfulness_chosen`.
    pub mean_faithfulness_rejected: f64,
}

/// Counts for one generator.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GeneratorStats {
    /// Positive traces.
    pub positives: usize,
    /// Of which valid.
    pub valid_positives: usize,
    /// Negative traces.
    pub negatives: usize,
    /// Of which valid.
    pub valid_negatives: usize,
}

/// Pairs valid positives with valid negatives of the same question under
/// `opts`, with `prompts` giving each question's prompt. Duplicate texts are
/// used once; within a question, rejected traces of distinct error types
/// come first. Deterministic.
pub fn build_pairs(
    traces: &[Trace],
    prompts: &HashMap<String, String>,
    opts: &PairOptions,
) -> (Vec<PreferencePair>, PairReport) {
    let mut report = PairReport::default();
    let mut by_question: BTreeMap<&str, Vec<&Trace>> = BTreeMap::new();
    for t in traces {
        let g = report.generators.entry(t.generator.clone()).or_default();
        match t.polarity {
            Polarity::Positive => {
                g.positives += 1;
                g.valid_positives += usize::from(t.valid);
            }
            Polarity::Negative => {
                g.negatives += 1;
                g.valid_negatives += usize::from(t.valid);
            }
        }
        by_question.entry(&t.question_id).or_default().push(t);
    }
    report.questions = by_question.len();
    let mut pairs = Vec::new();
    let (mut f_chosen, mut f_rejected) = (0.0, 0.0);
    for (qid, ts) in by_question {
        let mut drop = |why: &str| *report.dropped.entry(why.to_string()).or_default() += 1;
        let Some(prompt) = prompts.get(qid) else {
            drop("questions not in the dataset");
            continue;
        };
        let unique = |p: Polarity| {
            let mut seen = HashSet::new();
            ts.iter()
                .filter(|t| t.polarity == p && t.valid && seen.insert(t.text.as_str()))
                .copied()
                .collect::<Vec<_>>()
        };
        let positives = unique(Polarity::Positive);
        let mut negatives = unique(Polarity::Negative);
        if positives.is_empty() {
            drop("questions without a valid positive");
            continue;
        }
        if negatives.is_empty() {
            drop("questions without a valid negative");
            continue;
        }
        // Distinct error types first: each type's first trace, then the rest.
        let mut seen_types = HashSet::new();
        negatives.sort_by_key(|n| !seen_types.insert(n.error_type));
        let mut made = 0;
        'outer: for n in &negatives {
            for p in &positives {
                if made >= opts.max_per_question {
                    break 'outer;
                }
                let allowed = match opts.policy {
                    PairPolicy::Heterogeneous => p.generator != n.generator,
                    PairPolicy::Homogeneous => p.generator == n.generator,
                };
                if !allowed || p.text == n.text {
                    continue;
                }
                f_chosen += p.faithfulness;
                f_rejected += n.faithfulness;
                if let Some(e) = n.error_type {
                    *report.error_types.entry(e.to_string()).or_default() += 1;
                }
                pairs.push(PreferencePair {
                    prompt: prompt.clone(),
                    chosen: p.text.clone(),
                    rejected: n.text.clone(),
                    metadata: PairMetadata {
                        question_id: qid.to_string(),
                        chosen_generator: p.generator.clone(),
                        rejected_generator: n.generator.clone(),
                        error_type: n.error_type,
                        chosen_faithfulness: p.faithfulness,
                        rejected_faithfulness: n.faithfulness,
                    },
                });
                made += 1;
                // One chosen trace per rejected trace, cycling through positives.
                continue 'outer;
            }
        }
        if made == 0 {
            drop(match opts.policy {
                PairPolicy::Heterogeneous => "questions without a positive and a negative from different generators",
                PairPolicy::Homogeneous => "questions without a positive and a negative from the same generator",
            });
        } else {
            report.questions_with_pairs += 1;
        }
    }
    report.pairs = pairs.len();
    if !pairs.is_empty() {
        report.mean_faithfulness_chosen = f_chosen / pairs.len() as f64;
        report.mean_faithfulness_rejected = f_rejected / pairs.len() as f64;
    }
    (pairs, report)
}

/// A pair as one JSON line: TRL's standard format (`prompt`, `chosen`,
/// `rejected` strings) or its conversational format (message lists), with
/// the metadata alongside.
pub fn pair_json(p: &PreferencePair, conversational: bool) -> serde_json::Value {
    if conversational {
        serde_json::json!({
            "prompt": [{"role": "user", "content": p.prompt}],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
            "metadata": p.metadata,
        })
    } else {
        serde_json::to_value(p).expect("pairs serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tabletrace_data::ErrorType;

    fn trace(q: &str, g: &str, p: Polarity, text: &str, valid: bool, e: Option<ErrorType>) -> Trace {
        Trace {
            question_id: q.into(),
            generator: g.into(),
            polarity: p,
            text: text.into(),
            final_answer: None,
            valid,
            invalid_reason: None,
            error_type: e,
            faithfulness: 1.0,
            prompt: String::new(),
            params: serde_json::Value::Null,
        }
    }

    #[test]
    fn policies_pick_generators_and_dedupe() {
        use Polarity::*;
        let ts = vec![
            trace("q1", "program", Positive, "p", true, None),
            trace("q1", "local:m", Positive, "p2", true, None),
            trace("q1", "program", Negative, "n1", true, Some(ErrorType::FlippedFilter)),
            trace("q1", "program", Negative, "n1", true, Some(ErrorType::FlippedFilter)),
            trace("q1", "local:m", Negative, "n2", true, Some(ErrorType::Other)),
            trace("q1", "local:m", Negative, "bad", false, Some(ErrorType::Other)),
            trace("q2", "program", Positive, "p", true, None),
        ];
        let prompts: HashMap<String, String> =
            [("q1", "P1"), ("q2", "P2")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let (pairs, report) = build_pairs(&ts, &prompts, &PairOptions::default());
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(|p| p.metadata.chosen_generator != p.metadata.rejected_generator));
        assert_eq!(report.dropped.get("questions without a valid negative"), Some(&1));
        let homo = PairOptions { policy: PairPolicy::Homogeneous, ..PairOptions::default() };
        let (pairs, _) = build_pairs(&ts, &prompts, &homo);
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(|p| p.metadata.chosen_generator == p.metadata.rejected_generator));
        assert!(pairs.iter().all(|p| p.rejected != "bad"));
        let j = pair_json(&pairs[0], true);
        assert_eq!(j["chosen"][0]["role"], "assistant");
        assert_eq!(pair_json(&pairs[0], false)["prompt"], "P1");
    }
}
