//! The kernels against naive products and portable loops, on every instruction set the CPU has.

use super::*;

pub(super) fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

pub(super) fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_is_within_two_ulp_of_libm() {
    if !has_avx512f() {
        return;
    }
    let xs: Vec<f32> = (0..=20_000).map(|i| -103.0 + i as f32 * (103.0 + 88.0) / 20_000.0).collect();
    for x in xs.chunks(16) {
        let mut got = [0f32; 16];
        // SAFETY: AVX-512F checked above.
        unsafe {
            use std::arch::x86_64::*;
            let mut lanes = [0f32; 16];
            lanes[..x.len()].copy_from_slice(x);
            _mm512_storeu_ps(got.as_mut_ptr(), avx512::exp(_mm512_loadu_ps(lanes.as_ptr())));
        }
        for (&x, &g) in x.iter().zip(&got) {
            let want = x.exp();
            let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
            assert!(ulp <= 2 || (want < 1e-37 && (g - want).abs() < 1e-38), "exp({x}) = {g}, libm {want}");
        }
    }
    // SAFETY: AVX-512F checked above.
    let at = |x: f32| unsafe {
        use std::arch::x86_64::*;
        _mm512_reduce_max_ps(avx512::exp(_mm512_set1_ps(x)))
    };
    assert_eq!(at(f32::NEG_INFINITY), 0.0);
    assert_eq!(at(0.0), 1.0);
}

#[test]
fn masked_softmax_matches_the_portable_rows_and_masks_exactly() {
    // Two batches, t = 3 mask rows shared by 2 stacked heads (6 rows per
    // batch); row lengths that end in a partial 16-lane step.
    for s in [5, 37, 640] {
        let (batches, t, g) = (2, 3, 2);
        let scores: Vec<f32> = values(batches * g * t * s, s as u32).iter().map(|v| v * 30.0).collect();
        let mask: Vec<f32> =
            (0..batches * t * s).map(|i| if (i % s) > (i / s) % t + s / 2 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let got = masked_softmax(&scores, Some(&mask), batches, t, s, 0.125);
        for r in 0..batches * g * t {
            let (b, q) = (r / (g * t), (r % (g * t)) % t);
            let m = &mask[(b * t + q) * s..(b * t + q + 1) * s];
            let mut want = vec![0f32; s];
            softmax_row(&scores[r * s..(r + 1) * s], Some(m), 0.125, &mut want);
            let row = &got[r * s..(r + 1) * s];
            for j in 0..s {
                assert!((row[j] - want[j]).abs() <= 1e-6, "row {r} slot {j}: {} vs {}", row[j], want[j]);
                if m[j] == f32::NEG_INFINITY {
                    assert_eq!(row[j], 0.0);
                }
            }
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let dp = values(scores.len(), 7);
        let ds = softmax_backward(&got, &dp, s);
        for r in 0..batches * g * t {
            let (p, d) = (&got[r * s..(r + 1) * s], &dp[r * s..(r + 1) * s]);
            let dot: f32 = p.iter().zip(d).map(|(a, b)| a * b).sum();
            for j in 0..s {
                assert!((ds[r * s + j] - p[j] * (d[j] - dot)).abs() <= 1e-6);
            }
        }
    }
}

#[test]
fn f32_rows_matches_a_naive_product() {
    // 2×8 tiles (with an odd weight row per task), then 8-, 4- and 1-row
    // passes; k for the SIMD (96, 40: a last step of 8) and portable (12)
    // loops, and k = 1544 for the tiles' two k-blocks (the last ending in 8).
    for (m, n, k) in [(13, 37, 96), (13, 5, 40), (3, 4, 12), (16, 37, 1544), (8, 3, 40)] {
        let (x, w) = (values(m * k, 1), values(n * k, 2));
        let got = f32_rows(&x, m, &w, n, k);
        let want = naive(&x, m, &w, n, k);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "{m}x{n}x{k}: {g} vs {w}");
        }
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
            BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("K-quants are tested in kquants"),
        }
    }
    (bytes, deq)
}

#[test]
fn quantized_kernels_match_the_dequantized_product_on_every_instruction_set() {
    // 13 and 15 rows take the 8-, 4-, 2- and 1-row paths; k = 96 leaves an unpaired Q4_1 block,
    // k = 512 a multiple of eight blocks (the vector loop over Q4_1's minima). Where n is a
    // multiple of 16 VNNI takes the interleaved layout (one block to 48 per row).
    for (m, n, k) in [
        (13, 21, 96),
        (1, 7, 512),
        (5, 3, 32),
        (12, 40, 576),
        (8, 9, 1536),
        (15, 48, 576),
        (1, 32, 576),
        (8, 16, 1536),
        (3, 32, 896),
        (13, 16, 96),
        (2, 16, 32),
        (9, 64, 512),
    ] {
        let x = values(m * k, 3);
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (bytes, deq) = quantize(format, &values(n * k, 4));
            let for_isa = |isa| QuantWeight::with_isa(isa, format, bytes.clone(), n, k).unwrap();
            let want = naive(&x, m, &deq, n, k);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let portable = for_isa(Isa::Portable).matmul_with(Isa::Portable, &x, m);
            for (g, w) in portable.iter().zip(&want) {
                // Activations are rounded to 8 bits: a relative error of ~1%.
                assert!((g - w).abs() < 0.02 * scale, "{format:?} {m}x{n}x{k}: {g} vs {w}");
            }
            // Exactly the product of the rounded activations with the weights.
            let xq = quantize_rows(&x, m, k, BlockFormat::Q8_0);
            let rounded: Vec<f32> = xq.q.iter().enumerate().map(|(i, &q)| q as f32 * xq.d[i / 32]).collect();
            let exact = naive(&rounded, m, &deq, n, k);
            for (g, w) in portable.iter().zip(&exact) {
                assert!((g - w).abs() < 1e-4 * scale.max(1.0), "{format:?} {m}x{n}x{k}: {g} vs {w}");
            }
            // Every SIMD path gives the portable loop's sums (up to f32 summation order).
            for isa in Isa::available() {
                let got = for_isa(isa).matmul_with(isa, &x, m);
                for (g, p) in got.iter().zip(&portable) {
                    assert!((g - p).abs() < 1e-4 * scale.max(1.0), "{isa:?} {format:?} {m}x{n}x{k}: {g} vs {p}");
                }
            }
        }
    }
    assert!(QuantWeight::new(BlockFormat::Q8_0, vec![0; 10], 1, 32).is_none());
}

#[test]
fn simd_quantisation_gives_the_portable_values() {
    // 37 blocks: two groups of sixteen (the AVX-512 loop's) and five more.
    let mut x = values(32 * 37, 8);
    x[40] = 0.0; // ties and zeros: a block of zeros has scale 0
    x[64..96].iter_mut().for_each(|v| *v = 0.0);
    x[32 * 20..32 * 21].iter_mut().for_each(|v| *v = 0.0);
    // Blocks of other magnitudes, so that each scale is its own block's.
    x[32 * 17..32 * 18].iter_mut().for_each(|v| *v *= 1e-3);
    x[32 * 30..32 * 31].iter_mut().for_each(|v| *v *= -40.0);
    // A block with scale 1: halves (which round away from zero) and their neighbours.
    let ties = [127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -126.5, 0.49999997, -1.5, 1.5000001, 2.4999998];
    x[96..96 + ties.len()].copy_from_slice(&ties);
    let blocks = x.len() / 32;
    let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
    quantize_blocks(&x, &mut q, &mut d, &mut s);
    assert!(q[64..96].iter().all(|&v| v == 0) && d[2] == 0.0 && d[20] == 0.0);
    assert_eq!(d[3], 1.0);
    assert_eq!(&q[96..96 + ties.len()], &[127, 3, -3, 1, -1, 127, -127, 0, -2, 2, 2]);
    assert!(q.iter().any(|&v| v == 127 || v == -127));
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        let (mut q2, mut d2, mut s2) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
        // SAFETY: the CPU has AVX2.
        unsafe { quantize_blocks_avx2(&x, &mut q2, &mut d2, &mut s2) };
        assert_eq!((&q, &d, &s), (&q2, &d2, &s2));
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        let (mut q3, mut d3, mut s3) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
        // SAFETY: the CPU has AVX-512F.
        unsafe { quantize_blocks_avx512(&x, &mut q3, &mut d3, &mut s3) };
        assert_eq!((q, d, s), (q3, d3, s3));
    }
}

#[test]
fn concatenated_weights_give_the_stacked_products() {
    // Row counts of 4 and 5 keep the natural layout; 16 and 32 take the interleaved one on VNNI.
    for (m, k, na, nb) in [(3, 64, 4, 5), (3, 576, 16, 32), (9, 96, 32, 16)] {
        let x = values(m * k, 5);
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (a, b) = (quantize(format, &values(na * k, 6)).0, quantize(format, &values(nb * k, 7)).0);
            let (qa, qb) = (QuantWeight::new(format, a, na, k).unwrap(), QuantWeight::new(format, b, nb, k).unwrap());
            let both = QuantWeight::concat(&[&qa, &qb]).unwrap();
            let (ya, yb, y) = (qa.matmul(&x, m), qb.matmul(&x, m), both.matmul(&x, m));
            let n = na + nb;
            for i in 0..m {
                assert_eq!(&y[i * n..i * n + na], &ya[i * na..i * na + na]);
                assert_eq!(&y[i * n + na..i * n + n], &yb[i * nb..i * nb + nb]);
            }
        }
    }
}
