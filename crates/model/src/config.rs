//! Model configuration: the on-disk forms (Hugging Face `config.json`, GGUF
//! metadata) resolve into one [`ModelConfig`].

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The architectures this runtime implements. All are pre-norm decoders
/// with RMSNorm, rotary position embeddings (half rotation), grouped-query
/// attention and a SwiGLU MLP; they differ in the details named here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3, SmolLM2: no biases.
    Llama,
    /// Mistral: Llama with sliding-window attention.
    Mistral,
    /// Qwen2/Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: RMSNorm on each head of q and k, no biases.
    Qwen3,
}

impl Arch {
    /// Reads a `model_type` (config.json) or `general.architecture` (GGUF).
    pub fn parse(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            _ => None,
        }
    }
}

/// Llama 3.1-style RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
}

/// A resolved configuration: every field the model code reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional Llama 3.1 RoPE scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Context length.
    pub max_position_embeddings: usize,
    /// The output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v projections (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window (Mistral), if any.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Checks that the sizes fit together.
    pub fn validate(&self, source_name: &str) -> Result<()> {
        let bad = |message: String| Err(Error::Config { source_name: source_name.to_string(), message });
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim must be even and positive, not {}", self.head_dim));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        Ok(())
    }
}

/// `config.json` of a Hugging Face model folder (the fields we read).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_theta` and the scaling type here.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl ModelConfig {
    /// Resolves a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, source_name: &str) -> Result<ModelConfig> {
        let err = |message: String| Error::Config { source_name: source_name.to_string(), message };
        let c: HfConfig = serde_json::from_str(text).map_err(|e| err(format!("invalid config: {e}")))?;
        let arch = Arch::parse(&c.model_type).ok_or_else(|| {
            err(format!("model_type {:?} is not supported (supported: llama, mistral, qwen2, qwen3)", c.model_type))
        })?;
        let rope_theta = c
            .rope_theta
            .or_else(|| c.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()))
            .unwrap_or(10_000.0);
        let scaling = match (&c.rope_scaling, &c.rope_parameters) {
            (Some(v), _) if !v.is_null() => Some(v),
            (_, Some(p)) => Some(p),
            _ => None,
        };
        let rope_scaling = match scaling {
            None => None,
            Some(v) => {
                let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
                let f = |k: &str| {
                    v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| err(format!("rope_scaling.{k} is missing")))
                };
                match kind {
                    "default" => None,
                    "llama3" => Some(Llama3RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                    }),
                    other => return Err(err(format!("rope scaling of type {other:?} is not supported (only llama3)"))),
                }
            }
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
            rope_theta,
            rope_scaling,
            rms_norm_eps: c.rms_norm_eps,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: arch == Arch::Qwen2 || c.attention_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window: match arch {
                Arch::Mistral => c.sliding_window,
                Arch::Qwen2 | Arch::Qwen3 if c.use_sliding_window == Some(true) => c.sliding_window,
                _ => None,
            },
        };
        cfg.validate(source_name)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_config_resolves_bias_and_defaults() {
        let text = r#"{"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": true,
            "sliding_window": 32768, "use_sliding_window": false}"#;
        let c = ModelConfig::from_hf_json(text, "config.json").unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.qkv_bias && !c.qk_norm);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let text = r#"{"model_type": "gpt_neox", "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1,
            "num_hidden_layers": 1, "num_attention_heads": 1}"#;
        let e = ModelConfig::from_hf_json(text, "x/config.json").unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("\"gpt_neox\" is not supported"), "{e}");
    }
}
