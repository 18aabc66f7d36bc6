//! Q4_1 and Q8_0 weights interleaved sixteen rows at a time for AVX-512
//! VNNI: one i32 lane per weight row.
//!
//! A *chunk* is sixteen consecutive weight rows. For each block position `b`
//! (32 values) the chunk stores the sixteen rows' blocks side by side: each
//! 32-block splits into eight *steps* of four values, and the vector for
//! step `s` holds, in lane `l`, values `4s..4s + 4` of row `l`'s block `b`.
//! One activation row's four values of that step, broadcast to every lane,
//! then meet all sixteen rows in one `vpdpbusd`; eight of them leave the
//! sixteen rows' block dot products in the sixteen lanes. The block scales
//! (one per lane, stored alike) are applied once per block and activation
//! row — convert, multiply, fused multiply-add, and one more for Q4_1's
//! minimum — and the sums of the sixteen rows stay in their lanes to the
//! end: no horizontal reduction, and the sixteen results are one store.
//! Any `k` works the same way (no partial groups).
//!
//! Against the natural block order (four lanes per block, scales once per
//! four blocks and a horizontal sum per row), the batch-8 loop issues about
//! half as many other instructions per `vpdpbusd` (counted from the loop),
//! and batch-8 decoding of SmolLM2-135M took 22% fewer cycles.
//!
//! Q8_0's signed values are stored plus 128 (`vpdpbusd` multiplies unsigned
//! by signed bytes); the activations' block sums times 128 are subtracted
//! from the integer dot products, so the sums are exact before scaling.
//! The layout needs whole chunks (`n % 16 == 0`: every model's projections);
//! other weights keep the natural layout.

use super::{BlockFormat, Blocks};

/// Weight rows per chunk: one per i32 lane of a 512-bit vector.
pub(super) const ROWS: usize = 16;
/// Steps of four values in a 32-block.
const STEPS: usize = 8;

/// A weight `(n, k)` in the interleaved layout (see the module's note).
#[derive(Debug)]
pub(super) struct Interleaved {
    /// `(n / 16, blocks, runs, 16 lanes, 4 bytes)`: Q4_1, four runs (run
    /// `q`, lane `l`: row `l`'s block bytes `4q..4q + 4`, whose low nibbles
    /// are step `q` and high nibbles step `q + 4`); Q8_0, eight runs (run
    /// `s` = step `s`), values plus 128.
    quants: Vec<u8>,
    /// `(n / 16, blocks, 16 lanes)`: f16 bits of the block scales.
    scales: Vec<u16>,
    /// `(n / 16, blocks, 16 lanes)`: f16 bits of Q4_1's minima; empty for Q8_0.
    mins: Vec<u16>,
    blocks: usize,
}

impl Interleaved {
    /// Interleaves natural blocks of an `(n, k)` weight; `None` unless `n % 16 == 0`.
    pub(super) fn new(format: BlockFormat, w: &Blocks, n: usize, k: usize) -> Option<Interleaved> {
        if !n.is_multiple_of(ROWS) {
            return None;
        }
        let (blocks, qb) = (k / 32, format.quant_bytes());
        let mut out = Interleaved {
            quants: Vec::with_capacity(n * blocks * qb),
            scales: Vec::with_capacity(n * blocks),
            mins: Vec::with_capacity(if format == BlockFormat::Q4_1 { n * blocks } else { 0 }),
            blocks,
        };
        for chunk in 0..n / ROWS {
            for b in 0..blocks {
                let at = |lane: usize| (chunk * ROWS + lane) * blocks + b;
                for run in 0..qb / 4 {
                    for lane in 0..ROWS {
                        let bytes = &w.quants[at(lane) * qb + 4 * run..at(lane) * qb + 4 * run + 4];
                        match format {
                            BlockFormat::Q4_1 => out.quants.extend_from_slice(bytes),
                            BlockFormat::Q8_0 => out.quants.extend(bytes.iter().map(|v| v ^ 0x80)),
                        }
                    }
                }
                out.scales.extend((0..ROWS).map(|lane| w.scales[at(lane)]));
                if format == BlockFormat::Q4_1 {
                    out.mins.extend((0..ROWS).map(|lane| w.mins[at(lane)]));
                }
            }
        }
        Some(out)
    }

    /// Stacks weights with one `k` along the output dimension (whole chunks each).
    pub(super) fn concat(parts: &[&Interleaved]) -> Option<Interleaved> {
        let blocks = parts.first()?.blocks;
        if parts.iter().any(|p| p.blocks != blocks) {
            return None;
        }
        Some(Interleaved {
            quants: parts.iter().flat_map(|p| p.quants.iter().copied()).collect(),
            scales: parts.iter().flat_map(|p| p.scales.iter().copied()).collect(),
            mins: parts.iter().flat_map(|p| p.mins.iter().copied()).collect(),
            blocks,
        })
    }
}

/// Activation rows quantised to 8 bits per 32-block (the values of
/// [`super::quantize_natural`]), natural order, with each block's `128 · Σq`.
pub(super) struct Q8Natural {
    /// `(m, k)`.
    q: Vec<i8>,
    /// `(m, blocks)`: scales `d`, `d · Σq` and `128 · Σq`.
    d: Vec<f32>,
    s: Vec<f32>,
    sum128: Vec<i32>,
    m: usize,
    k: usize,
}

impl Q8Natural {
    /// Quantises `x (m, k)`.
    pub(super) fn quantize(x: &[f32], m: usize, k: usize) -> Q8Natural {
        let super::Natural8 { q, d, sum } = super::quantize_natural(x, m, k);
        let s = super::scaled_sums(&d, &sum);
        let sum128 = sum.iter().map(|&v| 128 * v).collect();
        Q8Natural { q, d, s, sum128, m, k }
    }
}

/// The kernel: `vpdpbusd` over chunks of sixteen weight rows.
#[cfg(target_arch = "x86_64")]
pub(super) mod vnni {
    use super::{BlockFormat, Interleaved, Q8Natural, ROWS, STEPS};
    use crate::kernels::Columns;
    use std::arch::x86_64::*;

    /// How far ahead of a chunk's block the weight stream is prefetched (bytes).
    const PREFETCH: usize = 8192;

    /// Weight rows `j0..j0 + rows` (multiples of sixteen) times every
    /// activation row, into columns `j0..j0 + rows` of `out`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C and AVX-512 F, BW, DQ, VL and VNNI; `w` and
    /// `x` come from one `k`; `out` is `(m, n)` for `x`'s `m` rows and the
    /// weight's `n` ≥ `j0 + rows`, and no other task writes these columns.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub(in crate::kernels) unsafe fn rows(
        format: BlockFormat,
        w: &Interleaved,
        j0: usize,
        rows: usize,
        out: Columns,
        x: &Q8Natural,
    ) {
        debug_assert!(j0.is_multiple_of(ROWS) && rows.is_multiple_of(ROWS) && w.blocks * 32 == x.k);
        match format {
            BlockFormat::Q4_1 => rows_of::<false>(w, j0, rows, out, x),
            BlockFormat::Q8_0 => rows_of::<true>(w, j0, rows, out, x),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn rows_of<const Q8: bool>(w: &Interleaved, j0: usize, rows: usize, out: Columns, x: &Q8Natural) {
        let mut first = 0;
        while first < x.m {
            first += match x.m - first {
                8.. => chunks::<Q8, 8>(w, j0, rows, out, x, first),
                4.. => chunks::<Q8, 4>(w, j0, rows, out, x, first),
                2.. => chunks::<Q8, 2>(w, j0, rows, out, x, first),
                _ => chunks::<Q8, 1>(w, j0, rows, out, x, first),
            };
        }
    }

    /// Activation rows `first..first + R` against the chunks of weight rows
    /// `j0..j0 + rows`; returns `R`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn chunks<const Q8: bool, const R: usize>(
        w: &Interleaved,
        j0: usize,
        rows: usize,
        out: Columns,
        x: &Q8Natural,
        first: usize,
    ) -> usize {
        let (blocks, k) = (w.blocks, x.k);
        let bytes = ROWS * if Q8 { 32 } else { 16 }; // one chunk's block
        for chunk in j0 / ROWS..(j0 + rows) / ROWS {
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..blocks {
                let at = chunk * blocks + b;
                let here = w.quants.as_ptr().add(at * bytes);
                for line in (0..bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(here.wrapping_add(PREFETCH + line) as *const i8);
                }
                let wv = weights::<Q8>(here);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.scales.as_ptr().add(at * ROWS) as *const __m256i));
                let mw = if Q8 {
                    _mm512_setzero_ps()
                } else {
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.mins.as_ptr().add(at * ROWS) as *const __m256i))
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = first + r;
                    // The activations' step runs, each broadcast to the sixteen lanes.
                    let y = x.q.as_ptr().add(row * k + b * 32) as *const i32;
                    let mut dot = _mm512_setzero_si512();
                    for (s, wv) in wv.iter().enumerate() {
                        dot = _mm512_dpbusd_epi32(dot, *wv, _mm512_set1_epi32(y.add(s).read_unaligned()));
                    }
                    let i = row * blocks + b;
                    if Q8 {
                        dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(*x.sum128.get_unchecked(i)));
                    }
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(*x.d.get_unchecked(i)));
                    *acc = _mm512_fmadd_ps(dw, t, *acc);
                    if !Q8 {
                        *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.s.get_unchecked(i)), *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.at(first + r, chunk * ROWS), *acc);
            }
        }
        R
    }

    /// A chunk's weight vectors for one block position, step by step
    /// (Q4_1: the low nibbles of run `q` are step `q`, the high nibbles step `q + 4`).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn weights<const Q8: bool>(p: *const u8) -> [__m512i; STEPS] {
        let mut v = [_mm512_setzero_si512(); STEPS];
        if Q8 {
            for (s, v) in v.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(p.add(64 * s) as *const _);
            }
        } else {
            let nibble = _mm512_set1_epi8(0x0F);
            for q in 0..STEPS / 2 {
                let packed = _mm512_loadu_si512(p.add(64 * q) as *const _);
                v[q] = _mm512_and_si512(packed, nibble);
                v[q + STEPS / 2] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble);
            }
        }
        v
    }
}
