//! Loading a LoRA adapter for a model named on the command line.

use std::path::Path;

use anyhow::Context;
use tabletrace_model::{Lora, Model};

/// Loads the adapter in `dir` for `model` (given as `spec`). An adapter whose
/// `base_model_name_or_path` names another model still loads when its shapes
/// fit, with a warning naming both: shapes that fit do not make it the same base.
pub fn load(dir: &Path, spec: &str, model: &Model) -> anyhow::Result<Lora> {
    let lora = Lora::load(dir, model).with_context(|| format!("cannot load the adapter {}", dir.display()))?;
    if let Some(warning) = base_mismatch(dir, spec)? {
        eprintln!("warning: {warning}");
    }
    Ok(lora)
}

/// The warning for an adapter trained on another base than `spec`, if it is.
fn base_mismatch(dir: &Path, spec: &str) -> anyhow::Result<Option<String>> {
    let base = Lora::base_model(dir).with_context(|| format!("cannot read the adapter {}", dir.display()))?;
    Ok(base.filter(|b| !tabletrace_model::same_model(b, spec)).map(|b| {
        format!(
            "the adapter {} was trained on {b:?}, but the model is {spec:?}; its shapes fit, so it is used — check \
             that this is the base you meant",
            dir.display()
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_base_is_named_and_the_same_base_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let write = |base: &str| {
            let cfg = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                         "base_model_name_or_path": base});
            std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        };
        write("smollm2-135m");
        assert_eq!(base_mismatch(dir.path(), "smollm2-135m").unwrap(), None);
        write("HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(base_mismatch(dir.path(), "smollm2-135m").unwrap(), None, "the hub id of the short name");
        write("qwen2.5-coder-0.5b");
        let w = base_mismatch(dir.path(), "smollm2-135m").unwrap().unwrap();
        assert!(w.contains("trained on \"qwen2.5-coder-0.5b\"") && w.contains("the model is \"smollm2-135m\""), "{w}");
    }
}
