//! LoRA adapters on the command line: loading one for a named model, and
//! `tabletrace adapter cast` (an adapter's weights in another precision,
//! e.g. f16 to commit a study's adapters at half the size).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, ValueEnum};
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

/// Precisions an adapter can be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Args)]
pub struct CastArgs {
    /// The PEFT LoRA adapter folder.
    adapter: PathBuf,
    /// The precision of the copy's weights.
    #[arg(long, value_enum)]
    dtype: Precision,
    /// Output folder (adapter_config.json and adapter_model.safetensors); PEFT
    /// and `tabletrace eval --adapter` read it (tabletrace computes in f32).
    #[arg(long)]
    out: PathBuf,
}

/// Writes a copy of an adapter with its weights in another precision.
pub fn cast(a: CastArgs) -> anyhow::Result<ExitCode> {
    let dtype = match a.dtype {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    };
    let weights = a.adapter.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", weights.display()))?;
    let cast = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let config = a.adapter.join("adapter_config.json");
    std::fs::copy(&config, a.out.join("adapter_config.json"))
        .with_context(|| format!("copying {}", config.display()))?;
    let out = a.out.join("adapter_model.safetensors");
    candle_core::safetensors::save(&cast, &out).with_context(|| format!("writing {}", out.display()))?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    eprintln!("wrote {} ({:.1} MB, {} tensors in {dtype:?})", a.out.display(), size as f64 / 1e6, cast.len());
    Ok(ExitCode::SUCCESS)
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
