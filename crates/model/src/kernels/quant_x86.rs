//! The x86 Q4_1/Q8_0 kernels, written once as a macro and instantiated for AVX2
//! (`maddubs`) and for AVX-512 VNNI (`vpdpbusd`).

use super::*;

/// The x86 kernels for Q4_1 and Q8_0, written once and instantiated per
/// instruction set by the 8-bit dot product they use: `$dot(acc, u, s)`
/// adds to each i32 lane of `acc` the four products of unsigned bytes of `u`
/// with signed bytes of `s` in that lane.
#[cfg(target_arch = "x86_64")]
macro_rules! quant_kernels {
    ($name:ident, $features:literal, $dot:item, $q4_1_quads:item, $q8_0_pairs:item) => {
        pub(super) mod $name {
            use super::avx::hsums;
            use super::{q4_1_halves, BlockFormat, Blocks, Q8Rows};
            use std::arch::x86_64::*;

            $dot

            $q4_1_quads

            $q8_0_pairs

            /// Weight rows `j0..` (as many as `out` holds, `m` results each)
            /// times every activation row: eight, four, then one activation
            /// rows per pass over a weight row, so that each weight block is
            /// loaded and unpacked once for up to eight rows.
            #[target_feature(enable = $features)]
            pub(in crate::kernels) unsafe fn rows(
                format: BlockFormat,
                w: &Blocks,
                j0: usize,
                out: &mut [f32],
                x: &Q8Rows,
                m: usize,
            ) {
                let mut done = 0; // activation rows done for every weight row
                if format == BlockFormat::Q4_1 {
                    let rows = out.len() / m;
                    while done + 8 <= m {
                        for r in (0..rows).step_by(2) {
                            let at = r * m + done;
                            if r + 1 < rows {
                                let [a, b] = q4_1::<2, 8>(w, j0 + r, x, done);
                                out[at..at + 8].copy_from_slice(&a);
                                out[at + m..at + m + 8].copy_from_slice(&b);
                            } else {
                                let [a] = q4_1::<1, 8>(w, j0 + r, x, done);
                                out[at..at + 8].copy_from_slice(&a);
                            }
                        }
                        done += 8;
                    }
                }
                for (r, out) in out.chunks_mut(m).enumerate() {
                    eights_fours_ones!(out, done, m, row(format, w, j0 + r, x));
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn row<const R: usize>(format: BlockFormat, w: &Blocks, j: usize, x: &Q8Rows, first: usize) -> [f32; R] {
                match format {
                    BlockFormat::Q4_1 => q4_1::<1, R>(w, j, x, first)[0],
                    BlockFormat::Q8_0 => q8_0::<R>(w, j, x, first),
                    BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("K-quants run on their groups (kquants_avx2)"),
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn f16(bits: u16) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            /// Q4_1 weight rows `j..j + W` against activation rows `first..first + R`,
            /// two blocks per step: 32 bytes of nibbles give the low values of
            /// both blocks and the high values of both, dotted with the
            /// activations in the same order; lanes 0..4 of the i32 sums
            /// belong to the first block and 4..8 to the second, scaled by
            /// `[d₀ d₀ d₀ d₀ d₁ d₁ d₁ d₁]`. Where 512-bit steps exist, each activation
            /// load serves all `W` weight rows.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_1<const W: usize, const R: usize>(w: &Blocks, j: usize, x: &Q8Rows, first: usize) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                let b = q4_1_quads::<W, R>(w, j, x, first, &mut acc);
                let mut out = [[0f32; R]; W];
                for (v, (out, acc)) in out.iter_mut().zip(acc).enumerate() {
                    *out = q4_1_from::<R>(w, j + v, x, first, b, acc);
                }
                out
            }

            /// Blocks `b..` of weight row `j` in [`q4_1`], added to the lane sums `acc` of the blocks before.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_1_from<const R: usize>(
                w: &Blocks,
                j: usize,
                x: &Q8Rows,
                first: usize,
                mut b: usize,
                mut acc: [__m256; R],
            ) -> [f32; R] {
                let (k, blocks) = (x.k, x.blocks);
                let sc = w.scales.as_ptr().add(j * blocks);
                let mn = w.mins.as_ptr().add(j * blocks);
                let qw = w.quants.as_ptr().add(j * blocks * 16);
                let nibble = _mm256_set1_epi8(0x0F);
                let spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
                while b + 2 <= blocks {
                    let packed = _mm256_loadu_si256(qw.add(b * 16) as *const __m256i);
                    let lo = _mm256_and_si256(packed, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
                    let pair = _mm_cvtsi32_si128((sc.add(b) as *const i32).read_unaligned());
                    let dw = _mm256_cvtph_ps(_mm_shuffle_epi8(pair, spread));
                    let pair = _mm_cvtsi32_si128((mn.add(b) as *const i32).read_unaligned());
                    let mw = _mm256_cvtph_ps(_mm_shuffle_epi8(pair, spread));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let row = first + r;
                        let (lo_at, hi_at) = q4_1_halves(b, blocks);
                        let y = x.q.as_ptr().add(row * k);
                        let ylo = _mm256_loadu_si256(y.add(lo_at) as *const __m256i);
                        let yhi = _mm256_loadu_si256(y.add(hi_at) as *const __m256i);
                        let dot = dot(dot(_mm256_setzero_si256(), lo, ylo), hi, yhi);
                        let at = row * blocks * 4 + b * 4;
                        let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d4.as_ptr().add(at)));
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
                        *acc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x.s4.as_ptr().add(at)), *acc);
                    }
                    b += 2;
                }
                let mut out = hsums(acc);
                if b < blocks {
                    // A last, unpaired block, stored in natural order.
                    for (r, o) in out.iter_mut().enumerate() {
                        let row = first + r;
                        let y = x.q.as_ptr().add(row * k + b * 32);
                        let mut dot = 0i32;
                        for t in 0..16 {
                            let byte = *qw.add(b * 16 + t);
                            dot += (byte & 0x0F) as i32 * *y.add(t) as i32 + (byte >> 4) as i32 * *y.add(16 + t) as i32;
                        }
                        let i = row * blocks + b;
                        *o += f16(*sc.add(b)) * x.d[i] * dot as f32 + f16(*mn.add(b)) * x.s[i];
                    }
                }
                out
            }

            /// Q8_0 weight row `j` against activation rows `first..first + R`,
            /// a block per step (the dot takes an unsigned operand: `|w|`
            /// times `y` with `w`'s sign).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q8_0<const R: usize>(w: &Blocks, j: usize, x: &Q8Rows, first: usize) -> [f32; R] {
                let (k, blocks) = (x.k, x.blocks);
                let sc = w.scales.as_ptr().add(j * blocks);
                let qw = w.quants.as_ptr().add(j * blocks * 32);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in q8_0_pairs::<R>(w, j, x, first, &mut acc)..blocks {
                    let wv = _mm256_loadu_si256(qw.add(b * 32) as *const __m256i);
                    let aw = _mm256_sign_epi8(wv, wv);
                    let dw = f16(*sc.add(b));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let row = first + r;
                        let y = _mm256_loadu_si256(x.q.as_ptr().add(row * k + b * 32) as *const __m256i);
                        let dot = dot(_mm256_setzero_si256(), aw, _mm256_sign_epi8(y, wv));
                        let scale = _mm256_set1_ps(dw * *x.d.as_ptr().add(row * blocks + b));
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
                    }
                }
                hsums(acc)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
quant_kernels!(
    quant_avx2,
    "avx2,fma,f16c",
    /// `maddubs` to i16 pairs (no overflow: |u| ≤ 128, |s| ≤ 127), then `madd` to i32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    },
    /// No 512-bit steps: every block goes through the 256-bit loop.
    #[inline(always)]
    fn q4_1_quads<const W: usize, const R: usize>(
        _: &Blocks,
        _: usize,
        _: &Q8Rows,
        _: usize,
        _: &mut [[__m256; R]; W],
    ) -> usize {
        0
    },
    /// As above.
    #[inline(always)]
    fn q8_0_pairs<const R: usize>(_: &Blocks, _: usize, _: &Q8Rows, _: usize, _: &mut [__m256; R]) -> usize {
        0
    }
);

#[cfg(target_arch = "x86_64")]
quant_kernels!(
    quant_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni",
    /// One `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    },
    /// Q4_1 blocks four at a time in 512-bit registers (64 bytes of nibbles;
    /// the activations' groups of four, see `Q8Rows::q`): lanes 4i..4i+4 of
    /// the sums belong to block i. Weight rows `j..j + W` at once: the
    /// activations and their scales are loaded once for all (`W = 2` at
    /// batch 8: a decoding run of SmolLM2-135M Q4_1 at one thread took 12%
    /// fewer cycles). Returns the blocks done; the sums are folded into `acc`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `r` indexes the `W` accumulator arrays and the activations
    unsafe fn q4_1_quads<const W: usize, const R: usize>(
        w: &Blocks,
        j: usize,
        x: &Q8Rows,
        first: usize,
        acc: &mut [[__m256; R]; W],
    ) -> usize {
        let (k, blocks) = (x.k, x.blocks);
        let quads = blocks / 4 * 4;
        let (sc, mn) = (w.scales.as_ptr().add(j * blocks), w.mins.as_ptr().add(j * blocks));
        let qw = w.quants.as_ptr().add(j * blocks * 16);
        let nibble = _mm512_set1_epi8(0x0F);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let four = |p: *const u16| {
            _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i))))
        };
        let mut wide = [[_mm512_setzero_ps(); R]; W];
        let mut b = 0;
        while b < quads {
            let (mut lo, mut hi) = ([_mm512_setzero_si512(); W], [_mm512_setzero_si512(); W]);
            let (mut dw, mut mw) = ([_mm512_setzero_ps(); W], [_mm512_setzero_ps(); W]);
            for v in 0..W {
                let packed = _mm512_loadu_si512(qw.add(v * blocks * 16 + b * 16) as *const _);
                lo[v] = _mm512_and_si512(packed, nibble);
                hi[v] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
                dw[v] = four(sc.add(v * blocks + b));
                mw[v] = four(mn.add(v * blocks + b));
            }
            for r in 0..R {
                let row = first + r;
                let y = x.q.as_ptr().add(row * k + b * 32);
                let ylo = _mm512_loadu_si512(y as *const _);
                let yhi = _mm512_loadu_si512(y.add(64) as *const _);
                let at = row * blocks * 4 + b * 4;
                let (d4, s4) = (_mm512_loadu_ps(x.d4.as_ptr().add(at)), _mm512_loadu_ps(x.s4.as_ptr().add(at)));
                for v in 0..W {
                    let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[v], ylo), hi[v], yhi);
                    wide[v][r] = _mm512_fmadd_ps(_mm512_mul_ps(dw[v], d4), _mm512_cvtepi32_ps(dot), wide[v][r]);
                    wide[v][r] = _mm512_fmadd_ps(mw[v], s4, wide[v][r]);
                }
            }
            b += 4;
        }
        for (acc, wide) in acc.iter_mut().zip(wide) {
            super::avx::add_halves(acc, wide);
        }
        quads
    },
    /// Q8_0 blocks two at a time in 512-bit registers: `|w|` times `y` with
    /// `w`'s sign (negated under a mask, 512-bit has no `vpsignb`); lanes
    /// 0..8 of the sums belong to the first block, 8..16 to the second.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn q8_0_pairs<const R: usize>(
        w: &Blocks,
        j: usize,
        x: &Q8Rows,
        first: usize,
        acc: &mut [__m256; R],
    ) -> usize {
        let (k, blocks) = (x.k, x.blocks);
        let pairs = blocks / 2 * 2;
        let sc = w.scales.as_ptr().add(j * blocks);
        let qw = w.quants.as_ptr().add(j * blocks * 32);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut wide = [_mm512_setzero_ps(); R];
        let mut b = 0;
        while b < pairs {
            let wv = _mm512_loadu_si512(qw.add(b * 32) as *const _);
            let negative = _mm512_movepi8_mask(wv);
            let aw = _mm512_abs_epi8(wv);
            let two = _mm_cvtph_ps(_mm_cvtsi32_si128((sc.add(b) as *const i32).read_unaligned()));
            let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(two));
            for (r, wide) in wide.iter_mut().enumerate() {
                let row = first + r;
                let y = _mm512_loadu_si512(x.q.as_ptr().add(row * k + b * 32) as *const _);
                let sy = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sy);
                let dy = _mm_castpd_ps(_mm_load_sd(x.d.as_ptr().add(row * blocks + b) as *const f64));
                let scale = _mm512_mul_ps(dw, _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dy)));
                *wide = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *wide);
            }
            b += 2;
        }
        super::avx::add_halves(acc, wide);
        pairs
    }
);
