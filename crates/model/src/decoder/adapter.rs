//! How adapters attach to the decoder: the [`Adapter`] trait, the seven
//! projections it can target ([`Proj`]), an adapter's factors kept beside a
//! quantised weight, and one layer's view of an adapter.

use super::*;

/// An adapter's update `ΔW = B A` kept beside a quantised weight as its two
/// factors, `y += (x Aᵀ) Bᵀ`: exact where merging would mean re-quantising,
/// for ~2.5% more arithmetic at rank 16 (Qwen2.5-0.5B).
#[derive(Debug, Clone)]
pub(super) struct LowRank {
    /// `(r, in)`, f32 on the CPU, contiguous.
    pub(super) a: Tensor,
    /// `(out, r)`, the adapter's scale included.
    pub(super) b: Tensor,
}

impl LowRank {
    /// Factors `a (r, in)` and `b (out, r)`.
    pub(super) fn new(a: &Tensor, b: &Tensor) -> Result<LowRank> {
        Ok(LowRank { a: a.to_dtype(DType::F32)?.contiguous()?, b: b.to_dtype(DType::F32)?.contiguous()? })
    }

    pub(super) fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// One pair of factors for parts stacked along the output dimension
    /// (`sizes[i]` outputs each, factors where adapted): the parts' `A`
    /// stacked, `B` block-diagonal. `None` where no part is adapted.
    pub(super) fn stacked(parts: &[Option<LowRank>], sizes: &[usize]) -> Result<Option<LowRank>> {
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
    pub(super) fn joined(self, other: LowRank) -> Result<LowRank> {
        Ok(LowRank {
            a: Tensor::cat(&[self.a, other.a], 0)?.contiguous()?,
            b: Tensor::cat(&[self.b, other.b], 1)?.contiguous()?,
        })
    }

    /// Adds `(x Aᵀ) Bᵀ` to `y (m, n)` for `x (m, k)`: the row kernels for
    /// decode-sized inputs; for longer ones `h = x Aᵀ` by one product and
    /// `h Bᵀ` added in place, rows in parallel ([`kernels::add_low_rank_into`];
    /// the row kernels' per-task transposition made a 2,000-token prefill's
    /// adapter cost a third of the base product, and a separate `h Bᵀ`
    /// tensor cost a zero-fill and a serial addition).
    pub(super) fn add_to(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        let (r, k) = self.a.dims2()?;
        let n = self.b.dim(0)?;
        if m <= SKINNY_ROWS {
            let u = with_cpu_f32(&self.a, |a| kernels::f32_rows(x, m, a, r, k));
            if let Some(d) = u.and_then(|u| with_cpu_f32(&self.b, |b| kernels::f32_rows(&u, m, b, n, r))) {
                y.iter_mut().zip(d).for_each(|(y, d)| *y += d);
                return Ok(());
            }
        }
        let xt = Tensor::from_slice(x, (m, k), self.a.device())?;
        let h = crate::ops::matmul(&xt, &self.a.t()?)?.flatten_all()?.to_vec1::<f32>()?; // (m, r)
        let bt = self.b.t()?.contiguous()?; // (r, n)
        match with_cpu_f32(&bt, |f| kernels::add_low_rank_into(y, &h, f, r)) {
            Some(()) => Ok(()),
            None => Err(Error::Request("adapter factors beside quantised weights must be CPU f32".into())),
        }
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
pub(super) struct LayerAdapter<'a> {
    pub(super) adapter: &'a dyn Adapter,
    pub(super) layer: usize,
}

impl LayerAdapter<'_> {
    /// `linear`'s projection of `x` plus the adapter's term, as one op where
    /// the adapter fuses ([`Adapter::project`]); with [`Need::Gradient`] the
    /// frozen product's value is not computed.
    pub(super) fn project(this: Option<Self>, proj: Proj, x: &Tensor, linear: &Linear, need: Need) -> Result<Tensor> {
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

    /// The adapter's fused op over a frozen product's `base` value (possibly a
    /// part of a fused product, read in place), or `base` attached to `x`
    /// with the product's backward where it does not fuse.
    pub(super) fn with_base(self, proj: Proj, x: &Tensor, base: Tensor, weight: &Frozen) -> Result<Tensor> {
        match self.adapter.project(self.layer, proj, x, &base, weight)? {
            Some(y) => Ok(y),
            None => weight.attach(x, &base.contiguous()?),
        }
    }

    pub(super) fn add(this: Option<Self>, proj: Proj, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match this {
            Some(a) => match a.adapter.delta(a.layer, proj, x)? {
                Some(d) => Ok((y + d)?),
                None => Ok(y),
            },
            None => Ok(y),
        }
    }
}
