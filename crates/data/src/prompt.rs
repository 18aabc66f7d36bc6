//! Renders a question's tables as prompt text: a schema header with keys,
//! then rows as Markdown or CSV, under a budget of rows and/or tokens.
//!
//! When a table does not fit, the rows the question most likely needs are
//! kept: rows holding a value that the question or its gold SQL mentions (a
//! string literal, a number, a quoted phrase) come first, then rows in
//! storage order. Kept rows are printed in storage order and the text says
//! how many were left out. Output is deterministic.

use serde::{Deserialize, Serialize};

use crate::question::{KeyHints, Question};
use crate::sql::{SqlFailure, TableDb};
use crate::table::{loose_name, Database};
use crate::value::Value;

/// How rows are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowFormat {
    /// A Markdown table (the default).
    #[default]
    Markdown,
    /// CSV with a header line.
    Csv,
}

/// How much of the tables a prompt may hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Rows shown per table at most. Default 100.
    pub max_rows_per_table: Option<usize>,
    /// Tokens for the whole rendering at most (headers included), counted
    /// by the counter given to [`render_tables`]. Default: no limit.
    pub max_tokens: Option<usize>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { max_rows_per_table: Some(100), max_tokens: None }
    }
}

/// A rough token count (one token per 4 bytes, at least one per word) for
/// budgets when no tokenizer is at hand.
pub fn approx_tokens(text: &str) -> usize {
    text.len().div_ceil(4).max(text.split_whitespace().count())
}

/// Rendered tables and what was left out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderedTables {
    /// The text to put in the prompt.
    pub text: String,
    /// Rows shown, over all tables.
    pub rows_shown: usize,
    /// Rows in the tables.
    pub rows_total: usize,
    /// Tokens of `text`, by the counter used.
    pub tokens: usize,
    /// False when even the schema without rows exceeds the token budget
    /// (the text is then the schema alone, over budget).
    pub fits: bool,
}

/// Rows held for one table while scanning.
struct Candidates {
    total: usize,
    /// `(relevance, row index, row)`.
    rows: Vec<(usize, usize, Vec<Value>)>,
}

/// Renders a question's tables (already opened as `db`).
///
/// Memory stays bounded by the budget: rows are streamed from SQLite and at
/// most twice the per-table row budget (or 10,000 rows when only a token
/// budget is set) are held per table.
pub fn render_tables(
    db: &TableDb,
    question: &Question,
    format: RowFormat,
    budget: &Budget,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<RenderedTables, SqlFailure> {
    let schema = db.schema()?;
    let terms = relevance_terms(question);
    let keep = budget.max_rows_per_table.unwrap_or(if budget.max_tokens.is_some() { 10_000 } else { usize::MAX });
    let mut candidates = Vec::with_capacity(schema.tables.len());
    for table in &schema.tables {
        let mut c = Candidates { total: 0, rows: Vec::new() };
        db.scan(&table.name, |row| {
            let score = relevance(&row, &terms);
            c.rows.push((score, c.total, row));
            c.total += 1;
            if c.rows.len() >= keep.saturating_mul(2).max(64) {
                prune(&mut c.rows, keep);
            }
            true
        })?;
        prune(&mut c.rows, keep);
        candidates.push(c);
    }

    let headers: Vec<String> = schema.tables.iter().map(|t| table_header(&schema, t, &question.key_hints)).collect();
    let column_lines: Vec<String> = schema
        .tables
        .iter()
        .map(|t| render_row(format, &t.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>()))
        .collect();
    let row_texts: Vec<Vec<String>> = candidates
        .iter()
        .map(|c| {
            c.rows
                .iter()
                .map(|(_, _, r)| render_row(format, &r.iter().map(Value::to_string).collect::<Vec<_>>()))
                .collect()
        })
        .collect();

    let assemble = |chosen: &[Vec<bool>]| -> (String, usize, usize) {
        let mut text = String::new();
        let (mut rows_shown, mut rows_total) = (0, 0);
        for (t, table) in schema.tables.iter().enumerate() {
            let c = &candidates[t];
            let mut picked: Vec<(usize, &String)> = c
                .rows
                .iter()
                .zip(&row_texts[t])
                .zip(&chosen[t])
                .filter(|(_, &on)| on)
                .map(|(((_, i, _), s), _)| (*i, s))
                .collect();
            picked.sort_by_key(|(i, _)| *i);
            text.push_str(&headers[t]);
            text.push_str(&column_lines[t]);
            if format == RowFormat::Markdown {
                text.push_str(&format!("|{}\n", "---|".repeat(table.columns.len())));
            }
            for (_, row) in &picked {
                text.push_str(row);
            }
            if picked.len() < c.total {
                text.push_str(&format!(
                    "({} of {} rows shown; {} rows left out)\n",
                    picked.len(),
                    c.total,
                    c.total - picked.len()
                ));
            }
            text.push('\n');
            rows_shown += picked.len();
            rows_total += c.total;
        }
        if !schema.foreign_keys.is_empty() {
            text.push_str("Foreign keys:\n");
            for fk in &schema.foreign_keys {
                text.push_str(&format!("- {}.{} -> {}.{}\n", fk.table, fk.column, fk.ref_table, fk.ref_column));
            }
        }
        (text.trim_end().to_string() + "\n", rows_shown, rows_total)
    };

    // Choose rows: every candidate, or, under a token budget, rows in
    // priority order taken round-robin over the tables while they fit.
    let mut chosen: Vec<Vec<bool>> = row_texts.iter().map(|r| vec![budget.max_tokens.is_none(); r.len()]).collect();
    if let Some(max_tokens) = budget.max_tokens {
        let skeleton = count_tokens(&assemble(&chosen).0);
        let mut used = skeleton;
        let mut added: Vec<(usize, usize)> = Vec::new();
        let mut next = vec![0usize; row_texts.len()];
        let mut progress = true;
        while progress {
            progress = false;
            for (t, rows) in row_texts.iter().enumerate() {
                if let Some(text) = rows.get(next[t]) {
                    let cost = count_tokens(text);
                    if used + cost <= max_tokens {
                        used += cost;
                        chosen[t][next[t]] = true;
                        added.push((t, next[t]));
                        next[t] += 1;
                        progress = true;
                    } else {
                        next[t] = rows.len();
                    }
                }
            }
        }
        // Token counts need not add up exactly (footers change, tokenizers
        // merge across lines): drop the last rows added until the text fits.
        while let Some((t, i)) = added.last().copied() {
            if count_tokens(&assemble(&chosen).0) <= max_tokens {
                break;
            }
            chosen[t][i] = false;
            added.pop();
        }
    }

    let (text, rows_shown, rows_total) = assemble(&chosen);
    let tokens = count_tokens(&text);
    let fits = budget.max_tokens.is_none_or(|m| tokens <= m);
    Ok(RenderedTables { text, rows_shown, rows_total, tokens, fits })
}

/// Keeps the `keep` most relevant rows (ties: earlier rows first).
fn prune(rows: &mut Vec<(usize, usize, Vec<Value>)>, keep: usize) {
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    rows.truncate(keep);
}

fn table_header(schema: &Database, table: &crate::table::Table, hints: &KeyHints) -> String {
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| match c.ty.sql_name() {
            "" => c.name.clone(),
            ty => format!("{} ({})", c.name, ty.to_lowercase()),
        })
        .collect();
    let mut s = format!("Table: {}\nColumns: {}\n", table.name, cols.join(", "));
    if !table.primary_key.is_empty() {
        s.push_str(&format!("Primary key: {}\n", table.primary_key.join(", ")));
    } else if schema.foreign_keys.is_empty() {
        // No declared keys: name the columns the dataset's key phrases point at.
        let hinted: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| hints.primary.iter().chain(&hints.foreign).any(|h| loose_name(h) == loose_name(&c.name)))
            .map(|c| c.name.as_str())
            .collect();
        if !hinted.is_empty() {
            s.push_str(&format!("Key columns: {}\n", hinted.join(", ")));
        }
    }
    s
}

fn render_row(format: RowFormat, cells: &[String]) -> String {
    match format {
        RowFormat::Markdown => {
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|").replace(['\n', '\r'], " ")).collect();
            format!("| {} |\n", cells.join(" | "))
        }
        RowFormat::Csv => {
            let cells: Vec<String> = cells
                .iter()
                .map(|c| {
                    if c.contains([',', '"', '\n', '\r']) {
                        format!("\"{}\"", c.replace('"', "\"\""))
                    } else {
                        c.clone()
                    }
                })
                .collect();
            format!("{}\n", cells.join(","))
        }
    }
}

/// Values the question or its SQL mentions: string literals and numbers of
/// the SQL, quoted phrases and numbers of the question; lowercased.
fn relevance_terms(q: &Question) -> Vec<String> {
    let mut terms = Vec::new();
    if let Some(sql) = &q.gold_sql {
        terms.extend(quoted(sql, '\''));
        terms.extend(quoted(sql, '"'));
        terms.extend(numbers(sql));
    }
    terms.extend(quoted(&q.text, '"'));
    terms.extend(numbers(&q.text));
    let mut terms: Vec<String> =
        terms.into_iter().map(|t| t.trim_matches('%').to_lowercase()).filter(|t| !t.is_empty()).collect();
    terms.sort();
    terms.dedup();
    terms
}

fn quoted(s: &str, q: char) -> Vec<String> {
    s.split(q).skip(1).step_by(2).map(str::to_string).collect()
}

fn numbers(s: &str) -> Vec<String> {
    s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|t| t.trim_matches('.'))
        .filter(|t| !t.is_empty() && t.bytes().any(|b| b.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

fn relevance(row: &[Value], terms: &[String]) -> usize {
    if terms.is_empty() {
        return 0;
    }
    terms
        .iter()
        .filter(|term| {
            row.iter().any(|v| match v {
                Value::Text(s) => {
                    let s = s.to_lowercase();
                    s == **term || (term.len() >= 3 && s.contains(term.as_str()))
                }
                Value::Integer(_) | Value::Real(_) => {
                    term.parse::<f64>().ok().zip(v.as_f64()).is_some_and(|(a, b)| (a - b).abs() < 1e-9)
                }
                _ => false,
            })
        })
        .count()
}
