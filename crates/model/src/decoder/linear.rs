//! A projection `y = x Wᵀ + b` over any weight storage (float, GGUF blocks with
//! our kernels, candle's quantised matmul, bf16 AMX tiles), plus an adapter's
//! low-rank term kept beside quantised weights.

use super::*;

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
    pub(super) low_rank: Option<LowRank>,
}

/// Decode-sized inputs (at most this many rows) take the row kernels.
pub(super) const SKINNY_ROWS: usize = 16;

/// GGUF blocks as a weight of [`kernels`], where one takes them: Q4_1 and
/// Q8_0 as stored, Q5_0 as the Q8_0 blocks with the same values, Q4_K and
/// Q6_K decoded into groups where the CPU has AVX2 (interleaved on VNNI).
/// `None` leaves the weight to candle's quantised matmul.
pub(super) fn block_weight(q: &candle_core::quantized::QTensor) -> Option<QuantWeight> {
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
                // Other block formats, and K-quants on CPUs without AVX2, go to candle.
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
    pub(super) fn concat(parts: &[Linear]) -> Result<Option<Linear>> {
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
    pub(super) fn add_low_rank(&mut self, update: LowRank) -> Result<()> {
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
    pub(super) fn frozen(&self) -> Option<Frozen> {
        match (&self.weight, &self.low_rank) {
            (LinearWeight::Float(w), _) => Some(Frozen::Float(w.clone())),
            (LinearWeight::Tiles(t), None) => Some(Frozen::Tiles(t.backward.clone())),
            _ => None,
        }
    }

    /// Packs a frozen float weight for bf16 tile products in place of its
    /// f32 values; whether it is packed (not for weights that train, other
    /// storage, or sizes that are not multiples of 32).
    pub(super) fn use_bf16_products(&mut self) -> bool {
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
    pub(super) fn gradient_only(&self, x: &Tensor) -> Result<Tensor> {
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
