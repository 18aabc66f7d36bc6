//! The flags every command that builds prompts shares (`traces`, `pairs`,
//! `eval`, `data prompt`), turned into one [`Prompter`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tabletrace_data::{Budget, RowFormat, DEFAULT_TABLE_TOKENS};
use tabletrace_trace::{PromptTemplates, Prompter, TokenCounter};

#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// Tokens the prompt's tables may take: whole tables when they fit, else
    /// the rows the question's text mentions first (the prompt says how many
    /// were left out).
    #[arg(long, default_value_t = DEFAULT_TABLE_TOKENS)]
    pub table_tokens: usize,
    /// Rows shown per table at most (default: no limit besides --table-tokens).
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// The model whose tokenizer counts --table-tokens (default: the model the
    /// command runs, if any; else about 4 bytes a token).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// A folder with `positive.jinja` / `negative.jinja` / `qa.jinja`
    /// replacing the built-in prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

impl PromptArgs {
    /// The prompter, counting tokens with `--tokenizer`, else with
    /// `model`'s tokenizer, else approximately.
    pub fn prompter(&self, model: Option<&str>) -> anyhow::Result<Prompter> {
        let count_tokens: TokenCounter = match self.tokenizer.as_deref().or(model) {
            Some(spec) => {
                let tok = tabletrace_model::load_tokenizer(spec)
                    .with_context(|| format!("loading the tokenizer of {spec} (it counts --table-tokens)"))?;
                Arc::new(move |text: &str| tok.encode(text, false).map(|ids| ids.len()).unwrap_or(usize::MAX))
            }
            None => Arc::new(tabletrace_data::approx_tokens),
        };
        self.prompter_counting(count_tokens)
    }

    /// The prompter with a token counter already at hand.
    pub fn prompter_counting(&self, count_tokens: TokenCounter) -> anyhow::Result<Prompter> {
        Ok(Prompter {
            templates: PromptTemplates::load(self.prompts.as_deref()).map_err(anyhow::Error::msg)?,
            format: RowFormat::Markdown,
            budget: Budget { max_rows_per_table: self.max_rows, max_tokens: Some(self.table_tokens) },
            count_tokens,
        })
    }

    /// The settings as recorded in reports.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "table_tokens": self.table_tokens,
            "max_rows": self.max_rows,
            "tokenizer": self.tokenizer,
            "prompts": self.prompts,
        })
    }
}
