//! One decoder layer: grouped-query attention with its KV cache, and the gated
//! MLP.

use super::*;

pub(super) struct Attention {
    /// q, k and v projections.
    pub(super) qkv: Projections,
    pub(super) o_proj: Linear,
    pub(super) q_norm: Option<Tensor>,
    pub(super) k_norm: Option<Tensor>,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) eps: f64,
    /// Attention by [`ops::blocked_attention`] (training) instead of
    /// [`ops::attention`] ([`Model::use_blocked_attention`]).
    pub(super) blocked: bool,
}

impl Attention {
    pub(super) fn load(ck: &mut Checkpoint, cfg: &ModelConfig, prefix: &str) -> Result<Self> {
        let norm = |ck: &mut Checkpoint, n: &str| -> Result<Option<Tensor>> {
            if cfg.qk_norm {
                Ok(Some(ck.take(&format!("{prefix}.{n}.weight"))?))
            } else {
                Ok(None)
            }
        };
        Ok(Attention {
            qkv: Projections::new(vec![
                Linear::load(ck, &format!("{prefix}.q_proj"), cfg.qkv_bias)?,
                Linear::load(ck, &format!("{prefix}.k_proj"), cfg.qkv_bias)?,
                Linear::load(ck, &format!("{prefix}.v_proj"), cfg.qkv_bias)?,
            ])?,
            o_proj: Linear::load(ck, &format!("{prefix}.o_proj"), false)?,
            q_norm: norm(ck, "q_norm")?,
            k_norm: norm(ck, "k_norm")?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            blocked: false,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, DType)>,
        adapter: Option<LayerAdapter>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut qkv = self.qkv.forward(x, &[Proj::Q, Proj::K, Proj::V], adapter)?.into_iter();
        let mut next = || qkv.next().expect("three projections");
        let (q_norm, k_norm) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (Some((qn, self.eps)), Some((kn, self.eps))),
            _ => (None, None),
        };
        let q = rope.heads(&next(), d, q_norm)?; // (B, H, T, D)
        let k = rope.heads(&next(), d, k_norm)?; // (B, KV, T, D)
        let v = next().reshape((b, t, kv, d))?.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            // (B, KV, S, D), S = cached + T, in the cache's dtype.
            Some((c, dtype)) => c.append(&ops::to_dtype(&k, dtype)?, &ops::to_dtype(&v, dtype)?)?,
            None => (k, v),
        };
        let g = h / kv;
        // Grouped-query attention without copying k/v: query heads j*G..j*G+G
        // share kv head j, so q is viewed as (B, KV, G*T, D).
        let q = q.reshape((b, kv, g * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let out = if self.blocked {
            ops::blocked_attention(&q, &k, &v, mask, scale)
        } else {
            ops::attention(&q, &k, &v, mask, scale)
        }?; // (B, KV, G*T, D)
        let out = out.reshape((b, h, t, d))?.transpose(1, 2)?.reshape((b, t, h * d))?;
        LayerAdapter::project(adapter, Proj::O, &out, &self.o_proj, Need::Value)
    }
}

/// What a forward pass is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// The output's value (and its graph).
    Value,
    /// Only the gradients of its inputs and the adapter under a given
    /// upstream gradient (a checkpointed layer's recomputation).
    Gradient,
}

pub(super) struct Mlp {
    /// gate and up projections.
    pub(super) gate_up: Projections,
    pub(super) down_proj: Linear,
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor, adapter: Option<LayerAdapter>) -> Result<Tensor> {
        Ok(self.forward_for(x, adapter, Need::Value, None)?.0)
    }

    /// With [`Need::Gradient`], the down projection's frozen product is not
    /// computed (see [`Linear::gradient_only`]): the output has the right
    /// gradients but not the right value.
    ///
    /// `kept`: the gate/up frozen products of an earlier pass on the same
    /// input; the products this pass used are returned (adapter path only).
    pub(super) fn forward_for(
        &self,
        x: &Tensor,
        adapter: Option<LayerAdapter>,
        need: Need,
        kept: Option<Vec<Tensor>>,
    ) -> Result<(Tensor, Option<Vec<Tensor>>)> {
        let (gate_up, frozen) = self.gate_up.forward_kept(x, &[Proj::Gate, Proj::Up], adapter, kept)?;
        let (gate, up) = (&gate_up[0], &gate_up[1]);
        let act = ops::silu_mul(gate, up)?;
        Ok((LayerAdapter::project(adapter, Proj::Down, &act, &self.down_proj, need)?, frozen))
    }
}

pub(super) struct Layer {
    pub(super) input_layernorm: Tensor,
    pub(super) self_attn: Attention,
    pub(super) post_attention_layernorm: Tensor,
    pub(super) mlp: Mlp,
}
