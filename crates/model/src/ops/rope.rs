//! Rotary position embeddings: half-split and interleaved pairs, and the fused
//! norm-and-rotate of query/key heads for inference.

use candle_core::{Result, Tensor, D};

use super::attach;

/// Rotary embedding, half-rotation layout: `x` is `(B, H, T, D)`, `cos` and
/// `sin` are `(B, T, D/2)`.
///
/// The forward is candle's fused kernel; the gradient of a rotation is the
/// rotation back: `dx = rope(g, cos, −sin)`, by the same kernel.
pub fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.track_op() || sin.track_op() {
        return rope_half_composed(x, cos, sin);
    }
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    if !x.track_op() {
        return Ok(y);
    }
    let (cos, sin_back) = (cos.clone(), sin.neg()?);
    attach(
        x,
        &y,
        "rope-grad",
        Box::new(move |g: &Tensor| candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &sin_back)),
    )
}

/// The half-rotation rotary embedding composed of differentiable ops.
pub(super) fn rope_half_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?); // (B, 1, T, D/2)
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// Rotary embedding, interleaved layout (llama-architecture GGUF as stored).
/// Inference only: used with quantised weights, which never train.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
}

/// The heads of a projection `y` `(B, T, N·D)` as `(B, N, T, D)`, each
/// RMS-normalised by `norm` (weight, ε) if given and rotated by `cos`/`sin`
/// `(B, T, D/2)` (pairs `(i, i + D/2)` or, `interleaved`, `(2i, 2i + 1)`),
/// in one pass ([`kernels::rotated_heads`]) for CPU f32 without a graph;
/// `None` otherwise (the caller composes the ops).
pub fn rotated_heads(
    y: &Tensor,
    d: usize,
    norm: Option<(&Tensor, f64)>,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<Option<Tensor>> {
    if y.track_op() || cos.track_op() || sin.track_op() || norm.is_some_and(|(w, _)| w.track_op()) {
        return Ok(None);
    }
    let (b, t, width) = y.dims3()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let out = crate::kernels::with_cpu_strided_rows(y, |rows| {
        crate::kernels::with_cpu_f32(&cos, |cos| {
            crate::kernels::with_cpu_f32(&sin, |sin| {
                let rotation = crate::kernels::Rotation { cos, sin, interleaved };
                match norm {
                    Some((w, eps)) => crate::kernels::with_cpu_f32(w, |w| {
                        crate::kernels::rotated_heads(&rows, t, d, Some((w, eps as f32)), &rotation)
                    }),
                    None => Some(crate::kernels::rotated_heads(&rows, t, d, None, &rotation)),
                }
            })
        })
    });
    match out {
        Some(Some(Some(Some(v)))) => Ok(Some(Tensor::from_vec(v, (b, width / d, t, d), y.device())?)),
        _ => Ok(None),
    }
}
