//! Answer normalisation and scoring.
//!
//! Rules, each unit-tested below with cases from the data:
//! - text: case, surrounding whitespace and punctuation, inner runs of
//!   whitespace, surrounding quotes and brackets are ignored;
//! - numbers: `12.0` = `12`, `1,234` = `1234`, `$5` = `5`, a trailing `.00`
//!   is dropped, and `45%` matches both `45` and `0.45`; a value written
//!   with fewer decimals matches when the other rounds to it (`33.33` vs
//!   `33.3333`), as long as at least one decimal is written;
//! - value sets: an answer is a set of values (cells, or comma-separated
//!   items); [`exact_match`] compares sets, [`partial_match`] gives the
//!   share of gold values found, [`token_f1`] is SQuAD-style token F1, and
//!   [`numeric_match`] compares sets with a relative tolerance on numbers.

use serde::Serialize;

use crate::answer::Answer;
use crate::value::Value;

/// A normalised value: a number (with how many decimals it was written
/// with) or normalised text.
#[derive(Debug, Clone, PartialEq)]
pub enum Norm {
    /// A number.
    Number {
        /// Its value (a percentage keeps its written value: `45%` is 45).
        value: f64,
        /// Decimals as written (`33.33` has 2; trailing zeros are dropped).
        decimals: u32,
        /// Written with `%`.
        percent: bool,
    },
    /// Normalised text.
    Text(String),
}

/// Normalises one value as written (a cell's display form, or one item of
/// a predicted answer).
pub fn normalize(raw: &str) -> Norm {
    let text = normalize_text(raw);
    match parse_number(&text) {
        Some((value, decimals, percent)) => Norm::Number { value, decimals, percent },
        None => Norm::Text(text),
    }
}

/// Lowercase, collapse whitespace, strip surrounding quotes, brackets and
/// punctuation (but keep a leading `-`, `$` or `(` that belongs to a value
/// such as `(262)347-9364x516`).
pub fn normalize_text(raw: &str) -> String {
    let collapsed = raw.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let mut s = collapsed.as_str();
    loop {
        let before = s;
        s = s.trim_end_matches(['.', ',', ';', ':', '!', '?', '"', '\'', '`', ' ']);
        s = s.trim_start_matches(['"', '\'', '`', ' ', '*']);
        s = s.trim_end_matches('*');
        for (open, close) in [('"', '"'), ('\'', '\''), ('[', ']'), ('(', ')'), ('{', '}')] {
            if s.len() >= 2
                && s.starts_with(open)
                && s.ends_with(close)
                && balanced_inside(&s[1..s.len() - 1], open, close)
            {
                s = &s[1..s.len() - 1];
            }
        }
        if s == before {
            return s.trim().to_string();
        }
    }
}

fn balanced_inside(inner: &str, open: char, close: char) -> bool {
    if open == close {
        return !inner.contains(open);
    }
    let mut depth = 0i32;
    for c in inner.chars() {
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth < 0 {
                return false;
            }
        }
    }
    depth == 0
}

/// Reads `1,234.50`, `-3`, `$5`, `45%`, `1e3`. Returns the value, the
/// decimals written (trailing zeros dropped) and whether it was a percentage.
fn parse_number(s: &str) -> Option<(f64, u32, bool)> {
    let mut t = s.trim();
    let percent = t.ends_with('%');
    t = t.trim_end_matches('%').trim_end();
    t = t.trim_start_matches(['$', '€', '£']);
    if t.is_empty() || !t.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let plain: String = if t.contains(',') {
        if !is_thousands_grouped(t) {
            return None;
        }
        t.replace(',', "")
    } else {
        t.to_string()
    };
    if !plain.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E')) {
        return None;
    }
    let value: f64 = plain.parse().ok().filter(|x: &f64| x.is_finite())?;
    let decimals = match plain.split_once('.') {
        Some((_, frac)) if !frac.contains(['e', 'E']) => frac.trim_end_matches('0').len() as u32,
        _ => 0,
    };
    Some((value, decimals, percent))
}

/// `1,234` and `-12,345,678.5` are grouped; `1,23` and `12,3456` are not.
fn is_thousands_grouped(t: &str) -> bool {
    let t = t.trim_start_matches(['-', '+']);
    let int_part = t.split('.').next().unwrap_or("");
    let groups: Vec<&str> = int_part.split(',').collect();
    groups.len() > 1
        && (1..=3).contains(&groups[0].len())
        && groups[1..].iter().all(|g| g.len() == 3)
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_digit()))
}

/// Splits a written answer into values on `;`, `|`, newlines and commas,
/// but not on the commas of a thousands-grouped number (`115,897`).
pub fn split_values(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    for part in text.split(['\n', ';', '|']) {
        let chars: Vec<char> = part.chars().collect();
        let mut start = 0;
        for i in 0..chars.len() {
            if chars[i] != ',' {
                continue;
            }
            let digit_before = i > 0 && chars[i - 1].is_ascii_digit();
            let three_after = chars.len() >= i + 4
                && chars[i + 1..i + 4].iter().all(char::is_ascii_digit)
                && chars.get(i + 4).is_none_or(|c| !c.is_ascii_digit());
            if digit_before && three_after {
                continue;
            }
            items.push(chars[start..i].iter().collect::<String>());
            start = i + 1;
        }
        items.push(chars[start..].iter().collect::<String>());
    }
    items.into_iter().map(|s| s.trim().to_string()).filter(|s| !normalize_text(s).is_empty()).collect()
}

/// The key two cells compare by: numbers by value (to 1e-9 relative),
/// text exactly, NULL as `NULL`.
pub(crate) fn cell_key(v: &Value) -> String {
    match v {
        Value::Integer(i) => format!("n:{i}"),
        Value::Real(x) if x.fract() == 0.0 && x.abs() < 9e15 => format!("n:{}", *x as i64),
        Value::Real(x) => format!("n:{:.9e}", x),
        Value::Text(s) => format!("s:{s}"),
        Value::Null => "null".to_string(),
        Value::Blob(_) => format!("b:{v}"),
    }
}

fn strict_eq(a: &Norm, b: &Norm) -> bool {
    match (a, b) {
        (Norm::Text(x), Norm::Text(y)) => x == y,
        (
            Norm::Number { value: x, decimals: dx, percent: px },
            Norm::Number { value: y, decimals: dy, percent: py },
        ) => {
            let candidates = |v: f64, p: bool| if p { vec![v, v / 100.0] } else { vec![v] };
            candidates(*x, *px).iter().any(|&x| {
                candidates(*y, *py).iter().any(|&y| {
                    if (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0) {
                        return true;
                    }
                    // The coarser value must be written with at least one decimal.
                    let d = (*dx).min(*dy);
                    d >= 1 && {
                        let scale = 10f64.powi(d as i32);
                        ((x * scale).round() - (y * scale).round()).abs() < 0.5
                    }
                })
            })
        }
        _ => false,
    }
}

fn tolerant_eq(a: &Norm, b: &Norm, rel_tol: f64) -> bool {
    if strict_eq(a, b) {
        return true;
    }
    match (a, b) {
        (Norm::Number { value: x, percent: px, .. }, Norm::Number { value: y, percent: py, .. }) => {
            let candidates = |v: f64, p: bool| if p { vec![v, v / 100.0] } else { vec![v] };
            candidates(*x, *px)
                .iter()
                .any(|&x| candidates(*y, *py).iter().any(|&y| (x - y).abs() <= rel_tol * x.abs().max(y.abs())))
        }
        _ => false,
    }
}

fn dedup(values: Vec<Norm>, eq: impl Fn(&Norm, &Norm) -> bool) -> Vec<Norm> {
    let mut out: Vec<Norm> = Vec::new();
    for v in values {
        if !out.iter().any(|o| eq(o, &v)) {
            out.push(v);
        }
    }
    out
}

fn set_eq(pred: &[Norm], gold: &[Norm], eq: impl Fn(&Norm, &Norm) -> bool + Copy) -> bool {
    let (p, g) = (dedup(pred.to_vec(), eq), dedup(gold.to_vec(), eq));
    !g.is_empty() && p.len() == g.len() && g.iter().all(|x| p.iter().any(|y| eq(x, y)))
}

fn norms(values: &[String]) -> Vec<Norm> {
    values.iter().map(|v| normalize(v)).collect()
}

/// Whether an answer says that there is nothing (`none`, `no rows`, …;
/// an empty answer says nothing at all and does not count): the one right answer to a gold result without values.
pub fn says_nothing(prediction: &str) -> bool {
    matches!(
        normalize_text(prediction).as_str(),
        "none" | "nothing" | "no rows" | "no result" | "no results" | "empty" | "0 rows" | "null" | "n/a"
    )
}

/// Value-set exact match: the predicted values, as a set, equal the gold
/// values. A prediction that equals a single gold value as a whole (a value
/// that itself contains a comma) also matches. A gold result without values
/// is matched by an answer that [`says_nothing`]; trace validation and
/// evaluation both score through here.
pub fn exact_match(prediction: &str, gold: &Answer) -> bool {
    let g = norms(&gold.values());
    if g.is_empty() {
        return says_nothing(prediction);
    }
    set_eq(&norms(&split_values(prediction)), &g, strict_eq)
        || (g.len() == 1 && strict_eq(&normalize(prediction), &g[0]))
}

/// MMQA-style partial match: the share of distinct gold values that the
/// prediction contains, as a value or (for text values) as a substring of
/// the normalised prediction. 1.0 when all are found.
pub fn partial_match(prediction: &str, gold: &Answer) -> f64 {
    let g = dedup(norms(&gold.values()), strict_eq);
    if g.is_empty() {
        return if says_nothing(prediction) { 1.0 } else { 0.0 };
    }
    let p = norms(&split_values(prediction));
    let whole = normalize_text(prediction);
    let found = g
        .iter()
        .filter(|x| {
            p.iter().any(|y| strict_eq(x, y))
                || matches!(x, Norm::Text(t) if !t.is_empty() && whole.contains(t.as_str()))
        })
        .count();
    found as f64 / g.len() as f64
}

/// Numeric-tolerant value-set match: like [`exact_match`], but numbers
/// match within `rel_tol` relative difference (0.01 is 1%).
pub fn numeric_match(prediction: &str, gold: &Answer, rel_tol: f64) -> bool {
    let g = norms(&gold.values());
    if g.is_empty() {
        return says_nothing(prediction);
    }
    let eq = |a: &Norm, b: &Norm| tolerant_eq(a, b, rel_tol);
    set_eq(&norms(&split_values(prediction)), &g, eq) || (g.len() == 1 && eq(&normalize(prediction), &g[0]))
}

/// Tokens for F1: normalised text split on whitespace and punctuation,
/// numbers in canonical form, articles dropped (as SQuAD does).
fn f1_tokens(text: &str) -> Vec<String> {
    normalize_text(text)
        .split(|c: char| c.is_whitespace() || (c.is_ascii_punctuation() && c != '.' && c != '-' && c != '%'))
        .map(|t| t.trim_matches(['.', '-']))
        .filter(|t| !t.is_empty() && !matches!(*t, "a" | "an" | "the"))
        .map(|t| match normalize(t) {
            Norm::Number { value, .. } => format!("{value}"),
            Norm::Text(s) => s,
        })
        .collect()
}

/// SQuAD-style token F1 between the prediction and the gold values joined.
pub fn token_f1(prediction: &str, gold: &Answer) -> f64 {
    if gold.values().is_empty() {
        return if says_nothing(prediction) { 1.0 } else { 0.0 };
    }
    let p = f1_tokens(prediction);
    let g = f1_tokens(&gold.values().join(" "));
    if p.is_empty() || g.is_empty() {
        return if p.is_empty() && g.is_empty() { 1.0 } else { 0.0 };
    }
    let mut remaining = g.clone();
    let mut common = 0usize;
    for t in &p {
        if let Some(i) = remaining.iter().position(|x| x == t) {
            remaining.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The answer a line gives after a `Final answer` label (case-insensitive;
/// Markdown emphasis, a repeated label and a trailing period removed), if it
/// is such a line with a non-empty answer.
fn labelled_answer(line: &str) -> Option<&str> {
    let mut l = line.trim().trim_start_matches(['*', '#', ' ']);
    let mut found = false;
    // Small models repeat the label ("Final answer: Final answer: x").
    while let Some(rest) = l.to_ascii_lowercase().strip_prefix("final answer").map(str::len) {
        l = l[l.len() - rest..].trim_start_matches(['*', ':', ' ']);
        found = true;
    }
    if !found {
        return None;
    }
    let v = l.trim_end_matches(['*', ' ']).trim_end_matches('.').trim();
    (!v.is_empty()).then_some(v)
}

/// The answer on the last `Final answer:` line (see [`final_answer_line`]),
/// if there is one. Trace validation and evaluation both read answers with it.
pub fn extract_final_answer(text: &str) -> Option<String> {
    text.lines().rev().find_map(labelled_answer).map(str::to_string)
}

/// The last line that gives a final answer, whole and trimmed (label
/// included): the target of Q&A SFT. The same lines as [`extract_final_answer`]
/// reads (case-insensitive label, Markdown emphasis, a repeated label).
pub fn final_answer_line(text: &str) -> Option<&str> {
    text.lines().rev().find(|l| labelled_answer(l).is_some()).map(str::trim)
}

/// All scores of one prediction against one gold answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    /// [`exact_match`].
    pub em: bool,
    /// [`partial_match`].
    pub pm: f64,
    /// [`token_f1`].
    pub f1: f64,
    /// [`numeric_match`] at 1% relative tolerance.
    pub num: bool,
}

/// Scores a prediction against a gold answer with every metric.
pub fn score(prediction: &str, gold: &Answer) -> Scores {
    Scores {
        em: exact_match(prediction, gold),
        pm: partial_match(prediction, gold),
        f1: token_f1(prediction, gold),
        num: numeric_match(prediction, gold, 0.01),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::ResultSet;

    fn text(s: &str) -> Answer {
        Answer::Text { text: s.to_string() }
    }
    fn rows(rows: Vec<Vec<Value>>) -> Answer {
        Answer::Table(ResultSet { columns: vec![], n_rows: rows.len(), truncated: false, rows })
    }
    fn t(s: &str) -> Value {
        Value::Text(s.to_string())
    }

    #[test]
    fn the_final_answer_line_is_the_one_the_answer_is_read_from() {
        let t = "Step 1: …\n**Final Answer:** Treasury.\nThanks!";
        assert_eq!(final_answer_line(t), Some("**Final Answer:** Treasury."));
        assert_eq!(extract_final_answer(t).as_deref(), Some("Treasury"));
        assert_eq!(
            final_answer_line("a\nFinal answer: 3\nFinal answer:\n"),
            Some("Final answer: 3"),
            "an empty answer is none"
        );
        assert_eq!(final_answer_line("no answer here"), None);
    }

    #[test]
    fn case_whitespace_and_punctuation() {
        assert_eq!(normalize_text("  Homeland   Security. "), "homeland security");
        assert_eq!(normalize_text("\"Perth-Andover\""), "perth-andover");
        assert_eq!(normalize_text("**Aroostook**"), "aroostook");
        // A phone number from MMQA two_table:11 keeps its inner punctuation.
        assert_eq!(normalize_text("(262)347-9364x516"), "(262)347-9364x516");
        assert_eq!(normalize_text("(Treasury)"), "treasury");
    }

    #[test]
    fn an_empty_gold_result_is_matched_by_saying_none_in_every_score() {
        let empty = rows(vec![]);
        for said in ["none", "None.", "No rows", "**nothing**"] {
            let s = score(said, &empty);
            assert!(s.em && s.num && s.pm == 1.0 && s.f1 == 1.0, "{said}: {s:?}");
        }
        for said in ["", "0", "Treasury"] {
            let s = score(said, &empty);
            assert!(!s.em && !s.num && s.pm == 0.0 && s.f1 == 0.0, "{said:?}: {s:?}");
        }
        // A gold with values is not matched by "none".
        assert!(!exact_match("none", &rows(vec![vec![Value::Integer(0)]])));
    }

    #[test]
    fn numbers() {
        // two_table:18 publishes "3.0"; the SQL returns the integer 3.
        assert!(exact_match("3", &text("3.0")));
        assert!(exact_match("12.0", &rows(vec![vec![Value::Integer(12)]])));
        // Thousands separators (two_table:0 publishes 115897).
        assert!(exact_match("115,897", &rows(vec![vec![Value::Real(115897.0)]])));
        assert!(exact_match("1,234,567.00", &text("1234567")));
        assert!(!exact_match("1,23", &text("123")));
        // Percentages match the number and the fraction.
        assert!(exact_match("45%", &text("45")));
        assert!(exact_match("45%", &rows(vec![vec![Value::Real(0.45)]])));
        assert!(exact_match("$5", &text("5")));
        // Rounded to the written decimals: AVG results are long floats.
        assert!(exact_match("33.33", &rows(vec![vec![Value::Real(33.333333333)]])));
        assert!(!exact_match("33", &rows(vec![vec![Value::Real(33.333333333)]])));
        assert!(!exact_match("33.4", &rows(vec![vec![Value::Real(33.333333333)]])));
        assert!(!exact_match("12", &text("12.5")));
    }

    #[test]
    fn value_sets_from_the_data() {
        // two_table:0: published "Treasury, 115897" vs executed (Treasury, 231794.0).
        let executed = rows(vec![vec![t("Treasury"), Value::Real(231794.0)]]);
        assert!(!exact_match("Treasury, 115897", &executed));
        assert!(exact_match("treasury, 231794", &executed));
        assert!(exact_match("231794; Treasury", &executed), "order of a value set does not matter");
        // two_table:1: two identical rows; the published answer lists each value once.
        let executed = rows(vec![vec![t("Treasury"), Value::Real(11.1)], vec![t("Treasury"), Value::Real(11.1)]]);
        assert!(exact_match("Treasury, 11.1", &executed));
        // two_table:3 lists three cities, one repeated in the result.
        let executed =
            rows(vec![vec![t("Plaster Rock")], vec![t("Drummond")], vec![t("Aroostook")], vec![t("Aroostook")]]);
        assert!(exact_match("Plaster Rock, Drummond, Aroostook", &executed));
        assert!(!exact_match("Plaster Rock, Drummond", &executed));
        // A single value that itself holds a comma.
        assert!(exact_match("Smith, John", &rows(vec![vec![t("Smith, John")]])));
    }

    #[test]
    fn partial_match_counts_gold_values_found() {
        let gold = text("Plaster Rock, Drummond, Aroostook");
        assert_eq!(partial_match("Plaster Rock, Drummond", &gold), 2.0 / 3.0);
        assert_eq!(partial_match("The cities are Plaster Rock, Drummond and Aroostook.", &gold), 1.0);
        assert_eq!(partial_match("Fredericton", &gold), 0.0);
    }

    #[test]
    fn token_f1_squad_style() {
        let gold = text("Health and Human Services");
        assert_eq!(token_f1("health and human services", &gold), 1.0);
        let f1 = token_f1("the Human Services", &gold);
        assert!((f1 - 2.0 * (1.0 * 0.5) / 1.5).abs() < 1e-12, "{f1}");
        assert_eq!(token_f1("Treasury", &gold), 0.0);
        assert_eq!(token_f1("12.0", &text("12")), 1.0);
    }

    #[test]
    fn numeric_tolerance() {
        let gold = rows(vec![vec![Value::Real(231794.0)]]);
        assert!(numeric_match("231,000", &gold, 0.01));
        assert!(!numeric_match("200000", &gold, 0.01));
        assert!(!exact_match("231,000", &gold));
    }

    #[test]
    fn splitting_keeps_thousands() {
        assert_eq!(split_values("Treasury, 115,897"), vec!["Treasury", "115,897"]);
        assert_eq!(split_values("1,2,3"), vec!["1", "2", "3"]);
        assert_eq!(split_values("a; b\nc | d"), vec!["a", "b", "c", "d"]);
        assert_eq!(split_values("x, , y."), vec!["x", "y."]);
    }
}
