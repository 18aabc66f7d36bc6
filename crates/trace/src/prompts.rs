//! Prompt templates (Jinja, rendered with minijinja): the built-in ones in
//! `crates/trace/prompts/`, or files of the same names in a folder the user
//! gives. Variables: `question`, `tables`, and for negatives `error_type` and
//! `error_description`.

use std::path::Path;

use tabletrace_data::ErrorType;

const POSITIVE: &str = include_str!("../prompts/positive.jinja");
const NEGATIVE: &str = include_str!("../prompts/negative.jinja");

/// The positive (and training/evaluation) prompt and the negative prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplates {
    /// Asks for step-by-step reasoning and a final-answer line.
    pub positive: String,
    /// Asks for a convincing trace with one error of a given type.
    pub negative: String,
}

impl Default for PromptTemplates {
    fn default() -> Self {
        PromptTemplates { positive: POSITIVE.to_string(), negative: NEGATIVE.to_string() }
    }
}

impl PromptTemplates {
    /// The built-in templates, with `positive.jinja` and `negative.jinja`
    /// from `dir` replacing them where present. Each template is checked.
    pub fn load(dir: Option<&Path>) -> Result<PromptTemplates, String> {
        let mut t = PromptTemplates::default();
        if let Some(dir) = dir {
            if !dir.is_dir() {
                return Err(format!("prompt folder {} does not exist", dir.display()));
            }
            for (name, slot) in [("positive.jinja", &mut t.positive), ("negative.jinja", &mut t.negative)] {
                let p = dir.join(name);
                if p.is_file() {
                    *slot = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                }
            }
        }
        t.render(&t.positive, "question", "tables", None).map_err(|e| format!("positive.jinja: {e}"))?;
        t.render(&t.negative, "question", "tables", Some(ErrorType::DroppedFilter))
            .map_err(|e| format!("negative.jinja: {e}"))?;
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

    /// The positive prompt (also the training and evaluation prompt).
    pub fn positive(&self, question: &str, tables: &str) -> String {
        self.render(&self.positive, question, tables, None).expect("checked when loaded")
    }

    /// The negative prompt for an error type.
    pub fn negative(&self, question: &str, tables: &str, error: ErrorType) -> String {
        self.render(&self.negative, question, tables, Some(error)).expect("checked when loaded")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_templates_render_and_overrides_are_checked() {
        let t = PromptTemplates::default();
        let p = t.positive("Who?", "Table: x\n");
        assert!(p.starts_with("You are given the following tables.\n\nTable: x\n\nQuestion: Who?"), "{p}");
        assert!(p.ends_with("starts with \"Final answer:\"."));
        let n = t.negative("Who?", "Table: x\n", ErrorType::FlippedFilter);
        assert!(n.contains("apply one condition the wrong way round"), "{n}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("positive.jinja"), "Q: {{ question }} T: {{ tables }}").unwrap();
        let t = PromptTemplates::load(Some(dir.path())).unwrap();
        assert_eq!(t.positive("a", "b"), "Q: a T: b");
        std::fs::write(dir.path().join("negative.jinja"), "{{ no_such_variable }}").unwrap();
        let e = PromptTemplates::load(Some(dir.path())).unwrap_err();
        assert!(e.contains("negative.jinja") && e.contains("does not render"), "{e}");
    }
}
