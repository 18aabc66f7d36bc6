//! The decoder: one readable implementation of the Llama family.
//!
//! Architecture (Hugging Face `LlamaForCausalLM`, `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`, `MistralForCausalLM` are the references):
//!
//! ```text
//! h = embed(ids)                                    (B, T, hidden)
//! for each layer:
//!     a = rms_norm(h) -> q, k, v projections        (+ bias: Qwen2)
//!     q, k = rms_norm per head                      (Qwen3)
//!     q, k = rope(q, k, positions)                  half rotation
//!     h = h + o_proj(softmax(q k^T / sqrt(d) + mask) v)   grouped-query
//!     h = h + down(silu(gate(rms_norm(h))) * up(rms_norm(h)))
//! logits = lm_head(rms_norm(h))                     (tied to embed: SmolLM2, small Qwen)
//! ```
//!
//! Every op is differentiable (see [`crate::ops`]), so adapters on the
//! projections train; the base weights are frozen tensors that never
//! receive a gradient.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Model`] (loading, forward, adapters merged or attached) and its [`Cache`] |
//! | `layer.rs` | a layer: attention with its KV cache, the gated MLP |
//! | `linear.rs`, `projections.rs` | a projection over any weight storage; projections fused per input |
//! | `adapter.rs` | the [`Adapter`] trait and the projections ([`Proj`]) it targets |
//! | `rope.rs`, `mask.rs` | rotary tables; causal and padded masks |
//! | `checkpointing.rs` | the checkpointed backward of LoRA training |
//!
//! The files share this module's imports (`use super::*`).

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::kv_cache::KvCache;

use crate::checkpoint::{Checkpoint, RopeLayout};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::frozen::{self, Frozen, LinearTiles};
use crate::kernels::{self, with_cpu_f32, BlockFormat, QuantWeight};
use crate::ops;

/// A decoder-only language model.
pub struct Model {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTables,
    device: Device,
    dtype: DType,
    kv_dtype: DType,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("config", &self.config).field("dtype", &self.dtype).finish()
    }
}

/// The key/value cache of one generation: one [`KvCache`] per layer.
pub struct Cache {
    layers: Vec<KvCache>,
    /// What the keys and values are kept in ([`Model::kv_dtype`]).
    dtype: DType,
}

impl Cache {
    /// Cached positions (slots), the same for every row of the batch.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::current_seq_len)
    }

    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cache whose batch row `i` is a copy of this one's row `rows[i]`
    /// (the same capacity): one prompt's keys and values for several rows
    /// that continue it differently.
    pub fn expanded(&self, rows: &[usize]) -> Result<Cache> {
        let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let mut idx: Option<Tensor> = None; // on the cache's device, made once
        let mut layers = Vec::with_capacity(self.layers.len());
        for kv in &self.layers {
            let (dim, cap) = (kv.k_cache().dim(), kv.k_cache().max_seq_len());
            let mut new = KvCache::new(dim, cap);
            if let (Some(k), Some(v)) = (kv.k()?, kv.v()?) {
                let idx = match &idx {
                    Some(i) => i.clone(),
                    None => idx.insert(Tensor::from_slice(&rows, rows.len(), k.device())?).clone(),
                };
                new.append(&k.contiguous()?.index_select(&idx, 0)?, &v.contiguous()?.index_select(&idx, 0)?)?;
            }
            layers.push(new);
        }
        Ok(Cache { layers, dtype: self.dtype })
    }
}

impl Model {
    /// Builds the model from a checkpoint, consuming its tensors. Every
    /// tensor the architecture needs must be there; leftovers are reported.
    pub fn new(mut ck: Checkpoint, device: &Device) -> Result<Model> {
        let cfg = ck.config.clone();
        let quantized = !ck.quantized.is_empty();
        let embed_tokens = ck.take("model.embed_tokens.weight")?;
        let (rows, width) = embed_tokens.dims2()?;
        if width != cfg.hidden_size {
            return Err(Error::Tensor {
                name: "model.embed_tokens.weight".into(),
                message: format!("has width {width}, but hidden_size is {}", cfg.hidden_size),
            });
        }
        let dtype = embed_tokens.dtype();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_layernorm: ck.take(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention::load(&mut ck, &cfg, &format!("{p}.self_attn"))?,
                post_attention_layernorm: ck.take(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_up: Projections::new(vec![
                        Linear::load(&mut ck, &format!("{p}.mlp.gate_proj"), false)?,
                        Linear::load(&mut ck, &format!("{p}.mlp.up_proj"), false)?,
                    ])?,
                    down_proj: Linear::load(&mut ck, &format!("{p}.mlp.down_proj"), false)?,
                },
            });
        }
        let norm = ck.take("model.norm.weight")?;
        let lm_head = if ck.tensors.contains_key("lm_head.weight") || ck.quantized.contains_key("lm_head.weight") {
            Linear::load(&mut ck, "lm_head", false)?
        } else if cfg.tie_word_embeddings {
            // Tied: the output layer multiplies by the embedding matrix.
            Linear { weight: LinearWeight::Float(embed_tokens.clone()), bias: None, low_rank: None }
        } else {
            return Err(Error::Tensor {
                name: "lm_head.weight".into(),
                message: format!("missing from {} and tie_word_embeddings is false", ck.path.display()),
            });
        };
        if rows < cfg.vocab_size {
            return Err(Error::Tensor {
                name: "model.embed_tokens.weight".into(),
                message: format!("has {rows} rows, fewer than vocab_size {}", cfg.vocab_size),
            });
        }
        let leftovers: Vec<&String> = ck.tensors.keys().chain(ck.quantized.keys()).collect();
        if !leftovers.is_empty() {
            tracing::warn!(path = %ck.path.display(), "unused tensors: {leftovers:?}");
        }
        let rope = RopeTables::new(&cfg, ck.rope_layout, dtype, device)?;
        // Quantised models keep keys and values in f16, as llama.cpp does by
        // default: decoding reads the whole cache every step, and from a few
        // hundred cached tokens at batch 8 that is more bytes than the weights.
        let kv_dtype = if quantized && dtype == DType::F32 { DType::F16 } else { dtype };
        Ok(Model { config: cfg, embed_tokens, layers, norm, lm_head, rope, device: device.clone(), dtype, kv_dtype })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The float dtype of activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the key/value cache keeps: f16 for quantised weights with
    /// f32 activations, else the activations' dtype.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// A fresh cache for up to `capacity` positions (it grows if needed).
    pub fn new_cache(&self, capacity: usize) -> Cache {
        let layers = (0..self.config.num_layers).map(|_| KvCache::new(2, capacity.max(1))).collect();
        Cache { layers, dtype: self.kv_dtype }
    }

    /// Runs the decoder.
    ///
    /// - `ids`: `(B, T)` u32 token ids;
    /// - `positions`: `(B, T)` u32 RoPE positions (per row, so left-padded
    ///   rows start at 0 on their first real token);
    /// - `mask`: additive `(B, T, S)` f32 mask over the `S` = cached + `T`
    ///   key slots (0 to attend, -inf not to), or `None` for plain causal
    ///   attention over unpadded rows with `T == 1` or no cache;
    /// - `cache`: keys/values of earlier steps, extended by this one.
    ///
    /// Returns logits `(B, T, V)`, or `(B, V)` for the last position only
    /// when `last_only`.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Cache>,
        last_only: bool,
    ) -> Result<Tensor> {
        let h = self.run(ids, positions, mask, cache, None)?;
        let t = h.dim(1)?;
        let h = if last_only { h.narrow(1, t - 1, 1)? } else { h };
        let logits = self.lm_head.forward(&h)?;
        let logits = logits.narrow(D::Minus1, 0, self.config.vocab_size)?;
        Ok(if last_only { logits.squeeze(1)? } else { logits })
    }

    /// Computes the layers' frozen projections on bf16 AMX tiles from now
    /// on (inputs rounded to bf16, f32 sums; the output layer, attention,
    /// adapters and gradients of trained tensors stay f32): 2.5–4× the f32
    /// products' speed where the CPU has AMX. Two packed bf16 copies of
    /// each weight replace its f32 values. An error where this CPU or
    /// the weights cannot (no AMX-BF16, quantised or non-CPU weights).
    pub fn use_bf16_products(&mut self) -> Result<()> {
        if !kernels::amx_available() {
            return Err(Error::Request(
                "bf16 products need a CPU with AMX-BF16 tiles (Intel Sapphire Rapids or later) and Linux; \
                 this one has none: use f32"
                    .into(),
            ));
        }
        let mut packed = 0;
        for layer in &mut self.layers {
            packed += layer.self_attn.qkv.use_bf16_products();
            packed += layer.self_attn.o_proj.use_bf16_products() as usize;
            packed += layer.mlp.gate_up.use_bf16_products();
            packed += layer.mlp.down_proj.use_bf16_products() as usize;
        }
        if packed == 0 {
            return Err(Error::Request(
                "bf16 products need f32 weights on the CPU with sizes that are multiples of 32; these have none".into(),
            ));
        }
        Ok(())
    }

    /// Runs attention by blocked kernels with an online softmax from now on
    /// ([`ops::blocked_attention`]): the same function up to float rounding,
    /// faster on long rows where the CPU has AVX-512F, and no score matrix
    /// kept for the backward. `tabletrace train` asks for it before training
    /// (every pass of a step must run the same kernels); generation keeps
    /// [`ops::attention`], so that evaluations do not move.
    pub fn use_blocked_attention(&mut self) {
        for layer in &mut self.layers {
            layer.self_attn.blocked = true;
        }
    }

    /// Merges a LoRA adapter into the projections for generation: into
    /// float weights (`W += scale · B A`), so that generation runs at the
    /// base model's speed; beside quantised weights as the two factors
    /// (`y += (x Aᵀ) scale · Bᵀ`), exact without re-quantising.
    pub fn merge_adapter(&mut self, lora: &crate::Lora) -> Result<()> {
        // Quantised llama-architecture q/k keep llama.cpp's row order (with
        // interleaved RoPE); the adapter's B rows, in Hugging Face order, follow them.
        let (heads, kv_heads, head_dim) = (self.config.num_heads, self.config.num_kv_heads, self.config.head_dim);
        let gguf_rows = self.rope.layout == RopeLayout::Interleaved;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let f = |p: Proj| -> Result<Option<(Tensor, Tensor)>> {
                let fac = lora.factors(i, p)?;
                Ok(match (fac, p) {
                    (Some((a, b)), Proj::Q) if gguf_rows => Some((a, crate::checkpoint::permute(&b, heads, head_dim)?)),
                    (Some((a, b)), Proj::K) if gguf_rows => {
                        Some((a, crate::checkpoint::permute(&b, kv_heads, head_dim)?))
                    }
                    (fac, _) => fac,
                })
            };
            layer.self_attn.qkv.add_low_rank(&[f(Proj::Q)?, f(Proj::K)?, f(Proj::V)?])?;
            if let Some((a, b)) = f(Proj::O)? {
                layer.self_attn.o_proj.add_low_rank(LowRank::new(&a, &b)?)?;
            }
            layer.mlp.gate_up.add_low_rank(&[f(Proj::Gate)?, f(Proj::Up)?])?;
            if let Some((a, b)) = f(Proj::Down)? {
                layer.mlp.down_proj.add_low_rank(LowRank::new(&a, &b)?)?;
            }
        }
        Ok(())
    }

    /// The final hidden states `(B, T, hidden)` (after the last norm, before
    /// the output layer), with an optional adapter on the projections. For
    /// training: pair with [`Model::output_weight`] and
    /// [`ops::token_logprobs`] to score tokens without materialising the
    /// logits. Arguments as in [`Model::forward`], without a cache.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        adapter: Option<&dyn Adapter>,
    ) -> Result<Tensor> {
        self.run(ids, positions, mask, None, adapter)
    }

    /// The output layer's weight `(vocab_size, hidden)` as floats, and its bias if any.
    pub fn output_weight(&self) -> Result<(Tensor, Option<Tensor>)> {
        let w = self.lm_head.weight_out_in()?.narrow(0, 0, self.config.vocab_size)?;
        let b = match &self.lm_head.bias {
            Some(b) => Some(b.narrow(0, 0, self.config.vocab_size)?),
            None => None,
        };
        Ok((w, b))
    }

    /// The `(out, in)` shape of projection `proj` of layer `layer`, `None`
    /// past the last layer: what an adapter must fit.
    pub fn projection_shape(&self, layer: usize, proj: Proj) -> Option<(usize, usize)> {
        if layer >= self.layers.len() {
            return None;
        }
        let c = &self.config;
        let attn = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        Some(match proj {
            Proj::Q => (attn, c.hidden_size),
            Proj::K | Proj::V => (kv, c.hidden_size),
            Proj::O => (c.hidden_size, attn),
            Proj::Gate | Proj::Up => (c.intermediate_size, c.hidden_size),
            Proj::Down => (c.hidden_size, c.intermediate_size),
        })
    }

    fn run(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut Cache>,
        adapter: Option<&dyn Adapter>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let max = self.config.max_position_embeddings;
        let max_pos = positions.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_pos >= max {
            return Err(Error::Request(format!("position {max_pos} is past the model's context of {max} tokens")));
        }
        let rope = self.rope.at(positions)?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let owned_mask;
        let mask = match mask {
            Some(m) => Some(m.to_dtype(self.dtype)?),
            None if t > 1 => {
                owned_mask = causal_mask(b, t, offset, &self.device)?.to_dtype(self.dtype)?;
                Some(owned_mask)
            }
            None => None,
        };
        let mut h = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        let eps = self.config.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.dtype));
            let la = adapter.map(|adapter| LayerAdapter { adapter, layer: i });
            let a = ops::rms_norm(&h, &layer.input_layernorm, eps)?;
            h = (h + layer.self_attn.forward(&a, &rope, mask.as_ref(), layer_cache, la)?)?;
            let m = ops::rms_norm(&h, &layer.post_attention_layernorm, eps)?;
            h = (h + layer.mlp.forward(&m, la)?)?;
        }
        Ok(ops::rms_norm(&h, &self.norm, eps)?)
    }
}

// One concern per file; items shared between them are `pub(super)`.
mod adapter;
mod checkpointing;
mod layer;
mod linear;
mod mask;
mod projections;
mod rope;
#[cfg(test)]
mod tests;

pub use adapter::*;
use layer::*;
pub use linear::*;
pub use mask::*;
use projections::*;
use rope::*;
