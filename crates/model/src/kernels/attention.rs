//! Decoding attention ([`few_query_attention`]): a few query rows per head
//! against the key/value cache read in place (f32 or f16), with AVX-512F for heads
//! of up to 128 values, else AVX2 and FMA, else portable loops.

use super::*;
use rayon::prelude::*;

/// Shapes of one [`few_query_attention`] call.
pub(crate) struct AttentionDims {
    /// Batch rows, key/value heads, stacked query rows per head (`G·T`),
    /// query positions `T`, key slots `S`, head size `D`.
    pub b: usize,
    pub kv: usize,
    pub gt: usize,
    pub t: usize,
    pub s: usize,
    pub d: usize,
}

/// `softmax(scale · q kᵀ + mask) v` per `(b, head)` for a few query rows, as
/// decoding has: `q` `(B, KV, G·T, D)` contiguous, `k`/`v` `(B, KV, S, D)`
/// read in place (f32 or f16), `mask` `(B, T, S)` (query row `r` uses mask
/// row `r mod T`). Returns `(B, KV, G·T, D)`.
pub(crate) fn few_query_attention<E: KvElement>(
    q: &[f32],
    k: &HeadRows<'_, E>,
    v: &HeadRows<'_, E>,
    mask: Option<&[f32]>,
    dims: &AttentionDims,
    scale: f32,
) -> Vec<f32> {
    let AttentionDims { b, kv, gt, d, .. } = *dims;
    debug_assert_eq!(q.len(), b * kv * gt * d);
    let simd = has_avx2_fma();
    let wide = has_avx512f() && d.is_multiple_of(16) && d <= avx512::MAX_HEAD;
    let mut out = vec![0f32; q.len()];
    let call = FewQuery { q, k, v, mask, dims, scale };
    // A few tasks per thread: one (b, head) block is about a microsecond of
    // work at decoding size, as little as a task's dispatch.
    let blocks_per_task = (b * kv).div_ceil(rayon::current_num_threads() * 2).max(1);
    out.par_chunks_mut(gt * d * blocks_per_task).enumerate().for_each(|(task, outs)| {
        let mut scratch = Scratch::default();
        let blocks = outs.len() / (gt * d);
        for (i, out) in outs.chunks_mut(gt * d).enumerate() {
            let block = task * blocks_per_task + i;
            // This task's next block, whose rows are fetched while this one is computed.
            let next = (i + 1 < blocks).then_some(block + 1);
            call.block_with(block, next, out, &mut scratch, simd, wide);
        }
    });
    out
}

/// A task's buffers between [`FewQuery::block_with`] calls: scores, and
/// f16 key/value rows converted for the kernels that read f32 only.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) scores: Vec<f32>,
    pub(super) keys: Vec<f32>,
    pub(super) values: Vec<f32>,
}

/// The inputs of one [`few_query_attention`] call, shared by its `(b, head)` blocks.
pub(super) struct FewQuery<'a, E = f32> {
    pub(super) q: &'a [f32],
    pub(super) k: &'a HeadRows<'a, E>,
    pub(super) v: &'a HeadRows<'a, E>,
    pub(super) mask: Option<&'a [f32]>,
    pub(super) dims: &'a AttentionDims,
    pub(super) scale: f32,
}

impl<E: KvElement> FewQuery<'_, E> {
    /// The `G·T` query rows of block `block`.
    pub(super) fn rows(&self, block: usize) -> &[f32] {
        let AttentionDims { gt, d, .. } = *self.dims;
        &self.q[block * gt * d..(block + 1) * gt * d]
    }

    /// The additive mask of query row `r` of batch row `bi` (mask row `r mod T`).
    pub(super) fn mask_row(&self, bi: usize, r: usize) -> Option<&[f32]> {
        let AttentionDims { t, s, .. } = *self.dims;
        self.mask.map(|m| &m[(bi * t + r % t) * s..(bi * t + r % t + 1) * s])
    }

    /// The key and value rows of block `block`, when each head's rows are back to back.
    pub(super) fn block_rows(&self, block: usize) -> Option<(&[E], &[E])> {
        let AttentionDims { kv, s, d, .. } = *self.dims;
        self.k.rows(block / kv, block % kv, s, d).zip(self.v.rows(block / kv, block % kv, s, d))
    }

    /// Block `block` into `out` with the widest kernel that fits; the AVX-512
    /// kernel fetches block `next`'s rows meanwhile.
    pub(super) fn block_with(
        &self,
        block: usize,
        next: Option<usize>,
        out: &mut [f32],
        scratch: &mut Scratch,
        simd: bool,
        wide: bool,
    ) {
        let AttentionDims { kv, s, d, .. } = *self.dims;
        let (bi, h) = (block / kv, block % kv);
        #[cfg(target_arch = "x86_64")]
        if wide {
            if let Some((keys, values)) = self.block_rows(block) {
                let mask_row = |r: usize| self.mask_row(bi, r);
                let (q, next) = (self.rows(block), next.and_then(|n| self.block_rows(n)));
                // SAFETY: the CPU has AVX-512F; d % 16 == 0, d ≤ MAX_HEAD; keys and values hold s rows of d.
                unsafe {
                    avx512::attention_rows(q, keys, values, next, mask_row, self.scale, d, out, &mut scratch.scores)
                };
                return;
            }
        }
        let _ = (wide, next);
        let (q, mask, dims, scale) = (self.q, self.mask, self.dims, self.scale);
        if let (Some(k), Some(v)) = (E::as_f32(self.k), E::as_f32(self.v)) {
            return FewQuery { q, k, v, mask, dims, scale }.block_f32(block, out, simd);
        }
        // The other kernels read f32: this head's rows, converted.
        let Scratch { keys, values, .. } = scratch;
        for (rows, to) in [(self.k, &mut *keys), (self.v, &mut *values)] {
            to.clear();
            to.extend((0..s).flat_map(|j| rows.row(bi, h, j, d).iter().map(|x| x.to_f32())));
        }
        let (k, v) = (&HeadRows::one_block(keys, d), &HeadRows::one_block(values, d));
        FewQuery { q, k, v, mask, dims, scale }.block_f32(block, out, simd)
    }
}

impl FewQuery<'_, f32> {
    /// Block `block` into `out` with AVX2 or the portable loop.
    pub(super) fn block_f32(&self, block: usize, out: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
            unsafe { attention_block_avx2(self, block, out) };
            return;
        }
        let _ = simd;
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| a * b).sum();
        attention_block(self, block, out, dot, |_, _| None, weighted_rows);
    }
}

/// One `(b, head)` block of [`few_query_attention`]: `q` and `out` are its
/// `G·T` rows; `dot` is the dot product of two rows of `D` values, `dot8`
/// that of one row with eight consecutive rows, where it has a kernel.
#[inline(always)]
pub(super) fn attention_block(
    call: &FewQuery<'_>,
    block: usize,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    dot8: impl Fn(&[f32], &[f32]) -> Option<[f32; 8]>,
    weighted: impl Fn(&[f32], &HeadRows<'_>, Head, &mut [f32]),
) {
    let AttentionDims { kv, gt, s, d, .. } = *call.dims;
    let (q, k, v, scale) = (call.rows(block), call.k, call.v, call.scale);
    let (bi, h) = (block / kv, block % kv);
    let mut p = vec![0f32; s];
    for r in 0..gt {
        let qr = &q[r * d..(r + 1) * d];
        let m = call.mask_row(bi, r);
        let mut j = 0;
        if let Some(keys) = k.rows(bi, h, s, d) {
            while j + 8 <= s {
                let Some(dots) = dot8(qr, &keys[j * d..(j + 8) * d]) else { break };
                p[j..j + 8].copy_from_slice(&dots);
                j += 8;
            }
        }
        for (j, pj) in p.iter_mut().enumerate().skip(j) {
            *pj = dot(qr, k.row(bi, h, j, d));
        }
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = *pj * scale + m.map_or(0.0, |m| m[j]);
            max = max.max(*pj);
        }
        let mut sum = 0f32;
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        let o = &mut out[r * d..(r + 1) * d];
        weighted(&p, v, Head { b: bi, h, d }, o);
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

/// One head of one batch row of [`HeadRows`], with its row size.
#[derive(Clone, Copy)]
pub(super) struct Head {
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) d: usize,
}

/// `out += Σ_j p_j · v_j` over the rows of one head, skipping the rows that
/// softmax gave no weight.
#[inline(always)]
pub(super) fn weighted_rows(p: &[f32], v: &HeadRows<'_>, head: Head, out: &mut [f32]) {
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            for (o, x) in out.iter_mut().zip(v.row(head.b, head.h, j, head.d)) {
                *o += pj * x;
            }
        }
    }
}

/// [`attention_block`] compiled for AVX2 and FMA (the dot products and the
/// weighted sums of value rows vectorise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attention_block_avx2(call: &FewQuery<'_>, block: usize, out: &mut [f32]) {
    let d = call.dims.d;
    let dot = |a: &[f32], b: &[f32]| {
        if d.is_multiple_of(8) {
            // SAFETY: this function runs with AVX2 and FMA; both rows hold `d` values.
            unsafe { avx::dot_f32(a, b) }
        } else {
            a.iter().zip(b).map(|(a, b)| a * b).sum()
        }
    };
    // SAFETY: as above; the rows hold 8 · `d` values, d % 8 == 0.
    let dot8 = |a: &[f32], rows: &[f32]| d.is_multiple_of(8).then(|| unsafe { avx::dot_f32_rows::<8>(a, rows, d) });
    let weighted = |p: &[f32], v: &HeadRows<'_>, head: Head, out: &mut [f32]| {
        if d.is_multiple_of(64) {
            // SAFETY: as above; every row holds `d` values, d % 64 == 0.
            unsafe { avx::weighted_rows_64(p, v, head, out) }
        } else {
            weighted_rows(p, v, head, out)
        }
    };
    attention_block(call, block, out, dot, dot8, weighted)
}
