//! Blocked attention with an online softmax (FlashAttention-2's scheme, on
//! the CPU) for training: the scores of [`BQ`] query rows × [`BK`] keys at
//! a time, never a `(T × S)` score matrix. The forward keeps each row's
//! log-sum-exp (and the key spans and transposed keys it worked out, see
//! [`Saved`]); the backward recomputes each tile's probabilities from it.
//! AVX-512F, heads of a multiple of 16 values (see [`available`]).
//!
//! Shapes as [`crate::ops::attention`] takes them: `q` `(B, KV, G·T, D)`
//! (the `G` query heads of a key/value head stacked along the rows), `k`,
//! `v` `(B, KV, S, D)`, an additive mask `(B, T, S)` shared by every head.
//! One task per query head; a key/value head's gradients are summed over
//! its `G` query heads at the end.

use rayon::prelude::*;

/// Query rows per tile.
pub const BQ: usize = 32;
/// Keys per tile.
pub const BK: usize = 128;

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct FlashDims {
    /// Batch rows.
    pub b: usize,
    /// Key/value heads.
    pub kv: usize,
    /// Query heads per key/value head.
    pub g: usize,
    /// Query positions.
    pub t: usize,
    /// Key positions.
    pub s: usize,
    /// Values per head.
    pub d: usize,
}

impl FlashDims {
    fn heads(&self) -> usize {
        self.b * self.kv * self.g
    }

    /// Query blocks per head.
    fn blocks(&self) -> usize {
        self.t.div_ceil(BQ)
    }

    /// `(batch row, key/value head)` of query head `h`.
    fn of(&self, h: usize) -> (usize, usize) {
        (h / (self.kv * self.g), h / self.g)
    }
}

/// Whether this CPU and head size take the blocked kernels.
pub fn available(d: usize) -> bool {
    super::has_avx512f() && d > 0 && d.is_multiple_of(16)
}

/// Per batch row and query block, the keys `lo..hi` that any of its rows
/// can see (`(0, 0)` where none): blocks of a causal or preference mask
/// skip the keys after their last visible one, and left padding the keys
/// before the first.
fn spans(mask: Option<&[f32]>, dims: &FlashDims) -> Vec<(usize, usize)> {
    let (t, s) = (dims.t, dims.s);
    let Some(mask) = mask else { return vec![(0, s); dims.b * dims.blocks()] };
    let mut spans = Vec::with_capacity(dims.b * dims.blocks());
    for bi in 0..dims.b {
        for qb in 0..dims.blocks() {
            let (mut lo, mut hi) = (s, 0);
            for r in qb * BQ..((qb + 1) * BQ).min(t) {
                let row = &mask[(bi * t + r) * s..(bi * t + r + 1) * s];
                if let Some(first) = row.iter().position(|&x| x != f32::NEG_INFINITY) {
                    lo = lo.min(first);
                    hi = hi.max(row.iter().rposition(|&x| x != f32::NEG_INFINITY).map_or(first, |j| j) + 1);
                }
            }
            spans.push(if lo < hi { (lo, hi) } else { (0, 0) });
        }
    }
    spans
}

/// `x` `(B, KV, S, D)` as `(B, KV, D, S)`: a key tile's values for one head
/// dimension lie together, as the score kernel reads them.
fn transposed(x: &[f32], dims: &FlashDims) -> Vec<f32> {
    let (s, d) = (dims.s, dims.d);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(s * d).zip(x.par_chunks(s * d)).for_each(|(o, x)| {
        for j in 0..s {
            for c in 0..d {
                o[c * s + j] = x[j * d + c];
            }
        }
    });
    out
}

/// What the forward leaves for the backward besides its output.
pub struct Saved {
    /// Each query row's log-sum-exp of its scaled, masked scores
    /// `(B, KV, G·T)` (−∞ for a row that sees no key; its output is 0).
    lse: Vec<f32>,
    /// The visible key span of each batch row's query blocks.
    spans: Vec<(usize, usize)>,
    /// The keys transposed, `(B, KV, D, S)`.
    kt: Vec<f32>,
}

/// Forward: the output `(B, KV, G·T, D)` and what the backward needs.
/// `None` where [`available`] is false.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    dims: &FlashDims,
    scale: f32,
) -> Option<(Vec<f32>, Saved)> {
    if !available(dims.d) {
        return None;
    }
    let (t, d) = (dims.t, dims.d);
    let (spans, kt) = (spans(mask, dims), transposed(k, dims));
    let mut out = vec![0f32; dims.heads() * t * d];
    let mut lse = vec![0f32; dims.heads() * t];
    let all = Operands { q, kt: &kt, v, mask, spans: &spans, dims, scale };
    out.par_chunks_mut(t * d).zip(lse.par_chunks_mut(t)).enumerate().for_each(|(h, (out, lse))| {
        // SAFETY: `available` checked AVX-512F and `d % 16 == 0`.
        unsafe { all.head(h).forward(out, lse) };
    });
    Some((out, Saved { lse, spans, kt }))
}

/// Backward: `[dq, dk, dv]` for the output gradient `d_out`, given the
/// forward's `out` and `saved` (for the same inputs). `None` where
/// [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    out: &[f32],
    saved: &Saved,
    d_out: &[f32],
    dims: &FlashDims,
    scale: f32,
) -> Option<[Vec<f32>; 3]> {
    if !available(dims.d) {
        return None;
    }
    let (t, s, d, g) = (dims.t, dims.s, dims.d, dims.g);
    let (lse, vt) = (&saved.lse, transposed(v, dims));
    let mut dq = vec![0f32; dims.heads() * t * d];
    // Each query head's share of its key/value head's dK and dV, summed below.
    let mut dkv = vec![0f32; dims.heads() * 2 * s * d];
    let all = Operands { q, kt: &saved.kt, v, mask, spans: &saved.spans, dims, scale };
    dq.par_chunks_mut(t * d).zip(dkv.par_chunks_mut(2 * s * d)).enumerate().for_each(|(h, (dq, dkv))| {
        let (head, kh) = (all.head(h), dims.of(h).1);
        let (dk, dv) = dkv.split_at_mut(s * d);
        let grads = HeadGrads {
            k: &k[kh * s * d..(kh + 1) * s * d],
            vt: &vt[kh * s * d..(kh + 1) * s * d],
            out: &out[h * t * d..(h + 1) * t * d],
            lse: &lse[h * t..(h + 1) * t],
            d_out: &d_out[h * t * d..(h + 1) * t * d],
        };
        // SAFETY: as in `forward`.
        unsafe { head.backward(&grads, dq, dk, dv) };
    });
    let kv_heads = dims.b * dims.kv;
    let (mut dk, mut dv) = (vec![0f32; kv_heads * s * d], vec![0f32; kv_heads * s * d]);
    dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d)).enumerate().for_each(|(kh, (dk, dv))| {
        for part in dkv[kh * g * 2 * s * d..(kh + 1) * g * 2 * s * d].chunks(2 * s * d) {
            let (pk, pv) = part.split_at(s * d);
            dk.iter_mut().zip(pk).for_each(|(a, b)| *a += b);
            dv.iter_mut().zip(pv).for_each(|(a, b)| *a += b);
        }
    });
    Some([dq, dk, dv])
}

/// The operands of a call (all heads), or of one query head (after
/// [`Operands::head`]: its query rows `(T, D)`, its key/value head's keys
/// transposed `(D, S)` and values `(S, D)`, its batch row's mask `(T, S)`
/// and spans).
struct Operands<'a> {
    q: &'a [f32],
    /// Keys transposed, `(…, D, S)`.
    kt: &'a [f32],
    v: &'a [f32],
    mask: Option<&'a [f32]>,
    /// The visible key span per query block, by batch row.
    spans: &'a [(usize, usize)],
    dims: &'a FlashDims,
    scale: f32,
}

impl<'a> Operands<'a> {
    /// Query head `h`'s share of a call's operands.
    fn head(&self, h: usize) -> Operands<'a> {
        let FlashDims { t, s, d, .. } = *self.dims;
        let (bi, kh) = self.dims.of(h);
        let blocks = self.dims.blocks();
        Operands {
            q: &self.q[h * t * d..(h + 1) * t * d],
            kt: &self.kt[kh * s * d..(kh + 1) * s * d],
            v: &self.v[kh * s * d..(kh + 1) * s * d],
            mask: self.mask.map(|m| &m[bi * t * s..(bi + 1) * t * s]),
            spans: &self.spans[bi * blocks..(bi + 1) * blocks],
            dims: self.dims,
            scale: self.scale,
        }
    }
}

/// What one query head's backward reads besides its [`Operands`].
struct HeadGrads<'a> {
    /// Keys `(S, D)`.
    k: &'a [f32],
    /// Values transposed `(D, S)`.
    vt: &'a [f32],
    /// Its forward output `(T, D)` and log-sum-exp `(T)`.
    out: &'a [f32],
    lse: &'a [f32],
    /// `(T, D)`.
    d_out: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl Operands<'_> {
    /// The tiles of query block `qb`: `(first row, rows, [(first key, keys)])`.
    fn tiles(&self, qb: usize) -> (usize, usize, impl Iterator<Item = (usize, usize)>) {
        let r0 = qb * BQ;
        let (lo, hi) = self.spans[qb];
        (r0, BQ.min(self.dims.t - r0), (lo..hi).step_by(BK).map(move |j0| (j0, BK.min(hi - j0))))
    }

    /// The mask rows `r0..` from key `j0`, or none.
    fn mask_at(&self, r: usize, j0: usize) -> Option<&[f32]> {
        let s = self.dims.s;
        self.mask.map(|m| &m[r * s + j0..(r + 1) * s])
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn forward(&self, out: &mut [f32], lse: &mut [f32]) {
        let (s, d) = (self.dims.s, self.dims.d);
        let mut scores = vec![0f32; BQ * BK];
        let mut acc = vec![0f32; BQ * d];
        for qb in 0..self.dims.blocks() {
            let (r0, nr, tiles) = self.tiles(qb);
            let (mut max, mut sum) = ([f32::NEG_INFINITY; BQ], [0f32; BQ]);
            acc[..nr * d].fill(0.0);
            for (j0, nk) in tiles {
                scores_tile(&self.q[r0 * d..], d, nr, &self.kt[j0..], s, nk, d, &mut scores, BK);
                for r in 0..nr {
                    let row = &mut scores[r * BK..r * BK + nk];
                    let corr = online_softmax_row(row, self.mask_at(r0 + r, j0), self.scale, &mut max[r], &mut sum[r]);
                    if corr != 1.0 {
                        acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= corr);
                    }
                }
                accumulate(&mut acc, d, nr, scores.as_ptr(), BK, 1, nk, &self.v[j0 * d..], d, d);
            }
            for r in 0..nr {
                let o = &mut out[(r0 + r) * d..(r0 + r + 1) * d];
                if sum[r] > 0.0 {
                    let inv = 1.0 / sum[r];
                    o.iter_mut().zip(&acc[r * d..(r + 1) * d]).for_each(|(o, a)| *o = a * inv);
                    lse[r0 + r] = max[r] + sum[r].ln();
                } else {
                    o.fill(0.0);
                    lse[r0 + r] = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// `dq` `(T, D)`, this head's shares `dk`, `dv` `(S, D)`.
    #[target_feature(enable = "avx512f")]
    unsafe fn backward(&self, grads: &HeadGrads, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (t, s, d) = (self.dims.t, self.dims.s, self.dims.d);
        // rowsum(dO ⊙ O): the softmax backward's subtrahend.
        let delta: Vec<f32> = (0..t)
            .map(|r| {
                grads.d_out[r * d..(r + 1) * d].iter().zip(&grads.out[r * d..(r + 1) * d]).map(|(a, b)| a * b).sum()
            })
            .collect();
        let (mut p, mut ds) = (vec![0f32; BQ * BK], vec![0f32; BQ * BK]);
        for qb in 0..self.dims.blocks() {
            let (r0, nr, tiles) = self.tiles(qb);
            for (j0, nk) in tiles {
                scores_tile(&self.q[r0 * d..], d, nr, &self.kt[j0..], s, nk, d, &mut p, BK);
                scores_tile(&grads.d_out[r0 * d..], d, nr, &grads.vt[j0..], s, nk, d, &mut ds, BK);
                for r in 0..nr {
                    let (pr, dr) = (&mut p[r * BK..r * BK + nk], &mut ds[r * BK..r * BK + nk]);
                    probs_and_grad_row(pr, dr, self.mask_at(r0 + r, j0), self.scale, grads.lse[r0 + r], delta[r0 + r]);
                }
                // dV[j] += Σ_r P[r][j] dO[r]; dQ[r] += Σ_j dS[r][j] K[j]; dK[j] += Σ_r dS[r][j] Q[r].
                accumulate(&mut dv[j0 * d..], d, nk, p.as_ptr(), 1, BK, nr, &grads.d_out[r0 * d..], d, d);
                accumulate(&mut dq[r0 * d..], d, nr, ds.as_ptr(), BK, 1, nk, &grads.k[j0 * d..], d, d);
                accumulate(&mut dk[j0 * d..], d, nk, ds.as_ptr(), 1, BK, nr, &self.q[r0 * d..], d, d);
            }
        }
    }
}

/// One row of a tile in the forward: `x ← scale · x + mask`, the running
/// maximum and sum updated, `x ← exp(x − max)`; returns the factor the
/// row's accumulated output must be multiplied by (1 where the maximum
/// stayed). A row that has seen no visible key yet stays at zero weight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn online_softmax_row(x: &mut [f32], mask: Option<&[f32]>, scale: f32, max: &mut f32, sum: &mut f32) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let sc = _mm512_set1_ps(scale);
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j < n {
        let k = super::avx512::lanes(n - j);
        let mut v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(j)), sc);
        if let Some(m) = mask {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m.as_ptr().add(j)));
        }
        mx = _mm512_mask_max_ps(mx, k, mx, v);
        _mm512_mask_storeu_ps(x.as_mut_ptr().add(j), k, v);
        j += 16;
    }
    let new_max = max.max(_mm512_reduce_max_ps(mx));
    if new_max == f32::NEG_INFINITY {
        x.fill(0.0);
        return 1.0;
    }
    let corr = if *max == new_max { 1.0 } else { (*max - new_max).exp() };
    let m = _mm512_set1_ps(new_max);
    let mut total = _mm512_setzero_ps();
    j = 0;
    while j < n {
        let k = super::avx512::lanes(n - j);
        let e = super::avx512::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(j)), m));
        total = _mm512_mask_add_ps(total, k, total, e);
        _mm512_mask_storeu_ps(x.as_mut_ptr().add(j), k, e);
        j += 16;
    }
    *sum = *sum * corr + _mm512_reduce_add_ps(total);
    *max = new_max;
    corr
}

/// One row of a tile in the backward: `p ← exp(scale · p + mask − lse)`
/// (the forward's probabilities) and `dp ← p ⊙ (dp − delta) · scale` (the
/// scores' gradient, the scale folded in for dQ and dK).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn probs_and_grad_row(p: &mut [f32], dp: &mut [f32], mask: Option<&[f32]>, scale: f32, lse: f32, delta: f32) {
    use std::arch::x86_64::*;
    if lse == f32::NEG_INFINITY {
        p.fill(0.0);
        dp.fill(0.0);
        return;
    }
    let n = p.len();
    let (sc, l, dl) = (_mm512_set1_ps(scale), _mm512_set1_ps(lse), _mm512_set1_ps(delta));
    let mut j = 0;
    while j < n {
        let k = super::avx512::lanes(n - j);
        let mut v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.as_ptr().add(j)), sc);
        if let Some(m) = mask {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m.as_ptr().add(j)));
        }
        let e = super::avx512::exp(_mm512_sub_ps(v, l));
        _mm512_mask_storeu_ps(p.as_mut_ptr().add(j), k, e);
        let g = _mm512_mul_ps(_mm512_mul_ps(e, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp.as_ptr().add(j)), dl)), sc);
        _mm512_mask_storeu_ps(dp.as_mut_ptr().add(j), k, g);
        j += 16;
    }
}

/// `out[r·ldo + j] = Σ_c a[r·lda + c] · bt[c·ldb + j]` for `r < nr`,
/// `j < nk`, `c < d`: a tile of scores from query rows and transposed keys.
/// Four rows × 32 keys per register block.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn scores_tile(
    a: &[f32],
    lda: usize,
    nr: usize,
    bt: &[f32],
    ldb: usize,
    nk: usize,
    d: usize,
    out: &mut [f32],
    ldo: usize,
) {
    assert!(a.len() >= (nr - 1) * lda + d && bt.len() >= (d - 1) * ldb + nk && out.len() >= (nr - 1) * ldo + nk);
    by_fours(nr, |r, four| match four {
        true => scores_rows::<4>(a, lda, r, bt, ldb, nk, d, out, ldo),
        false => scores_rows::<1>(a, lda, r, bt, ldb, nk, d, out, ldo),
    });
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores_rows<const R: usize>(
    a: &[f32],
    lda: usize,
    r0: usize,
    bt: &[f32],
    ldb: usize,
    nk: usize,
    d: usize,
    out: &mut [f32],
    ldo: usize,
) {
    use std::arch::x86_64::*;
    let (a, bt, out) = (a.as_ptr(), bt.as_ptr(), out.as_mut_ptr());
    let mut j = 0;
    while j < nk {
        let (k0, k1) = (super::avx512::lanes(nk - j), super::avx512::lanes(nk.saturating_sub(j + 16)));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for c in 0..d {
            let b0 = _mm512_maskz_loadu_ps(k0, bt.add(c * ldb + j));
            let b1 = _mm512_maskz_loadu_ps(k1, bt.add(c * ldb + j + 16));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add((r0 + i) * lda + c));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let o = out.add((r0 + i) * ldo + j);
            _mm512_mask_storeu_ps(o, k0, acc[0]);
            _mm512_mask_storeu_ps(o.add(16), k1, acc[1]);
        }
        j += 32;
    }
}

/// `out[r·ldo + c] += Σ_k a[r·ars + k·aks] · b[k·ldb + c]` for `r < nr`,
/// `k < nk`, `c < d` (`d` a multiple of 16): rows of a product added into
/// `out`, `a` read with any strides (a tile or its transpose). Four rows ×
/// 64 values per register block.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate(
    out: &mut [f32],
    ldo: usize,
    nr: usize,
    a: *const f32,
    ars: usize,
    aks: usize,
    nk: usize,
    b: &[f32],
    ldb: usize,
    d: usize,
) {
    assert!(out.len() >= (nr - 1) * ldo + d && b.len() >= (nk - 1) * ldb + d && d.is_multiple_of(16));
    by_fours(nr, |r, four| match four {
        true => accumulate_rows::<4>(out, ldo, r, a, ars, aks, nk, b, ldb, d),
        false => accumulate_rows::<1>(out, ldo, r, a, ars, aks, nk, b, ldb, d),
    });
}

/// `rows(r, true)` for rows `r..r + 4` while four are left, then
/// `rows(r, false)` for each of the rest.
#[inline(always)]
fn by_fours(nr: usize, mut rows: impl FnMut(usize, bool)) {
    let mut r = 0;
    while r + 4 <= nr {
        rows(r, true);
        r += 4;
    }
    while r < nr {
        rows(r, false);
        r += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn accumulate_rows<const R: usize>(
    out: &mut [f32],
    ldo: usize,
    r0: usize,
    a: *const f32,
    ars: usize,
    aks: usize,
    nk: usize,
    b: &[f32],
    ldb: usize,
    d: usize,
) {
    use std::arch::x86_64::*;
    let (out, b) = (out.as_mut_ptr(), b.as_ptr());
    let mut c0 = 0;
    while c0 < d {
        // Up to four vectors of 16 values; the ones past `d` are masked off.
        let k = [0, 1, 2, 3].map(|w| if c0 + 16 * w < d { 0xffffu16 } else { 0 });
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (i, acc) in acc.iter_mut().enumerate() {
            for w in 0..4 {
                acc[w] = _mm512_maskz_loadu_ps(k[w], out.add((r0 + i) * ldo + c0 + 16 * w));
            }
        }
        for kk in 0..nk {
            let row = b.add(kk * ldb + c0);
            let bv = [0, 1, 2, 3].map(|w| _mm512_maskz_loadu_ps(k[w], row.add(16 * w)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add((r0 + i) * ars + kk * aks));
                for w in 0..4 {
                    acc[w] = _mm512_fmadd_ps(x, bv[w], acc[w]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for w in 0..4 {
                _mm512_mask_storeu_ps(out.add((r0 + i) * ldo + c0 + 16 * w), k[w], acc[w]);
            }
        }
        c0 += 64;
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl Operands<'_> {
    unsafe fn forward(&self, _: &mut [f32], _: &mut [f32]) {
        unreachable!("`available` is false off x86-64")
    }
    unsafe fn backward(&self, _: &HeadGrads, _: &mut [f32], _: &mut [f32], _: &mut [f32]) {
        unreachable!("`available` is false off x86-64")
    }
}
