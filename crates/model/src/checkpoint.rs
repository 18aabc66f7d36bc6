//! Reading weights: GGUF files (dequantised on load, or kept quantised for
//! inference) and Hugging Face folders (config.json + safetensors), both
//! into tensors under Hugging Face checkpoint names.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};

/// How the rotary embedding pairs dimensions in q and k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Dimension `i` pairs with `i + head_dim/2` (Hugging Face, qwen2/qwen3 GGUF).
    Half,
    /// Dimension `2i` pairs with `2i + 1` (llama-architecture GGUF as stored).
    Interleaved,
}

/// Weights of one model under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).
pub struct Checkpoint {
    /// The resolved configuration.
    pub config: ModelConfig,
    /// Float tensors (f32 unless another dtype was asked for).
    pub tensors: HashMap<String, Tensor>,
    /// Linear weights kept in their GGUF quantisation (inference only).
    pub quantized: HashMap<String, Arc<QTensor>>,
    /// How q and k are laid out for RoPE.
    pub rope_layout: RopeLayout,
    /// GGUF metadata, for the tokenizer and chat template (empty for HF folders).
    pub gguf_metadata: HashMap<String, gguf_file::Value>,
    /// The file or folder read.
    pub path: PathBuf,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("quantized", &self.quantized.len())
            .finish()
    }
}

impl Checkpoint {
    /// Takes a float tensor by name, naming it when missing.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors.remove(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            message: format!("missing from {}", self.path.display()),
        })
    }
}

/// GGUF tensor names to Hugging Face names.
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn meta_u(md: &HashMap<String, gguf_file::Value>, key: &str, path: &Path) -> Result<usize> {
    let v = md
        .get(key)
        .ok_or_else(|| Error::Weights { path: path.to_path_buf(), message: format!("metadata {key} is missing") })?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| Error::Weights { path: path.to_path_buf(), message: format!("metadata {key}: {e}") })
}

fn meta_f(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    md.get(key).and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
}

/// Reads a GGUF file. With `keep_quantized`, 2-D projection weights stay in
/// their stored quantisation (for inference with quantised matmuls) and q/k
/// keep the llama layout; otherwise every tensor is dequantised to f32 and
/// llama-architecture q/k are un-permuted to the Hugging Face layout, so that
/// adapters trained on it are PEFT-compatible.
pub fn read_gguf(path: &Path, keep_quantized: bool) -> Result<Checkpoint> {
    let weights_err = |message: String| Error::Weights { path: path.to_path_buf(), message };
    let file = File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let mut reader = BufReader::new(file);
    let content =
        gguf_file::Content::read(&mut reader).map_err(|e| weights_err(format!("not a readable GGUF file: {e}")))?;
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| weights_err("metadata general.architecture is missing".into()))?;
    let arch = Arch::parse(&arch_name).ok_or_else(|| {
        weights_err(format!("architecture {arch_name:?} is not supported (supported: llama, mistral, qwen2, qwen3)"))
    })?;
    let p = &arch_name;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(weights_err(
            "rope_freqs (Llama 3.1 RoPE scaling in GGUF) is not supported; load the Hugging Face folder instead".into(),
        ));
    }
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| weights_err("tensor token_embd.weight is missing".into()))?;
    let num_heads = meta_u(md, &format!("{p}.attention.head_count"), path)?;
    let hidden_size = meta_u(md, &format!("{p}.embedding_length"), path)?;
    let config = ModelConfig {
        arch,
        vocab_size: embd.shape.dims()[0],
        hidden_size,
        intermediate_size: meta_u(md, &format!("{p}.feed_forward_length"), path)?,
        num_layers: meta_u(md, &format!("{p}.block_count"), path)?,
        num_heads,
        num_kv_heads: meta_u(md, &format!("{p}.attention.head_count_kv"), path).unwrap_or(num_heads),
        head_dim: meta_u(md, &format!("{p}.attention.key_length"), path).unwrap_or(hidden_size / num_heads.max(1)),
        rope_theta: meta_f(md, &format!("{p}.rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        rms_norm_eps: meta_f(md, &format!("{p}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        max_position_embeddings: meta_u(md, &format!("{p}.context_length"), path).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: content.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        sliding_window: None,
    };
    config.validate(&path.display().to_string())?;
    let permuted = arch == Arch::Llama || arch == Arch::Mistral;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    let mut quantized = HashMap::new();
    for gguf_name in names {
        let Some(name) = hf_name(gguf_name) else {
            continue;
        };
        let q = content
            .tensor(&mut reader, gguf_name, &Device::Cpu)
            .map_err(|e| weights_err(format!("tensor {gguf_name}: {e} (is the file truncated?)")))?;
        let is_projection = name.ends_with("_proj.weight") || name == "lm_head.weight";
        let is_float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if keep_quantized && !is_float && (is_projection || name == "model.embed_tokens.weight") {
            let q = Arc::new(q);
            if name == "model.embed_tokens.weight" {
                // A tied output layer multiplies by the embedding: keep it quantised for that.
                if config.tie_word_embeddings {
                    quantized.insert("lm_head.weight".to_string(), q.clone());
                }
                tensors.insert(
                    name,
                    q.dequantize(&Device::Cpu).map_err(|e| weights_err(format!("tensor {gguf_name}: {e}")))?,
                );
            } else {
                quantized.insert(name, q);
            }
            continue;
        }
        let mut t = q.dequantize(&Device::Cpu).map_err(|e| weights_err(format!("tensor {gguf_name}: {e}")))?;
        if permuted && !keep_quantized {
            if name.ends_with("q_proj.weight") {
                t = unpermute(&t, config.num_heads, config.head_dim)?;
            } else if name.ends_with("k_proj.weight") {
                t = unpermute(&t, config.num_kv_heads, config.head_dim)?;
            }
        }
        tensors.insert(name, t);
    }
    let rope_layout = if permuted && keep_quantized { RopeLayout::Interleaved } else { RopeLayout::Half };
    Ok(Checkpoint {
        config,
        tensors,
        quantized,
        rope_layout,
        gguf_metadata: content.metadata,
        path: path.to_path_buf(),
    })
}

/// Undoes llama.cpp's q/k permutation: rows `(head, i, pair)` back to `(head, pair, i)`.
fn unpermute(w: &Tensor, n_head: usize, head_dim: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, head_dim / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// llama.cpp's q/k permutation of rows `(head, pair, i)` to `(head, i, pair)`
/// (the inverse of [`unpermute`]): for what meets weights kept in the GGUF's
/// layout, such as an adapter's `B` beside quantised q/k projections.
pub(crate) fn permute(w: &Tensor, n_head: usize, head_dim: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, 2, head_dim / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Reads a Hugging Face model folder: `config.json` and `model.safetensors`
/// or sharded `model-*.safetensors` with `model.safetensors.index.json`.
pub fn read_hf_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Io { path: cfg_path.clone(), source: e })?;
    let config = ModelConfig::from_hf_json(&text, &cfg_path.display().to_string())?;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::Io { path: index.clone(), source: e })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Weights { path: index.clone(), message: format!("invalid index: {e}") })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Weights { path: index.clone(), message: "weight_map is missing".into() })?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        files
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut tensors = HashMap::new();
    for f in &files {
        if !f.is_file() {
            return Err(Error::Weights { path: f.clone(), message: "weights file is missing".into() });
        }
        let loaded = candle_core::safetensors::load(f, device).map_err(|e| Error::Weights {
            path: f.clone(),
            message: format!("cannot read safetensors (truncated?): {e}"),
        })?;
        for (name, t) in loaded {
            let t = if t.dtype() == dtype { t } else { t.to_dtype(dtype)? };
            tensors.insert(name, t);
        }
    }
    Ok(Checkpoint {
        config,
        tensors,
        quantized: HashMap::new(),
        rope_layout: RopeLayout::Half,
        gguf_metadata: HashMap::new(),
        path: dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.11.ffn_down.weight").unwrap(), "model.layers.11.mlp.down_proj.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)
        let (n_head, hd, inp) = (2, 4, 3);
        let hf = Tensor::arange(0f32, (n_head * hd * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n_head * hd, inp))
            .unwrap();
        let gguf = hf
            .reshape((n_head, 2, hd / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((n_head * hd, inp))
            .unwrap();
        let back = unpermute(&gguf, n_head, hd).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        assert_eq!(permute(&hf, n_head, hd).unwrap().to_vec2::<f32>().unwrap(), gguf.to_vec2::<f32>().unwrap());
    }
}
