//! AVX2/FMA helpers: horizontal sums, f32 dot products and the weighted sums
//! of value rows that decoding attention uses.

use std::arch::x86_64::*;

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

/// `out += Σ_j p_j · row(j)` for rows of a multiple of 64 values: 64
/// lanes of `out` stay in registers while the rows stream by.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn weighted_rows_64(p: &[f32], v: &super::HeadRows<'_>, head: super::Head, out: &mut [f32]) {
    for c in (0..out.len()).step_by(64) {
        let po = out.as_mut_ptr().add(c);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (u, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(po.add(8 * u));
        }
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                let (w, pr) = (_mm256_set1_ps(pj), v.row(head.b, head.h, j, head.d).as_ptr().add(c));
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(pr.add(8 * u)), *a);
                }
            }
        }
        for (u, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(po.add(8 * u), *a);
        }
    }
}

/// How far ahead of its dot products [`dot_f32_rows`] asks for weight
/// values (8 KB): with `R` activation rows of 1,536 values (48 KB, all
/// of L1) the hardware prefetcher alone streamed the weights at 11 GB/s
/// instead of 27 (`R = 8`: 44 → 71 GFLOP/s at one thread; no change at
/// `k = 576`).
const PREFETCH_F32: usize = 2048;

/// Dot products of one f32 row with `R` consecutive rows of `x`
/// (`R * k` values), `k` a multiple of 8: the weight vector is loaded
/// once for `R` FMAs. The weight row is read as part of a stream over
/// consecutive rows: values past its end are prefetched.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32_rows<const R: usize>(w: &[f32], x: &[f32], k: usize) -> [f32; R] {
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    let mut c = 0;
    while c + 16 <= k {
        // A prefetch never faults: the address may lie past the weights.
        _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(c + PREFETCH_F32) as *const i8);
        for h in [c, c + 8] {
            let wv = _mm256_loadu_ps(pw.add(h));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(r * k + h)), *acc);
            }
        }
        c += 16;
    }
    while c + 8 <= k {
        let wv = _mm256_loadu_ps(pw.add(c));
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(r * k + c)), *acc);
        }
        c += 8;
    }
    hsums(acc)
}

/// Activation values per block of [`f32_tiles_2x8`]: eight rows of up to
/// 1,024 values (32 KB) stay in L1 while the weight rows stream by.
const F32_BLOCK: usize = 1024;

/// `out[j · stride + a] += w_j · x_a` for every weight row `j` of `w`
/// (`rows × k`) and the eight activation rows `a` of `x` (`8 × k`), `k`
/// a multiple of 8; `out` starts at zero. Two weight rows at a time (16
/// accumulators: AVX-512VL's 32 registers), so that each activation
/// load feeds two FMAs; `k` in equal blocks of at most [`F32_BLOCK`]
/// values, and the next pair's weights prefetched. Measured at one
/// thread for 8 rows, from DRAM, against [`dot_f32_rows`]: k = 576:
/// 109 → 127 GFLOP/s, 1536: 70 → 108, 4864: 76 → 87.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn f32_tiles_2x8(w: &[f32], x: &[f32], k: usize, out: &mut [f32], stride: usize) {
    let rows = w.len() / k;
    let blocks = k.div_ceil(F32_BLOCK);
    let kb = k.div_ceil(blocks).next_multiple_of(16);
    let ahead = (2 * k).max(PREFETCH_F32);
    let px = x.as_ptr();
    for c0 in (0..k).step_by(kb) {
        let c1 = (c0 + kb).min(k);
        for j in (0..rows).step_by(2) {
            let pw0 = w.as_ptr().add(j * k);
            // An odd last row is computed twice and stored once.
            let pw1 = if j + 1 < rows { pw0.add(k) } else { pw0 };
            let mut a0 = [_mm256_setzero_ps(); 8];
            let mut a1 = [_mm256_setzero_ps(); 8];
            let mut step = |c: usize| {
                let (w0, w1) = (_mm256_loadu_ps(pw0.add(c)), _mm256_loadu_ps(pw1.add(c)));
                for a in 0..8 {
                    let xv = _mm256_loadu_ps(px.add(a * k + c));
                    a0[a] = _mm256_fmadd_ps(w0, xv, a0[a]);
                    a1[a] = _mm256_fmadd_ps(w1, xv, a1[a]);
                }
            };
            let mut c = c0;
            while c + 16 <= c1 {
                // A prefetch never faults: the address may lie past the weights.
                _mm_prefetch::<_MM_HINT_T0>(pw0.wrapping_add(c + ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(pw1.wrapping_add(c + ahead) as *const i8);
                step(c);
                step(c + 8);
                c += 16;
            }
            if c < c1 {
                step(c); // k % 16 == 8: the last block ends with 8 values
            }
            for (row, acc) in [(j, a0), (j + 1, a1)] {
                if row < rows {
                    let o = &mut out[row * stride..row * stride + 8];
                    for (o, v) in o.iter_mut().zip(hsums(acc)) {
                        *o += v;
                    }
                }
            }
        }
    }
}

/// Adds both 256-bit halves of each of `wide` to `acc`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq")]
#[inline]
pub unsafe fn add_halves<const R: usize>(acc: &mut [__m256; R], wide: [__m512; R]) {
    for (a, v) in acc.iter_mut().zip(wide) {
        let halves = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
        *a = _mm256_add_ps(*a, halves);
    }
}

/// The lane sums of `R` vectors; for eight, one transposing reduction
/// instead of eight.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn hsums<const R: usize>(v: [__m256; R]) -> [f32; R] {
    let mut out = [0f32; R];
    if R == 8 {
        let h = |a: __m256, b: __m256| _mm256_hadd_ps(a, b);
        // Per 128-bit lane: [s0 s1 s2 s3] partial sums, likewise s4..s8.
        let (a, b) = (h(h(v[0], v[1]), h(v[2], v[3])), h(h(v[4], v[5]), h(v[6], v[7])));
        let (lo, hi) = (_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi));
    } else {
        for (o, v) in out.iter_mut().zip(v) {
            *o = hsum(v);
        }
    }
    out
}
