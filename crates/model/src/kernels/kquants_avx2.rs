//! The AVX2 kernels for the K-quants (Q4_K, Q6_K) decoded into groups in
//! natural row order ([`super::kquants::Groups`]): for CPUs without AVX-512
//! VNNI, and on VNNI CPUs for weights whose rows do not come in whole chunks
//! of sixteen. They compute the sums of the portable loop in `quant.rs`
//! (up to the order of f32 additions).
//!
//! - Q4_K's groups are Q4_1-shaped (16 bytes of nibbles per 32 values) with
//!   f32 scales and minima: two groups per 256-bit step, as the Q4_1 kernel
//!   of `quant_x86.rs` does with f16 ones; the activations come in Q4_1's
//!   half-block order (see `Q8Rows::q`).
//! - Q6_K's groups are 32 signed bytes in `[-32, 31]` with an f32 scale per
//!   16 values: `maddubs` of `|w|` with the activations carrying `w`'s sign
//!   leaves values 0..16 in i32 lanes 0..4 and 16..32 in lanes 4..8, which
//!   are scaled by `[s₀ s₀ s₀ s₀ s₁ s₁ s₁ s₁]`.
//!
//! K-quant rows hold whole 256-value super-blocks, so the 32-groups of a row
//! always pair up (no tail loop).

use super::avx::hsums;
use super::kquants::Groups;
use super::{q4_1_halves, BlockFormat, Q8Rows};
use std::arch::x86_64::*;

/// Weight rows `j0..` (as many as `out` holds, `m` results each) times every
/// activation row: eight, four, then one activation rows per pass over a
/// weight row, so that each group is loaded and unpacked once for up to
/// eight, in tiles of [`ROW_TILE`] activation rows.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `g` holds whole rows of `x.k` values and
/// `x` was quantised for `format` ([`super::quantize_rows`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows(format: BlockFormat, g: &Groups, j0: usize, out: &mut [f32], x: &Q8Rows, m: usize) {
    debug_assert!(x.blocks.is_multiple_of(2));
    // Long inputs (prefill) in tiles of activation rows that stay in L2
    // while the task's weight rows stream past; decoding is one tile.
    for from in (0..m).step_by(ROW_TILE) {
        let to = (from + ROW_TILE).min(m);
        for (r, out) in out.chunks_mut(m).enumerate() {
            eights_fours_ones!(out, from, to, row(format, g, j0 + r, x));
        }
    }
}

/// Activation rows per pass over a task's weight rows: 64 rows of the
/// widest K-quant input (4,864 values) are 311 KB of int8. Without tiles
/// every weight row streamed all of a 1,000-token prompt's activations
/// (4.9 MB) from beyond L2.
const ROW_TILE: usize = 64;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row<const R: usize>(format: BlockFormat, g: &Groups, j: usize, x: &Q8Rows, first: usize) -> [f32; R] {
    match format {
        BlockFormat::Q4K => q4_k::<R>(g, j, x, first),
        BlockFormat::Q6K => q6_k::<R>(g, j, x, first),
        BlockFormat::Q4_1 | BlockFormat::Q8_0 => unreachable!("only the K-quants decode to groups"),
    }
}

/// `maddubs` to i16 pairs (no overflow: unsigned operands ≤ 32, signed ≤ 127), then `madd` to i32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
}

/// `[p[0] p[0] p[0] p[0] p[1] p[1] p[1] p[1]]`: two groups' scales, one per
/// i32 lane of their dot products.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pair(p: *const f32) -> __m256 {
    _mm256_set_m128(_mm_set1_ps(*p.add(1)), _mm_set1_ps(*p))
}

/// Q4_K weight row `j` against activation rows `first..first + R`, two
/// groups per step: 32 bytes of nibbles give both groups' low values and
/// both groups' high values, dotted with the activations in that order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_k<const R: usize>(g: &Groups, j: usize, x: &Q8Rows, first: usize) -> [f32; R] {
    let (k, blocks) = (x.k, x.blocks);
    let sc = g.scales.as_ptr().add(j * blocks);
    let mn = g.mins.as_ptr().add(j * blocks);
    let qw = g.quants.as_ptr().add(j * blocks * 16);
    let nibble = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in (0..blocks).step_by(2) {
        let packed = _mm256_loadu_si256(qw.add(b * 16) as *const __m256i);
        let lo = _mm256_and_si256(packed, nibble);
        let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
        let (dw, mw) = (pair(sc.add(b)), pair(mn.add(b)));
        let (lo_at, hi_at) = q4_1_halves(b, blocks);
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = first + r;
            let y = x.q.as_ptr().add(row * k);
            let ylo = _mm256_loadu_si256(y.add(lo_at) as *const __m256i);
            let yhi = _mm256_loadu_si256(y.add(hi_at) as *const __m256i);
            let dot = dot(dot(_mm256_setzero_si256(), lo, ylo), hi, yhi);
            let at = row * blocks * 4 + b * 4;
            let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d4.as_ptr().add(at)));
            *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
            *acc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x.s4.as_ptr().add(at)), *acc);
        }
    }
    hsums(acc)
}

/// Q6_K weight row `j` against activation rows `first..first + R`, a
/// 32-group (two 16-groups) per step.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6_k<const R: usize>(g: &Groups, j: usize, x: &Q8Rows, first: usize) -> [f32; R] {
    let (k, blocks) = (x.k, x.blocks);
    let sc = g.scales.as_ptr().add(j * 2 * blocks);
    let qw = g.quants.as_ptr().add(j * blocks * 32);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let wv = _mm256_loadu_si256(qw.add(b * 32) as *const __m256i);
        let aw = _mm256_sign_epi8(wv, wv);
        let dw = pair(sc.add(2 * b));
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = first + r;
            let y = _mm256_loadu_si256(x.q.as_ptr().add(row * k + b * 32) as *const __m256i);
            let dot = dot(_mm256_setzero_si256(), aw, _mm256_sign_epi8(y, wv));
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(row * blocks + b)));
            *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
        }
    }
    hsums(acc)
}
