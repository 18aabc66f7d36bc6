//! Training rows and their tokenisation, identical to TRL's for the same rows.
//!
//! Rows are JSONL in TRL's formats: preference (`prompt`, `chosen`,
//! `rejected`) or prompt-completion (`prompt`, `completion`), each either
//! standard (strings) or conversational (lists of `{role, content}`).
//!
//! - Preference rows follow `CPOTrainer.tokenize_row`: the answer's tokens
//!   are those of `prompt + answer` after the prompt's (one fewer when the
//!   tokenizer merges across the boundary), BOS is prepended to the prompt
//!   unless already there, EOS appended to the answer unless already there,
//!   and the answer is cut to fit `max_length`.
//! - Completion rows follow `SFTTrainer`: EOS text appended to standard
//!   completions, the completion starts where the tokenised prompt and
//!   prompt + completion diverge, the sequence is cut at `max_length`.
//! - Preference rows for DPO follow `DPOTrainer` ([`tokenize_dpo`]): each of
//!   chosen and rejected as a completion row is, the completions starting
//!   where the first of the two diverges from the prompt.
//! - Conversational rows are rendered with the chat template first, as
//!   TRL's `maybe_apply_chat_template` does.

use std::path::Path;

use serde_json::Value;
use tabletrace_model::{ChatMessage, Tokenizer};

use crate::error::{io, Error, Result};

/// A token sequence whose tokens from `completion_start` on are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Prompt and completion ids.
    pub ids: Vec<u32>,
    /// Index of the first completion token.
    pub completion_start: usize,
}

impl Sequence {
    /// Number of scored completion tokens (the first token of a sequence
    /// has no prediction, so it is never scored).
    pub fn scored(&self) -> usize {
        self.ids.len().saturating_sub(self.completion_start.max(1))
    }
}

/// One row as text, after the chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A preference pair.
    Preference {
        /// Question id or `line N`.
        id: String,
        /// 1-based line in the data file.
        line: usize,
        /// Prompt text.
        prompt: String,
        /// Preferred completion.
        chosen: String,
        /// Rejected completion.
        rejected: String,
        /// Whether the row was conversational (the template ends the turn).
        conversational: bool,
    },
    /// A prompt-completion row (SFT).
    Completion {
        /// Question id or `line N`.
        id: String,
        /// 1-based line in the data file.
        line: usize,
        /// Prompt text.
        prompt: String,
        /// Completion text.
        completion: String,
        /// Whether the row was conversational (no EOS text appended: the template ends the turn).
        conversational: bool,
    },
}

impl Row {
    /// The row's 1-based line in its file.
    pub fn line(&self) -> usize {
        let (Row::Preference { line, .. } | Row::Completion { line, .. }) = self;
        *line
    }

    /// Where the row is, for reports: `ID (line N)`, or `line N` for a row without an id.
    pub fn place(&self) -> String {
        let (Row::Preference { id, line, .. } | Row::Completion { id, line, .. }) = self;
        if *id == format!("line {line}") {
            id.clone()
        } else {
            format!("{id} (line {line})")
        }
    }
}

/// A tokenised row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// Chosen and rejected sequences of one pair.
    Preference {
        /// Row id.
        id: String,
        /// 1-based line of the row in its file.
        line: usize,
        /// Prompt + chosen.
        chosen: Sequence,
        /// Prompt + rejected.
        rejected: Sequence,
    },
    /// One SFT sequence.
    Completion {
        /// Row id.
        id: String,
        /// 1-based line of the row in its file.
        line: usize,
        /// Prompt + completion.
        seq: Sequence,
    },
}

impl Example {
    /// The row id.
    pub fn id(&self) -> &str {
        match self {
            Example::Preference { id, .. } | Example::Completion { id, .. } => id,
        }
    }

    /// The row's 1-based line in its file.
    pub fn line(&self) -> usize {
        match self {
            Example::Preference { line, .. } | Example::Completion { line, .. } => *line,
        }
    }

    /// Tokens in the example (both sequences of a pair).
    pub fn tokens(&self) -> usize {
        match self {
            Example::Preference { chosen, rejected, .. } => chosen.ids.len() + rejected.ids.len(),
            Example::Completion { seq, .. } => seq.ids.len(),
        }
    }
}

/// The sequences of some examples as one batch lays them out: chosen (or
/// SFT) sequences first, then the rejected ones in the same order — the
/// layout [`preference_loss`](crate::objective::preference_loss) expects.
pub fn batch_sequences<'e>(rows: &[&'e Example]) -> Vec<&'e Sequence> {
    let mut seqs = Vec::with_capacity(rows.len() * 2);
    for e in rows {
        match e {
            Example::Preference { chosen, .. } => seqs.push(chosen),
            Example::Completion { seq, .. } => seqs.push(seq),
        }
    }
    for e in rows {
        if let Example::Preference { rejected, .. } = e {
            seqs.push(rejected);
        }
    }
    seqs
}

/// What the SFT target of a preference row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SftTarget {
    /// The chosen trace.
    Trace,
    /// Only the chosen trace's `Final answer: …` line.
    Answer,
}

/// Rows dropped or cut while tokenising, with reasons.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TokenizeReport {
    /// Rows kept.
    pub kept: usize,
    /// Rows whose completion was cut to fit `max_length`.
    pub truncated: usize,
    /// Rows skipped: `(ID (line N), reason)`.
    pub skipped: Vec<(String, String)>,
}

/// Reads a JSONL file of rows, rendering conversational rows with `tokenizer`'s chat template.
pub fn read_rows(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Error::Row { path: path.to_path_buf(), line: i + 1, message };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        rows.push(parse_row(&v, i + 1, tokenizer).map_err(bad)?);
    }
    if rows.is_empty() {
        return Err(Error::Setup(format!("{}: no rows", path.display())));
    }
    Ok(rows)
}

fn messages(v: &Value, key: &str) -> Result<Vec<ChatMessage>, String> {
    let list = v.as_array().ok_or_else(|| format!("{key:?} must be a string or a list of messages"))?;
    list.iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) => Ok(ChatMessage::new(r, c)),
                _ => Err(format!("{key:?}: each message needs string \"role\" and \"content\"")),
            }
        })
        .collect()
}

fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let n = a.char_indices().zip(b.chars()).take_while(|((_, x), y)| x == y).count();
    match a.char_indices().nth(n) {
        Some((at, _)) => &a[..at],
        None => a,
    }
}

/// One JSON row as text; conversational rows go through the chat template
/// as in TRL's `maybe_apply_chat_template`.
pub fn parse_row(v: &Value, line: usize, tokenizer: &Tokenizer) -> Result<Row, String> {
    let id = v
        .pointer("/metadata/question_id")
        .or_else(|| v.get("id"))
        .and_then(Value::as_str)
        .map_or_else(|| format!("line {line}"), str::to_string);
    let prompt = v.get("prompt").ok_or("no \"prompt\" (TRL rows need an explicit prompt)")?;
    let answers: Vec<&str> = ["chosen", "rejected", "completion"].into_iter().filter(|k| v.get(*k).is_some()).collect();
    let is_pref = answers == ["chosen", "rejected"];
    if !is_pref && answers != ["completion"] {
        return Err("a row needs \"chosen\" and \"rejected\", or \"completion\"".into());
    }
    if let Some(p) = prompt.as_str() {
        let text = |k: &str| -> Result<String, String> {
            v[k].as_str().map(str::to_string).ok_or_else(|| format!("{k:?} must be a string like \"prompt\""))
        };
        return Ok(if is_pref {
            Row::Preference {
                id,
                line,
                prompt: p.into(),
                chosen: text("chosen")?,
                rejected: text("rejected")?,
                conversational: false,
            }
        } else {
            Row::Completion { id, line, prompt: p.into(), completion: text("completion")?, conversational: false }
        });
    }
    let prompt_msgs = messages(prompt, "prompt")?;
    let last = prompt_msgs.last().ok_or("\"prompt\" has no messages")?;
    let add_generation_prompt = match last.role.as_str() {
        "user" | "tool" | "system" => true,
        "assistant" => return Err("a prompt ending with an assistant message is not supported".into()),
        r => return Err(format!("unknown role {r:?} in the last prompt message")),
    };
    let render = |msgs: &[ChatMessage], gen: bool| tokenizer.apply_chat_template(msgs, gen).map_err(|e| e.to_string());
    let mut prompt_text = render(&prompt_msgs, add_generation_prompt)?;
    let mut full = Vec::new();
    for k in &answers {
        let mut all = prompt_msgs.clone();
        all.extend(messages(&v[*k], k)?);
        let t = render(&all, false)?;
        prompt_text = common_prefix(&prompt_text, &t).to_string();
        full.push(t);
    }
    let tail = |t: &String| t[prompt_text.len()..].to_string();
    Ok(if is_pref {
        Row::Preference {
            id,
            line,
            chosen: tail(&full[0]),
            rejected: tail(&full[1]),
            prompt: prompt_text,
            conversational: true,
        }
    } else {
        Row::Completion { id, line, completion: tail(&full[0]), prompt: prompt_text, conversational: true }
    })
}

/// TRL's `build_tokenized_answer`: (prompt ids, answer ids) of `prompt + answer`.
fn tokenized_answer(tokenizer: &Tokenizer, prompt: &str, answer: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let full = tokenizer.encode(&format!("{prompt}{answer}"), false)?;
    let prompt_ids = tokenizer.encode(prompt, false)?;
    let mut start = prompt_ids.len().min(full.len());
    if prompt_ids[..start] != full[..start] {
        start = start.saturating_sub(1);
    }
    Ok((full[..start].to_vec(), full[start..].to_vec()))
}

/// The chosen trace's `Final answer: …` line (the Q&A SFT target): the
/// data layer's, so that training and evaluation read the same lines.
pub use tabletrace_data::matching::final_answer_line;

/// Tokenises rows for `method`'s kind of training.
///
/// Preference rows train preference methods; for SFT they give prompt →
/// chosen (or its final answer line for Q&A SFT). Prompt-completion rows
/// only train SFT.
pub fn tokenize(
    rows: &[Row],
    tokenizer: &Tokenizer,
    max_length: usize,
    preference: bool,
    sft_target: SftTarget,
) -> Result<(Vec<Example>, TokenizeReport)> {
    let eos = *tokenizer
        .eos_ids()
        .first()
        .ok_or_else(|| Error::Setup("the tokenizer has no EOS token; training needs one to end completions".into()))?;
    let mut out = Vec::new();
    let mut report = TokenizeReport::default();
    for row in rows {
        let example = match row {
            Row::Preference { id, prompt, chosen, rejected, .. } if preference => {
                if chosen.trim().is_empty() || rejected.trim().is_empty() {
                    report.skipped.push((row.place(), "empty chosen or rejected completion".into()));
                    continue;
                }
                let mut seqs = Vec::with_capacity(2);
                let mut truncated = false;
                for answer in [chosen, rejected] {
                    let (mut p, mut a) = tokenized_answer(tokenizer, prompt, answer)?;
                    if let Some(bos) = tokenizer.bos_id() {
                        if p.first() != Some(&bos) {
                            p.insert(0, bos);
                        }
                    }
                    if a.last() != Some(&eos) {
                        a.push(eos);
                    }
                    if p.len() + a.len() > max_length {
                        a.truncate(max_length.saturating_sub(p.len()));
                        truncated = true;
                    }
                    seqs.push((p, a));
                }
                if seqs.iter().any(|(_, a)| a.is_empty()) {
                    let n = seqs[0].0.len();
                    report
                        .skipped
                        .push((row.place(), format!("the prompt alone has {n} tokens, max_length is {max_length}")));
                    continue;
                }
                report.truncated += truncated as usize;
                let mut seqs = seqs
                    .into_iter()
                    .map(|(p, a)| Sequence { completion_start: p.len(), ids: p.into_iter().chain(a).collect() });
                Example::Preference {
                    id: id.clone(),
                    line: row.line(),
                    chosen: seqs.next().expect("two sequences"),
                    rejected: seqs.next().expect("two sequences"),
                }
            }
            Row::Preference { id, .. } | Row::Completion { id, .. } if preference => {
                return Err(Error::Setup(format!(
                    "row {id} is a prompt-completion row; preference methods need prompt/chosen/rejected rows"
                )));
            }
            Row::Preference { id, prompt, chosen, .. } | Row::Completion { id, prompt, completion: chosen, .. } => {
                let (target, conversational) = match (row, sft_target) {
                    // The answer line is cut out of the trace: it needs an EOS of its own.
                    (Row::Preference { .. }, SftTarget::Answer) => match final_answer_line(chosen) {
                        Some(line) => (line.to_string(), false),
                        None => {
                            report.skipped.push((row.place(), "the chosen trace has no \"Final answer:\" line".into()));
                            continue;
                        }
                    },
                    // A conversational row's completion ends with the template's end of turn.
                    (Row::Preference { conversational, .. } | Row::Completion { conversational, .. }, _) => {
                        (chosen.clone(), *conversational)
                    }
                };
                if target.trim().is_empty() {
                    report.skipped.push((row.place(), "empty completion".into()));
                    continue;
                }
                let (mut ids, start) = completion_ids(tokenizer, prompt, &target, conversational)?;
                if start >= max_length {
                    report.skipped.push((
                        row.place(),
                        format!("the prompt alone has {start} tokens, max_length is {max_length}"),
                    ));
                    continue;
                }
                if ids.len() > max_length {
                    ids.truncate(max_length);
                    report.truncated += 1;
                }
                if ids.len() == start {
                    report.skipped.push((row.place(), "the completion has no tokens".into()));
                    continue;
                }
                Example::Completion { id: id.clone(), line: row.line(), seq: Sequence { ids, completion_start: start } }
            }
        };
        report.kept += 1;
        out.push(example);
    }
    Ok((out, report))
}

/// `prompt + completion` tokenised as `SFTTrainer` and `DPOTrainer` do:
/// the EOS text appended to a standard completion, the completion starting
/// where the tokenised prompt and the whole diverge. `(ids, start)`.
fn completion_ids(
    tokenizer: &Tokenizer,
    prompt: &str,
    completion: &str,
    conversational: bool,
) -> Result<(Vec<u32>, usize)> {
    let eos_text = tokenizer.eos_token();
    let completion = if !conversational && !eos_text.is_empty() && !completion.ends_with(eos_text) {
        format!("{completion}{eos_text}")
    } else {
        completion.to_string()
    };
    let prompt_ids = tokenizer.encode(prompt, false)?;
    let ids = tokenizer.encode(&format!("{prompt}{completion}"), false)?;
    let start = prompt_ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
    Ok((ids, start))
}

/// Tokenises preference rows as TRL's `DPOTrainer` (1.16) does: chosen and
/// rejected each as `prompt + completion` (EOS text appended to standard
/// rows, no BOS added), both completions starting at the shorter of the two
/// common prefixes with the tokenised prompt, each sequence cut at
/// `max_length`; a row whose prompt alone fills `max_length` is skipped.
pub fn tokenize_dpo(rows: &[Row], tokenizer: &Tokenizer, max_length: usize) -> Result<(Vec<Example>, TokenizeReport)> {
    let mut out = Vec::new();
    let mut report = TokenizeReport::default();
    for row in rows {
        let Row::Preference { id, prompt, chosen, rejected, conversational, .. } = row else {
            return Err(Error::Setup(format!(
                "row {} is a prompt-completion row; DPO needs prompt/chosen/rejected rows",
                row.place()
            )));
        };
        if chosen.trim().is_empty() || rejected.trim().is_empty() {
            report.skipped.push((row.place(), "empty chosen or rejected completion".into()));
            continue;
        }
        let (mut c, c_start) = completion_ids(tokenizer, prompt, chosen, *conversational)?;
        let (mut r, r_start) = completion_ids(tokenizer, prompt, rejected, *conversational)?;
        let start = c_start.min(r_start);
        if start >= max_length {
            report
                .skipped
                .push((row.place(), format!("the prompt alone has {start} tokens, max_length is {max_length}")));
            continue;
        }
        let mut truncated = false;
        for ids in [&mut c, &mut r] {
            if ids.len() > max_length {
                ids.truncate(max_length);
                truncated = true;
            }
        }
        report.truncated += truncated as usize;
        report.kept += 1;
        out.push(Example::Preference {
            id: id.clone(),
            line: row.line(),
            chosen: Sequence { ids: c, completion_start: start },
            rejected: Sequence { ids: r, completion_start: start },
        });
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answer_lines_are_found() {
        assert_eq!(final_answer_line("a\nb\nFinal answer: 3\n"), Some("Final answer: 3"));
        assert_eq!(final_answer_line("no answer"), None);
        assert_eq!(common_prefix("abcé", "abcx"), "abc");
        assert_eq!(common_prefix("ab", "abc"), "ab");
    }
}
