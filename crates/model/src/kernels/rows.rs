//! Row-wise kernels of the forward and backward passes: masked softmax and its
//! backward, RMSNorm, the gated MLP's `silu(g) ⊙ u` and its backward, and the
//! rotary embedding of query/key heads (with Qwen3's per-head norm). Each row is
//! done with AVX-512F where the CPU has it, else by a portable loop.

use super::*;
use rayon::prelude::*;

/// Attention probabilities in one pass per row: `softmax(scale · scores + mask)`.
///
/// `scores` holds `batches` blocks of `rows` rows of length `s`; row `r` of
/// block `b` adds mask row `b · t + r mod t` (`mask` is `(batches, t, s)`:
/// the grouped query heads stacked as `G·T` rows share the mask). With
/// AVX-512F the row is done 16 lanes at a time with a polynomial `exp`
/// (`avx512::softmax_row`, within 2 ulp of libm's); masked (`-inf`)
/// slots give exactly 0 either way.
pub fn masked_softmax(
    scores: &[f32],
    mask: Option<&[f32]>,
    batches: usize,
    t: usize,
    s: usize,
    scale: f32,
) -> Vec<f32> {
    let rows = scores.len() / s.max(1) / batches.max(1);
    let simd = has_avx512f();
    by_rows(scores.len(), s, |r, o| {
        let x = &scores[r * s..(r + 1) * s];
        let m = mask.map(|m| {
            let (b, q) = (r / rows, (r % rows) % t);
            &m[(b * t + q) * s..(b * t + q + 1) * s]
        });
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F checked above; `x`, `m` and `o` hold `s` values.
            unsafe { avx512::softmax_row(x, m, scale, o) };
            return;
        }
        let _ = simd;
        softmax_row(x, m, scale, o);
    })
}

/// One row of [`masked_softmax`], portable.
pub(super) fn softmax_row(x: &[f32], m: Option<&[f32]>, scale: f32, o: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for j in 0..x.len() {
        let v = x[j] * scale + m.map_or(0.0, |m| m[j]);
        o[j] = v;
        max = max.max(v);
    }
    let mut sum = 0f32;
    for v in o.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in o.iter_mut() {
        *v /= sum;
    }
}

/// The softmax backward per row of length `s`: `P ⊙ (dP − Σ_j P_j dP_j)`.
pub fn softmax_backward(p: &[f32], dp: &[f32], s: usize) -> Vec<f32> {
    let simd = has_avx512f();
    by_rows(p.len(), s, |r, o| {
        let (p, dp) = (&p[r * s..(r + 1) * s], &dp[r * s..(r + 1) * s]);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F checked above; all three rows hold `s` values.
            unsafe { avx512::softmax_backward_row(p, dp, o) };
            return;
        }
        let _ = simd;
        let dot: f32 = p.iter().zip(dp).map(|(a, b)| a * b).sum();
        for j in 0..s {
            o[j] = p[j] * (dp[j] - dot);
        }
    })
}

/// Elements per parallel task of the elementwise kernels.
pub(super) const ELEMENTS_PER_TASK: usize = 1 << 14;

/// `silu(g) ⊙ u`, elementwise (the gated MLP's activation).
pub fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    let simd = has_avx512f();
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(ELEMENTS_PER_TASK).enumerate().for_each(|(c, o)| {
        let at = c * ELEMENTS_PER_TASK;
        silu_mul_into(&g[at..at + o.len()], &u[at..at + o.len()], o, simd);
    });
    out
}

/// `o = silu(g) ⊙ u` for slices of one length; `simd`: the CPU has AVX-512F.
pub(super) fn silu_mul_into(g: &[f32], u: &[f32], o: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller checked AVX-512F; the three slices have one length.
        unsafe { avx512::silu_mul(g, u, o) };
        return;
    }
    let _ = simd;
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// RMSNorm of each row of `x` (rows of `w.len()` values): `x / √(mean(x²) + ε) ⊙ w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let (d, simd) = (w.len(), has_avx512f());
    by_rows(x.len(), d, |r, out| rms_norm_into(&x[r * d..(r + 1) * d], w, eps, out, simd))
}

/// One row of [`rms_norm`] into `out`, with AVX-512F when `simd`.
pub(super) fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller checked AVX-512F; the three slices have one length.
        unsafe { avx512::rms_norm_row(x, w, eps, out) };
        return;
    }
    let _ = simd;
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / w.len() as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        *o = x * inv * w;
    }
}

/// A rotary embedding's angles for rows of heads: `cos`/`sin` `(rows, D/2)`,
/// pairing dimensions `(i, i + D/2)` or, `interleaved`, `(2i, 2i + 1)`.
pub(crate) struct Rotation<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub interleaved: bool,
}

/// The heads of `y` — rows `(b, t)` of `n` heads of `d` values — as one
/// `(B, N, T, D)` buffer: each head RMS-normalised by `norm` (weight, ε)
/// if given (Qwen3's q/k norm), then rotated by its row's angles. One pass
/// instead of a transposing copy, a norm and a rotation.
pub(crate) fn rotated_heads(
    y: &StridedRows<'_>,
    t: usize,
    d: usize,
    norm: Option<(&[f32], f32)>,
    rotation: &Rotation<'_>,
) -> Vec<f32> {
    let (n, half, simd) = (y.n / d, d / 2, has_avx512f());
    let mut out = vec![0f32; y.rows * y.n];
    let head = |block: usize, out: &mut [f32]| {
        // Block (b, j): head j of the t rows of batch row b.
        let (b, j) = (block / n, block % n);
        let mut normed = vec![0f32; if norm.is_some() { d } else { 0 }];
        for (tt, o) in out.chunks_exact_mut(d).enumerate() {
            let row = b * t + tt;
            let mut x = &y.row(row)[j * d..(j + 1) * d];
            if let Some((w, eps)) = norm {
                rms_norm_into(x, w, eps, &mut normed, simd);
                x = &normed;
            }
            let (cos, sin) = (&rotation.cos[row * half..(row + 1) * half], &rotation.sin[row * half..(row + 1) * half]);
            // (a, b) ↦ (a cos − b sin, a sin + b cos), written as zipped
            // slices so that it vectorises.
            if rotation.interleaved {
                for (((o, x), &c), &s) in o.chunks_exact_mut(2).zip(x.chunks_exact(2)).zip(cos).zip(sin) {
                    o[0] = x[0] * c - x[1] * s;
                    o[1] = x[0] * s + x[1] * c;
                }
            } else {
                let ((o1, o2), (x1, x2)) = (o.split_at_mut(half), x.split_at(half));
                for (((((o1, o2), &a), &b), &c), &s) in o1.iter_mut().zip(o2).zip(x1).zip(x2).zip(cos).zip(sin) {
                    *o1 = a * c - b * s;
                    *o2 = a * s + b * c;
                }
            }
        }
    };
    // Decoding's few heads in one go; a prompt's in parallel.
    if out.len() < ELEMENTS_PER_TASK {
        out.chunks_exact_mut(t * d).enumerate().for_each(|(block, o)| head(block, o));
    } else {
        out.par_chunks_exact_mut(t * d).enumerate().for_each(|(block, o)| head(block, o));
    }
    out
}

/// The gradients `(dg, du)` of [`silu_mul`] for the output's gradient `dy`.
pub fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let simd = has_avx512f();
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    dg.par_chunks_mut(ELEMENTS_PER_TASK).zip(du.par_chunks_mut(ELEMENTS_PER_TASK)).enumerate().for_each(
        |(c, (dg, du))| {
            let at = c * ELEMENTS_PER_TASK;
            let n = dg.len();
            let (g, u, dy) = (&g[at..at + n], &u[at..at + n], &dy[at..at + n]);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX-512F checked above; the five slices have one length.
                unsafe { avx512::silu_mul_backward(g, u, dy, dg, du) };
                return;
            }
            let _ = simd;
            for i in 0..n {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        },
    );
    (dg, du)
}

/// [`silu_mul`] of two tensors given as rows (such as the gate and up halves
/// of a fused product), into a contiguous `(rows, n)` result.
pub(crate) fn silu_mul_rows(g: &StridedRows<'_>, u: &StridedRows<'_>) -> Vec<f32> {
    assert!(g.rows == u.rows && g.n == u.n);
    let (n, simd) = (g.n, has_avx512f());
    by_rows(g.rows * n, n, |r, o| silu_mul_into(g.row(r), u.row(r), o, simd))
}
