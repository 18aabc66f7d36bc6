//! RMSNorm (fused forward with a hand-written backward, or composed) and the
//! last-dimension softmax.

use candle_core::{Result, Tensor, D};

use super::attach;

/// RMSNorm over the last dimension, scaled by `weight`.
///
/// With a frozen weight (LoRA training) the forward is candle's fused
/// kernel and the input's gradient is written by hand:
/// `dx = r⁻¹ (w ⊙ g) − x · Σ(w ⊙ g ⊙ x) / (n r³)`, `r = √(mean(x²) + ε)`.
/// A weight that is a variable takes the composed path.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if weight.track_op() {
        return rms_norm_composed(x, weight, eps);
    }
    let xd = x.detach().contiguous()?;
    let y = rms_norm_forward(&xd, weight, eps)?;
    if !x.track_op() {
        return Ok(y);
    }
    let w = weight.clone();
    attach(
        x,
        &y,
        "rms-norm-grad",
        Box::new(move |g: &Tensor| {
            let n = xd.dim(D::Minus1)? as f64;
            let inv = ((xd.sqr()?.sum_keepdim(D::Minus1)? / n)? + eps)?.sqrt()?.recip()?;
            let gw = g.broadcast_mul(&w)?;
            let coef = ((gw.mul(&xd)?.sum_keepdim(D::Minus1)? * inv.powf(3.0)?)? / n)?;
            gw.broadcast_mul(&inv)? - xd.broadcast_mul(&coef)?
        }),
    )
}

/// RMSNorm without a graph: the vectorised kernel for CPU f32 (candle's
/// sums each row one value at a time), candle's elsewhere.
pub(super) fn rms_norm_forward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let w = weight.contiguous()?;
    let d = w.elem_count();
    if w.dims().len() == 1 && x.dim(D::Minus1)? == d {
        let y = crate::kernels::with_cpu_f32(x, |xs| {
            crate::kernels::with_cpu_f32(&w, |ws| crate::kernels::rms_norm(xs, ws, eps as f32))
        });
        if let Some(Some(y)) = y {
            return Tensor::from_vec(y, x.shape(), x.device());
        }
    }
    candle_nn::ops::rms_norm(x, weight, eps as f32)
}

/// RMSNorm composed of differentiable ops (gradients for `x` and `weight`).
pub(super) fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let mean_sq = (x.sqr()?.sum_keepdim(D::Minus1)? / dim as f64)?;
    x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}
