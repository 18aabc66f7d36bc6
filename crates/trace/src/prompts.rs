//! Prompts: the one place a question becomes the text a model reads.
//!
//! [`Prompter`] renders a question's tables (from its gold-free
//! [`Asked`](tabletrace_data::Asked) view, under a token budget counted
//! with the target model's tokenizer) into a template. Training pairs,
//! evaluation and the LLM generators all build prompts through it, so a
//! prompt can never depend on gold SQL or gold answers.
//!
//! Templates are Jinja (minijinja): the built-in ones in
//! `crates/trace/prompts/`, or files of the same names in a folder the user
//! gives. Variables: `question`, `tables`, and for negatives `error_type` and
//! `error_description`.

use std::path::Path;
use std::sync::Arc;

use crate::error::Error;
use tabletrace_data::{render_tables, Budget, ErrorType, Question, RenderedTables, RowFormat, SqlFailure, TableDb};

const POSITIVE: &str = include_str!("../prompts/positive.jinja");
const NEGATIVE: &str = include_str!("../prompts/negative.jinja");
const QA: &str = include_str!("../prompts/qa.jinja");

/// The positive (trace; also the training and evaluation) prompt, the Q&A
/// prompt and the negative prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplates {
    /// Asks for step-by-step reasoning and a final-answer line.
    pub positive: String,
    /// Asks for a convincing trace with one error of a given type.
    pub negative: String,
    /// Asks for the answer alone on a final-answer line.
    pub qa: String,
}

impl Default for PromptTemplates {
    fn default() -> Self {
        PromptTemplates { positive: POSITIVE.to_string(), negative: NEGATIVE.to_string(), qa: QA.to_string() }
    }
}

impl PromptTemplates {
    /// The built-in templates, with `positive.jinja` and `negative.jinja`
    /// from `dir` replacing them where present. Each template is checked.
    pub fn load(dir: Option<&Path>) -> Result<PromptTemplates, Error> {
        let err = |template: &str, message: String| Error::Template { template: template.to_string(), message };
        let mut t = PromptTemplates::default();
        if let Some(dir) = dir {
            if !dir.is_dir() {
                return Err(err(&dir.display().to_string(), "the folder does not exist".into()));
            }
            for (name, slot) in
                [("positive.jinja", &mut t.positive), ("negative.jinja", &mut t.negative), ("qa.jinja", &mut t.qa)]
            {
                let p = dir.join(name);
                if p.is_file() {
                    *slot = std::fs::read_to_string(&p).map_err(|e| err(&p.display().to_string(), e.to_string()))?;
                }
            }
        }
        t.render(&t.positive, "question", "tables", None).map_err(|e| err("positive.jinja", e))?;
        t.render(&t.qa, "question", "tables", None).map_err(|e| err("qa.jinja", e))?;
        t.render(&t.negative, "question", "tables", Some(ErrorType::DroppedFilter))
            .map_err(|e| err("negative.jinja", e))?;
        Ok(t)
    }

    fn render(&self, template: &str, question: &str, tables: &str, error: Option<ErrorType>) -> Result<String, String> {
        let mut env = minijinja::Environment::new();
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template("t", template).map_err(|e| format!("does not parse: {e}"))?;
        let t = env.get_template("t").map_err(|e| e.to_string())?;
        t.render(minijinja::context! {
            question => question,
            tables => tables,
            error_type => error.map(ErrorType::name),
            error_description => error.map(ErrorType::describe),
        })
        .map(|s| s.trim_end().to_string())
        .map_err(|e| format!("does not render: {e}"))
    }

    // Templates are checked with placeholder values when loaded, but a user
    // template can still fail on real ones (a filter that needs a number, a
    // branch taken only for long tables): rendering returns the error.

    /// The positive prompt (also the training and evaluation prompt).
    pub fn positive(&self, question: &str, tables: &str) -> Result<String, String> {
        self.render(&self.positive, question, tables, None).map_err(|e| format!("positive.jinja {e}"))
    }

    /// The Q&A prompt (the answer alone).
    pub fn qa(&self, question: &str, tables: &str) -> Result<String, String> {
        self.render(&self.qa, question, tables, None).map_err(|e| format!("qa.jinja {e}"))
    }

    /// The negative prompt for an error type.
    pub fn negative(&self, question: &str, tables: &str, error: ErrorType) -> Result<String, String> {
        self.render(&self.negative, question, tables, Some(error)).map_err(|e| format!("negative.jinja {e}"))
    }
}

/// Why a question's prompt could not be built.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptError {
    /// Its tables could not be read or rendered.
    Tables(SqlFailure),
    /// A template failed on this question's values.
    Template(String),
}

impl std::fmt::Display for PromptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromptError::Tables(e) => write!(f, "its tables cannot be rendered: {}", e.message),
            PromptError::Template(e) => write!(f, "its prompt cannot be built: {e}"),
        }
    }
}

impl std::error::Error for PromptError {}

/// Which prompt a model is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// Reason step by step, then `Final answer:` (the pairs' prompt).
    Trace,
    /// The answer alone on a `Final answer:` line.
    Qa,
}

impl PromptStyle {
    /// The name in configs and on `--prompt-format`.
    pub fn name(self) -> &'static str {
        match self {
            PromptStyle::Trace => "trace",
            PromptStyle::Qa => "qa",
        }
    }

    /// The style called `name` (`trace` or `qa`).
    pub fn parse(name: &str) -> Result<PromptStyle, String> {
        match name {
            "trace" => Ok(PromptStyle::Trace),
            "qa" => Ok(PromptStyle::Qa),
            _ => Err(format!("{name:?} is not trace or qa")),
        }
    }
}

/// Counts tokens of a text: the target model's tokenizer, or
/// [`approx_tokens`](tabletrace_data::approx_tokens) when none is at hand.
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

/// A question's prompt and the tables it shows.
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionPrompt {
    /// The text given to the model (before any chat template).
    pub text: String,
    /// The rendered tables inside it: rows shown, rows in all, tokens.
    pub tables: RenderedTables,
}

/// Builds every prompt of a run the same way: templates, row format, the
/// tables' budget and the token counter that measures it.
#[derive(Clone)]
pub struct Prompter {
    /// The templates.
    pub templates: PromptTemplates,
    /// How rows are written.
    pub format: RowFormat,
    /// How much of the tables a prompt holds.
    pub budget: Budget,
    /// What measures `budget.max_tokens`.
    pub count_tokens: TokenCounter,
}

impl std::fmt::Debug for Prompter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter").field("format", &self.format).field("budget", &self.budget).finish_non_exhaustive()
    }
}

impl Default for Prompter {
    /// Built-in templates, Markdown rows, whole tables up to
    /// [`DEFAULT_TABLE_TOKENS`](tabletrace_data::DEFAULT_TABLE_TOKENS)
    /// approximate tokens.
    fn default() -> Self {
        Prompter {
            templates: PromptTemplates::default(),
            format: RowFormat::Markdown,
            budget: Budget::default(),
            count_tokens: Arc::new(tabletrace_data::approx_tokens),
        }
    }
}

impl Prompter {
    /// The question's tables as the prompt shows them (from its text alone).
    pub fn tables(&self, db: &TableDb, q: &Question) -> Result<RenderedTables, SqlFailure> {
        render_tables(db, q.asked(), self.format, &self.budget, self.count_tokens.as_ref())
    }

    /// The prompt a model reads for a question.
    pub fn prompt(&self, db: &TableDb, q: &Question, style: PromptStyle) -> Result<QuestionPrompt, PromptError> {
        let tables = self.tables(db, q).map_err(PromptError::Tables)?;
        let text = self.text(q, &tables, style)?;
        Ok(QuestionPrompt { text, tables })
    }

    /// The prompt text for tables already rendered by [`Prompter::tables`].
    pub fn text(&self, q: &Question, tables: &RenderedTables, style: PromptStyle) -> Result<String, PromptError> {
        match style {
            PromptStyle::Trace => self.templates.positive(&q.text, &tables.text),
            PromptStyle::Qa => self.templates.qa(&q.text, &tables.text),
        }
        .map_err(PromptError::Template)
    }

    /// The prompt asking a generator for a trace with one error of a type,
    /// for tables already rendered by [`Prompter::tables`].
    pub fn negative_text(
        &self,
        q: &Question,
        tables: &RenderedTables,
        error: ErrorType,
    ) -> Result<String, PromptError> {
        self.templates.negative(&q.text, &tables.text, error).map_err(PromptError::Template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_templates_render_and_overrides_are_checked() {
        let t = PromptTemplates::default();
        let p = t.positive("Who?", "Table: x\n").unwrap();
        assert!(p.starts_with("You are given the following tables.\n\nTable: x\n\nQuestion: Who?"), "{p}");
        assert!(p.ends_with("starts with \"Final answer:\"."));
        let n = t.negative("Who?", "Table: x\n", ErrorType::FlippedFilter).unwrap();
        assert!(n.contains("apply one condition the wrong way round"), "{n}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("positive.jinja"), "Q: {{ question }} T: {{ tables }}").unwrap();
        let t = PromptTemplates::load(Some(dir.path())).unwrap();
        assert_eq!(t.positive("a", "b").unwrap(), "Q: a T: b");
        std::fs::write(dir.path().join("negative.jinja"), "{{ no_such_variable }}").unwrap();
        let e = PromptTemplates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("negative.jinja") && e.contains("does not render"), "{e}");
        // Passes the check with placeholders, fails on a real question: an error, not a panic.
        std::fs::remove_file(dir.path().join("negative.jinja")).unwrap();
        std::fs::write(
            dir.path().join("positive.jinja"),
            "{% if question|length > 20 %}{{ missing }}{% endif %}{{ question }}",
        )
        .unwrap();
        let t = PromptTemplates::load(Some(dir.path())).unwrap();
        let e = t.positive("Which department has the largest budget?", "T").unwrap_err();
        assert!(e.contains("positive.jinja") && e.contains("does not render"), "{e}");
    }
}
