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

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::kv_cache::KvCache;

use crate::checkpoint::{Checkpoint, RopeLayout};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::frozen::{self, Frozen, LinearTiles};
use crate::kernels::{self, with_cpu_f32, BlockFormat, QuantWeight};
use crate::ops;

/// A projection's weight: float (trainable path) or quantised (inference).
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `(out, in)` float weight, as checkpoints store it.
    Float(Tensor),
    /// GGUF blocks with a kernel of [`kernels`](crate::kernels) (Q4_1, Q8_0,
    /// Q5_0 as Q8_0; Q4_K and Q6_K with AVX-512 VNNI).
    Blocks(QuantWeight),
    /// Other GGUF quantisations, multiplied by candle's quantised kernels.
    Quantized(QMatMul),
    /// A frozen float weight packed for bf16 AMX tile products in place of
    /// its f32 values ([`Model::use_bf16_products`]).
    Tiles(LinearTiles),
}

/// A projection `y = x W^T + b`, plus an adapter's low-rank term where one
/// is attached to quantised weights.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight.
    pub weight: LinearWeight,
    /// The bias, if any.
    pub bias: Option<Tensor>,
    /// An adapter's update kept as factors (quantised or packed weights).
    low_rank: Option<LowRank>,
}

/// An adapter's update `ΔW = B A` kept beside a quantised weight as its two
/// factors, `y += (x Aᵀ) Bᵀ`: exact where merging would mean re-quantising,
/// for ~2.5% more arithmetic at rank 16 (Qwen2.5-0.5B).
#[derive(Debug, Clone)]
struct LowRank {
    /// `(r, in)`, f32 on the CPU, contiguous.
    a: Tensor,
    /// `(out, r)`, the adapter's scale included.
    b: Tensor,
}

impl LowRank {
    /// Factors `a (r, in)` and `b (out, r)`.
    fn new(a: &Tensor, b: &Tensor) -> Result<LowRank> {
        Ok(LowRank { a: a.to_dtype(DType::F32)?.contiguous()?, b: b.to_dtype(DType::F32)?.contiguous()? })
    }

    fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// One pair of factors for parts stacked along the output dimension
    /// (`sizes[i]` outputs each, factors where adapted): the parts' `A`
    /// stacked, `B` block-diagonal. `None` where no part is adapted.
    fn stacked(parts: &[Option<LowRank>], sizes: &[usize]) -> Result<Option<LowRank>> {
        let r: usize = parts.iter().flatten().map(LowRank::rank).sum();
        let Some(first) = parts.iter().flatten().next() else {
            return Ok(None);
        };
        let device = first.a.device();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut r0 = 0;
        for (part, &rows) in parts.iter().zip(sizes) {
            let zeros = |cols: usize| Tensor::zeros((rows, cols), DType::F32, device);
            match part {
                Some(p) => {
                    a.push(p.a.clone());
                    let mut row = Vec::new();
                    if r0 > 0 {
                        row.push(zeros(r0)?);
                    }
                    row.push(p.b.clone());
                    if r0 + p.rank() < r {
                        row.push(zeros(r - r0 - p.rank())?);
                    }
                    b.push(Tensor::cat(&row, 1)?);
                    r0 += p.rank();
                }
                None => b.push(zeros(r)?),
            }
        }
        Ok(Some(LowRank { a: Tensor::cat(&a, 0)?.contiguous()?, b: Tensor::cat(&b, 0)?.contiguous()? }))
    }

    /// Both updates: `A`s stacked, `B`s side by side.
    fn joined(self, other: LowRank) -> Result<LowRank> {
        Ok(LowRank {
            a: Tensor::cat(&[self.a, other.a], 0)?.contiguous()?,
            b: Tensor::cat(&[self.b, other.b], 1)?.contiguous()?,
        })
    }

    /// Adds `(x Aᵀ) Bᵀ` to `y (m, n)` for `x (m, k)`: the row kernels for
    /// decode-sized inputs, candle's matmul for longer ones (the row
    /// kernels' per-task transposition made a 2,000-token prefill's
    /// adapter cost a third of the base product).
    fn add_to(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        let (r, k) = self.a.dims2()?;
        let n = self.b.dim(0)?;
        let d = if m <= SKINNY_ROWS {
            let u = with_cpu_f32(&self.a, |a| kernels::f32_rows(x, m, a, r, k));
            u.and_then(|u| with_cpu_f32(&self.b, |b| kernels::f32_rows(&u, m, b, n, r)))
        } else {
            None
        };
        let d = match d {
            Some(d) => d,
            None => {
                let xt = Tensor::from_slice(x, (m, k), self.a.device())?;
                xt.matmul(&self.a.t()?)?.matmul(&self.b.t()?)?.flatten_all()?.to_vec1::<f32>()?
            }
        };
        y.iter_mut().zip(d).for_each(|(y, d)| *y += d);
        Ok(())
    }
}

/// The seven projections of a decoder layer, by their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Proj {
    /// `self_attn.q_proj`
    #[serde(rename = "q_proj")]
    Q,
    /// `self_attn.k_proj`
    #[serde(rename = "k_proj")]
    K,
    /// `self_attn.v_proj`
    #[serde(rename = "v_proj")]
    V,
    /// `self_attn.o_proj`
    #[serde(rename = "o_proj")]
    O,
    /// `mlp.gate_proj`
    #[serde(rename = "gate_proj")]
    Gate,
    /// `mlp.up_proj`
    #[serde(rename = "up_proj")]
    Up,
    /// `mlp.down_proj`
    #[serde(rename = "down_proj")]
    Down,
}

impl Proj {
    /// All seven, in checkpoint order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The module's short name (`q_proj`, …, `down_proj`), as PEFT's `target_modules` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The module's path inside a layer (`self_attn.q_proj`, `mlp.down_proj`).
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// Parses a short name.
    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Something that adds to a projection's output: a LoRA adapter. The base
/// weights stay frozen; what the adapter returns is differentiable in its
/// own variables.
pub trait Adapter {
    /// The term added to projection `proj` of layer `layer` for input `x`
    /// `(.., in)`, shaped `(.., out)`; `None` where the adapter has nothing.
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> candle_core::Result<Option<Tensor>>;

    /// The projection `base + delta(x)` as one differentiable op, where
    /// `base` is the frozen product `x Wᵀ (+ bias)` computed without a graph
    /// and `weight` is `W` `(out, in)`: the op's backward gives `x` the
    /// frozen product's gradient `dy W` ([`Frozen::input_gradient`]) as well
    /// as the adapter's. `None`
    /// where the adapter has no term for this projection or does not fuse;
    /// the caller then attaches `base` to `x` and adds [`Adapter::delta`].
    fn project(
        &self,
        layer: usize,
        proj: Proj,
        x: &Tensor,
        base: &Tensor,
        weight: &Frozen,
    ) -> candle_core::Result<Option<Tensor>> {
        let _ = (layer, proj, x, base, weight);
        Ok(None)
    }

    /// Whether later deltas record a graph for the adapter's variables;
    /// returns the previous setting. An adapter that cannot stop tracking
    /// keeps tracking (the default).
    fn track(&self, on: bool) -> bool {
        let _ = on;
        true
    }
}

/// The adapter of one layer, if any.
#[derive(Clone, Copy)]
struct LayerAdapter<'a> {
    adapter: &'a dyn Adapter,
    layer: usize,
}

impl LayerAdapter<'_> {
    /// `linear`'s projection of `x` plus the adapter's term, as one op where
    /// the adapter fuses ([`Adapter::project`]); with [`Need::Gradient`] the
    /// frozen product's value is not computed.
    fn project(this: Option<Self>, proj: Proj, x: &Tensor, linear: &Linear, need: Need) -> Result<Tensor> {
        let (Some(a), Some(w)) = (this, linear.frozen()) else {
            let y = match need {
                Need::Value => linear.forward(x)?,
                Need::Gradient => linear.gradient_only(x)?,
            };
            return LayerAdapter::add(this, proj, x, y);
        };
        let base = match need {
            Need::Value => linear.forward(&x.detach())?,
            Need::Gradient => {
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank > 0") = w.out_features()?;
                Tensor::zeros(dims, x.dtype(), x.device())?
            }
        };
        a.with_base(proj, x, base, &w)
    }

    /// The adapter's fused op over a frozen product's `base` value, or `base`
    /// attached to `x` with the product's backward where it does not fuse.
    fn with_base(self, proj: Proj, x: &Tensor, base: Tensor, weight: &Frozen) -> Result<Tensor> {
        match self.adapter.project(self.layer, proj, x, &base, weight)? {
            Some(y) => Ok(y),
            None => weight.attach(x, &base),
        }
    }

    fn add(this: Option<Self>, proj: Proj, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match this {
            Some(a) => match a.adapter.delta(a.layer, proj, x)? {
                Some(d) => Ok((y + d)?),
                None => Ok(y),
            },
            None => Ok(y),
        }
    }
}

/// Projections of the same input (q, k, v; gate, up), run as one product
/// when their weights stack (same storage kind), else one by one.
struct Projections {
    fused: Option<Linear>,
    parts: Vec<Linear>,
    sizes: Vec<usize>,
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Projections> {
        let sizes = parts.iter().map(Linear::out_features).collect::<Result<Vec<_>>>()?;
        Ok(match Linear::concat(&parts)? {
            Some(fused) => Projections { fused: Some(fused), parts: Vec::new(), sizes },
            None => Projections { fused: None, parts, sizes },
        })
    }

    /// Adds part `i`'s adapter update `factors[i]` = `(A, scale · B)`, if
    /// any (see [`Linear::add_low_rank`]); a fused projection takes the
    /// parts' factors stacked ([`LowRank::stacked`]).
    fn add_low_rank(&mut self, factors: &[Option<(Tensor, Tensor)>]) -> Result<()> {
        let parts = factors
            .iter()
            .map(|fac| fac.as_ref().map(|(a, b)| LowRank::new(a, b)).transpose())
            .collect::<Result<Vec<_>>>()?;
        match &mut self.fused {
            Some(f) => {
                if let Some(stacked) = LowRank::stacked(&parts, &self.sizes)? {
                    f.add_low_rank(stacked)?;
                }
            }
            None => {
                for (p, part) in self.parts.iter_mut().zip(parts) {
                    if let Some(l) = part {
                        p.add_low_rank(l)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The projections of `x`, each plus the adapter's term for `kinds[i]`.
    ///
    /// With an adapter over float weights, the frozen products are computed
    /// without a graph (still as one product when fused) and each part joins
    /// the graph as one op with its adapter term ([`Adapter::project`]),
    /// instead of a product, a split and an addition.
    fn forward(&self, x: &Tensor, kinds: &[Proj], adapter: Option<LayerAdapter>) -> Result<Vec<Tensor>> {
        Ok(self.forward_kept(x, kinds, adapter, None)?.0)
    }

    /// [`Projections::forward`], also returning the frozen products (one
    /// tensor when fused) where the adapter path computed them without a
    /// graph, and taking them from `kept` instead of computing them when
    /// given (a recomputation).
    fn forward_kept(
        &self,
        x: &Tensor,
        kinds: &[Proj],
        adapter: Option<LayerAdapter>,
        kept: Option<Vec<Tensor>>,
    ) -> Result<(Vec<Tensor>, Option<Vec<Tensor>>)> {
        if let (Some(a), Some(weights)) = (adapter, self.frozen_parts()?) {
            let frozen = match kept {
                Some(k) => k,
                None => self.products(&x.detach())?,
            };
            let ys = self
                .split(frozen.clone())?
                .into_iter()
                .zip(weights.iter().zip(kinds))
                .map(|(y, (w, &k))| a.with_base(k, x, y.contiguous()?, w))
                .collect::<Result<_>>()?;
            return Ok((ys, Some(frozen)));
        }
        let base = self.split(self.products(x)?)?;
        Ok((
            base.into_iter().zip(kinds).map(|(y, &k)| LayerAdapter::add(adapter, k, x, y)).collect::<Result<_>>()?,
            None,
        ))
    }

    /// The products of `x`: one tensor when fused, else one per part.
    fn products(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.fused {
            Some(f) => Ok(vec![f.forward(x)?]),
            None => self.parts.iter().map(|p| p.forward(x)).collect(),
        }
    }

    /// The parts' outputs from [`Projections::products`].
    fn split(&self, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        match self.fused {
            Some(_) => self.by_part(&outputs[0], D::Minus1),
            None => Ok(outputs),
        }
    }

    /// `t` cut along `dim` into the parts' sizes.
    fn by_part(&self, t: &Tensor, dim: D) -> Result<Vec<Tensor>> {
        let dim = candle_core::shape::Dim::to_index(&dim, t.shape(), "by_part")?;
        let mut at = 0;
        self.sizes
            .iter()
            .map(|&n| {
                let part = t.narrow(dim, at, n);
                at += n;
                Ok(part?)
            })
            .collect()
    }

    /// Each part's frozen float weight `(out, in)` (with its rows of the
    /// fused weight's tiles, if packed); `None` for other storage.
    fn frozen_parts(&self) -> Result<Option<Vec<Frozen>>> {
        let Some(f) = &self.fused else {
            return Ok(self.parts.iter().map(Linear::frozen).collect());
        };
        let Some(fused) = f.frozen() else {
            return Ok(None);
        };
        let mut at = 0;
        self.sizes
            .iter()
            .map(|&n| {
                let part = fused.rows(at, n);
                at += n;
                part
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Packs the weights for bf16 tile products; the number of weights
    /// packed. A fused weight is packed only where each part starts at a
    /// multiple of 32 rows (its parts' gradients read their rows' tiles).
    fn use_bf16_products(&mut self) -> usize {
        match &mut self.fused {
            Some(f) if self.sizes.iter().all(|n| n.is_multiple_of(32)) => f.use_bf16_products() as usize,
            Some(_) => 0,
            None => self.parts.iter_mut().map(|p| p.use_bf16_products() as usize).sum(),
        }
    }
}

/// Decode-sized inputs (at most this many rows) take the row kernels.
const SKINNY_ROWS: usize = 16;

/// GGUF blocks as a weight of [`kernels`], where one takes them: Q4_1 and
/// Q8_0 as stored, Q5_0 as the Q8_0 blocks with the same values, Q4_K and
/// Q6_K where the CPU has the VNNI kernel. `None` leaves the weight to
/// candle's quantised matmul.
fn block_weight(q: &candle_core::quantized::QTensor) -> Option<QuantWeight> {
    let (n, k) = q.shape().dims2().ok()?;
    let data = q.data().ok()?;
    let (format, data) = match q.dtype() {
        GgmlDType::Q4_1 => (BlockFormat::Q4_1, data.into_owned()),
        GgmlDType::Q8_0 => (BlockFormat::Q8_0, data.into_owned()),
        GgmlDType::Q5_0 => (BlockFormat::Q8_0, kernels::q5_0_to_q8_0(&data)?),
        GgmlDType::Q4K => (BlockFormat::Q4K, data.into_owned()),
        GgmlDType::Q6K => (BlockFormat::Q6K, data.into_owned()),
        _ => return None,
    };
    QuantWeight::new(format, data, n, k)
}

impl Linear {
    /// A linear layer from a checkpoint tensor (float or quantised).
    pub fn load(ck: &mut Checkpoint, prefix: &str, bias: bool) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = match ck.quantized.remove(&name) {
            Some(q) => match block_weight(&q) {
                Some(blocks) => LinearWeight::Blocks(blocks),
                // K-quants without the VNNI kernel go to candle's K-quant matmul:
                // with the AVX2 kernels forced on the Xeon (TABLETRACE_QUANT_KERNELS=avx2),
                // their f32 values instead gave prefill +14%, decode b1 -7%, +370 MB.
                None => LinearWeight::Quantized(QMatMul::from_arc(q)?),
            },
            None => LinearWeight::Float(ck.take(&name)?),
        };
        let bias = if bias { Some(ck.take(&format!("{prefix}.bias"))?) } else { None };
        Ok(Linear { weight, bias, low_rank: None })
    }

    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        Ok(match &self.weight {
            LinearWeight::Float(w) => w.dim(0)?,
            LinearWeight::Blocks(q) => q.n(),
            LinearWeight::Tiles(t) => t.forward.n(),
            LinearWeight::Quantized(q) => match q {
                QMatMul::QTensor(t) => t.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dim(0)?,
            },
        })
    }

    /// Stacks layers along the output dimension when their weights are of
    /// one kind (all float, or all the same block format) and all or none
    /// have a bias; `None` otherwise.
    fn concat(parts: &[Linear]) -> Result<Option<Linear>> {
        let weight = if let Some(ws) = parts
            .iter()
            .map(|p| match &p.weight {
                LinearWeight::Float(w) => Some(w.clone()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            LinearWeight::Float(Tensor::cat(&ws, 0)?)
        } else if let Some(qs) = parts
            .iter()
            .map(|p| match &p.weight {
                LinearWeight::Blocks(q) => Some(q),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            match QuantWeight::concat(&qs) {
                Some(q) => LinearWeight::Blocks(q),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        let bias = match parts.iter().map(|p| p.bias.clone()).collect::<Option<Vec<_>>>() {
            Some(bs) => Some(Tensor::cat(&bs, 0)?),
            None if parts.iter().all(|p| p.bias.is_none()) => None,
            None => return Ok(None),
        };
        Ok(Some(Linear { weight, bias, low_rank: None }))
    }

    /// The weight as `(out, in)` floats (dequantised if need be).
    pub fn weight_out_in(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Float(w) => w.clone(),
            LinearWeight::Blocks(_) => {
                return Err(Error::Request(
                    "a Q4_1/Q8_0 weight has no float form here; load the model unquantised".into(),
                ))
            }
            LinearWeight::Tiles(_) => {
                return Err(Error::Request(
                    "a weight packed for bf16 products has no f32 form; load the model again".into(),
                ))
            }
            LinearWeight::Quantized(q) => match q {
                QMatMul::QTensor(t) => t.dequantize(&t.device())?,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
            },
        })
    }

    /// Adds an adapter's update `B A`: merged into a float weight, kept as
    /// factors beside a quantised one.
    fn add_low_rank(&mut self, update: LowRank) -> Result<()> {
        match &mut self.weight {
            LinearWeight::Float(w) => {
                *w = (&*w + update.b.matmul(&update.a)?.to_dtype(w.dtype())?)?.detach();
            }
            _ => {
                self.low_rank = Some(match self.low_rank.take() {
                    Some(old) => old.joined(update)?,
                    None => update,
                });
            }
        }
        Ok(())
    }

    /// The weight as a frozen operand of training's products: float or
    /// packed, without an adapter's factors; `None` for quantised weights.
    fn frozen(&self) -> Option<Frozen> {
        match (&self.weight, &self.low_rank) {
            (LinearWeight::Float(w), _) => Some(Frozen::Float(w.clone())),
            (LinearWeight::Tiles(t), None) => Some(Frozen::Tiles(t.backward.clone())),
            _ => None,
        }
    }

    /// Packs a frozen float weight for bf16 tile products in place of its
    /// f32 values; whether it is packed (not for weights that train, other
    /// storage, or sizes that are not multiples of 32).
    fn use_bf16_products(&mut self) -> bool {
        if let LinearWeight::Float(w) = &self.weight {
            if !w.track_op() {
                if let Some(t) = LinearTiles::pack(w) {
                    self.weight = LinearWeight::Tiles(t);
                }
            }
        }
        matches!(self.weight, LinearWeight::Tiles(_))
    }

    /// Zeros shaped like [`Linear::forward`]'s output, with its gradient for
    /// `x` ([`ops::frozen_linear_gradient_only`]); the real product for a
    /// weight that is not plain float.
    fn gradient_only(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Float(w) => Ok(ops::frozen_linear_gradient_only(x, &w.t()?)?),
            LinearWeight::Tiles(t) if self.low_rank.is_none() && x.track_op() => {
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank > 0") = t.forward.n();
                Frozen::Tiles(t.backward.clone()).attach(x, &Tensor::zeros(dims, x.dtype(), x.device())?)
            }
            _ => self.forward(x),
        }
    }

    /// Applies the projection to `x` of shape `(.., in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().expect("inputs have a feature dimension");
        let rows = x.elem_count() / k.max(1);
        let mut out_dims = dims.clone();
        let on_cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op();
        let y = match &self.weight {
            LinearWeight::Float(w) if on_cpu_f32 && rows <= SKINNY_ROWS && !w.track_op() => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let n = w.dim(0)?;
                match with_cpu_f32(w, |ws| kernels::f32_rows(&xs, rows, ws, n, k)) {
                    Some(y) => {
                        *out_dims.last_mut().expect("rank > 0") = n;
                        Tensor::from_vec(y, out_dims, x.device())?
                    }
                    None => ops::frozen_linear(x, &w.t()?)?,
                }
            }
            LinearWeight::Float(w) => ops::frozen_linear(x, &w.t()?)?,
            LinearWeight::Tiles(t) => {
                let mut value = frozen::tile_product(&x.detach(), &t.forward)?.ok_or_else(|| {
                    Error::Request("a weight packed for bf16 products takes f32 inputs on the CPU".into())
                })?;
                if let Some(l) = &self.low_rank {
                    let xs = x.flatten_all()?.to_vec1::<f32>()?;
                    let mut ys = value.flatten_all()?.to_vec1::<f32>()?;
                    l.add_to(&xs, rows, &mut ys)?;
                    value = Tensor::from_vec(ys, value.dims(), x.device())?;
                }
                match self.low_rank {
                    None => Frozen::Tiles(t.backward.clone()).attach(x, &value)?,
                    Some(_) => value,
                }
            }
            LinearWeight::Blocks(q) => {
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                *out_dims.last_mut().expect("rank > 0") = q.n();
                let mut y = q.matmul(&xs, rows);
                if let Some(l) = &self.low_rank {
                    l.add_to(&xs, rows, &mut y)?;
                }
                Tensor::from_vec(y, out_dims, x.device())?.to_dtype(x.dtype())?
            }
            LinearWeight::Quantized(q) => {
                let y = q.forward(x)?;
                match &self.low_rank {
                    Some(l) => {
                        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        let mut ys = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        l.add_to(&xs, rows, &mut ys)?;
                        Tensor::from_vec(ys, y.dims(), x.device())?.to_dtype(y.dtype())?
                    }
                    None => y,
                }
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Attention {
    /// q, k and v projections.
    qkv: Projections,
    o_proj: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

impl Attention {
    fn load(ck: &mut Checkpoint, cfg: &ModelConfig, prefix: &str) -> Result<Self> {
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
        })
    }

    fn forward(
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
        let out = ops::attention(&q, &k, &v, mask, 1.0 / (d as f64).sqrt())?; // (B, KV, G*T, D)
        let out = out.reshape((b, h, t, d))?.transpose(1, 2)?.reshape((b, t, h * d))?;
        LayerAdapter::project(adapter, Proj::O, &out, &self.o_proj, Need::Value)
    }
}

/// What a forward pass is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// The output's value (and its graph).
    Value,
    /// Only the gradients of its inputs and the adapter under a given
    /// upstream gradient (a checkpointed layer's recomputation).
    Gradient,
}

struct Mlp {
    /// gate and up projections.
    gate_up: Projections,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, adapter: Option<LayerAdapter>) -> Result<Tensor> {
        Ok(self.forward_for(x, adapter, Need::Value, None)?.0)
    }

    /// With [`Need::Gradient`], the down projection's frozen product is not
    /// computed (see [`Linear::gradient_only`]): the output has the right
    /// gradients but not the right value.
    ///
    /// `kept`: the gate/up frozen products of an earlier pass on the same
    /// input; the products this pass used are returned (adapter path only).
    fn forward_for(
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

struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Cosine and sine tables of the rotary embedding, for every position.
struct RopeTables {
    cos: Tensor, // (max_pos, D/2)
    sin: Tensor,
    layout: RopeLayout,
}

/// The rotary embedding for one batch's positions.
struct RopeAt {
    cos: Tensor, // (B, T, D/2)
    sin: Tensor,
    layout: RopeLayout,
}

impl RopeAt {
    /// A projection `y` `(B, T, N·D)` as rotated heads `(B, N, T, D)`, each
    /// RMS-normalised first by `norm` (weight, ε: Qwen3's q/k norm).
    fn heads(&self, y: &Tensor, d: usize, norm: Option<(&Tensor, f64)>) -> Result<Tensor> {
        let interleaved = self.layout == RopeLayout::Interleaved;
        if let Some(h) = ops::rotated_heads(y, d, norm, &self.cos, &self.sin, interleaved)? {
            return Ok(h);
        }
        let (b, t, width) = y.dims3()?;
        let mut h = y.reshape((b, t, width / d, d))?.transpose(1, 2)?.contiguous()?;
        if let Some((w, eps)) = norm {
            h = ops::rms_norm(&h, w, eps)?;
        }
        Ok(match self.layout {
            RopeLayout::Half => ops::rope_half(&h, &self.cos, &self.sin)?,
            RopeLayout::Interleaved => ops::rope_interleaved(&h, &self.cos, &self.sin)?,
        })
    }
}

impl RopeTables {
    fn new(cfg: &ModelConfig, layout: RopeLayout, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let mut inv_freq: Vec<f64> =
            (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64)).collect();
        if let Some(s) = &cfg.rope_scaling {
            // Llama 3.1: long wavelengths are slowed by `factor`, short ones
            // kept, and the band between interpolated.
            let old = s.original_max_position_embeddings as f64;
            let (low_wl, high_wl) = (old / s.low_freq_factor, old / s.high_freq_factor);
            for f in &mut inv_freq {
                let wl = 2.0 * std::f64::consts::PI / *f;
                if wl > low_wl {
                    *f /= s.factor;
                } else if wl >= high_wl {
                    let smooth = (old / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
            layout,
        })
    }

    fn at(&self, positions: &Tensor) -> Result<RopeAt> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        Ok(RopeAt {
            cos: self.cos.index_select(&flat, 0)?.reshape((b, t, half))?,
            sin: self.sin.index_select(&flat, 0)?.reshape((b, t, half))?,
            layout: self.layout,
        })
    }
}

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

    /// Forward and backward with activation checkpointing: the layers run
    /// once without keeping their graphs (only each layer's input is kept),
    /// `head` turns the final hidden states into a loss, and the backward
    /// recomputes one layer at a time from its kept input. Peak memory is
    /// one layer's graph instead of all of them, for about a third more
    /// compute (less the down projections: a recomputed layer's output
    /// value is never read, only its gradients, so that last product is
    /// not recomputed).
    ///
    /// With `keep_mlp`, the first pass also keeps each layer's frozen
    /// gate/up products (`2 × intermediate` values per token and layer,
    /// six times a layer input for SmolLM2), and the recomputation reuses
    /// them: the costliest half of a layer's products is not redone.
    ///
    /// Returns the gradients of `vars` (the adapter's variables, `None` for
    /// one that got none) and what `head` returned beside the loss.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_checkpointed<T>(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        adapter: &dyn Adapter,
        vars: &[Tensor],
        keep_mlp: bool,
        head: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
    ) -> Result<(Vec<Option<Tensor>>, T)> {
        let (b, t) = ids.dims2()?;
        let rope = self.rope.at(positions)?;
        let mask = mask.to_dtype(self.dtype)?;
        let eps = self.config.rms_norm_eps;
        type Kept = Option<Vec<Tensor>>;
        let layer_fwd = |i: usize, x: &Tensor, need: Need, kept: Kept| -> Result<(Tensor, Kept)> {
            let layer = &self.layers[i];
            let la = Some(LayerAdapter { adapter, layer: i });
            let a = ops::rms_norm(x, &layer.input_layernorm, eps)?;
            let h = (x + layer.self_attn.forward(&a, &rope, Some(&mask), None, la)?)?;
            let m = ops::rms_norm(&h, &layer.post_attention_layernorm, eps)?;
            let (y, products) = layer.mlp.forward_for(&m, la, need, kept)?;
            Ok(((&h + y)?, products))
        };
        // The first pass keeps each layer's input only, so it records no
        // graph (no pass-through copies, no saved probabilities).
        let was_tracking = adapter.track(false);
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut kept = Vec::with_capacity(self.layers.len());
        let mut h = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        let first_pass = (0..self.layers.len()).try_for_each(|i| -> Result<()> {
            let (out, products) = layer_fwd(i, &h, Need::Value, None)?;
            inputs.push(std::mem::replace(&mut h, out.detach()));
            kept.push(products.filter(|_| keep_mlp));
            Ok(())
        });
        adapter.track(was_tracking);
        first_pass?;
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut collect = |store: &candle_core::backprop::GradStore| -> Result<()> {
            for (slot, v) in grads.iter_mut().zip(vars) {
                if let Some(g) = store.get(v) {
                    *slot = Some(match slot.take() {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        };
        let top = candle_core::Var::from_tensor(&h)?;
        let (loss, extra) = head(&ops::rms_norm(top.as_tensor(), &self.norm, eps)?)?;
        let store = loss.backward()?;
        collect(&store)?;
        let mut upstream = store.get(top.as_tensor()).cloned();
        drop(store);
        for i in (0..self.layers.len()).rev() {
            let Some(dh) = upstream.take() else { break };
            let x = candle_core::Var::from_tensor(&inputs[i])?;
            // Only `y`'s gradients are used (`y · dh` is never read), so
            // the down projection's product is skipped.
            let (y, _) = layer_fwd(i, x.as_tensor(), Need::Gradient, kept[i].take())?;
            let store = (y * dh)?.sum_all()?.backward()?;
            collect(&store)?;
            upstream = store.get(x.as_tensor()).cloned();
        }
        Ok((grads, extra))
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

/// Additive causal mask `(B, T, offset + T)`: query `i` sees key slots `0..=offset + i`.
pub fn causal_mask(b: usize, t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let v: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(v, (t, s), device)?.unsqueeze(0)?.broadcast_as((b, t, s))?.contiguous()?)
}

/// Additive mask `(B, T, S)` for left-padded rows: query `i` of row `r` sees
/// key slot `j` when `j <= offset + i` and slot `j` holds a real token of
/// row `r` (`key_valid[r][j]`). Every query also sees its own slot, so that a
/// padding position has finite values (a row of -inf would give NaN, and NaN
/// keys poison every row that masks them).
pub fn padded_causal_mask(key_valid: &[Vec<bool>], t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let b = key_valid.len();
    let s = offset + t;
    let mut v = Vec::with_capacity(b * t * s);
    for row in key_valid {
        for i in 0..t {
            for j in 0..s {
                let ok = j == offset + i || (j < offset + i && row.get(j).copied().unwrap_or(false));
                v.push(if ok { 0.0 } else { f32::NEG_INFINITY });
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, t, s), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
    }

    /// A Q8_0 linear layer `(n, k)` from `w`'s values (one scale per 32).
    fn q8_0(w: &[f32], n: usize, k: usize) -> Linear {
        let mut bytes = Vec::new();
        for blk in w.chunks(32) {
            let d = half::f16::from_f32(blk.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0);
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend(blk.iter().map(|v| (v / d.to_f32()).round() as i8 as u8));
        }
        let q = QuantWeight::new(BlockFormat::Q8_0, bytes, n, k).unwrap();
        Linear { weight: LinearWeight::Blocks(q), bias: None, low_rank: None }
    }

    fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn an_adapter_beside_quantised_weights_adds_exactly_its_update() {
        // 5 rows take the row kernels, 20 candle's matmul.
        for m in [5, 20] {
            adds_exactly(m);
        }
    }

    fn adds_exactly(m: usize) {
        let k = 64;
        let x = tensor(values(m * k, 1.0), (m, k));
        let sizes = [32, 16, 48];
        let parts: Vec<Linear> =
            sizes.iter().enumerate().map(|(i, &n)| q8_0(&values(n * k, 10.0 * i as f32), n, k)).collect();
        let base: Vec<Tensor> = parts.iter().map(|p| p.forward(&x).unwrap()).collect();
        // Rank 2 on the first part, none on the second, rank 3 on the third.
        let factors: Vec<Option<(Tensor, Tensor)>> = vec![
            Some((tensor(values(2 * k, 3.0), (2, k)), tensor(values(32 * 2, 4.0), (32, 2)))),
            None,
            Some((tensor(values(3 * k, 5.0), (3, k)), tensor(values(48 * 3, 6.0), (48, 3)))),
        ];
        let mut fused = Projections::new(parts).unwrap();
        assert!(fused.fused.is_some(), "Q8_0 parts stack into one product");
        fused.add_low_rank(&factors).unwrap();
        let got = fused.forward(&x, &[Proj::Q, Proj::K, Proj::V], None).unwrap();
        for ((g, b), f) in got.iter().zip(&base).zip(&factors) {
            let want = match f {
                Some((a, bb)) => (b + x.matmul(&bb.matmul(a).unwrap().t().unwrap()).unwrap()).unwrap(),
                None => b.clone(),
            };
            let diff = (g - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "max |diff| {diff}");
        }
        // A second adapter on the same projection adds its update too.
        let mut one = q8_0(&values(32 * k, 0.0), 32, k);
        let (a, b) = factors[0].clone().unwrap();
        one.add_low_rank(LowRank::new(&a, &b).unwrap()).unwrap();
        one.add_low_rank(LowRank::new(&a, &b).unwrap()).unwrap();
        let want = (&base[0] + (x.matmul(&b.matmul(&a).unwrap().t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
        let diff =
            (one.forward(&x).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "twice: max |diff| {diff}");
    }
}
