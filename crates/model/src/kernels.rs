//! CPU kernels for the shapes that decoding produces: a few activation rows
//! (`m` ≤ 16) against a large row-major weight. candle's matmul repacks the
//! whole weight on every such call, and its quantised matmul has no SIMD
//! path for Q4_1; these kernels stream each weight row once, dot it with
//! every activation row while it is in L1, and split the weight rows over
//! the rayon pool.
//!
//! - [`f32_rows`]: f32 weights `(n, k)`.
//! - [`QuantWeight`]: Q4_1 and Q8_0 GGUF blocks, multiplied after quantising
//!   the activations to 8 bits per 32-block (as ggml does).
//!
//! AVX2+FMA+F16C is used when the CPU has it (checked at run time); otherwise a
//! portable loop computes the same sums.

use rayon::prelude::*;

/// Weight rows per parallel task: a few tasks per thread, so that work
/// balances without paying the pool's dispatch cost hundreds of times per
/// token.
fn rows_per_task(n: usize) -> usize {
    let tasks = rayon::current_num_threads() * 4;
    n.div_ceil(tasks).next_multiple_of(16).max(16)
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `row(j, out_j)` for every weight row `j < n`, where `out_j` is the
/// `m` results of row `j`, in parallel, and returns the `(m, n)` product.
fn by_weight_rows(m: usize, n: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per_task = rows_per_task(n);
    let mut tmp = vec![0f32; n * m]; // (n, m)
    tmp.par_chunks_mut(per_task * m).enumerate().for_each(|(c, chunk)| {
        for (r, out) in chunk.chunks_mut(m).enumerate() {
            row(c * per_task + r, out);
        }
    });
    if m == 1 {
        return tmp;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = tmp[j * m + i];
        }
    }
    out
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor (no copy);
/// `None` for other devices, dtypes or layouts.
pub(crate) fn with_cpu_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.is_contiguous() || t.dtype() != candle_core::DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>().ok()?;
            Some(f(&all[layout.start_offset()..layout.start_offset() + t.elem_count()]))
        }
        _ => None,
    }
}

/// Attention probabilities in one pass per row: `softmax(scale · scores + mask)`.
///
/// `scores` holds `batches` blocks of `rows` rows of length `s`; row `r` of
/// block `b` adds mask row `b · t + r mod t` (`mask` is `(batches, t, s)`:
/// the grouped query heads stacked as `G·T` rows share the mask).
pub fn masked_softmax(
    scores: &[f32],
    mask: Option<&[f32]>,
    batches: usize,
    t: usize,
    s: usize,
    scale: f32,
) -> Vec<f32> {
    let rows = scores.len() / s.max(1) / batches.max(1);
    by_rows(scores.len(), s, |r, o| {
        let x = &scores[r * s..(r + 1) * s];
        let m = mask.map(|m| {
            let (b, q) = (r / rows, (r % rows) % t);
            &m[(b * t + q) * s..(b * t + q + 1) * s]
        });
        let mut max = f32::NEG_INFINITY;
        for j in 0..s {
            let v = x[j] * scale + m.map_or(0.0, |m| m[j]);
            o[j] = v;
            max = max.max(v);
        }
        for v in o.iter_mut() {
            *v = (*v - max).exp();
        }
        // Summed and divided as candle's softmax does, so that inference
        // gives the very same probabilities as before this kernel.
        let mut sum = 0f32;
        // SAFETY: `o` holds `s` initialised f32 values.
        unsafe { <f32 as candle_core::cpu::kernels::VecOps>::vec_reduce_sum(o.as_ptr(), &mut sum, s) };
        for v in o.iter_mut() {
            *v /= sum;
        }
    })
}

/// The softmax backward per row of length `s`: `P ⊙ (dP − Σ_j P_j dP_j)`.
pub fn softmax_backward(p: &[f32], dp: &[f32], s: usize) -> Vec<f32> {
    by_rows(p.len(), s, |r, o| {
        let (p, dp) = (&p[r * s..(r + 1) * s], &dp[r * s..(r + 1) * s]);
        let dot: f32 = p.iter().zip(dp).map(|(a, b)| a * b).sum();
        for j in 0..s {
            o[j] = p[j] * (dp[j] - dot);
        }
    })
}

/// A `len`-element output of rows of length `s`, row `r` written by
/// `row(r, out_r)`, 64 rows per parallel task.
fn by_rows(len: usize, s: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    const ROWS_PER_TASK: usize = 64;
    let mut out = vec![0f32; len];
    out.par_chunks_mut(s * ROWS_PER_TASK).enumerate().for_each(|(c, chunk)| {
        for (i, o) in chunk.chunks_mut(s).enumerate() {
            row(c * ROWS_PER_TASK + i, o);
        }
    });
    out
}

/// `x (m, k) @ w (n, k)^T` for row-major f32 slices.
pub fn f32_rows(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let simd = has_avx2_fma() && k % 8 == 0;
    by_weight_rows(m, n, |j, out| {
        let wj = &w[j * k..(j + 1) * k];
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // Eight, then four activation rows per pass: the weight row is
            // loaded once for eight (four) FMAs, and streamed from memory once.
            while i + 8 <= m {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above); k % 8 == 0.
                let r = unsafe { avx::dot_f32_rows::<8>(wj, &x[i * k..(i + 8) * k], k) };
                out[i..i + 8].copy_from_slice(&r);
                i += 8;
            }
            while i + 4 <= m {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above); k % 8 == 0.
                let r = unsafe { avx::dot_f32_rows::<4>(wj, &x[i * k..(i + 4) * k], k) };
                out[i..i + 4].copy_from_slice(&r);
                i += 4;
            }
            while i < m {
                // SAFETY: as above.
                out[i] = unsafe { avx::dot_f32(wj, &x[i * k..(i + 1) * k]) };
                i += 1;
            }
        }
        for (o, xi) in out[i..].iter_mut().zip(x[i * k..].chunks(k)) {
            *o = wj.iter().zip(xi).map(|(a, b)| a * b).sum();
        }
    })
}

/// Activations quantised to 8 bits per 32-block: `q = round(x / d)`, `d =
/// max|x| / 127`, and `s = d * sum(q)` (for Q4_1's offsets).
struct Q8Rows {
    q: Vec<i8>,  // (m, k)
    d: Vec<f32>, // (m, k / 32)
    s: Vec<f32>, // (m, k / 32)
}

fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8Rows {
    let blocks = k / 32;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * blocks];
    let mut s = vec![0f32; m * blocks];
    for b in 0..m * blocks {
        let xs = &x[b * 32..(b + 1) * 32];
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in q[b * 32..(b + 1) * 32].iter_mut().zip(xs) {
            *o = (v * inv).round() as i8;
            sum += *o as i32;
        }
        d[b] = scale;
        s[b] = scale * sum as f32;
    }
    Q8Rows { q, d, s }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// A GGUF-quantised weight `(n, k)` in one of the block formats these
/// kernels multiply.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    format: BlockFormat,
    data: std::sync::Arc<Vec<u8>>,
    n: usize,
    k: usize,
}

/// The block formats with kernels here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 weights: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `w = d q + m`.
    Q4_1,
    /// 32 weights: f16 scale `d`, 32 signed bytes; `w = d q`.
    Q8_0,
}

impl BlockFormat {
    fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }
}

impl QuantWeight {
    /// Wraps raw GGUF blocks of an `(n, k)` weight. `None` when the sizes do
    /// not fit the format.
    pub fn new(format: BlockFormat, data: Vec<u8>, n: usize, k: usize) -> Option<QuantWeight> {
        (k % 32 == 0 && data.len() == n * (k / 32) * format.block_bytes()).then(|| QuantWeight {
            format,
            data: std::sync::Arc::new(data),
            n,
            k,
        })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Stacks weights with the same format and input size along the output
    /// dimension (to run several projections as one product).
    pub fn concat(parts: &[&QuantWeight]) -> Option<QuantWeight> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.k != first.k) {
            return None;
        }
        let data: Vec<u8> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        QuantWeight::new(first.format, data, parts.iter().map(|p| p.n).sum(), first.k)
    }

    /// `x (m, k) @ w^T`, with `x` quantised to 8 bits per block.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let xq = quantize_rows(x, m, k);
        let blocks = k / 32;
        let bb = self.format.block_bytes();
        let row_bytes = blocks * bb;
        let simd = has_avx2_fma();
        let format = self.format;
        by_weight_rows(m, n, |j, out| {
            let wj = &self.data[j * row_bytes..(j + 1) * row_bytes];
            let mut first = 0;
            #[cfg(target_arch = "x86_64")]
            if simd && format == BlockFormat::Q4_1 {
                // Four activation rows per pass: each weight block is unpacked once.
                while first + 4 <= m {
                    let (q, d, s) = (&xq.q[first * k..], &xq.d[first * blocks..], &xq.s[first * blocks..]);
                    // SAFETY: the CPU has AVX2, FMA and F16C; the slices hold four rows of `blocks` blocks.
                    let r = unsafe { avx::dot_q4_1_x4(wj, q, d, s, blocks) };
                    out[first..first + 4].copy_from_slice(&r);
                    first += 4;
                }
            }
            for (i, o) in out.iter_mut().enumerate().skip(first) {
                let q = &xq.q[i * k..(i + 1) * k];
                let d = &xq.d[i * blocks..(i + 1) * blocks];
                let s = &xq.s[i * blocks..(i + 1) * blocks];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: the CPU has AVX2, FMA and F16C; slices hold `blocks` whole blocks.
                    *o = unsafe {
                        match format {
                            BlockFormat::Q4_1 => avx::dot_q4_1(wj, q, d, s, blocks),
                            BlockFormat::Q8_0 => avx::dot_q8_0(wj, q, d, blocks),
                        }
                    };
                    continue;
                }
                let _ = simd;
                *o = dot_scalar(format, wj, q, d, s, blocks);
            }
        })
    }
}

fn dot_scalar(format: BlockFormat, w: &[u8], q: &[i8], d: &[f32], s: &[f32], blocks: usize) -> f32 {
    let mut sum = 0f32;
    for b in 0..blocks {
        let qy = &q[b * 32..(b + 1) * 32];
        match format {
            BlockFormat::Q4_1 => {
                let blk = &w[b * 20..(b + 1) * 20];
                let (dw, mw) = (f16_at(blk, 0), f16_at(blk, 2));
                let mut acc = 0i32;
                for j in 0..16 {
                    acc += (blk[4 + j] & 0x0F) as i32 * qy[j] as i32 + (blk[4 + j] >> 4) as i32 * qy[j + 16] as i32;
                }
                sum += dw * d[b] * acc as f32 + mw * s[b];
            }
            BlockFormat::Q8_0 => {
                let blk = &w[b * 34..(b + 1) * 34];
                let dw = f16_at(blk, 0);
                let acc: i32 = (0..32).map(|j| blk[2 + j] as i8 as i32 * qy[j] as i32).sum();
                sum += dw * d[b] * acc as f32;
            }
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// An f16 at `p` as f32, with the F16C instruction.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(x: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(x, 1);
        let s = _mm_add_ps(hi, _mm256_castps256_ps128(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Dot product of two f32 slices whose length is a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * u)), _mm256_loadu_ps(pb.add(i + 8 * u)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// Dot products of one f32 row with `R` consecutive rows of `x`
    /// (`R * k` values), `k` a multiple of 8: the weight vector is loaded
    /// once for `R` FMAs.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32_rows<const R: usize>(w: &[f32], x: &[f32], k: usize) -> [f32; R] {
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c + 8 <= k {
            let wv = _mm256_loadu_ps(pw.add(c));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(r * k + c)), *acc);
            }
            c += 8;
        }
        let mut out = [0f32; R];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
        out
    }

    /// Sum of `u8 * i8` products of 32 lanes, as 8 f32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
    }

    /// One Q4_1 block (20 bytes at `blk`) against 32 activations: the
    /// integer dot product as 8 f32 lanes, and the block's scale and minimum.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_block(blk: *const u8, qy: *const i8) -> (__m256, f32, f32) {
        // Nibbles: bytes 0..16 hold weights 0..16 (low) and 16..32 (high).
        let packed = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let both = _mm256_insertf128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1);
        let qw = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
        let y = _mm256_loadu_si256(qy as *const __m256i);
        (mul_sum_us8(qw, y), f16(blk), f16(blk.add(2)))
    }

    /// Q4_1 weight blocks (20 bytes) against 8-bit activations. Two blocks
    /// per step into two accumulators, so that consecutive FMAs do not wait
    /// on each other.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(w: &[u8], q: &[i8], d: &[f32], s: &[f32], blocks: usize) -> f32 {
        let (wp, qp, dp, sp) = (w.as_ptr(), q.as_ptr(), d.as_ptr(), s.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut offsets = 0f32;
        let mut b = 0;
        while b + 2 <= blocks {
            let (xy0, d0, m0) = q4_1_block(wp.add(b * 20), qp.add(b * 32));
            let (xy1, d1, m1) = q4_1_block(wp.add((b + 1) * 20), qp.add((b + 1) * 32));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * *dp.add(b)), xy0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * *dp.add(b + 1)), xy1, acc1);
            offsets += m0 * *sp.add(b) + m1 * *sp.add(b + 1);
            b += 2;
        }
        if b < blocks {
            let (xy, d0, m0) = q4_1_block(wp.add(b * 20), qp.add(b * 32));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * *dp.add(b)), xy, acc0);
            offsets += m0 * *sp.add(b);
        }
        hsum(_mm256_add_ps(acc0, acc1)) + offsets
    }

    /// Q4_1 weight blocks against four consecutive activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1_x4(w: &[u8], q: &[i8], d: &[f32], s: &[f32], blocks: usize) -> [f32; 4] {
        let (wp, qp, dp, sp) = (w.as_ptr(), q.as_ptr(), d.as_ptr(), s.as_ptr());
        let k = blocks * 32;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut offsets = [0f32; 4];
        for b in 0..blocks {
            let blk = wp.add(b * 20);
            let packed = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let both = _mm256_insertf128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1);
            let qw = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
            let (dw, mw) = (f16(blk), f16(blk.add(2)));
            for r in 0..4 {
                let y = _mm256_loadu_si256(qp.add(r * k + b * 32) as *const __m256i);
                let i = r * blocks + b;
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * *dp.add(i)), mul_sum_us8(qw, y), acc[r]);
                offsets[r] += mw * *sp.add(i);
            }
        }
        [hsum(acc[0]) + offsets[0], hsum(acc[1]) + offsets[1], hsum(acc[2]) + offsets[2], hsum(acc[3]) + offsets[3]]
    }

    /// Q8_0 weight blocks (34 bytes) against 8-bit activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(w: &[u8], q: &[i8], d: &[f32], blocks: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, &db) in d.iter().enumerate().take(blocks) {
            let blk = w.as_ptr().add(b * 34);
            let dw = f16(blk);
            let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let qy = _mm256_loadu_si256(q.as_ptr().add(b * 32) as *const __m256i);
            // maddubs needs an unsigned operand: |w| times y with w's sign.
            let ax = _mm256_sign_epi8(qw, qw);
            let sy = _mm256_sign_epi8(qy, qw);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * db), mul_sum_us8(ax, sy), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
            }
        }
        out
    }

    #[test]
    fn f32_rows_matches_a_naive_product() {
        let (m, n, k) = (9, 37, 96);
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let got = f32_rows(&x, m, &w, n, k);
        let want = naive(&x, m, &w, n, k);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
    }

    /// Quantises `w` to Q4_1 or Q8_0 blocks the way ggml does, and returns
    /// the blocks with the dequantised weights they stand for.
    fn quantize(format: BlockFormat, w: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut deq = Vec::new();
        for blk in w.chunks(32) {
            match format {
                BlockFormat::Q4_1 => {
                    let (lo, hi) = blk.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                    let d = half::f16::from_f32((hi - lo) / 15.0);
                    let m = half::f16::from_f32(lo);
                    let (df, mf) = (d.to_f32(), m.to_f32());
                    let q: Vec<u8> = blk.iter().map(|v| (((v - mf) / df).round().clamp(0.0, 15.0)) as u8).collect();
                    bytes.extend_from_slice(&d.to_le_bytes());
                    bytes.extend_from_slice(&m.to_le_bytes());
                    bytes.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
                    deq.extend(q.iter().map(|&q| df * q as f32 + mf));
                }
                BlockFormat::Q8_0 => {
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = half::f16::from_f32(amax / 127.0);
                    let df = d.to_f32();
                    let q: Vec<i8> = blk.iter().map(|v| (v / df).round() as i8).collect();
                    bytes.extend_from_slice(&d.to_le_bytes());
                    bytes.extend(q.iter().map(|&q| q as u8));
                    deq.extend(q.iter().map(|&q| df * q as f32));
                }
            }
        }
        (bytes, deq)
    }

    #[test]
    fn quantized_kernels_match_the_dequantized_product() {
        let (m, n, k) = (6, 21, 128);
        let x = values(m * k, 3);
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (bytes, deq) = quantize(format, &values(n * k, 4));
            let qw = QuantWeight::new(format, bytes.clone(), n, k).unwrap();
            let got = qw.matmul(&x, m);
            let want = naive(&x, m, &deq, n, k);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                // Activations are rounded to 8 bits: a relative error of ~1%.
                assert!((g - w).abs() < 0.02 * scale, "{format:?}: {g} vs {w}");
            }
            // The portable loop and the SIMD path give the same sums.
            let xq = quantize_rows(&x, m, k);
            let portable = dot_scalar(
                format,
                &bytes[..(k / 32) * format.block_bytes()],
                &xq.q[..k],
                &xq.d[..k / 32],
                &xq.s[..k / 32],
                k / 32,
            );
            assert!((portable - got[0]).abs() < 1e-3 * scale.max(1.0), "{format:?}: {portable} vs {}", got[0]);
        }
        assert!(QuantWeight::new(BlockFormat::Q8_0, vec![0; 10], 1, 32).is_none());
    }
}
