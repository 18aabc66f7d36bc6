//! bf16 matrix products on Intel AMX tiles (`tdpbf16ps`) for training's
//! frozen base products: f32 activations rounded to bf16, a frozen weight
//! packed once into tile order, f32 sums. On this project's Xeon they run
//! at 2.5–4× candle's f32 product (`tabletrace bench matmul`).
//!
//! A product `C (m × n) = A (m × k) · B (k × n)` runs in blocks of 32 × 32
//! outputs (four accumulator tiles), 32 values of `k` per step (two A tiles
//! of 16 rows, two B tiles of 16 columns). The work is split into tasks of
//! `ROWS_PER_TASK × cols` outputs; each task walks `k` in chunks of
//! `K_CHUNK` so that its A and B blocks stay in the core's L2 cache, adding
//! each chunk's sums into the tiles of the previous one.
//!
//! B is packed as tiles of 16 rows × 64 bytes: row `r` of the tile of
//! column block `j` and `k` block `s` holds, for its 16 columns, the pair
//! `B[32 s + 2 r][·]`, `B[32 s + 2 r + 1][·]` (AMX's "VNNI" order).

use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::OnceLock;

/// Rows of the output one task computes (a multiple of 32).
const ROWS_PER_TASK: usize = 256;
/// `k` values per chunk (a multiple of 32): A's 256 × 1024 and B's
/// 1024 × 256 bf16 blocks take 1 MiB of L2 together.
const K_CHUNK: usize = 1024;
/// Columns per task (a multiple of 32).
const COLS_PER_TASK: usize = 256;

/// Whether this CPU and OS run AMX bf16 tiles: CPUID's AMX-TILE and
/// AMX-BF16 bits, and Linux granting this process the tile state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`), asked once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let tile = leaf7.edx & (1 << 24) != 0;
            let bf16 = leaf7.edx & (1 << 22) != 0;
            if !(tile && bf16 && std::is_x86_feature_detected!("avx512f")) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a request for a permission; it changes no memory of ours.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// `x` rounded to the nearest bf16 (ties to even), as its bits. Finite
/// values only: a NaN may become an infinity.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The value of bf16 bits.
#[cfg(test)]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Rounds `src` into `dst` (same length).
#[cfg_attr(not(target_arch = "x86_64"), allow(clippy::missing_safety_doc))]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn round_slice(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_bits(s);
    }
}

/// A `k × n` matrix in AMX tile order, rounded to bf16; the right-hand
/// side of [`matmul`].
#[derive(Clone)]
pub struct Bf16Tiles {
    k: usize,
    n: usize,
    /// Tiles of the whole packed matrix, shared by its views.
    data: std::sync::Arc<Vec<u16>>,
    /// `k` blocks per column block in `data`, and the first one this view reads.
    blocks: usize,
    first: usize,
}

impl Bf16Tiles {
    /// Packs `B[i][j] = at(i, j)` for `i < k`, `j < n`; `None` unless both
    /// are multiples of 32.
    pub fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Option<Bf16Tiles> {
        if !k.is_multiple_of(32) || !n.is_multiple_of(32) || k == 0 || n == 0 {
            return None;
        }
        let kb = k / 32;
        let mut data = vec![0u16; k * n];
        data.par_chunks_mut(512).enumerate().for_each(|(t, tile)| {
            let (j, s) = (t / kb, t % kb);
            for r in 0..16 {
                for c in 0..16 {
                    for e in 0..2 {
                        tile[r * 32 + c * 2 + e] = bf16_bits(at(32 * s + 2 * r + e, 16 * j + c));
                    }
                }
            }
        });
        Some(Bf16Tiles { k, n, data: std::sync::Arc::new(data), blocks: kb, first: 0 })
    }

    /// Rows `start..start + len` of this matrix (multiples of 32), sharing
    /// its tiles: a fused projection's part.
    pub fn rows(&self, start: usize, len: usize) -> Option<Bf16Tiles> {
        if !start.is_multiple_of(32) || !len.is_multiple_of(32) || len == 0 || start + len > self.k {
            return None;
        }
        Some(Bf16Tiles { k: len, first: self.first + start / 32, ..self.clone() })
    }

    /// `Wᵀ` for a weight `w` of `n` rows (outputs) × `k` columns (inputs),
    /// row-major: `x · Wᵀ` is the layer's forward product.
    pub fn transposed_weight(w: &[f32], n: usize, k: usize) -> Option<Bf16Tiles> {
        assert_eq!(w.len(), n * k);
        Bf16Tiles::pack(k, n, |i, j| w[j * k + i])
    }

    /// `W` itself (`n` rows × `k` columns): `dy · W` is the input's gradient.
    pub fn weight(w: &[f32], n: usize, k: usize) -> Option<Bf16Tiles> {
        assert_eq!(w.len(), n * k);
        Bf16Tiles::pack(n, k, |i, j| w[i * k + j])
    }

    /// Rows (the product's inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns (the product's outputs per row).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The tile of column block `j` (16 columns) and `k` block `s` (32 rows).
    fn tile(&self, j: usize, s: usize) -> *const u16 {
        self.data[(j * self.blocks + self.first + s) * 512..].as_ptr()
    }
}

/// `a (m × k) · b (k × n)` with `a` rounded to bf16 and f32 sums, row-major.
/// Panics unless [`available`] and `a.len() == m * b.k()`.
pub fn matmul(a: &[f32], m: usize, b: &Bf16Tiles) -> Vec<f32> {
    assert!(available(), "AMX bf16 tiles are not available on this CPU");
    let (k, n) = (b.k, b.n);
    assert_eq!(a.len(), m * k, "bf16 matmul: a has {} values, not {m} × {k}", a.len());
    let rows = m.div_ceil(32) * 32;
    // A in bf16, padded with zero rows to a multiple of 32.
    let mut a16 = vec![0u16; rows * k];
    a16[..m * k].par_chunks_mut(64 * 1024).zip(a.par_chunks(64 * 1024)).for_each(|(d, s)| {
        // SAFETY: `available` checked AVX-512F (and BW comes with AMX CPUs).
        unsafe { round_slice(s, d) }
    });
    // Written by the tasks through a pointer into its spare capacity (the
    // first k chunk stores every tile before anything reads it), then
    // given its length.
    let mut c: Vec<f32> = Vec::with_capacity(rows * n);
    let row_tasks = rows.div_ceil(ROWS_PER_TASK);
    let col_tasks = n.div_ceil(COLS_PER_TASK);
    let c_ptr = SendPtr(c.as_mut_ptr());
    (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
        let (rt, ct) = (t / col_tasks, t % col_tasks);
        let r0 = rt * ROWS_PER_TASK;
        let r1 = (r0 + ROWS_PER_TASK).min(rows);
        let c0 = ct * COLS_PER_TASK;
        let c1 = (c0 + COLS_PER_TASK).min(n);
        // SAFETY: tasks write disjoint blocks of `c`; AMX is available and
        // every pointer stays inside `a16`, `b.data` and `c`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            task(&a16, k, b, c_ptr.get(), n, r0..r1, c0..c1)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (c_ptr, r0, r1, c0, c1);
    });
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the tasks wrote all `rows × n` values.
    unsafe {
        c.set_len(rows * n)
    };
    c.truncate(m * n);
    c
}

/// The output's pointer, shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut i = 0;
    while i < 8 {
        c[16 + 2 * i] = 64;
        c[48 + i] = 16;
        i += 1;
    }
    TileConfig(c)
};

#[cfg(target_arch = "x86_64")]
/// One task's block of outputs, rows `rows` × columns `cols` (multiples of 32).
unsafe fn task(
    a16: &[u16],
    k: usize,
    b: &Bf16Tiles,
    c: *mut f32,
    n: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    let lda = (k * 2) as isize;
    let ldc = (n * 4) as isize;
    for k0 in (0..k).step_by(K_CHUNK) {
        let steps = (k - k0).min(K_CHUNK) / 32;
        let first = k0 == 0;
        for r in rows.clone().step_by(32) {
            let a = a16.as_ptr().add(r * k + k0);
            for j in cols.clone().step_by(32) {
                let b0 = b.tile(j / 16, k0 / 32);
                let b1 = b.tile(j / 16 + 1, k0 / 32);
                block(a, lda, b0, b1, c.add(r * n + j), ldc, steps, first);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// `C[32 × 32] (+)= A[32 × 32 steps] · B` over `steps` k blocks: A rows at
/// `a` (stride `lda` bytes), B's two column tiles at `b0`, `b1` (the next k
/// block's tile 1 KiB further), C at `c` (stride `ldc` bytes); C starts at
/// zero when `first`, else from its stored values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a: *const u16,
    lda: isize,
    b0: *const u16,
    b1: *const u16,
    c: *mut f32,
    ldc: isize,
    steps: usize,
    first: bool,
) {
    let a16 = a.byte_offset(16 * lda);
    let c16 = c.byte_offset(16 * ldc);
    if first {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    } else {
        asm!(
            "tileloadd tmm0, [{c} + {ldc}*1]",
            "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{c16} + {ldc}*1]",
            "tileloadd tmm3, [{c16} + {ldc}*1 + 64]",
            c = in(reg) c, c16 = in(reg) c16, ldc = in(reg) ldc,
            options(nostack, readonly),
        );
    }
    asm!(
        "2:",
        "tileloadd tmm4, [{a} + {lda}*1]",
        "tileloadd tmm5, [{a16} + {lda}*1]",
        "tileloadd tmm6, [{b0} + {s64}*1]",
        "tileloadd tmm7, [{b1} + {s64}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a}, 64",
        "add {a16}, 64",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {steps}",
        "jnz 2b",
        a = inout(reg) a => _, a16 = inout(reg) a16 => _, b0 = inout(reg) b0 => _, b1 = inout(reg) b1 => _,
        steps = inout(reg) steps => _, lda = in(reg) lda, s64 = in(reg) 64isize,
        options(nostack, readonly),
    );
    asm!(
        "tilestored [{c} + {ldc}*1], tmm0",
        "tilestored [{c} + {ldc}*1 + 64], tmm1",
        "tilestored [{c16} + {ldc}*1], tmm2",
        "tilestored [{c16} + {ldc}*1 + 64], tmm3",
        c = in(reg) c, c16 = in(reg) c16, ldc = in(reg) ldc,
        options(nostack),
    );
}

#[cfg(test)]
mod tests {
    use super::super::tests::values;
    use super::*;

    /// The largest absolute difference.
    fn max_error(got: &[f32], want: &[f64]) -> f64 {
        got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max)
    }

    /// The product of the bf16-rounded operands in f64.
    fn reference(a: &[f32], m: usize, k: usize, b: impl Fn(usize, usize) -> f32, n: usize) -> Vec<f64> {
        let r = |x: f32| bf16_value(bf16_bits(x)) as f64;
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| r(a[i * k + p]) * r(b(p, j))).sum();
            }
        }
        c
    }

    #[test]
    fn products_equal_the_rounded_operands_product() {
        if !available() {
            eprintln!("skipped: no AMX here");
            return;
        }
        for (m, k, n) in [(1, 32, 32), (45, 96, 64), (300, 1088, 288), (33, 2080, 32)] {
            let a = values(m * k, 1);
            let w = values(n * k, 2);
            let fwd = Bf16Tiles::transposed_weight(&w, n, k).unwrap();
            let got = matmul(&a, m, &fwd);
            let err = max_error(&got, &reference(&a, m, k, |p, j| w[j * k + p], n));
            assert!(err < 1e-3, "{m}×{k}×{n}: max error {err}");
            // dy · W: the same weight as the right-hand side untransposed.
            let dy = values(m * n, 3);
            let bwd = Bf16Tiles::weight(&w, n, k).unwrap();
            let got = matmul(&dy, m, &bwd);
            let err = max_error(&got, &reference(&dy, m, n, |p, j| w[p * k + j], k));
            assert!(err < 1e-3, "{m}×{n}×{k} (dy·W): max error {err}");
        }
    }

    #[test]
    fn a_view_of_rows_multiplies_like_those_rows_alone() {
        if !available() {
            eprintln!("skipped: no AMX here");
            return;
        }
        let (m, n, k) = (40, 96, 64);
        let w = values(n * k, 4);
        let dy = values(m * 32, 5);
        let part = Bf16Tiles::weight(&w, n, k).unwrap().rows(32, 32).unwrap();
        let alone = Bf16Tiles::weight(&w[32 * k..64 * k], 32, k).unwrap();
        assert_eq!(matmul(&dy, m, &part), matmul(&dy, m, &alone));
        assert!(Bf16Tiles::weight(&w, n, k).unwrap().rows(16, 32).is_none());
    }

    #[test]
    fn a_transposed_tile_changes_the_product() {
        if !available() {
            eprintln!("skipped: no AMX here");
            return;
        }
        // The pair order inside a tile matters: packing B's transpose by
        // mistake (same shape, square) gives a different product.
        let (m, k) = (32, 64);
        let (a, w) = (values(m * k, 6), values(k * k, 7));
        let right = matmul(&a, m, &Bf16Tiles::transposed_weight(&w, k, k).unwrap());
        let wrong = matmul(&a, m, &Bf16Tiles::weight(&w, k, k).unwrap());
        let want = reference(&a, m, k, |p, j| w[j * k + p], k);
        let close = |c: &[f32]| max_error(c, &want) < 1e-3;
        assert!(close(&right) && !close(&wrong));
    }
}
