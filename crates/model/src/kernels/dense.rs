//! [`f32_rows`]: a few activation rows times an f32 weight `(n, k)`; with
//! AVX-512VL eight activation rows at a time meet two weight rows, in `k`-blocks
//! that keep the activations in L1.

use super::*;

/// `x (m, k) @ w (n, k)^T` for row-major f32 slices.
pub fn f32_rows(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let simd = has_avx2_fma() && k.is_multiple_of(8);
    let tiles = simd && m >= 8 && has_avx512vl();
    by_weight_chunks(m, n, |j0, out| {
        let rows = out.len() / m;
        let mut first = 0;
        #[cfg(target_arch = "x86_64")]
        if tiles {
            // Eight activation rows at a time against two weight rows.
            let wc = &w[j0 * k..(j0 + rows) * k];
            while first + 8 <= m {
                // SAFETY: the CPU has AVX2, FMA, F16C, AVX-512F and VL (checked above); k % 8 == 0.
                unsafe { avx::f32_tiles_2x8(wc, &x[first * k..(first + 8) * k], k, &mut out[first..], m) };
                first += 8;
            }
        }
        for (r, out) in out.chunks_mut(m).enumerate() {
            let wj = &w[(j0 + r) * k..(j0 + r + 1) * k];
            let mut i = first;
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
        }
    })
}
