//! [`QuantWeight`]: a GGUF Q4_1 or Q8_0 weight repacked on load, the
//! instruction set its product runs on ([`Isa`], checked at run time) and the
//! portable kernels that define the sums the SIMD ones compute.

use super::*;

/// A GGUF-quantised weight `(n, k)` in one of the block formats these
/// kernels multiply, repacked on load: the f16 scales (and Q4_1's minima)
/// apart from the quantised values, so that a kernel reads each as a
/// contiguous stream. Same bytes as the GGUF blocks.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    pub(super) format: BlockFormat,
    pub(super) packed: std::sync::Arc<Packed>,
    pub(super) n: usize,
    pub(super) k: usize,
}

/// The layout of a weight's blocks, chosen for the kernel that will run.
#[derive(Debug)]
pub(super) enum Packed {
    /// For the portable, AVX2 and natural-order VNNI kernels.
    Natural(Blocks),
    /// For the VNNI kernel with one lane per weight row ([`interleaved`]).
    Interleaved(interleaved::Interleaved),
    /// K-quants decoded into groups ([`kquants`]), natural row order: for the
    /// AVX2 and portable kernels, and on VNNI where rows do not come in
    /// whole chunks of sixteen.
    Groups(kquants::Groups),
}

#[derive(Debug)]
pub(super) struct Blocks {
    /// `(n, k / 32)`: f16 bits of each block's scale `d`.
    pub(super) scales: Vec<u16>,
    /// `(n, k / 32)`: f16 bits of each Q4_1 block's minimum `m`; empty for Q8_0.
    pub(super) mins: Vec<u16>,
    /// `(n, k / 32 · quant_bytes)`: Q4_1, 16 bytes of nibbles per block (low
    /// nibble of byte `j` = value `j`, high = value `j + 16`); Q8_0, 32 signed bytes.
    pub(super) quants: Vec<u8>,
}

/// The block formats with kernels here. (Q5_0 becomes Q8_0 on load:
/// [`q5_0_to_q8_0`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 weights: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `w = d q + m`.
    Q4_1,
    /// 32 weights: f16 scale `d`, 32 signed bytes; `w = d q`.
    Q8_0,
    /// 256 weights in eight 32-groups with 6-bit scales and minima under f16
    /// super-scales (see [`kquants`]); decoded into groups on load.
    Q4K,
    /// 256 weights of 6 bits in sixteen 16-groups with i8 scales under an
    /// f16 super-scale (see [`kquants`]); decoded into groups on load.
    Q6K,
}

impl BlockFormat {
    /// Weights per GGUF block.
    pub(super) fn block_values(self) -> usize {
        match self {
            BlockFormat::Q4_1 | BlockFormat::Q8_0 => 32,
            BlockFormat::Q4K | BlockFormat::Q6K => kquants::SUPER,
        }
    }

    /// Bytes of one GGUF block.
    pub(super) fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4K => kquants::Q4_K_BYTES,
            BlockFormat::Q6K => kquants::Q6_K_BYTES,
        }
    }

    /// Bytes of a 32-block's quantised values, as the kernels hold them.
    pub(super) fn quant_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 | BlockFormat::Q4K => 16,
            BlockFormat::Q8_0 | BlockFormat::Q6K => 32,
        }
    }
}

/// The instruction set the quantised kernels run with, found at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Isa {
    /// The instruction set of the quantised kernels: the best this CPU has,
    /// or a lower one named by `TABLETRACE_QUANT_KERNELS` (`avx2`, `portable`),
    /// to measure on one machine what a CPU without AVX-512 VNNI gets.
    pub(super) fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("TABLETRACE_QUANT_KERNELS").as_deref() {
                Ok("portable") => Isa::Portable,
                #[cfg(target_arch = "x86_64")]
                Ok("avx2") if best != Isa::Portable => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// The best instruction set this CPU has for the quantised kernels.
    pub(super) fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Vnni;
            }
            return Isa::Avx2;
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, for tests.
    #[cfg(test)]
    pub(super) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                all.push(Isa::Avx2);
            }
            if Isa::detect() == Isa::Vnni {
                all.push(Isa::Vnni);
            }
        }
        all
    }
}

impl QuantWeight {
    /// Repacks raw GGUF blocks of an `(n, k)` weight. `None` when the sizes
    /// do not fit the format.
    ///
    /// Without AVX2 the K-quants stay with candle (`None`), whose quantised
    /// matmul has SIMD paths (NEON) that the portable loop lacks.
    pub fn new(format: BlockFormat, data: Vec<u8>, n: usize, k: usize) -> Option<QuantWeight> {
        let isa = Isa::detect();
        if isa == Isa::Portable && matches!(format, BlockFormat::Q4K | BlockFormat::Q6K) {
            return None;
        }
        QuantWeight::with_isa(isa, format, data, n, k)
    }

    /// [`QuantWeight::new`] laid out for the kernels of `isa`: interleaved
    /// for VNNI where the rows come in whole chunks of sixteen, natural otherwise
    /// (K-quants: decoded groups in natural order).
    pub(super) fn with_isa(isa: Isa, format: BlockFormat, data: Vec<u8>, n: usize, k: usize) -> Option<QuantWeight> {
        let (bb, per_block) = (format.block_bytes(), format.block_values());
        if !k.is_multiple_of(per_block) || data.len() != n * (k / per_block) * bb {
            return None;
        }
        if matches!(format, BlockFormat::Q4K | BlockFormat::Q6K) {
            let groups =
                if format == BlockFormat::Q4K { kquants::q4_k_groups(&data)? } else { kquants::q6_k_groups(&data)? };
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Vnni {
                if let Some(w) = interleaved::Interleaved::from_groups(format, &groups, n, k) {
                    return Some(QuantWeight { format, packed: std::sync::Arc::new(Packed::Interleaved(w)), n, k });
                }
            }
            return Some(QuantWeight { format, packed: std::sync::Arc::new(Packed::Groups(groups)), n, k });
        }
        let count = n * (k / 32);
        let mut blocks = Blocks {
            scales: Vec::with_capacity(count),
            mins: Vec::with_capacity(if format == BlockFormat::Q4_1 { count } else { 0 }),
            quants: Vec::with_capacity(count * format.quant_bytes()),
        };
        for blk in data.chunks_exact(bb) {
            blocks.scales.push(u16::from_le_bytes([blk[0], blk[1]]));
            match format {
                BlockFormat::Q4_1 => {
                    blocks.mins.push(u16::from_le_bytes([blk[2], blk[3]]));
                    blocks.quants.extend_from_slice(&blk[4..]);
                }
                BlockFormat::Q8_0 => blocks.quants.extend_from_slice(&blk[2..]),
                BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("K-quants returned above"),
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Vnni {
            if let Some(w) = interleaved::Interleaved::new(format, &blocks, n, k) {
                return Some(QuantWeight { format, packed: std::sync::Arc::new(Packed::Interleaved(w)), n, k });
            }
        }
        let _ = isa;
        Some(QuantWeight { format, packed: std::sync::Arc::new(Packed::Natural(blocks)), n, k })
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
        // Every part in the first one's layout, or `None`.
        fn all<'a, T>(parts: &[&'a QuantWeight], pick: impl Fn(&'a Packed) -> Option<&'a T>) -> Option<Vec<&'a T>> {
            parts.iter().map(|p| pick(&p.packed)).collect()
        }
        let packed = match &*first.packed {
            Packed::Natural(_) => {
                let blocks = all(parts, |p| if let Packed::Natural(b) = p { Some(b) } else { None })?;
                Packed::Natural(Blocks {
                    scales: blocks.iter().flat_map(|b| b.scales.iter().copied()).collect(),
                    mins: blocks.iter().flat_map(|b| b.mins.iter().copied()).collect(),
                    quants: blocks.iter().flat_map(|b| b.quants.iter().copied()).collect(),
                })
            }
            Packed::Interleaved(_) => {
                let ws = all(parts, |p| if let Packed::Interleaved(w) = p { Some(w) } else { None })?;
                Packed::Interleaved(interleaved::Interleaved::concat(&ws)?)
            }
            Packed::Groups(_) => {
                let gs = all(parts, |p| if let Packed::Groups(g) = p { Some(g) } else { None })?;
                Packed::Groups(kquants::Groups::concat(&gs))
            }
        };
        Some(QuantWeight {
            format: first.format,
            packed: std::sync::Arc::new(packed),
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
        })
    }

    /// `x (m, k) @ w^T`, with `x` quantised to 8 bits per block.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(Isa::detect(), x, m)
    }

    pub(super) fn matmul_with(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let format = self.format;
        let w = match &*self.packed {
            Packed::Natural(w) => w,
            Packed::Groups(g) => {
                let xq = quantize_rows(x, m, self.k, format);
                return by_weight_chunks(m, self.n, |j0, out| match isa {
                    Isa::Portable => portable::group_rows(format, g, j0, out, &xq, m),
                    // SAFETY: `detect` found AVX2, FMA and F16C (VNNI CPUs have them too); the
                    // groups hold whole rows of `k` values and `xq` was quantised for `format`.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 | Isa::Vnni => unsafe { kquants_avx2::rows(format, g, j0, out, &xq, m) },
                });
            }
            #[cfg(target_arch = "x86_64")]
            Packed::Interleaved(w) => {
                assert_eq!(isa, Isa::Vnni, "an interleaved weight runs on the VNNI kernel");
                let xq = interleaved::Q8Natural::quantize(x, m, self.k, format);
                // SAFETY: interleaved weights exist only where `detect` found VNNI (and AVX2, FMA, F16C,
                // AVX-512 F, BW, DQ, VL); `n % 16 == 0`, and `by_weight_columns` splits at multiples of 16;
                // the kernel stores every activation row of each chunk of its columns.
                return unsafe {
                    by_weight_columns(m, self.n, |j0, rows, out| interleaved::vnni::rows(w, j0, rows, out, &xq))
                };
            }
            #[cfg(not(target_arch = "x86_64"))]
            Packed::Interleaved(_) => unreachable!("interleaved weights are built for VNNI only"),
        };
        let xq = quantize_rows(x, m, self.k, format);
        by_weight_chunks(m, self.n, |j0, out| match isa {
            Isa::Portable => portable::rows(format, w, j0, out, &xq, m),
            // SAFETY: `detect` found AVX2, FMA and F16C; `Blocks` and `Q8Rows` hold whole rows of whole blocks.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { quant_avx2::rows(format, w, j0, out, &xq, m) },
            // SAFETY: as above, and AVX-512 F, BW, DQ, VL and VNNI.
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => unsafe { quant_vnni::rows(format, w, j0, out, &xq, m) },
        })
    }
}

/// The portable kernels: the sums the SIMD kernels compute, loop by loop.
pub(super) mod portable {
    use super::kquants::Groups;
    use super::{q4_1_halves, BlockFormat, Blocks, Q8Rows};

    pub(super) fn f16(bits: u16) -> f32 {
        half::f16::from_bits(bits).to_f32()
    }

    /// Weight rows `j0..` (as many as `out` holds, `m` results each) times every activation row.
    pub(super) fn rows(format: BlockFormat, w: &Blocks, j0: usize, out: &mut [f32], x: &Q8Rows, m: usize) {
        let (k, blocks) = (x.k, x.blocks);
        let qb = format.quant_bytes();
        for (r, out) in out.chunks_mut(m).enumerate() {
            let j = j0 + r;
            let qw = &w.quants[j * blocks * qb..(j + 1) * blocks * qb];
            for (i, o) in out.iter_mut().enumerate() {
                let qx = &x.q[i * k..(i + 1) * k];
                let mut sum = 0f32;
                for b in 0..blocks {
                    let acc: i32 = match format {
                        BlockFormat::Q4_1 => nibble_dot(qw, qx, b, blocks),
                        BlockFormat::Q8_0 => (0..32).map(|t| qw[b * 32 + t] as i8 as i32 * qx[b * 32 + t] as i32).sum(),
                        BlockFormat::Q4K | BlockFormat::Q6K => {
                            unreachable!("K-quants run on their groups (group_rows)")
                        }
                    };
                    sum += f16(w.scales[j * blocks + b]) * x.d[i * blocks + b] * acc as f32;
                    if format == BlockFormat::Q4_1 {
                        sum += f16(w.mins[j * blocks + b]) * x.s[i * blocks + b];
                    }
                }
                *o = sum;
            }
        }
    }

    /// The integer dot product of 32-block `b` of a row of Q4_1-packed nibbles
    /// (Q4_1, Q4_K's groups) with activations in Q4_1's half-block order.
    fn nibble_dot(qw: &[u8], qx: &[i8], b: usize, blocks: usize) -> i32 {
        let (lo, hi) = q4_1_halves(b, blocks);
        (0..16)
            .map(|t| {
                let byte = qw[b * 16 + t];
                (byte & 0x0F) as i32 * qx[lo + t] as i32 + (byte >> 4) as i32 * qx[hi + t] as i32
            })
            .sum()
    }

    /// [`rows`] for the K-quants' decoded groups: Q4_K as Q4_1 with f32
    /// scales and minima, Q6_K as signed bytes with a scale per 16 values.
    pub(super) fn group_rows(format: BlockFormat, g: &Groups, j0: usize, out: &mut [f32], x: &Q8Rows, m: usize) {
        let (k, blocks) = (x.k, x.blocks);
        let qb = format.quant_bytes();
        for (r, out) in out.chunks_mut(m).enumerate() {
            let j = j0 + r;
            let qw = &g.quants[j * blocks * qb..(j + 1) * blocks * qb];
            for (i, o) in out.iter_mut().enumerate() {
                let qx = &x.q[i * k..(i + 1) * k];
                let mut sum = 0f32;
                for b in 0..blocks {
                    let d = x.d[i * blocks + b];
                    match format {
                        BlockFormat::Q4K => {
                            let acc = nibble_dot(qw, qx, b, blocks);
                            sum += g.scales[j * blocks + b] * d * acc as f32
                                + g.mins[j * blocks + b] * x.s[i * blocks + b];
                        }
                        BlockFormat::Q6K => {
                            let half = |h: usize| -> i32 {
                                (16 * h..16 * h + 16).map(|t| qw[b * 32 + t] as i8 as i32 * qx[b * 32 + t] as i32).sum()
                            };
                            let s = &g.scales[(j * blocks + b) * 2..(j * blocks + b) * 2 + 2];
                            sum += d * (s[0] * half(0) as f32 + s[1] * half(1) as f32);
                        }
                        BlockFormat::Q4_1 | BlockFormat::Q8_0 => unreachable!("only the K-quants decode to groups"),
                    }
                }
                *o = sum;
            }
        }
    }
}
