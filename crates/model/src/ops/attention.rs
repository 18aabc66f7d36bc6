//! Grouped-query attention with a hand-written backward: dense, by the key span
//! each query block can see (`SpanPlan`), and the decoding path that reads the KV
//! cache in place.

use candle_core::{DType, Result, Tensor, D};

use super::{attach3, matmul, matmul_add, to_dtype, Backward3};

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

/// [`attention`] as training runs it: on CPU f32 with AVX-512F and heads of
/// a multiple of 16 values, the blocked kernels with an online softmax
/// ([`kernels::flash`](crate::kernels::flash)): tiles of 32 query rows × 128
/// keys instead of a `(G·T, S)` score matrix per head, only each row's
/// log-sum-exp kept for the backward, which recomputes the tiles'
/// probabilities. At the study's length (a 3,000-token prompt and two
/// 256-token completions, Qwen2.5-0.5B's heads) the score matrices' memory
/// traffic held the span path to ~80 GFLOP/s. Elsewhere [`attention`].
/// The same function as [`attention`] up to float rounding (tests compare
/// both). A model runs it where [`crate::Model::use_blocked_attention`]
/// asked (training, every pass: with bf16 products a difference in the last
/// f32 bits between the checkpointed first pass and the recomputation
/// moves the gradients visibly); generation keeps [`attention`], so that
/// evaluations do not move.
pub fn blocked_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    match flash_attention(q, k, v, mask, scale)? {
        Some(out) => Ok(out),
        None => attention(q, k, v, mask, scale),
    }
}

/// [`blocked_attention`]'s kernels, or `None` where they do not apply.
pub(super) fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (b, kv, gt, d) = q.dims4()?;
    let s = k.dim(2)?;
    let t = mask.map_or(Ok(gt), |m| m.dim(1))?;
    let cpu_f32 = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32;
    if !crate::kernels::flash::available(d) || !cpu_f32(q) || !gt.is_multiple_of(t) || v.dim(2)? != s {
        return Ok(None);
    }
    let dims = crate::kernels::flash::FlashDims { b, kv, g: gt / t, t, s, d };
    let (k, v) = (to_dtype(k, DType::F32)?, to_dtype(v, DType::F32)?);
    let (qd, kd, vd) = (q.detach().contiguous()?, k.detach().contiguous()?, v.detach().contiguous()?);
    let md = mask.map(|m| m.to_dtype(DType::F32)?.contiguous()).transpose()?;
    let (out, saved) = with_f32_slices([&qd, &kd, &vd], md.as_ref(), |[qs, ks, vs], ms| {
        crate::kernels::flash::forward(qs, ks, vs, ms, &dims, scale as f32)
    })?
    .expect("available checked");
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if !tracked {
        return Ok(Some(Tensor::from_vec(out, (b, kv, gt, d), q.device())?));
    }
    let value = out.clone();
    let device = q.device().clone();
    let backward: Backward3 = Box::new(move |d_out: &Tensor| {
        let d_out = d_out.to_dtype(DType::F32)?.contiguous()?;
        let grads = with_f32_slices([&qd, &kd, &vd], md.as_ref(), |[qs, ks, vs], ms| {
            crate::kernels::with_cpu_f32(&d_out, |dos| {
                crate::kernels::flash::backward(qs, ks, vs, ms, &out, &saved, dos, &dims, scale as f32)
            })
        })?;
        let Some(Some([dq, dk, dv])) = grads else {
            candle_core::bail!("blocked attention's backward: the output gradient must be CPU f32")
        };
        Ok([
            Some(Tensor::from_vec(dq, (b, kv, gt, d), &device)?),
            Some(Tensor::from_vec(dk, (b, kv, s, d), &device)?),
            Some(Tensor::from_vec(dv, (b, kv, s, d), &device)?),
        ])
    });
    Ok(Some(super::attach3_cpu([q, &k, &v], value, (b, kv, gt, d).into(), "attention", backward)?))
}

/// Runs `f` on the f32 values of three contiguous CPU tensors and an
/// optional fourth, in place.
fn with_f32_slices<R>(
    xs: [&Tensor; 3],
    extra: Option<&Tensor>,
    f: impl FnOnce([&[f32]; 3], Option<&[f32]>) -> R,
) -> Result<R> {
    use crate::kernels::with_cpu_f32;
    let missing = || candle_core::Error::Msg("blocked attention: inputs must be contiguous CPU f32".into());
    let [a, b, c] = xs;
    with_cpu_f32(a, |a| {
        with_cpu_f32(b, |b| {
            with_cpu_f32(c, |c| match extra {
                Some(m) => with_cpu_f32(m, |m| f([a, b, c], Some(m))),
                None => Some(f([a, b, c], None)),
            })
        })
    })
    .flatten()
    .flatten()
    .flatten()
    .ok_or_else(missing)
}

/// [`attention`] over the whole score matrix (`plan` = `None`) or over each
/// query block's key span.
pub(super) fn attention_with(
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
pub(super) fn dense_attention(
    qd: &Tensor,
    kd: &Tensor,
    vd: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    tracked: bool,
) -> Result<(Tensor, Option<Backward3>)> {
    let probs = masked_softmax(&matmul(qd, &kd.t()?)?, mask, scale)?; // (B, KV, G·T, S)
    let out = matmul(&probs, vd)?; // (B, KV, G·T, D)
    if !tracked {
        return Ok((out, None));
    }
    let (qd, kd, vd) = (qd.clone(), kd.clone(), vd.clone());
    let backward: Backward3 = Box::new(move |d_out: &Tensor| {
        let dv = matmul(&probs.t()?, d_out)?; // (B, KV, S, D)
        let ds = (softmax_backward(&probs, &matmul(d_out, &vd.t()?)?)? * scale)?; // (B, KV, G·T, S)
        Ok([Some(matmul(&ds, &kd)?), Some(matmul(&ds.t()?, &qd)?), Some(dv)])
    });
    Ok((out, Some(backward)))
}

/// Query positions per block of a [`SpanPlan`].
pub(super) const SPAN_BLOCK: usize = 64;

/// For masks that hide most keys from many queries (causal masks, and the
/// `[prompt | chosen | rejected]` rows of preference training), the
/// attention of each block of [`SPAN_BLOCK`] query positions over the keys
/// `0..hi` it can see at all, instead of over all `S` keys: about half the
/// products and softmax work of a causal mask. The mask still applies
/// inside each span, so the result is the dense one's (the skipped scores
/// have probability exactly 0).
pub(super) struct SpanPlan {
    /// Per batch row, the blocks `(t0, t1, hi)`: query positions `t0..t1`
    /// see no key at or after `hi`.
    pub(super) blocks: Vec<Vec<(usize, usize, usize)>>,
}

impl SpanPlan {
    /// The plan for an additive mask `(B, T, S)` and `rows` = `G·T` stacked
    /// query rows; `None` where spans would save less than a quarter of the
    /// dense work, or the mask does not fit.
    pub(super) fn of(mask: &Tensor, rows: usize) -> Result<Option<SpanPlan>> {
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
    pub(super) fn attention(
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
                let p = masked_softmax(&matmul(&qb, &kb.t()?)?, Some(&mb), scale)?; // (1, KV, n·G, hi)
                parts.push(matmul(&p, &vb)?);
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
                let (mut dk, mut dv) = (vec![0f32; kv * s * d], vec![0f32; kv * s * d]);
                for (&(t0, t1, hi), p) in row_blocks.iter().zip(&probs[bi]) {
                    let n = t1 - t0;
                    let qb = qr.narrow(0, bi, 1)?.narrow(2, t0 * g, n * g)?;
                    let kb = kd.narrow(0, bi, 1)?.narrow(2, 0, hi)?;
                    let vb = vd.narrow(0, bi, 1)?.narrow(2, 0, hi)?;
                    let db = dr.narrow(0, bi, 1)?.narrow(2, t0 * g, n * g)?.contiguous()?;
                    matmul_add(&mut dv, s * d, d, &p.t()?, &db)?;
                    let ds = (softmax_backward(p, &matmul(&db, &vb.t()?)?)? * scale)?; // (1, KV, n·G, hi)
                    dq_parts.push(matmul(&ds, &kb)?);
                    matmul_add(&mut dk, s * d, d, &ds.t()?, &qb)?;
                }
                dqs.push(Tensor::cat(&dq_parts, 2)?);
                let block = |v: Vec<f32>| Tensor::from_vec(v, (1, kv, s, d), qr.device())?.to_dtype(qr.dtype());
                dks.push(block(dk)?);
                dvs.push(block(dv)?);
            }
            Ok([Some(by_head(&Tensor::cat(&dqs, 0)?)?), Some(Tensor::cat(&dks, 0)?), Some(Tensor::cat(&dvs, 0)?)])
        });
        Ok((out, Some(backward)))
    }
}

/// Query rows per head up to which inference takes [`few_query_attention`].
pub(super) const FEW_QUERY_ROWS: usize = 32;

/// Attention without a graph for decoding-sized queries on CPU f32
/// ([`kernels::few_query_attention`]): keys and values are read where they
/// are (a view of the KV cache needs no copy) and the scores never become a
/// tensor. `None` when the inputs do not fit (then the general path runs).
pub(super) fn few_query_attention(
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
pub(super) fn few_query_attention_of<E: crate::kernels::KvElement>(
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
pub(super) fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
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
pub(super) fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
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
