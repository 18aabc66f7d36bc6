//! AVX-512F row kernels: a polynomial `exp`, the softmax row, decoding
//! attention for one key/value head, RMSNorm and SiLU rows, and the lane
//! reductions they share.

use std::arch::x86_64::*;

/// `e^x` lane-wise (Cephes' `expf` scheme: `x = n ln 2 + r`, `|r| ≤ ln 2 / 2`,
/// `e^r = 1 + r + r² P(r)`, `2^n` by `scalef`): relative error about
/// 1e-7. Inputs below −104 (and −∞) give 0; inputs above 88 give e⁸⁸.
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0)), _mm512_set1_ps(88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(e, n)
}

/// The largest head size [`attention_rows`] takes: a query row in eight registers.
pub const MAX_HEAD: usize = 128;

/// Few-query attention for one key/value head ([`super::few_query_attention`]):
/// query rows `q` `(r, d)`, `keys` and `values` `(s, d)`, `mask(row)`
/// the additive mask of a query row; `out` `(r, d)`. The scores of
/// sixteen keys come out of one transposing reduction as one vector,
/// the softmax is [`softmax_row`], and each value row, loaded once, is
/// weighted into up to four query rows at a time (skipping the rows that
/// softmax gave no weight). `d` a multiple of 16, at most [`MAX_HEAD`];
/// `scratch` holds the scores between calls. Keys and values are f32 or
/// f16 (converted as they are loaded). `next`, the key and value rows of
/// the block computed after this one, are prefetched a row of each per
/// value row weighted here: the jump to another head's rows is one the
/// hardware prefetcher does not follow, and without this one core read
/// the cache at ~20 GB/s (`examples/decode_attention.rs`: 30 layers at
/// batch 8, context 270, f16, one thread: 2,380-2,450 → 1,780-1,810 µs
/// per step).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_rows<'m, E: super::KvElement>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    next: Option<(&[E], &[E])>,
    mask: impl Fn(usize) -> Option<&'m [f32]>,
    scale: f32,
    d: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert!(d.is_multiple_of(16) && d <= MAX_HEAD && values.len() == keys.len() && out.len() == q.len());
    // The head size as a constant, so that a row's vectors stay in registers.
    match d / 16 {
        1 => attention_rows_of::<E, 1, 4>(q, (keys, values), next, mask, scale, out, scratch),
        2 => attention_rows_of::<E, 2, 4>(q, (keys, values), next, mask, scale, out, scratch),
        3 => attention_rows_of::<E, 3, 4>(q, (keys, values), next, mask, scale, out, scratch),
        4 => attention_rows_of::<E, 4, 4>(q, (keys, values), next, mask, scale, out, scratch),
        5 => attention_rows_of::<E, 5, 2>(q, (keys, values), next, mask, scale, out, scratch),
        6 => attention_rows_of::<E, 6, 2>(q, (keys, values), next, mask, scale, out, scratch),
        7 => attention_rows_of::<E, 7, 2>(q, (keys, values), next, mask, scale, out, scratch),
        _ => attention_rows_of::<E, 8, 2>(q, (keys, values), next, mask, scale, out, scratch),
    }
}

/// [`attention_rows`] for heads of `16 C` values, `W` query rows per pass over the values.
#[target_feature(enable = "avx512f")]
unsafe fn attention_rows_of<'m, E: super::KvElement, const C: usize, const W: usize>(
    q: &[f32],
    (keys, values): (&[E], &[E]),
    next: Option<(&[E], &[E])>,
    mask: impl Fn(usize) -> Option<&'m [f32]>,
    scale: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let d = 16 * C;
    let (s, rows) = (keys.len() / d, q.len() / d);
    scratch.resize(s + rows * s, 0.0);
    let (scores, p) = scratch.split_at_mut(s); // p: (rows, s)
    for (r, qr) in q.chunks_exact(d).enumerate() {
        let qv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(qr.as_ptr().add(16 * c)));
        for j0 in (0..s).step_by(16) {
            let n = (s - j0).min(16);
            let acc: [__m512; 16] = std::array::from_fn(|jj| {
                let mut acc = _mm512_setzero_ps();
                if jj < n {
                    let key = keys.as_ptr().add((j0 + jj) * d);
                    for (c, qc) in qv.iter().enumerate() {
                        acc = _mm512_fmadd_ps(*qc, load16(key.add(16 * c)), acc);
                    }
                    if r == 0 {
                        // The value rows come next: on their way while the scores are made.
                        let value = values.as_ptr().add((j0 + jj) * d) as *const i8;
                        for line in (0..d * std::mem::size_of::<E>()).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(value.add(line));
                        }
                    }
                }
                acc
            });
            _mm512_mask_storeu_ps(scores.as_mut_ptr().add(j0), lanes(n), lane_sums(acc));
        }
        softmax_row(scores, mask(r), scale, &mut p[r * s..(r + 1) * s]);
    }
    for r0 in (0..rows).step_by(W) {
        let w = (rows - r0).min(W);
        let mut acc = [[_mm512_setzero_ps(); C]; W];
        for j in 0..s {
            if let (0, Some((nk, nv))) = (r0, next) {
                // The next block's rows, a few lines per value row: in L2 when it starts.
                let bytes = d * std::mem::size_of::<E>();
                for rows in [nk, nv] {
                    if j * d < rows.len() {
                        let at = rows.as_ptr().add(j * d) as *const i8;
                        for line in (0..bytes).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(at.add(line));
                        }
                    }
                }
            }
            let row = values.as_ptr().add(j * d);
            let v: [__m512; C] = std::array::from_fn(|c| load16(row.add(16 * c)));
            for (r, acc) in acc.iter_mut().enumerate().take(w) {
                let pj = *p.get_unchecked((r0 + r) * s + j);
                if pj != 0.0 {
                    let pj = _mm512_set1_ps(pj);
                    for (acc, v) in acc.iter_mut().zip(v) {
                        *acc = _mm512_fmadd_ps(pj, v, *acc);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(w) {
            for (c, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add((r0 + r) * d + 16 * c), *acc);
            }
        }
    }
}

/// Sixteen f32 or f16 values as f32.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<E: super::KvElement>(p: *const E) -> __m512 {
    if E::HALF {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

/// Lane `j` of the result is the sum of the lanes of `v[j]`: a
/// transposing reduction (45 instructions for sixteen sums).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lane_sums(v: [__m512; 16]) -> __m512 {
    lane_reduce(v, |a, b| _mm512_add_ps(a, b))
}

/// Lane `j` of the result is `op` over the lanes of `v[j]`, for an
/// associative and commutative `op` (sums, maxima; integer ones work
/// on the bits).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn lane_reduce(v: [__m512; 16], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
    // Per 128-bit lane c: [a₀∘a₂, b₀∘b₂, a₁∘a₃, b₁∘b₃] of each pair (a, b).
    let x: [__m512; 8] = std::array::from_fn(|i| {
        op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]))
    });
    // Per 128-bit lane c: vectors 4i..4i + 4 reduced over that lane.
    let z: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        op(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
    });
    // 128-bit lanes [z₀(c₀∘c₂), z₀(c₁∘c₃), z₁(c₀∘c₂), z₁(c₁∘c₃)], likewise for z₂, z₃.
    let u: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (z[2 * i], z[2 * i + 1]);
        op(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
    });
    op(_mm512_shuffle_f32x4::<0b10_00_10_00>(u[0], u[1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(u[0], u[1]))
}

/// Lanes `0..n` of 16 set.
#[inline]
pub(super) fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// `o = softmax(scale · x + m)` for one row.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_row(x: &[f32], m: Option<&[f32]>, scale: f32, o: &mut [f32]) {
    let s = x.len();
    assert!(o.len() == s && m.is_none_or(|m| m.len() == s));
    let (sc, ninf) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut max = ninf;
    let mut j = 0;
    while j < s {
        let k = lanes(s - j);
        let mut v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(j)), sc);
        if let Some(m) = m {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m.as_ptr().add(j)));
        }
        max = _mm512_mask_max_ps(max, k, max, v);
        _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, v);
        j += 16;
    }
    let mx = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let mut sum = _mm512_setzero_ps();
    j = 0;
    while j < s {
        let k = lanes(s - j);
        let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, o.as_ptr().add(j)), mx));
        sum = _mm512_mask_add_ps(sum, k, sum, e);
        _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, e);
        j += 16;
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    j = 0;
    while j < s {
        let k = lanes(s - j);
        let p = o.as_mut_ptr().add(j);
        _mm512_mask_storeu_ps(p, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p), inv));
        j += 16;
    }
}

/// One row of [`super::rms_norm`].
#[target_feature(enable = "avx512f")]
pub unsafe fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
    let d = x.len();
    assert!(w.len() == d && o.len() == d);
    let mut sum = _mm512_setzero_ps();
    let mut j = 0;
    while j < d {
        let v = _mm512_maskz_loadu_ps(lanes(d - j), x.as_ptr().add(j));
        sum = _mm512_fmadd_ps(v, v, sum);
        j += 16;
    }
    let inv = _mm512_set1_ps(1.0 / (_mm512_reduce_add_ps(sum) / d as f32 + eps).sqrt());
    j = 0;
    while j < d {
        let k = lanes(d - j);
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(j)), inv);
        _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, w.as_ptr().add(j))));
        j += 16;
    }
}

/// `σ(x)` lane-wise.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sigmoid(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    _mm512_div_ps(one, _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), x))))
}

/// `o = g σ(g) u`.
#[target_feature(enable = "avx512f")]
pub unsafe fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
    assert!(u.len() == g.len() && o.len() == g.len());
    let mut j = 0;
    while j < g.len() {
        let k = lanes(g.len() - j);
        let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(j));
        let uv = _mm512_maskz_loadu_ps(k, u.as_ptr().add(j));
        _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(gv)), uv));
        j += 16;
    }
}

/// `dg = dy u σ(g) (1 + g (1 − σ(g)))`, `du = dy g σ(g)`.
#[target_feature(enable = "avx512f")]
pub unsafe fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g.len();
    assert!(u.len() == n && dy.len() == n && dg.len() == n && du.len() == n);
    let one = _mm512_set1_ps(1.0);
    let mut j = 0;
    while j < n {
        let k = lanes(n - j);
        let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(j));
        let uv = _mm512_maskz_loadu_ps(k, u.as_ptr().add(j));
        let d = _mm512_maskz_loadu_ps(k, dy.as_ptr().add(j));
        let sg = sigmoid(gv);
        let silu = _mm512_mul_ps(gv, sg);
        _mm512_mask_storeu_ps(du.as_mut_ptr().add(j), k, _mm512_mul_ps(d, silu));
        let ds = _mm512_mul_ps(sg, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sg), one));
        _mm512_mask_storeu_ps(dg.as_mut_ptr().add(j), k, _mm512_mul_ps(_mm512_mul_ps(d, uv), ds));
        j += 16;
    }
}

/// `o = p ⊙ (dp − Σ p ⊙ dp)` for one row.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_backward_row(p: &[f32], dp: &[f32], o: &mut [f32]) {
    let s = p.len();
    assert!(dp.len() == s && o.len() == s);
    let mut acc = _mm512_setzero_ps();
    let mut j = 0;
    while j < s {
        let k = lanes(s - j);
        acc = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(k, p.as_ptr().add(j)),
            _mm512_maskz_loadu_ps(k, dp.as_ptr().add(j)),
            acc,
        );
        j += 16;
    }
    let dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    j = 0;
    while j < s {
        let k = lanes(s - j);
        let (pv, dv) = (_mm512_maskz_loadu_ps(k, p.as_ptr().add(j)), _mm512_maskz_loadu_ps(k, dp.as_ptr().add(j)));
        _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, _mm512_mul_ps(pv, _mm512_sub_ps(dv, dot)));
        j += 16;
    }
}
