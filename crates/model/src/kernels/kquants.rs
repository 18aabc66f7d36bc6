//! GGUF block formats without a kernel of their own, decoded on load into
//! the groups the kernels multiply — exactly: every weight the decoded form
//! stands for equals ggml's dequantisation of the original bytes.
//!
//! - **Q5_0** (32 values: f16 `d`, 32 high bits, 16 bytes of nibbles; `w = d (q − 16)`)
//!   becomes Q8_0 with the same `d` and the values `q − 16`: 34 bytes per
//!   block instead of 22, for the kernels that Q8_0 already has. Qwen2.5's
//!   GGUF files store every projection whose input is 896 wide this way (a
//!   K-quant needs multiples of 256).
//! - **Q4_K** (256 values: f16 `d` and `dmin`, twelve bytes of 6-bit
//!   sub-scales and minima, 128 bytes of nibbles) becomes eight Q4_1-shaped
//!   32-groups per super-block, with f32 scales `d · sc` and minima
//!   `−dmin · m`. Both products are exact in f32 (11 + 6 significant bits),
//!   and are the ones ggml's dequantisation computes.
//! - **Q6_K** (256 values: 128 bytes of low nibbles, 64 of high bit pairs,
//!   sixteen i8 sub-scales, f16 `d`; `w = d · sc · (q − 32)`) becomes signed
//!   bytes `q − 32` in 16-groups with f32 scales `d · sc` (11 + 8 bits).

/// Values per K-quant super-block.
pub(super) const SUPER: usize = 256;

/// Bytes of a Q5_0 block.
const Q5_0_BYTES: usize = 22;
/// Bytes of a Q4_K super-block.
pub(super) const Q4_K_BYTES: usize = 144;
/// Bytes of a Q6_K super-block.
pub(super) const Q6_K_BYTES: usize = 210;

fn f16(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// Q5_0 blocks as the Q8_0 blocks with the same values; `None` unless the
/// bytes are whole blocks.
pub fn q5_0_to_q8_0(data: &[u8]) -> Option<Vec<u8>> {
    if !data.len().is_multiple_of(Q5_0_BYTES) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / Q5_0_BYTES * 34);
    for blk in data.chunks_exact(Q5_0_BYTES) {
        out.extend_from_slice(&blk[..2]);
        let high = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let qs = &blk[6..];
        let value = |j: usize| {
            let nibble = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
            let q = nibble | (((high >> j) & 1) as u8) << 4;
            (q as i8 - 16) as u8
        };
        out.extend((0..32).map(value));
    }
    Some(out)
}

/// A K-quant weight decoded into groups of 32 values (16 for Q6_K's
/// scales), row by row in natural order.
#[derive(Debug)]
pub(super) struct Groups {
    /// `(n, k / 32, bytes)`: Q4_K, 16 bytes per group packed as Q4_1 (low
    /// nibble of byte `j` = value `j`, high = value `j + 16`); Q6_K, 32
    /// signed bytes.
    pub quants: Vec<u8>,
    /// `(n, k / 32)` for Q4_K, `(n, k / 16)` for Q6_K: the f32 scales.
    pub scales: Vec<f32>,
    /// `(n, k / 32)`: Q4_K's minima (`w = scale · q + min`); empty for Q6_K.
    pub mins: Vec<f32>,
}

impl Groups {
    /// Weights of one format stacked along the output dimension (the rows of each in turn).
    pub(super) fn concat(parts: &[&Groups]) -> Groups {
        Groups {
            quants: parts.iter().flat_map(|g| g.quants.iter().copied()).collect(),
            scales: parts.iter().flat_map(|g| g.scales.iter().copied()).collect(),
            mins: parts.iter().flat_map(|g| g.mins.iter().copied()).collect(),
        }
    }
}

/// Sub-block `j`'s 6-bit scale and minimum in Q4_K's twelve bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Decodes Q4_K super-blocks; `None` unless the bytes are whole super-blocks.
pub(super) fn q4_k_groups(data: &[u8]) -> Option<Groups> {
    if !data.len().is_multiple_of(Q4_K_BYTES) {
        return None;
    }
    let supers = data.len() / Q4_K_BYTES;
    let mut g = Groups {
        quants: Vec::with_capacity(supers * 8 * 16),
        scales: Vec::with_capacity(supers * 8),
        mins: Vec::with_capacity(supers * 8),
    };
    for blk in data.chunks_exact(Q4_K_BYTES) {
        let (d, dmin) = (f16(blk[0], blk[1]), f16(blk[2], blk[3]));
        let (sc, qs) = (&blk[4..16], &blk[16..]);
        // Each 32 bytes hold two groups: the low nibbles the first, the high ones the second.
        for pair in 0..4 {
            let bytes = &qs[32 * pair..32 * pair + 32];
            for (half, shift) in [(0, 0), (1, 4)] {
                let (s, m) = scale_min_k4(2 * pair + half, sc);
                g.scales.push(d * s as f32);
                g.mins.push(-(dmin * m as f32));
                let v = |j: usize| (bytes[j] >> shift) & 0x0F;
                g.quants.extend((0..16).map(|j| v(j) | (v(j + 16) << 4)));
            }
        }
    }
    Some(g)
}

/// Decodes Q6_K super-blocks; `None` unless the bytes are whole super-blocks.
pub(super) fn q6_k_groups(data: &[u8]) -> Option<Groups> {
    if !data.len().is_multiple_of(Q6_K_BYTES) {
        return None;
    }
    let supers = data.len() / Q6_K_BYTES;
    let mut g = Groups {
        quants: Vec::with_capacity(supers * SUPER),
        scales: Vec::with_capacity(supers * 16),
        mins: Vec::new(),
    };
    for blk in data.chunks_exact(Q6_K_BYTES) {
        let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
        let d = f16(blk[208], blk[209]);
        g.scales.extend(sc.iter().map(|&s| d * s as i8 as f32));
        // Two halves of 128 values; in each, value 32·r + l (r = 0..4, l = 0..32)
        // takes nibble r / 2 of ql[l + 32·(r % 2)] and bit pair r of qh[l].
        for h in 0..2 {
            let (ql, qh) = (&ql[64 * h..64 * h + 64], &qh[32 * h..32 * h + 32]);
            for r in 0..4 {
                g.quants.extend((0..32).map(|l| {
                    let low = (ql[l + 32 * (r % 2)] >> (4 * (r / 2))) & 0x0F;
                    let q = low | (((qh[l] >> (2 * r)) & 3) << 4);
                    (q as i8 - 32) as u8
                }));
            }
        }
    }
    Some(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Weights quantised by candle (ggml's quantisers) and the values its
    /// dequantisation gives.
    pub(crate) fn quantized(dtype: GgmlDType, n: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                // Rows of different magnitudes and a few outliers, so that scales and minima vary.
                let v = (s % 20001) as f32 / 10000.0 - 1.0;
                v * (1.0 + (i / k) as f32 * 0.1) * if s.is_multiple_of(97) { 4.0 } else { 1.0 }
            })
            .collect();
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (q.data().unwrap().into_owned(), deq)
    }

    fn q8_0_values(data: &[u8]) -> Vec<f32> {
        data.chunks_exact(34).flat_map(|b| b[2..].iter().map(move |&q| f16(b[0], b[1]) * q as i8 as f32)).collect()
    }

    #[test]
    fn q5_0_becomes_q8_0_with_the_same_values() {
        let (bytes, deq) = quantized(GgmlDType::Q5_0, 3, 96, 1);
        assert_eq!(q8_0_values(&q5_0_to_q8_0(&bytes).unwrap()), deq);
        assert!(q5_0_to_q8_0(&bytes[..21]).is_none());
    }

    fn group_values(g: &Groups, per_scale: usize) -> Vec<f32> {
        if g.mins.is_empty() {
            g.quants.iter().enumerate().map(|(i, &q)| g.scales[i / per_scale] * q as i8 as f32).collect()
        } else {
            g.quants
                .chunks_exact(16)
                .enumerate()
                .flat_map(|(b, bytes)| {
                    let value = |j: usize| if j < 16 { bytes[j] & 0x0F } else { bytes[j - 16] >> 4 };
                    (0..32).map(move |j| g.scales[b] * value(j) as f32 + g.mins[b])
                })
                .collect()
        }
    }

    #[test]
    fn k_quants_decode_to_ggml_s_values_exactly() {
        let (bytes, deq) = quantized(GgmlDType::Q4K, 3, 512, 2);
        let g = q4_k_groups(&bytes).unwrap();
        assert_eq!(group_values(&g, 32), deq);
        let (bytes, deq) = quantized(GgmlDType::Q6K, 3, 512, 3);
        let g = q6_k_groups(&bytes).unwrap();
        assert_eq!(group_values(&g, 16), deq);
        assert!(q4_k_groups(&bytes[..143]).is_none() && q6_k_groups(&bytes[..209]).is_none());
    }

    #[test]
    fn every_scale_and_minimum_byte_is_read_where_ggml_reads_it() {
        // Perturb each byte of one super-block's scales (and Q4_K's d, dmin; Q6_K's d):
        // the decoded values still equal ggml's dequantisation of the perturbed bytes.
        for (dtype, range, decode, per_scale) in [
            (GgmlDType::Q4K, 0..16, q4_k_groups as fn(&[u8]) -> Option<Groups>, 32),
            (GgmlDType::Q6K, 192..210, q6_k_groups, 16),
        ] {
            let (bytes, _) = quantized(dtype, 1, 256, 4);
            for at in range {
                let mut b = bytes.clone();
                b[at] ^= 0x15;
                let t = QTensor::new(
                    candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(&b), &Device::Cpu, dtype)
                        .unwrap(),
                    (1, 256),
                )
                .unwrap();
                let want = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = group_values(&decode(&b).unwrap(), per_scale);
                let same = got.iter().zip(&want).all(|(g, w)| g == w || (g.is_nan() && w.is_nan()));
                assert!(same, "{dtype:?}: byte {at} perturbed");
            }
        }
    }

    #[test]
    fn k_quant_kernels_give_the_product_with_ggml_s_weights_on_every_instruction_set() {
        use crate::kernels::tests::{naive, values};
        use crate::kernels::{quantize_natural, BlockFormat, Isa, QuantWeight};
        // 13 rows take the 8-, 4- and 1-row paths; 48 weight rows are three chunks of
        // sixteen (VNNI's interleaved layout), 20 rows are not (VNNI runs the AVX2 kernel);
        // 77 activation rows are two tiles of the AVX2 kernel (64 + 13).
        for (m, n, k) in
            [(1, 16, 256), (13, 48, 512), (8, 32, 768), (3, 16, 4864), (5, 20, 512), (13, 3, 256), (77, 20, 256)]
        {
            let x = values(m * k, 7);
            // The activations as the kernels round them: the product must be exact up to f32 sums.
            let xq = quantize_natural(&x, m, k);
            let rounded: Vec<f32> = xq.q.iter().enumerate().map(|(i, &q)| q as f32 * xq.d[i / 32]).collect();
            for (format, dtype) in [(BlockFormat::Q4K, GgmlDType::Q4K), (BlockFormat::Q6K, GgmlDType::Q6K)] {
                let (bytes, deq) = quantized(dtype, n, k, 5);
                let want = naive(&rounded, m, &deq, n, k);
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                let block_bytes = bytes.len() / (n * (k / SUPER));
                // One super-block's scale byte perturbed; two of its 32-groups' quantised
                // bytes swapped (Q4_K: the nibbles of groups 0/1 and 2/3; Q6_K: low nibbles).
                let row_block = (n / 2) * (k / SUPER) * block_bytes;
                let mut bad_scale = bytes.clone();
                bad_scale[row_block + if format == BlockFormat::Q4K { 5 } else { 195 }] ^= 0x09;
                let mut swapped = bytes.clone();
                let qs = row_block + if format == BlockFormat::Q4K { 16 } else { 0 };
                let (a, b) = swapped[qs..qs + 64].split_at_mut(32);
                a.swap_with_slice(b);
                for isa in Isa::available() {
                    let product = |bytes: &[u8]| {
                        QuantWeight::with_isa(isa, format, bytes.to_vec(), n, k).unwrap().matmul_with(isa, &x, m)
                    };
                    let got = product(&bytes);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!((g - e).abs() < 1e-5 * scale, "{isa:?} {format:?} {m}x{n}x{k} [{i}]: {g} vs {e}");
                    }
                    // The kernel reads every scale and group it should, where it should.
                    for (what, bad) in [("a perturbed scale", &bad_scale), ("swapped groups", &swapped)] {
                        let moved = product(bad);
                        let differs = moved.iter().zip(&want).any(|(g, e)| (g - e).abs() > 1e-3 * scale);
                        assert!(differs, "{isa:?} {format:?} {m}x{n}x{k}: {what} leaves the product unchanged");
                    }
                }
            }
        }
        // Without AVX2 these formats stay with candle.
        let (bytes, _) = quantized(GgmlDType::Q4K, 16, 256, 1);
        assert_eq!(QuantWeight::new(BlockFormat::Q4K, bytes, 16, 256).is_none(), Isa::detect() == Isa::Portable);
        // Sizes that do not fit.
        let (bytes, _) = quantized(GgmlDType::Q6K, 16, 256, 1);
        for isa in Isa::available() {
            assert!(QuantWeight::with_isa(isa, BlockFormat::Q6K, bytes.clone(), 16, 512).is_none());
            let short = bytes[..bytes.len() - 1].to_vec();
            assert!(QuantWeight::with_isa(isa, BlockFormat::Q6K, short, 16, 256).is_none());
        }
    }

    #[test]
    fn concatenated_k_quant_weights_give_the_stacked_products() {
        use crate::kernels::tests::values;
        use crate::kernels::{BlockFormat, Isa, QuantWeight};
        // 16 + 32 rows stay interleaved on VNNI; 5 + 16 rows are groups on every instruction set.
        for (m, k, na, nb) in [(3, 512, 16, 32), (9, 256, 5, 16)] {
            let x = values(m * k, 5);
            for (format, dtype) in [(BlockFormat::Q4K, GgmlDType::Q4K), (BlockFormat::Q6K, GgmlDType::Q6K)] {
                for isa in Isa::available() {
                    let weight = |n: usize, seed: u32| {
                        QuantWeight::with_isa(isa, format, quantized(dtype, n, k, seed).0, n, k).unwrap()
                    };
                    let (qa, qb) = (weight(na, 6), weight(nb, 7));
                    let Some(both) = QuantWeight::concat(&[&qa, &qb]) else {
                        // Interleaved and grouped parts do not stack (5 rows are groups, 16 interleaved).
                        assert!(isa == Isa::Vnni && na % 16 != 0, "{isa:?} {format:?}");
                        continue;
                    };
                    let (ya, yb, y) =
                        (qa.matmul_with(isa, &x, m), qb.matmul_with(isa, &x, m), both.matmul_with(isa, &x, m));
                    let n = na + nb;
                    for i in 0..m {
                        assert_eq!(&y[i * n..i * n + na], &ya[i * na..i * na + na], "{isa:?} {format:?}");
                        assert_eq!(&y[i * n + na..i * n + n], &yb[i * nb..i * nb + nb], "{isa:?} {format:?}");
                    }
                }
            }
        }
    }
}
