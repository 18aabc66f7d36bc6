//! The gated MLP's `silu(gate) ⊙ up` as one custom op with its backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `silu(gate) ⊙ up`, the gated MLP's activation: on CPU f32 one pass
/// forward and one backward (`dg = dy·u·σ(g)(1 + g(1 − σ(g)))`,
/// `du = dy·g·σ(g)`) instead of candle's silu, multiply and their composed
/// backwards; composed ops elsewhere.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(gate) && f32_cpu(up)) || gate.dims() != up.dims() {
        return gate.silu()? * up;
    }
    if !(gate.track_op() || up.track_op()) {
        // Inference: read the halves of a fused gate/up product where they lie.
        let out = crate::kernels::with_cpu_strided_rows(gate, |g| {
            crate::kernels::with_cpu_strided_rows(up, |u| crate::kernels::silu_mul_rows(&g, &u))
        });
        if let Some(Some(out)) = out {
            return Tensor::from_vec(out, gate.shape(), gate.device());
        }
    }
    let (g, u) = (gate.contiguous()?, up.contiguous()?);
    g.apply_op2_arc(&u, Arc::new(Box::new(SiluMul)))
}

/// The op of [`silu_mul`] (contiguous CPU f32 inputs).
pub(super) struct SiluMul;

/// The f32 elements of a contiguous CPU storage.
pub(super) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("silu-mul: a strided input"),
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = crate::kernels::silu_mul(contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (g.contiguous()?, u.contiguous()?, grad.contiguous()?);
        let grads = crate::kernels::with_cpu_f32(&g, |gv| {
            crate::kernels::with_cpu_f32(&u, |uv| {
                crate::kernels::with_cpu_f32(&dy, |dv| crate::kernels::silu_mul_backward(gv, uv, dv))
            })
        });
        let Some(Some(Some((dg, du)))) = grads else { candle_core::bail!("silu-mul: inputs left the CPU") };
        Ok((Some(Tensor::from_vec(dg, g.dims(), g.device())?), Some(Tensor::from_vec(du, u.dims(), u.device())?)))
    }
}
