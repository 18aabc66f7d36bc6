//! Validation of traces: the final answer, whether it matches gold, and how
//! faithful the cited values are to the tables.

pub use tabletrace_data::matching::extract_final_answer;
use tabletrace_data::matching::{exact_match, normalize, Norm};
use tabletrace_data::Answer;

/// Whether a final answer matches a gold answer: the same rule evaluation
/// scores by ([`exact_match`]: value sets, and for an empty gold result an
/// answer saying there is none).
pub fn matches_gold(answer: &str, gold: &Answer) -> bool {
    exact_match(answer, gold)
}

/// What a trace may cite: normalised texts, their words, and numbers.
#[derive(Debug, Default, Clone)]
pub struct Evidence {
    texts: std::collections::HashSet<String>,
    numbers: std::collections::HashSet<i64>,
}

impl Evidence {
    /// Adds a value (a cell, a count, a schema name, a word of the question).
    pub fn add(&mut self, raw: &str) {
        match normalize(raw) {
            Norm::Number { value, .. } => {
                self.numbers.insert(number_key(value));
            }
            Norm::Text(t) => {
                for w in t.split_whitespace() {
                    self.texts.insert(w.to_string());
                }
                self.texts.insert(t);
            }
        }
    }

    fn has(&self, token: &str) -> bool {
        match normalize(token) {
            Norm::Number { value, .. } => self.numbers.contains(&number_key(value)),
            Norm::Text(t) => self.texts.contains(&t),
        }
    }
}

impl<S: AsRef<str>> FromIterator<S> for Evidence {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut e = Evidence::default();
        for s in iter {
            e.add(s.as_ref());
        }
        e
    }
}

/// Numbers compare to 6 decimals.
fn number_key(x: f64) -> i64 {
    (x * 1e6).round() as i64
}

/// SQL words and aggregate names a trace writes that are not citations.
const NOT_CITED: &[&str] = &[
    "SUM", "AVG", "COUNT", "MIN", "MAX", "AND", "OR", "NOT", "IN", "LIKE", "IS", "NULL", "DISTINCT", "AS", "SELECT",
    "FROM", "WHERE", "BY", "ASC", "DESC",
];

/// Share of the numbers and capitalised entities a trace cites that occur
/// in `evidence` (cell values of the tables and of executed intermediate
/// results, schema names, the question's own words). 1.0 when the trace
/// cites nothing checkable.
pub fn faithfulness(text: &str, evidence: &Evidence) -> f64 {
    let cited = citations(text);
    if cited.is_empty() {
        return 1.0;
    }
    cited.iter().filter(|t| evidence.has(t)).count() as f64 / cited.len() as f64
}

/// Numbers and capitalised words (not at a sentence start, not step labels)
/// of a trace: the values it claims to have read or computed.
fn citations(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let body = line.split_once(':').filter(|(head, _)| head.starts_with("Step ")).map_or(line, |(_, b)| b);
        // Split on spaces and punctuation; dots split words (`table.column`)
        // but not numbers (`231794.0`).
        let mut words: Vec<&str> = Vec::new();
        for w in body.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '(' | ')' | '=')) {
            if w.trim_end_matches('.').parse::<f64>().is_ok() {
                words.push(w);
            } else {
                let mut parts = w.split('.').peekable();
                while let Some(p) = parts.next() {
                    // A sentence end keeps its dot, so the next word counts as a sentence start.
                    words.push(if parts.peek().is_some_and(|n| n.is_empty()) { w } else { p });
                    if parts.peek().is_some_and(|n| n.is_empty()) {
                        break;
                    }
                }
            }
        }
        for (i, w) in words.iter().enumerate() {
            let w = w.trim_matches(|c: char| matches!(c, '.' | ':' | '"' | '\'' | '`' | '*'));
            if w.is_empty() {
                continue;
            }
            let is_number = w.parse::<f64>().is_ok() && w.chars().any(|c| c.is_ascii_digit());
            // The first word of a sentence is capitalised anyway.
            let starts_sentence = words[..i].iter().rev().find(|x| !x.is_empty()).is_none_or(|p| p.ends_with('.'));
            let is_entity = w.chars().next().is_some_and(char::is_uppercase) && !starts_sentence && w.len() > 1;
            if is_number || (is_entity && !NOT_CITED.contains(&w.to_ascii_uppercase().as_str())) {
                out.push(w.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_label_is_stripped() {
        assert_eq!(
            extract_final_answer("x\nFinal answer: Final answer: Sergio García").as_deref(),
            Some("Sergio García")
        );
        assert_eq!(extract_final_answer("**Final Answer:** 42.").as_deref(), Some("42"));
        assert_eq!(extract_final_answer("no label"), None);
    }

    #[test]
    fn final_answers_are_found_in_common_forms() {
        assert_eq!(extract_final_answer("Step 1: x\nFinal answer: Treasury, 231794.0").unwrap(), "Treasury, 231794.0");
        assert_eq!(extract_final_answer("blah\n**Final Answer:** Paris.\n").unwrap(), "Paris");
        assert_eq!(extract_final_answer("final answer: 3\nFinal answer: 4").unwrap(), "4");
        assert!(extract_final_answer("The answer is 4").is_none());
        assert!(extract_final_answer("Final answer:").is_none());
    }

    #[test]
    fn faithfulness_counts_cited_values_found() {
        let evidence: Evidence = ["Treasury", "231794.0", "15", "Homeland Security"].into_iter().collect();
        assert_eq!(faithfulness("Step 1: Look at 15 rows.\nFinal answer: Treasury, 231794", &evidence), 1.0);
        let f = faithfulness("Step 1: Look at 16 rows of Defense.\nFinal answer: Treasury", &evidence);
        assert!((f - 1.0 / 3.0).abs() < 1e-9, "{f}");
        assert_eq!(faithfulness("Step 1: Sum over Homeland Security with SUM(x).", &evidence), 1.0);
    }

    #[test]
    fn empty_gold_accepts_none() {
        let empty =
            Answer::Table(tabletrace_data::ResultSet { columns: vec![], rows: vec![], n_rows: 0, truncated: false });
        assert!(matches_gold("none", &empty));
        assert!(!matches_gold("Treasury", &empty));
    }
}
