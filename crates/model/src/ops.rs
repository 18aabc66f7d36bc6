//! Operations with two paths: candle's fused kernels when no gradient is
//! tracked (inference), and, when one is, the fused kernel with a
//! hand-written backward or a composition of differentiable ops. candle's fused `rms_norm`,
//! `softmax_last_dim` and `rope` return no gradient at all, so calling them
//! on a tracked tensor would silently stop training.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

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
fn rms_norm_forward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
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
fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
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
fn rope_half_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

/// `x @ rhs` for a frozen weight given as the right-hand side `rhs`
/// (`(in, out)`, a transposed view or a contiguous transposed copy), for `x`
/// of any rank.
///
/// candle's matmul backward always computes the weight's gradient, even for
/// a weight that is not trained: for LoRA that costs a full fine-tuning's
/// compute and memory. Here the product is computed without a graph and
/// re-attached to `x` through a pass-through op whose backward returns
/// the input's gradient only. A weight that is itself a variable (full
/// fine-tuning) takes the ordinary differentiable path.
pub fn frozen_linear(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if rhs.track_op() {
        return plain_linear(x, rhs);
    }
    frozen_linear_with_value(x, &plain_linear(&x.detach(), rhs)?, rhs)
}

/// The graph of [`frozen_linear`] without its value: zeros shaped like
/// `x @ rhs`, whose backward is the product's (`dx = dy @ rhsᵀ`).
///
/// For a recomputation that only wants gradients: when nothing downstream
/// reads the product's value (the last projection of a layer, added to the
/// residual stream), its Jacobian does not depend on that value, so the
/// product itself need not be computed.
pub fn frozen_linear_gradient_only(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if rhs.track_op() || !x.track_op() {
        return frozen_linear(x, rhs);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank > 0") = rhs.dim(1)?;
    frozen_linear_with_value(x, &Tensor::zeros(dims, x.dtype(), x.device())?, rhs)
}

/// `value` (the product `x @ rhs` for a frozen `rhs`, computed without a
/// graph; any value when only gradients are wanted) attached to `x` with
/// the product's backward.
pub fn frozen_linear_with_value(x: &Tensor, value: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let rhs_t = rhs.t()?;
    with_input_gradient(x, value, Box::new(move |grad: &Tensor| plain_linear(grad, &rhs_t)))
}

/// `x @ rhs` with `x` flattened to 2-D and reshaped back.
fn plain_linear(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    match x.rank() {
        2 => x.matmul(rhs),
        _ => {
            let dims = x.dims().to_vec();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let y = x.reshape((rows, dims[dims.len() - 1]))?.matmul(rhs)?;
            let mut out = dims;
            *out.last_mut().expect("rank > 0") = rhs.dim(1)?;
            y.reshape(out)
        }
    }
}

/// `value` (computed from `x` without a graph) attached to `x`, with
/// `backward` mapping the value's gradient to `x`'s: a frozen product whose
/// input gradient another kernel computes.
pub fn with_input_gradient(x: &Tensor, value: &Tensor, backward: Backward) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value.clone());
    }
    attach(x, &value.contiguous()?, "frozen-matmul-grad", backward)
}

/// `d/dx` of a value computed from `x` outside the graph.
pub type Backward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Attaches `y`, computed from `x` without a graph, to `x`, with `backward`
/// mapping the gradient of `y` to the gradient of `x`.
fn attach(x: &Tensor, y: &Tensor, name: &'static str, backward: Backward) -> Result<Tensor> {
    x.apply_op2_arc(y, Arc::new(Box::new(PassThrough { name, backward })))
}

/// Passes a precomputed value through, with a hand-written backward.
struct PassThrough {
    name: &'static str,
    backward: Backward,
}

impl CustomOp2 for PassThrough {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        // The precomputed value is the fresh result of an op: contiguous from offset 0.
        if !l2.is_contiguous() || l2.start_offset() != 0 {
            candle_core::bail!("{}: the precomputed value must be contiguous", self.name);
        }
        Ok((s2.clone(), l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if !l2.is_contiguous() || l2.start_offset() != 0 {
            candle_core::bail!("{}: the precomputed value must be contiguous", self.name);
        }
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(grad)?), None))
    }
}

/// Attaches `value`, computed from `inputs` without a graph, to all three
/// as one op whose backward is `backward`: one graph node where three
/// pass-throughs would need two additions and a zero tensor, forward and
/// backward.
pub fn attach3(inputs: [&Tensor; 3], value: Tensor, name: &'static str, backward: Backward3) -> Result<Tensor> {
    let [a, b, c] = inputs;
    a.apply_op3_arc(
        b,
        c,
        Arc::new(Box::new(Precomputed3 { name, value: std::sync::Mutex::new(Some(value)), backward })),
    )
}

/// The op of [`attach3`].
struct Precomputed3 {
    name: &'static str,
    /// Taken by the forward, which runs once.
    value: std::sync::Mutex<Option<Tensor>>,
    backward: Backward3,
}

impl Precomputed3 {
    fn take(&self) -> Result<Tensor> {
        let value = self.value.lock().expect("the precomputed-value lock is never poisoned").take();
        let Some(value) = value else { candle_core::bail!("{}: the forward ran twice", self.name) };
        value.contiguous()
    }
}

impl CustomOp3 for Precomputed3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let exact = |v: &Tensor| -> Option<(CpuStorage, Shape)> {
            let (storage, layout) = v.storage_and_layout();
            let candle_core::Storage::Cpu(c) = &*storage else { return None };
            let len = match c {
                CpuStorage::F32(x) => x.len(),
                CpuStorage::BF16(x) => x.len(),
                CpuStorage::F16(x) => x.len(),
                _ => return None,
            };
            (layout.start_offset() == 0 && len == v.elem_count()).then(|| (c.clone(), v.shape().clone()))
        };
        // A fresh result (the usual case) is cloned whole; a view is copied first.
        match exact(&value).or_else(|| value.copy().ok().and_then(|c| exact(&c))) {
            Some(out) => Ok(out),
            None => candle_core::bail!("{}: the value is not a CPU float tensor", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(layout)?, value.shape().clone())),
            _ => candle_core::bail!("{}: the value is not on the GPU", self.name),
        }
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [a, b, c] = (self.backward)(&grad.contiguous()?)?;
        Ok((a, b, c))
    }
}

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
struct SiluMul;

/// The f32 elements of a contiguous CPU storage.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
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

/// Log-probabilities of `targets[i]` under `softmax(hidden[i] @ weight^T + bias)`,
/// for `hidden` `(N, H)`, `weight` `(V, H)`: the language-model loss's core
/// without a `(N, V)` logits tensor alive beyond one chunk of `chunk` rows.
///
/// The backward recomputes each chunk's logits (one extra product) and
/// returns `g_i (W[y_i] - softmax_i W)` for `hidden` only: the output
/// weight is frozen. A weight that is itself a variable takes the plain
/// differentiable path (full logits).
pub fn token_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    if targets.len() != n {
        candle_core::bail!("token_logprobs: {} targets for {n} rows", targets.len());
    }
    let device = hidden.device().clone();
    let targets_t = Tensor::from_slice(targets, n, &device)?;
    let logits_of = |h: &Tensor| -> Result<Tensor> {
        let l = h.matmul(&weight.t()?)?;
        match bias {
            Some(b) => l.broadcast_add(b),
            None => Ok(l),
        }
    };
    if weight.track_op() || bias.is_some_and(|b| b.track_op()) {
        let logp = candle_nn::ops::log_softmax(&logits_of(hidden)?, D::Minus1)?;
        return logp.gather(&targets_t.unsqueeze(1)?, 1)?.squeeze(1);
    }
    let chunk = chunk.max(1);
    let detached = hidden.detach();
    let (mut logps, mut lses) = (Vec::new(), Vec::new());
    for at in (0..n).step_by(chunk) {
        let c = chunk.min(n - at);
        let logits = logits_of(&detached.narrow(0, at, c)?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?; // (c, 1)
        let picked = logits.gather(&targets_t.narrow(0, at, c)?.unsqueeze(1)?, 1)?;
        logps.push((picked - &lse)?.squeeze(1)?);
        lses.push(lse.squeeze(1)?);
    }
    let logp = Tensor::cat(&logps, 0)?;
    if !hidden.track_op() {
        return Ok(logp);
    }
    let lse = Tensor::cat(&lses, 0)?;
    let (weight, bias) = (weight.clone(), bias.cloned());
    let backward: Backward = Box::new(move |grad: &Tensor| {
        let mut parts = Vec::new();
        for at in (0..n).step_by(chunk) {
            let c = chunk.min(n - at);
            let h = detached.narrow(0, at, c)?;
            let mut logits = h.matmul(&weight.t()?)?;
            if let Some(b) = &bias {
                logits = logits.broadcast_add(b)?;
            }
            let p = logits.broadcast_sub(&lse.narrow(0, at, c)?.unsqueeze(1)?)?.exp()?; // (c, V)
            let picked = weight.index_select(&targets_t.narrow(0, at, c)?, 0)?; // (c, H)
            let g = grad.narrow(0, at, c)?.unsqueeze(1)?;
            parts.push((picked - p.matmul(&weight)?)?.broadcast_mul(&g)?);
        }
        Tensor::cat(&parts, 0)
    });
    attach(hidden, &logp, "token-logprobs", backward)
}

/// `x` in `dtype`. Between f32 and f16 on CPU the conversion goes through
/// `half`'s slice conversions (F16C where the CPU has it); candle converts
/// one value at a time, which was 2% of a batch-8 decoding step for the
/// cache's new keys and values.
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    let converted = match (x.dtype(), dtype) {
        (DType::F32, DType::F16) => {
            let x = x.contiguous()?;
            crate::kernels::with_cpu_f32(&x, |v| {
                let mut out = vec![half::f16::ZERO; v.len()];
                out.convert_from_f32_slice(v);
                Tensor::from_vec(out, x.shape(), x.device())
            })
        }
        (DType::F16, DType::F32) => {
            let x = x.contiguous()?;
            crate::kernels::with_cpu_slice::<half::f16, _>(&x, |v| {
                let mut out = vec![0f32; v.len()];
                v.convert_to_f32_slice(&mut out);
                Tensor::from_vec(out, x.shape(), x.device())
            })
        }
        _ => None,
    };
    match converted {
        Some(t) => t,
        None => x.to_dtype(dtype),
    }
}

/// Grouped-query attention `softmax(q k^T · scale + mask) v`.
///
/// - `q`: `(B, KV, G·T, D)`: the `G` query heads sharing each key/value
///   head, stacked along the rows;
/// - `k`, `v`: `(B, KV, S, D)`, of `q`'s dtype or, as a quantised model's
///   cache keeps them, f16 (read as they are by the decoding kernels,
///   converted otherwise);
/// - `mask`: additive `(B, T, S)`, the same for every head.
///
/// Computed without a graph (scale, mask and softmax in one pass per row),
/// keeping only the probabilities for a hand-written backward: `dV = Pᵀ dO`,
/// `dS = P ⊙ (dO Vᵀ − rowsum(P ⊙ dO Vᵀ))` (one pass per row), `dQ = dS K · scale`,
/// `dK = dSᵀ Q · scale`. The composed version keeps about five
/// score-sized tensors per layer and runs as many elementwise passes.
/// Where the mask hides whole key ranges from blocks of queries (causal
/// masks, preference rows), only each block's visible span is computed
/// (`SpanPlan`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if !(q.track_op() || k.track_op() || v.track_op()) {
        if let Some(out) = few_query_attention(q, k, v, mask, scale)? {
            return Ok(out);
        }
    }
    let plan = match mask {
        Some(m) => SpanPlan::of(m, q.dim(2)?)?,
        None => None,
    };
    // A cache kept in another dtype (f16 beside f32 queries) is read as the queries' dtype.
    let (k, v) = (to_dtype(k, q.dtype())?, to_dtype(v, q.dtype())?);
    attention_with(q, &k, &v, mask, scale, plan.as_ref())
}

/// The gradients of an op's three inputs (`None`: not needed) for its
/// output's gradient.
pub type Backward3 = Box<dyn Fn(&Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync>;

/// [`attention`] over the whole score matrix (`plan` = `None`) or over each
/// query block's key span.
fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    plan: Option<&SpanPlan>,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach().contiguous()?, v.detach().contiguous()?);
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let (out, backward) = match (plan, mask) {
        (Some(plan), Some(mask)) => plan.attention(&qd, &kd, &vd, mask, scale, tracked)?,
        _ => dense_attention(&qd, &kd, &vd, mask, scale, tracked)?,
    };
    match backward {
        Some(backward) => attach3([q, k, v], out, "attention", backward),
        None => Ok(out),
    }
}

/// The whole `(G·T, S)` score matrix per head at once, probabilities kept
/// for the backward (`[dq, dk, dv]`) when `tracked`.
fn dense_attention(
    qd: &Tensor,
    kd: &Tensor,
    vd: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    tracked: bool,
) -> Result<(Tensor, Option<Backward3>)> {
    let probs = masked_softmax(&qd.matmul(&kd.t()?)?, mask, scale)?; // (B, KV, G·T, S)
    let out = probs.matmul(vd)?; // (B, KV, G·T, D)
    if !tracked {
        return Ok((out, None));
    }
    let (qd, kd, vd) = (qd.clone(), kd.clone(), vd.clone());
    let backward: Backward3 = Box::new(move |d_out: &Tensor| {
        let dv = probs.t()?.matmul(d_out)?; // (B, KV, S, D)
        let ds = (softmax_backward(&probs, &d_out.matmul(&vd.t()?)?)? * scale)?; // (B, KV, G·T, S)
        Ok([Some(ds.matmul(&kd)?), Some(ds.t()?.matmul(&qd)?), Some(dv)])
    });
    Ok((out, Some(backward)))
}

/// Query positions per block of a [`SpanPlan`].
const SPAN_BLOCK: usize = 64;

/// For masks that hide most keys from many queries (causal masks, and the
/// `[prompt | chosen | rejected]` rows of preference training), the
/// attention of each block of [`SPAN_BLOCK`] query positions over the keys
/// `0..hi` it can see at all, instead of over all `S` keys: about half the
/// products and softmax work of a causal mask. The mask still applies
/// inside each span, so the result is the dense one's (the skipped scores
/// have probability exactly 0).
struct SpanPlan {
    /// Per batch row, the blocks `(t0, t1, hi)`: query positions `t0..t1`
    /// see no key at or after `hi`.
    blocks: Vec<Vec<(usize, usize, usize)>>,
}

impl SpanPlan {
    /// The plan for an additive mask `(B, T, S)` and `rows` = `G·T` stacked
    /// query rows; `None` where spans would save less than a quarter of the
    /// dense work, or the mask does not fit.
    fn of(mask: &Tensor, rows: usize) -> Result<Option<SpanPlan>> {
        let (b, t, s) = mask.dims3()?;
        if t < 2 * SPAN_BLOCK || !rows.is_multiple_of(t) {
            return Ok(None);
        }
        let m = mask.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut blocks = Vec::with_capacity(b);
        let mut area = 0;
        for bi in 0..b {
            let mut row_blocks = Vec::new();
            for t0 in (0..t).step_by(SPAN_BLOCK) {
                let t1 = (t0 + SPAN_BLOCK).min(t);
                let hi = (t0..t1)
                    .map(|q| {
                        let row = &m[(bi * t + q) * s..(bi * t + q + 1) * s];
                        row.iter().rposition(|&x| x != f32::NEG_INFINITY).map_or(1, |j| j + 1)
                    })
                    .max()
                    .unwrap_or(s);
                area += (t1 - t0) * hi;
                row_blocks.push((t0, t1, hi));
            }
            blocks.push(row_blocks);
        }
        Ok((4 * area <= 3 * b * t * s).then_some(SpanPlan { blocks }))
    }

    /// The attention of `qd` `(B, KV, G·T, D)` over `kd`, `vd` `(B, KV, S, D)`
    /// block by block (see [`attention`] for the shapes).
    fn attention(
        &self,
        qd: &Tensor,
        kd: &Tensor,
        vd: &Tensor,
        mask: &Tensor,
        scale: f64,
        tracked: bool,
    ) -> Result<(Tensor, Option<Backward3>)> {
        let (b, kv, gt, d) = qd.dims4()?;
        let (t, s) = (mask.dim(1)?, mask.dim(2)?);
        let g = gt / t;
        // Rows as (position, head) so that a block of positions is one run
        // of rows for every head sharing a key/value head.
        let by_position = move |x: &Tensor| -> Result<Tensor> {
            x.reshape((b, kv, g, t, d))?.transpose(2, 3)?.contiguous()?.reshape((b, kv, t * g, d))
        };
        let by_head = move |x: &Tensor| -> Result<Tensor> {
            x.reshape((b, kv, t, g, d))?.transpose(2, 3)?.contiguous()?.reshape((b, kv, g * t, d))
        };
        let qr = by_position(qd)?;
        let mut probs = Vec::new(); // per batch row, per block
        let mut outs = Vec::with_capacity(b);
        for (bi, blocks) in self.blocks.iter().enumerate() {
            let mut parts = Vec::with_capacity(blocks.len());
            let mut row_probs = Vec::with_capacity(blocks.len());
            for &(t0, t1, hi) in blocks {
                let n = t1 - t0;
                let qb = qr.narrow(0, bi, 1)?.narrow(2, t0 * g, n * g)?; // (1, KV, n·G, D)
                let kb = kd.narrow(0, bi, 1)?.narrow(2, 0, hi)?; // (1, KV, hi, D)
                let vb = vd.narrow(0, bi, 1)?.narrow(2, 0, hi)?;
                let mb = mask
                    .narrow(0, bi, 1)?
                    .narrow(1, t0, n)?
                    .narrow(2, 0, hi)?
                    .unsqueeze(2)?
                    .broadcast_as((1, n, g, hi))?
                    .reshape((1, n * g, hi))?; // row r: position t0 + r / G
                let p = masked_softmax(&qb.matmul(&kb.t()?)?, Some(&mb), scale)?; // (1, KV, n·G, hi)
                parts.push(p.matmul(&vb)?);
                if tracked {
                    row_probs.push(p);
                }
            }
            outs.push(Tensor::cat(&parts, 2)?);
            probs.push(row_probs);
        }
        let out = by_head(&Tensor::cat(&outs, 0)?)?;
        if !tracked {
            return Ok((out, None));
        }
        let (kd, vd, blocks) = (kd.clone(), vd.clone(), self.blocks.clone());
        let backward: Backward3 = Box::new(move |d_out: &Tensor| {
            let dr = by_position(d_out)?;
            let (mut dqs, mut dks, mut dvs) = (Vec::with_capacity(b), Vec::with_capacity(b), Vec::with_capacity(b));
            for (bi, row_blocks) in blocks.iter().enumerate() {
                let mut dq_parts = Vec::with_capacity(row_blocks.len());
                // dK and dV over all S keys: each block adds to its span `0..hi`.
                let mut dk = Tensor::zeros((1, kv, s, d), qr.dtype(), qr.device())?;
                let mut dv = dk.clone();
                for (&(t0, t1, hi), p) in row_blocks.iter().zip(&probs[bi]) {
                    let n = t1 - t0;
                    let qb = qr.narrow(0, bi, 1)?.narrow(2, t0 * g, n * g)?;
                    let kb = kd.narrow(0, bi, 1)?.narrow(2, 0, hi)?;
                    let vb = vd.narrow(0, bi, 1)?.narrow(2, 0, hi)?;
                    let db = dr.narrow(0, bi, 1)?.narrow(2, t0 * g, n * g)?.contiguous()?;
                    dv = (dv + p.t()?.matmul(&db)?.pad_with_zeros(2, 0, s - hi)?)?;
                    let ds = (softmax_backward(p, &db.matmul(&vb.t()?)?)? * scale)?; // (1, KV, n·G, hi)
                    dq_parts.push(ds.matmul(&kb)?);
                    dk = (dk + ds.t()?.matmul(&qb.contiguous()?)?.pad_with_zeros(2, 0, s - hi)?)?;
                }
                dqs.push(Tensor::cat(&dq_parts, 2)?);
                dks.push(dk);
                dvs.push(dv);
            }
            Ok([Some(by_head(&Tensor::cat(&dqs, 0)?)?), Some(Tensor::cat(&dks, 0)?), Some(Tensor::cat(&dvs, 0)?)])
        });
        Ok((out, Some(backward)))
    }
}

/// Query rows per head up to which inference takes [`few_query_attention`].
const FEW_QUERY_ROWS: usize = 32;

/// Attention without a graph for decoding-sized queries on CPU f32
/// ([`kernels::few_query_attention`]): keys and values are read where they
/// are (a view of the KV cache needs no copy) and the scores never become a
/// tensor. `None` when the inputs do not fit (then the general path runs).
fn few_query_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    match k.dtype() {
        DType::F32 => few_query_attention_of::<f32>(q, k, v, mask, scale),
        DType::F16 => few_query_attention_of::<half::f16>(q, k, v, mask, scale),
        _ => Ok(None),
    }
}

/// [`few_query_attention`] for keys and values of `E`.
fn few_query_attention_of<E: crate::kernels::KvElement>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (b, kv, gt, d) = q.dims4()?;
    let s = k.dim(2)?;
    if gt > FEW_QUERY_ROWS || v.dim(2)? != s {
        return Ok(None);
    }
    let t = mask.map_or(Ok(gt), |m| m.dim(1))?;
    let mask = mask.map(|m| m.contiguous()).transpose()?;
    let dims = crate::kernels::AttentionDims { b, kv, gt, t, s, d };
    let out = crate::kernels::with_cpu_f32(q, |qv| {
        crate::kernels::with_cpu_head_rows::<E, _>(k, |kr| {
            crate::kernels::with_cpu_head_rows::<E, _>(v, |vr| match &mask {
                Some(m) => crate::kernels::with_cpu_f32(m, |mv| {
                    crate::kernels::few_query_attention(qv, &kr, &vr, Some(mv), &dims, scale as f32)
                }),
                None => Some(crate::kernels::few_query_attention(qv, &kr, &vr, None, &dims, scale as f32)),
            })
        })
    });
    match out {
        Some(Some(Some(Some(o)))) => Ok(Some(Tensor::from_vec(o, (b, kv, gt, d), q.device())?)),
        _ => Ok(None),
    }
}

/// `softmax(scale · scores + mask)` for `scores` `(B, KV, G·T, S)` and an
/// additive `mask` `(B, T, S)` shared by the `G` stacked query heads: one
/// pass per row on CPU f32 ([`kernels::masked_softmax`]), composed ops
/// elsewhere. No gradient (the attention's backward is written by hand).
fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, kv, gt, s) = scores.dims4()?;
    let t = mask.map_or(Ok(gt), |m| m.dim(1))?;
    let mask = mask.map(|m| m.contiguous()).transpose()?;
    let fused = crate::kernels::with_cpu_f32(scores, |sc| match &mask {
        Some(m) => {
            crate::kernels::with_cpu_f32(m, |m| crate::kernels::masked_softmax(sc, Some(m), b, t, s, scale as f32))
        }
        None => Some(crate::kernels::masked_softmax(sc, None, b, t, s, scale as f32)),
    });
    if let Some(Some(p)) = fused {
        return Tensor::from_vec(p, (b, kv, gt, s), scores.device());
    }
    let scores = (scores * scale)?;
    let scores = match &mask {
        Some(m) => {
            let g = gt / t;
            scores.reshape((b, kv, g, t, s))?.broadcast_add(&m.reshape((b, 1, 1, t, s))?)?.reshape((b, kv, gt, s))?
        }
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)
}

/// The softmax backward `P ⊙ (dP − rowsum(P ⊙ dP))` over the last dimension:
/// one pass per row on CPU f32, composed ops elsewhere.
fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    let s = p.dim(D::Minus1)?;
    let dp = dp.contiguous()?;
    let fused = crate::kernels::with_cpu_f32(p, |pv| {
        crate::kernels::with_cpu_f32(&dp, |dv| crate::kernels::softmax_backward(pv, dv, s))
    });
    if let Some(Some(ds)) = fused {
        return Tensor::from_vec(ds, p.dims(), p.device());
    }
    let row = (&dp * p)?.sum_keepdim(D::Minus1)?;
    p * dp.broadcast_sub(&row)?
}

/// Per row of `hidden` `(N, H)`, the sum over the vocabulary of
/// `hidden @ weight^T + bias`, without the `(N, V)` product: `hidden · Σ_v W[v] + Σ b`.
/// For the mean-logit metrics TRL logs. No gradient.
pub fn logit_sums(hidden: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let col = weight.detach().sum_keepdim(0)?.t()?; // (H, 1)
    let s = hidden.detach().matmul(&col)?.squeeze(1)?;
    match bias {
        Some(b) => s.affine(1.0, b.detach().sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?),
        None => Ok(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values in [-1, 1).
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Central finite differences of `sum(f(x) * probe)` against autograd.
    fn check_grad(x0: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
        let x = Var::from_tensor(x0).unwrap();
        let probe = randn(f(x0).dims(), 99);
        let loss = (f(x.as_tensor()) * &probe).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).expect("x gets a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let flat = x0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for i in (0..flat.len()).step_by((flat.len() / 12).max(1)) {
            let eval = |delta: f32| {
                let mut v = flat.clone();
                v[i] += delta;
                let xt = Tensor::from_vec(v, x0.dims(), &Device::Cpu).unwrap();
                (f(&xt) * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() <= 2e-2 * fd.abs().max(1.0),
                "element {i}: finite difference {fd}, autograd {}",
                g[i]
            );
        }
    }

    #[test]
    fn fast_and_differentiable_paths_agree() {
        let x = randn(&[2, 3, 4, 8], 1);
        let w = (randn(&[8], 2) + 1.5).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        assert!(max_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &rms_norm(xv.as_tensor(), &w, 1e-5).unwrap()) < 1e-5);
        assert!(max_diff(&softmax_last(&x).unwrap(), &softmax_last(xv.as_tensor()).unwrap()) < 1e-6);
        let cos = randn(&[2, 4, 4], 3);
        let sin = randn(&[2, 4, 4], 4);
        assert!(max_diff(&rope_half(&x, &cos, &sin).unwrap(), &rope_half(xv.as_tensor(), &cos, &sin).unwrap()) < 1e-6);
        // The hand-written backwards give the composed versions' gradients.
        let probe = randn(&[2, 3, 4, 8], 6);
        let grad_of = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let pairs = [
            (rms_norm(xv.as_tensor(), &w, 1e-5).unwrap(), rms_norm_composed(xv.as_tensor(), &w, 1e-5).unwrap()),
            (rope_half(xv.as_tensor(), &cos, &sin).unwrap(), rope_half_composed(xv.as_tensor(), &cos, &sin).unwrap()),
        ];
        for (fused, composed) in pairs {
            let (a, b) = (grad_of(fused), grad_of(composed));
            assert!(max_diff(a.get(xv.as_tensor()).unwrap(), b.get(xv.as_tensor()).unwrap()) < 1e-5);
        }
        let wl = randn(&[5, 8], 5);
        let direct = x.broadcast_matmul(&wl.t().unwrap()).unwrap();
        assert!(max_diff(&frozen_linear(xv.as_tensor(), &wl.t().unwrap()).unwrap(), &direct) < 1e-5);
    }

    #[test]
    fn differentiable_paths_match_finite_differences() {
        let w = (randn(&[8], 2) + 1.5).unwrap();
        check_grad(&randn(&[2, 3, 8], 7), |x| rms_norm(x, &w, 1e-5).unwrap());
        check_grad(&randn(&[2, 5], 8), |x| softmax_last(x).unwrap());
        let cos = randn(&[1, 3, 4], 3);
        let sin = randn(&[1, 3, 4], 4);
        check_grad(&randn(&[1, 2, 3, 8], 9), |x| rope_half(x, &cos, &sin).unwrap());
    }

    #[test]
    fn attention_matches_the_composed_version_and_finite_differences() {
        let (b, kv, g, t, d) = (2, 2, 2, 3, 4);
        let q = randn(&[b, kv, g * t, d], 31);
        let k = randn(&[b, kv, t, d], 32);
        let v = randn(&[b, kv, t, d], 33);
        let mask = crate::causal_mask(b, t, 0, &Device::Cpu).unwrap();
        let composed = |q: &Tensor, k: &Tensor, v: &Tensor| {
            let sc = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap();
            let sc = sc
                .reshape((b, kv, g, t, t))
                .unwrap()
                .broadcast_add(&mask.reshape((b, 1, 1, t, t)).unwrap())
                .unwrap()
                .reshape((b, kv, g * t, t))
                .unwrap();
            candle_nn::ops::softmax(&sc, D::Minus1).unwrap().matmul(v).unwrap()
        };
        let qv = Var::from_tensor(&q).unwrap();
        assert!(max_diff(&attention(qv.as_tensor(), &k, &v, Some(&mask), 0.5).unwrap(), &composed(&q, &k, &v)) < 1e-5);
        // Without a mask: the plain softmax of the scores.
        let unmasked = candle_nn::ops::softmax(&(q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap(), D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap();
        assert!(max_diff(&attention(&q, &k, &v, None, 0.5).unwrap(), &unmasked) < 1e-5);
        check_grad(&q, |x| attention(x, &k, &v, Some(&mask), 0.5).unwrap());
        check_grad(&k, |x| attention(&q, x, &v, Some(&mask), 0.5).unwrap());
        check_grad(&v, |x| attention(&q, &k, x, Some(&mask), 0.5).unwrap());
        // All three at once, as in the model.
        let (kv_, vv) = (Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
        let probe = randn(&[b, kv, g * t, d], 34);
        let ours = (attention(qv.as_tensor(), kv_.as_tensor(), vv.as_tensor(), Some(&mask), 0.5).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let reference = (composed(qv.as_tensor(), kv_.as_tensor(), vv.as_tensor()) * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for x in [qv.as_tensor(), kv_.as_tensor(), vv.as_tensor()] {
            assert!(max_diff(ours.get(x).unwrap(), reference.get(x).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn decoding_attention_reads_a_cache_view_and_matches_the_composed_version() {
        // Keys/values as views of a larger cache (rows contiguous, heads apart),
        // a padded-row mask, one and several query positions, AVX-512 (D = 16..128: key counts
        // below, at and past sixteen), AVX2 (D = 8, 256) and portable (D = 4) dot products.
        for (b, kv, g, t, s, d) in [
            (2, 3, 3, 1, 11, 16),
            (2, 2, 2, 3, 5, 4),
            (1, 2, 2, 4, 19, 8),
            (1, 2, 3, 1, 9, 128),
            (2, 3, 3, 1, 37, 64),
            (1, 2, 4, 2, 32, 32),
            (1, 2, 2, 1, 20, 256),
        ] {
            let q = randn(&[b, kv, g * t, d], 41);
            let k = randn(&[b, kv, s + 4, d], 42).narrow(2, 0, s).unwrap();
            let v = randn(&[b, kv, s + 4, d], 43).narrow(2, 0, s).unwrap();
            assert!(!k.is_contiguous());
            let valid: Vec<Vec<bool>> = (0..b).map(|r| (0..s).map(|j| j >= r).collect()).collect();
            let mask = crate::padded_causal_mask(&valid, t, s - t, &Device::Cpu).unwrap();
            let sc = (q.matmul(&k.t().unwrap()).unwrap() * 0.25).unwrap();
            let sc = sc
                .reshape((b, kv, g, t, s))
                .unwrap()
                .broadcast_add(&mask.reshape((b, 1, 1, t, s)).unwrap())
                .unwrap()
                .reshape((b, kv, g * t, s))
                .unwrap();
            let want = candle_nn::ops::softmax(&sc, D::Minus1).unwrap().matmul(&v.contiguous().unwrap()).unwrap();
            let got = few_query_attention(&q, &k, &v, Some(&mask), 0.25).unwrap().expect("takes the fast path");
            assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
            assert!(max_diff(&attention(&q, &k, &v, Some(&mask), 0.25).unwrap(), &want) < 1e-5);
            // An f16 cache (views of it, as the cache hands out) gives the f32
            // result of its rounded values, on every kernel.
            let to_f16 = |x: &Tensor| to_dtype(&x.contiguous().unwrap(), DType::F16).unwrap();
            let (k16, v16) = (to_f16(&randn(&[b, kv, s + 4, d], 42)), to_f16(&randn(&[b, kv, s + 4, d], 43)));
            let (k16, v16) = (k16.narrow(2, 0, s).unwrap(), v16.narrow(2, 0, s).unwrap());
            let (kr, vr) = (k16.to_dtype(DType::F32).unwrap(), v16.to_dtype(DType::F32).unwrap());
            let want = few_query_attention(&q, &kr, &vr, Some(&mask), 0.25).unwrap().unwrap();
            let got = few_query_attention(&q, &k16, &v16, Some(&mask), 0.25).unwrap().expect("reads f16 in place");
            assert!(max_diff(&got, &want) < 1e-6, "f16, d = {d}: {}", max_diff(&got, &want));
            assert!(max_diff(&attention(&q, &k16, &v16, Some(&mask), 0.25).unwrap(), &want) < 1e-5);
        }
    }

    #[test]
    fn rotated_heads_match_the_composed_ops() {
        // A fused projection's parts are views (rows apart); one decoding
        // step and a prompt long enough to run in parallel; both layouts,
        // with and without the q/k norm.
        for (b, t, n, d) in [(3, 1, 4, 16), (2, 40, 4, 64)] {
            let fused = randn(&[b, t, (n + 2) * d], 61);
            let y = fused.narrow(2, d, n * d).unwrap();
            assert!(!y.is_contiguous());
            let angles = (randn(&[b, t, d / 2], 62) * 3.0).unwrap();
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let w = (randn(&[d], 63) + 1.5).unwrap();
            for interleaved in [false, true] {
                for norm in [None, Some((&w, 1e-6))] {
                    let got = rotated_heads(&y, d, norm, &cos, &sin, interleaved).unwrap().expect("CPU f32");
                    let mut h = y.reshape((b, t, n, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                    if let Some((w, eps)) = norm {
                        h = rms_norm(&h, w, eps).unwrap();
                    }
                    let want = if interleaved {
                        rope_interleaved(&h, &cos, &sin).unwrap()
                    } else {
                        rope_half(&h, &cos, &sin).unwrap()
                    };
                    assert_eq!(got.dims(), &[b, n, t, d]);
                    assert!(max_diff(&got, &want) < 1e-6, "{}", max_diff(&got, &want));
                }
            }
            // With a graph, the caller composes the ops.
            let yv = Var::from_tensor(&y.contiguous().unwrap()).unwrap();
            assert!(rotated_heads(yv.as_tensor(), d, None, &cos, &sin, false).unwrap().is_none());
        }
    }

    #[test]
    fn f16_conversions_match_candles() {
        let x = (randn(&[3, 70], 5) * 1e3).unwrap();
        let x =
            Tensor::cat(&[x, Tensor::new(&[[65504f32, 65520.0, 1e-8, -0.0, f32::NAN]; 3], &Device::Cpu).unwrap()], 1)
                .unwrap();
        let ours = to_dtype(&x, DType::F16).unwrap().to_vec2::<half::f16>().unwrap();
        let candle = x.to_dtype(DType::F16).unwrap().to_vec2::<half::f16>().unwrap();
        let bits = |v: &Vec<Vec<half::f16>>| v.iter().flatten().map(|h| h.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&candle));
        // And back: f16 to f32 is exact, as candle's.
        let h = x.to_dtype(DType::F16).unwrap();
        let back = |t: Tensor| t.to_vec2::<f32>().unwrap().concat().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(back(to_dtype(&h, DType::F32).unwrap()), back(h.to_dtype(DType::F32).unwrap()));
        // A strided view converts as its contiguous copy.
        let t = x.t().unwrap();
        assert_eq!(
            bits(&to_dtype(&t, DType::F16).unwrap().t().unwrap().to_vec2::<half::f16>().unwrap()),
            bits(&candle)
        );
    }

    #[test]
    fn token_logprobs_match_log_softmax_and_finite_differences() {
        let w = randn(&[11, 6], 21);
        let b = randn(&[11], 22);
        let targets = [3u32, 0, 10, 7, 7];
        let h = randn(&[5, 6], 23);
        let plain = |h: &Tensor| {
            let l = h.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let lp = candle_nn::ops::log_softmax(&l, D::Minus1).unwrap();
            let t = Tensor::new(&targets, &Device::Cpu).unwrap().unsqueeze(1).unwrap();
            lp.gather(&t, 1).unwrap().squeeze(1).unwrap()
        };
        for chunk in [1, 2, 5, 64] {
            let hv = Var::from_tensor(&h).unwrap();
            assert!(
                max_diff(&token_logprobs(hv.as_tensor(), &w, Some(&b), &targets, chunk).unwrap(), &plain(&h)) < 1e-5
            );
            check_grad(&h, |x| token_logprobs(x, &w, Some(&b), &targets, chunk).unwrap());
        }
        // The weight is frozen: no gradient is computed for it.
        let hv = Var::from_tensor(&h).unwrap();
        let grads =
            token_logprobs(hv.as_tensor(), &w, None, &targets, 2).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none() && grads.get(hv.as_tensor()).is_some());
        let sums = logit_sums(&h, &w, Some(&b)).unwrap();
        let direct = h.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap().sum(1).unwrap();
        assert!(max_diff(&sums, &direct) < 1e-4);
    }

    #[test]
    fn frozen_linear_backward_matches_finite_differences_and_skips_the_weight() {
        let w = randn(&[6, 8], 11);
        let wt = w.t().unwrap();
        check_grad(&randn(&[2, 3, 8], 12), |x| frozen_linear(x, &wt).unwrap());
        // The weight is no node of the graph: no gradient is computed for it.
        let x = Var::from_tensor(&randn(&[3, 8], 13)).unwrap();
        let grads = frozen_linear(x.as_tensor(), &wt).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&wt).is_none() && grads.get(&w).is_none());
        assert!(grads.get(x.as_tensor()).is_some());
        // A weight that is a variable (a tied, trained embedding) gets its gradient.
        let wv = Var::from_tensor(&w).unwrap();
        let grads =
            frozen_linear(x.as_tensor(), &wv.as_tensor().t().unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(wv.as_tensor()).is_some());
    }

    /// `(B, T, T)` masks: row 0 causal, row 1 laid out as a preference pair
    /// `[prompt 100 | chosen 50 | rejected 50]` (each completion sees the
    /// prompt and itself), its last 10 slots padding that sees slot 0 only.
    fn pair_masks(t: usize) -> Tensor {
        let mut m = vec![f32::NEG_INFINITY; 2 * t * t];
        for q in 0..t {
            m[q * t..q * t + q + 1].fill(0.0);
            let row = &mut m[(t + q) * t..(t + q + 1) * t];
            match q {
                _ if q >= t - 10 => row[0] = 0.0,
                _ if q < 100 => row[..=q].fill(0.0),
                _ if q < 150 => {
                    row[..100].fill(0.0);
                    row[100..=q].fill(0.0);
                }
                _ => {
                    row[..100].fill(0.0);
                    row[150..=q].fill(0.0);
                }
            }
        }
        Tensor::from_vec(m, (2, t, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn span_limited_attention_gives_the_dense_values_and_gradients() {
        let (b, kv, g, t, d) = (2, 2, 3, 200, 8);
        let mask = pair_masks(t);
        let plan = SpanPlan::of(&mask, g * t).unwrap().expect("these masks hide over a quarter of the scores");
        assert_eq!(plan.blocks[1].iter().map(|b| b.2).collect::<Vec<_>>(), vec![64, 128, 190, 1]);
        let zeros = Tensor::zeros((b, t, t), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(SpanPlan::of(&zeros, g * t).unwrap().is_none(), "nothing to skip");
        let (q, k, v) = (randn(&[b, kv, g * t, d], 41), randn(&[b, kv, t, d], 42), randn(&[b, kv, t, d], 43));
        let probe = randn(&[b, kv, g * t, d], 44);
        let run = |plan: Option<&SpanPlan>| {
            let vars = [&q, &k, &v].map(|x| Var::from_tensor(x).unwrap());
            let [qv, kv_, vv] = vars.each_ref().map(|x| x.as_tensor());
            let out = attention_with(qv, kv_, vv, Some(&mask), 0.3, plan).unwrap();
            let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (out, [qv, kv_, vv].map(|x| grads.get(x).unwrap().clone()))
        };
        let (dense, dense_grads) = run(None);
        let (spans, span_grads) = run(Some(&plan));
        assert!(max_diff(&dense, &spans) < 1e-5);
        for (a, b) in dense_grads.iter().zip(&span_grads) {
            assert!(max_diff(a, b) < 1e-5, "gradients differ by {}", max_diff(a, b));
        }
        // Untracked, as in inference and the first checkpointed pass.
        assert!(max_diff(&attention(&q, &k, &v, Some(&mask), 0.3).unwrap(), &dense) < 1e-5);
        check_grad(&k, |x| attention(&q, x, &v, Some(&mask), 0.3).unwrap());
    }

    #[test]
    fn silu_mul_reads_the_halves_of_a_fused_product_in_place() {
        // (2, 3, 2n): the gate and up halves are narrow views, rows 2n apart.
        let fused = (randn(&[2, 3, 74], 71) * 4.0).unwrap();
        let (gate, up) = (fused.narrow(2, 0, 37).unwrap(), fused.narrow(2, 37, 37).unwrap());
        assert!(!gate.is_contiguous());
        let rows = |t: &Tensor| crate::kernels::with_cpu_strided_rows(t, |r| (r.start, r.stride, r.rows, r.n));
        assert_eq!((rows(&gate), rows(&up)), (Some((0, 74, 6, 37)), Some((37, 74, 6, 37))));
        let want = (gate.contiguous().unwrap().silu().unwrap() * up.contiguous().unwrap()).unwrap();
        assert!(max_diff(&silu_mul(&gate, &up).unwrap(), &want) < 1e-5);
        // A transposed view is not rows apart: the copying path, the same values.
        let t = randn(&[37, 4], 72).t().unwrap();
        assert_eq!(rows(&t), None);
        let want = (t.contiguous().unwrap().silu().unwrap() * &t).unwrap();
        assert!(max_diff(&silu_mul(&t, &t).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn rms_norm_kernel_matches_candles() {
        // 37 values per row: a partial 16-lane step.
        for (rows, d) in [(5, 37), (3, 576), (130, 64)] {
            let x = (randn(&[rows, d], 61) * 3.0).unwrap();
            let w = randn(&[d], 62);
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            assert!(max_diff(&rms_norm_forward(&x, &w, 1e-5).unwrap(), &want) < 1e-5);
        }
    }

    #[test]
    fn silu_mul_matches_the_composed_ops_and_finite_differences() {
        // 37 values per row: a partial 16-lane step; large inputs saturate σ.
        let gate = (randn(&[3, 37], 51) * 12.0).unwrap();
        let up = randn(&[3, 37], 52);
        let composed = |g: &Tensor, u: &Tensor| (g.silu().unwrap() * u).unwrap();
        assert!(max_diff(&silu_mul(&gate, &up).unwrap(), &composed(&gate, &up)) < 1e-5);
        let (g, u) = (Var::from_tensor(&gate).unwrap(), Var::from_tensor(&up).unwrap());
        let probe = randn(&[3, 37], 53);
        let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (ours, reference) =
            (grads(silu_mul(g.as_tensor(), u.as_tensor()).unwrap()), grads(composed(g.as_tensor(), u.as_tensor())));
        for x in [g.as_tensor(), u.as_tensor()] {
            assert!(max_diff(ours.get(x).unwrap(), reference.get(x).unwrap()) < 1e-5);
        }
        check_grad(&randn(&[2, 20], 54), |x| {
            silu_mul(x, &up.narrow(0, 0, 2).unwrap().narrow(1, 0, 20).unwrap()).unwrap()
        });
    }

    #[test]
    fn gradient_only_linear_has_the_products_gradient_and_no_value() {
        let wt = randn(&[6, 8], 14).t().unwrap();
        let x = Var::from_tensor(&randn(&[2, 3, 8], 15)).unwrap();
        let dy = randn(&[2, 3, 6], 16);
        let grad_of = |y: Tensor| {
            let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            grads.get(x.as_tensor()).unwrap().clone()
        };
        let y = frozen_linear_gradient_only(x.as_tensor(), &wt).unwrap();
        assert_eq!(y.dims(), &[2, 3, 6]);
        assert_eq!(y.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let (want, got) = (grad_of(frozen_linear(x.as_tensor(), &wt).unwrap()), grad_of(y));
        assert!(max_diff(&want, &got) < 1e-6);
        assert!(want.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.1);
    }
}
