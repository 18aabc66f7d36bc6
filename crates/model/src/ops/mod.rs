//! Operations with two paths: candle's fused kernels when no gradient is
//! tracked (inference), and, when one is, the fused kernel with a
//! hand-written backward or a composition of differentiable ops. candle's fused `rms_norm`,
//! `softmax_last_dim` and `rope` return no gradient at all, so calling them
//! on a tracked tensor would silently stop training.
//!
//! | file | holds |
//! |---|---|
//! | `norm.rs`, `rope.rs`, `silu.rs` | RMSNorm and softmax, rotary embeddings, the MLP gate |
//! | `linear.rs` | products with a frozen base weight |
//! | `matmul.rs` | products of tensors without a graph, written once (no zero-filled output) |
//! | `attention.rs` | grouped-query attention (dense, by key span, decoding) |
//! | `logprobs.rs` | per-token log-probabilities through the output layer, logit sums |
//! | `backward.rs` | attaching a hand-written backward to candle's graph |
//! | `dtype.rs` | f32 ↔ f16 conversion of CPU tensors |

mod attention;
mod backward;
mod dtype;
mod linear;
mod logprobs;
mod matmul;
mod norm;
mod rope;
mod silu;
#[cfg(test)]
mod tests;

pub use attention::*;
pub use backward::*;
pub use dtype::*;
pub use linear::*;
pub use logprobs::*;
pub use matmul::*;
pub use norm::*;
pub use rope::*;
pub use silu::*;
