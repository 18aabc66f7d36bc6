//! Activations quantised to 8 bits per 32-block as ggml's reference quantiser
//! does, laid out for the kernels of one weight format (portable, AVX2 and
//! AVX-512 quantisers that give the same values).

use super::*;

/// Activations quantised to 8 bits per 32-block as ggml's reference
/// quantiser does (halves round away from zero): `q = round(x / d)`, `d = max|x| / 127`, laid out
/// for the kernels of one weight format.
pub(super) struct Q8Rows {
    /// `(m, k)`. For Q4_1 (and Q4_K's groups) the halves of blocks are reordered to match the
    /// weights' low and high nibbles (`lo` = values 0..16 of a block, `hi` =
    /// 16..32): each group of four blocks as `[lo₀ lo₁ lo₂ lo₃ hi₀ hi₁ hi₂
    /// hi₃]`, then a remaining pair as `[lo₀ lo₁ hi₀ hi₁]`, then a last
    /// block as is; [`q4_1_halves`] says where each half is.
    pub(super) q: Vec<i8>,
    /// `(m, blocks)`: the block scales.
    pub(super) d: Vec<f32>,
    /// `(m, 4 · blocks)`: each scale four times, one per i32 lane that a
    /// 32-byte dot product leaves for a block's 16 bytes.
    pub(super) d4: Vec<f32>,
    /// `(m, blocks)`: `d · Σq`, for Q4_1's minimum.
    pub(super) s: Vec<f32>,
    /// `(m, 4 · blocks)`: each `s / 4` four times, to add Q4_1's minimum
    /// term lane by lane alongside the scaled dot products.
    pub(super) s4: Vec<f32>,
    pub(super) k: usize,
    pub(super) blocks: usize,
}

pub(super) fn quantize_rows(x: &[f32], m: usize, k: usize, format: BlockFormat) -> Q8Rows {
    let blocks = k / 32;
    let Natural8 { mut q, d, sum } = quantize_natural(x, m, k);
    let s = scaled_sums(&d, &sum);
    // Q4_K's groups are packed as Q4_1's blocks are.
    if matches!(format, BlockFormat::Q4_1 | BlockFormat::Q4K) {
        let natural = q.clone();
        for (row, src) in q.chunks_mut(k).zip(natural.chunks(k)) {
            for b in 0..blocks {
                let (lo, hi) = q4_1_halves(b, blocks);
                row[lo..lo + 16].copy_from_slice(&src[b * 32..b * 32 + 16]);
                row[hi..hi + 16].copy_from_slice(&src[b * 32 + 16..b * 32 + 32]);
            }
        }
    }
    let d4 = d.iter().flat_map(|&v| [v; 4]).collect();
    let s4 = s.iter().flat_map(|&v| [v / 4.0; 4]).collect();
    Q8Rows { q, d, d4, s, s4, k, blocks }
}

/// Activations quantised per 32-block in natural order (see [`quantize_blocks`]).
pub(super) struct Natural8 {
    /// `(m, k)`.
    pub(super) q: Vec<i8>,
    /// `(m, blocks)`: the block scales.
    pub(super) d: Vec<f32>,
    /// `(m, blocks)`: each block's `Σq`.
    pub(super) sum: Vec<i32>,
}

pub(super) fn quantize_natural(x: &[f32], m: usize, k: usize) -> Natural8 {
    let blocks = k / 32;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * blocks];
    let mut sum = vec![0i32; m * blocks];
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        unsafe { quantize_blocks_avx512(x, &mut q, &mut d, &mut sum) };
    } else if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (and so SSE4.1's rounding instruction).
        unsafe { quantize_blocks_avx2(x, &mut q, &mut d, &mut sum) };
    } else {
        quantize_blocks(x, &mut q, &mut d, &mut sum);
    }
    #[cfg(not(target_arch = "x86_64"))]
    quantize_blocks(x, &mut q, &mut d, &mut sum);
    Natural8 { q, d, sum }
}

/// `d · Σq` per block: the activations' share of Q4_1's minimum term.
pub(super) fn scaled_sums(d: &[f32], sum: &[i32]) -> Vec<f32> {
    d.iter().zip(sum).map(|(&d, &sum)| d * sum as f32).collect()
}

/// Where block `b` of a row of `blocks` Q4_1-ordered activations keeps its
/// values 0..16 and 16..32 (offsets in the row; see [`Q8Rows::q`]).
pub(super) fn q4_1_halves(b: usize, blocks: usize) -> (usize, usize) {
    let quads = blocks / 4 * 4;
    if b < quads {
        let (group, i) = (b / 4 * 128, b % 4 * 16);
        (group + i, group + 64 + i)
    } else if b < blocks / 2 * 2 {
        let (pair, i) = (b / 2 * 64, b % 2 * 16);
        (pair + i, pair + 32 + i)
    } else {
        (b * 32, b * 32 + 16)
    }
}

/// Quantises each 32-block of `x` into `q`, with its scale in `d` and `Σq` in `sum`.
#[inline(always)]
pub(super) fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    for (b, (xs, qs)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in qs.iter_mut().zip(xs) {
            *o = (v * inv).round() as i8;
            sum += *o as i32;
        }
        d[b] = scale;
        sums[b] = sum;
    }
}

/// [`quantize_blocks`] with AVX2: the same values (multiplied by the same
/// inverse scale, halves rounded away from zero), without a call to `roundf`
/// per value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    // packs interleave the 128-bit lanes; this puts the 4-byte runs back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..x.len() / 32 {
        let p = x.as_ptr().add(b * 32);
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let abs = |v: __m256| _mm256_andnot_ps(sign, v);
        let a = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
        let a = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
        let a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        let amax = _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        // round(y) = trunc(y ± (0.5 − ulp/2)): exact for every f32, ties away from zero.
        let round = |v: __m256| {
            let y = _mm256_mul_ps(v, inv);
            let half = _mm256_or_ps(_mm256_and_ps(y, sign), _mm256_set1_ps(0.49999997));
            _mm256_cvttps_epi32(_mm256_add_ps(y, half))
        };
        let i = [round(v[0]), round(v[1]), round(v[2]), round(v[3])];
        let total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let t = _mm_add_epi32(_mm256_extracti128_si256(total, 1), _mm256_castsi256_si128(total));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_storeu_si256(q.as_mut_ptr().add(b * 32) as *mut __m256i, _mm256_permutevar8x32_epi32(packed, order));
        d[b] = scale;
        sums[b] = sum;
    }
}

/// [`quantize_blocks`] with AVX-512F: a block in two registers, sixteen
/// blocks' maxima and sums each from one transposing reduction (one block
/// at a time, the reductions' latency made it 2.9% of a batch-8 decoding
/// step; now 1.5%).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_blocks_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let (sign, below_half) = (_mm512_set1_epi32(i32::MIN), _mm512_castps_si512(_mm512_set1_ps(0.49999997)));
    // round(y) = trunc(y ± (0.5 − ulp/2)): exact for every f32, ties away from zero.
    let round = |v: __m512, inv: __m512| {
        let y = _mm512_mul_ps(v, inv);
        let half = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(y), sign), below_half);
        _mm512_cvttps_epi32(_mm512_add_ps(y, _mm512_castsi512_ps(half)))
    };
    let blocks = x.len() / 32;
    // Sixteen blocks at a time: their maxima and sums come out of one
    // transposing reduction each, with the scales divided as one vector.
    for g in 0..blocks / 16 {
        let (x, q) = (x.as_ptr().add(g * 512), q.as_mut_ptr().add(g * 512) as *mut __m128i);
        let amax: [__m512; 16] = std::array::from_fn(|b| {
            _mm512_max_ps(
                _mm512_abs_ps(_mm512_loadu_ps(x.add(32 * b))),
                _mm512_abs_ps(_mm512_loadu_ps(x.add(32 * b + 16))),
            )
        });
        let scale = _mm512_div_ps(avx512::lane_reduce(amax, |a, b| _mm512_max_ps(a, b)), _mm512_set1_ps(127.0));
        let inv = _mm512_maskz_div_ps(
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(scale, _mm512_setzero_ps()),
            _mm512_set1_ps(1.0),
            scale,
        );
        _mm512_storeu_ps(d.as_mut_ptr().add(g * 16), scale);
        let mut invs = [0f32; 16];
        _mm512_storeu_ps(invs.as_mut_ptr(), inv);
        let block_sums: [__m512; 16] = std::array::from_fn(|b| {
            let inv = _mm512_set1_ps(invs[b]);
            let (lo, hi) =
                (round(_mm512_loadu_ps(x.add(32 * b)), inv), round(_mm512_loadu_ps(x.add(32 * b + 16)), inv));
            _mm_storeu_si128(q.add(2 * b), _mm512_cvtepi32_epi8(lo));
            _mm_storeu_si128(q.add(2 * b + 1), _mm512_cvtepi32_epi8(hi));
            _mm512_castsi512_ps(_mm512_add_epi32(lo, hi))
        });
        let add = |a: __m512, b: __m512| {
            _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)))
        };
        _mm512_storeu_si512(
            sums.as_mut_ptr().add(g * 16) as *mut _,
            _mm512_castps_si512(avx512::lane_reduce(block_sums, add)),
        );
    }
    for b in blocks / 16 * 16..blocks {
        let p = x.as_ptr().add(b * 32);
        let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let (lo, hi) = (round(v[0], inv), round(v[1], inv));
        let out = q.as_mut_ptr().add(32 * b) as *mut __m128i;
        _mm_storeu_si128(out, _mm512_cvtepi32_epi8(lo));
        _mm_storeu_si128(out.add(1), _mm512_cvtepi32_epi8(hi));
        d[b] = scale;
        sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi));
    }
}
