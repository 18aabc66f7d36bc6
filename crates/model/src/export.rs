//! Merging an adapter into the base and exporting a Hugging Face folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`) that transformers, vLLM and we load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::decoder::Proj;
use crate::error::{Error, Result};
use crate::loader::{resolve, ModelSource};
use crate::lora::Lora;
use crate::tokenizer::Tokenizer;
use crate::{read_gguf, read_hf_folder};

/// `config.json` for a resolved configuration.
pub fn hf_config(c: &ModelConfig) -> serde_json::Value {
    let (model_type, arch) = match c.arch {
        Arch::Llama => ("llama", "LlamaForCausalLM"),
        Arch::Mistral => ("mistral", "MistralForCausalLM"),
        Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
    };
    let mut v = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    if c.arch == Arch::Llama && c.qkv_bias {
        v["attention_bias"] = true.into();
    }
    if let Some(s) = &c.rope_scaling {
        v["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    if let Some(w) = c.sliding_window {
        v["sliding_window"] = w.into();
        if matches!(c.arch, Arch::Qwen2 | Arch::Qwen3) {
            v["use_sliding_window"] = true.into();
        }
    }
    v
}

/// Merges `lora` into the float weights of the model `spec` names and writes
/// a Hugging Face folder to `out` (f32 safetensors, Hugging Face q/k layout).
pub fn export_merged(spec: &str, lora: Option<&Lora>, tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    let mut ck = match resolve(spec)? {
        ModelSource::Gguf(p) => read_gguf(&p, false)?,
        ModelSource::HfFolder(d) => read_hf_folder(&d, DType::F32, &Device::Cpu)?,
    };
    if let Some(lora) = lora {
        for layer in 0..ck.config.num_layers {
            for proj in Proj::ALL {
                if let Some(delta) = lora.merged_delta(layer, proj)? {
                    let name = format!("model.layers.{layer}.{}.weight", proj.path());
                    let w = ck.tensors.get_mut(&name).ok_or_else(|| Error::Tensor {
                        name: name.clone(),
                        message: "is not a float weight of the base; cannot merge".into(),
                    })?;
                    *w = (w.to_dtype(DType::F32)? + delta.to_device(&Device::Cpu)?)?;
                }
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
    let tensors: HashMap<String, Tensor> =
        ck.tensors.into_iter().map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.contiguous()?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
    };
    write("config.json", serde_json::to_string_pretty(&hf_config(&ck.config)).expect("json"))?;
    tokenizer.save_hf(out)
}
