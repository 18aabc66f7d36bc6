//! CPU kernels for the shapes that decoding produces: a few activation rows
//! (`m` ≤ 16) against a large row-major weight. candle's matmul repacks the
//! whole weight on every such call, and its quantised matmul has no SIMD
//! path for Q4_1; these kernels stream each weight row once, dot it with
//! every activation row while it is in L1, and split the weight rows over
//! the rayon pool.
//!
//! - [`f32_rows`]: f32 weights `(n, k)`; with AVX-512VL, eight activation
//!   rows at a time meet two weight rows (each activation load feeds two
//!   FMAs), in `k`-blocks that keep the activations in L1, with the weight
//!   stream prefetched.
//! - [`QuantWeight`]: Q4_1, Q8_0, Q4_K and Q6_K GGUF blocks (Q5_0 via Q8_0), multiplied after quantising
//!   the activations to 8 bits per 32-block (as ggml does). With AVX-512
//!   VNNI the blocks of sixteen rows are interleaved on load, one i32 lane
//!   per row ([`interleaved`]); otherwise they keep their natural order.
//! - [`few_query_attention`]: decoding attention that reads the KV cache in
//!   place (AVX-512F for heads of up to 128 values, else AVX2, else portable).
//!
//! The instruction set is checked at run time (AVX2+FMA+F16C, AVX-512); a
//! portable loop computes the same sums where the CPU has neither.
//!
//! | file | holds |
//! |---|---|
//! | `dense.rs` | [`f32_rows`]: f32 weights |
//! | `q8.rs` | activations quantised to 8 bits per block, per weight format |
//! | `quant.rs` | [`QuantWeight`], [`BlockFormat`], the run-time instruction-set choice and the portable quantised kernels |
//! | `quant_x86.rs` | the AVX2 and AVX-512 VNNI quantised kernels (one macro, two instantiations) |
//! | `interleaved.rs`, `kquants.rs` | sixteen-row interleaving for VNNI; Q4_K/Q5_0/Q6_K decoded on load |
//! | `kquants_avx2.rs` | the AVX2 kernels for Q4_K/Q6_K's decoded groups (CPUs without VNNI) |
//! | `attention.rs` | `few_query_attention` (decoding attention on the KV cache in place) |
//! | `flash.rs` | blocked attention with an online softmax, forward and backward (training's long rows) |
//! | `rows.rs` | softmax, RMSNorm, SiLU-gate and rotary rows, forward and backward |
//! | `avx.rs`, `avx512.rs` | the AVX2 and AVX-512F row and attention helpers |
//! | `amx.rs` | bf16 products on AMX tiles (training's frozen base products) |
//! | `lora.rs` | LoRA's dropout mask as bits and its rank-r term added onto a frozen product's rows (training) |
//! | `tensors.rs`, `parallel.rs` | in-place views of candle CPU tensors; the split of work over the rayon pool |

/// Fills `out[from..m]`, one weight row's results for activation rows
/// `from..m`: eight rows at a time, then four, then one, where
/// `$row::<R>(args…, i)` gives the results of rows `i..i + R` as `[f32; R]`
/// (a macro for the const `R`; defined before the kernel files, which see it).
#[cfg(target_arch = "x86_64")]
macro_rules! eights_fours_ones {
    ($out:ident, $from:expr, $m:expr, $row:ident($($arg:expr),*)) => {{
        let mut i = $from;
        while i + 8 <= $m {
            $out[i..i + 8].copy_from_slice(&$row::<8>($($arg,)* i));
            i += 8;
        }
        while i + 4 <= $m {
            $out[i..i + 4].copy_from_slice(&$row::<4>($($arg,)* i));
            i += 4;
        }
        while i < $m {
            $out[i] = $row::<1>($($arg,)* i)[0];
            i += 1;
        }
    }};
}

// Each file below holds one concern; the helpers they share are `pub(super)`
// in their file and imported here, so `super::name` reaches them from any of
// the kernel files.
mod amx;
mod attention;
#[cfg(target_arch = "x86_64")]
mod avx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod dense;
pub mod flash;
mod interleaved;
mod kquants;
#[cfg(target_arch = "x86_64")]
mod kquants_avx2;
mod lora;
mod parallel;
mod q8;
mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_x86;
mod rows;
mod tensors;
#[cfg(test)]
mod tests;

pub use amx::{available as amx_available, matmul as bf16_matmul, Bf16Tiles};
pub(crate) use attention::*;
pub use dense::*;
pub use kquants::q5_0_to_q8_0;
pub use lora::DropoutMask;
pub(crate) use lora::{add_low_rank, add_low_rank_into};
use parallel::*;
use q8::*;
pub use quant::*;
#[cfg(target_arch = "x86_64")]
use quant_x86::*;
pub use rows::*;
pub(crate) use tensors::*;

/// True where the CPU has every one of the x86 `features` (false on other architectures).
macro_rules! cpu_has {
    ($($feature:tt),+) => {{
        #[cfg(target_arch = "x86_64")]
        {
            true $(&& std::is_x86_feature_detected!($feature))+
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }};
}

/// AVX-512F and VL: 32 vector registers, which the f32 2×8 tile needs.
pub(super) fn has_avx512vl() -> bool {
    cpu_has!("avx512f", "avx512vl")
}

pub(super) fn has_avx512f() -> bool {
    cpu_has!("avx512f")
}

/// AVX-512F with DQ (64-bit products) and BW (16-bit compares).
pub(super) fn has_avx512_dq_bw() -> bool {
    cpu_has!("avx512f", "avx512dq", "avx512bw")
}

pub(super) fn has_avx2_fma() -> bool {
    cpu_has!("avx2", "fma", "f16c")
}
