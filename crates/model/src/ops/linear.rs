//! Products with a frozen base weight: the gradient flows to the input only
//! (optionally from a value computed elsewhere, such as bf16 AMX tiles).

use candle_core::{Result, Tensor};

use super::with_input_gradient;

/// `x @ rhs` for a frozen weight given as the right-hand side `rhs`
/// (`(in, out)`, a transposed view or a contiguous transposed copy), for `x`
/// of any rank.
///
/// candle's matmul backward always computes the weight's gradient, even for
/// a weight that is not trained: for LoRA that costs a full fine-tuning's
/// compute and memory. Here the product is computed without a graph and
/// re-attached to `x` through a pass-through op whose backward returns
/// the input's gradient only. A weight that is itself a variable (full
/// fine-tuning) takes the ordinary differentiable path.
pub fn frozen_linear(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if rhs.track_op() {
        return plain_linear(x, rhs);
    }
    frozen_linear_with_value(x, &plain_linear(&x.detach(), rhs)?, rhs)
}

/// The graph of [`frozen_linear`] without its value: zeros shaped like
/// `x @ rhs`, whose backward is the product's (`dx = dy @ rhsᵀ`).
///
/// For a recomputation that only wants gradients: when nothing downstream
/// reads the product's value (the last projection of a layer, added to the
/// residual stream), its Jacobian does not depend on that value, so the
/// product itself need not be computed.
pub fn frozen_linear_gradient_only(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if rhs.track_op() || !x.track_op() {
        return frozen_linear(x, rhs);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank > 0") = rhs.dim(1)?;
    frozen_linear_with_value(x, &Tensor::zeros(dims, x.dtype(), x.device())?, rhs)
}

/// `value` (the product `x @ rhs` for a frozen `rhs`, computed without a
/// graph; any value when only gradients are wanted) attached to `x` with
/// the product's backward.
pub fn frozen_linear_with_value(x: &Tensor, value: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let rhs_t = rhs.t()?;
    with_input_gradient(x, value, Box::new(move |grad: &Tensor| plain_linear(grad, &rhs_t)))
}

/// `x @ rhs` with `x` flattened to 2-D and reshaped back.
pub(super) fn plain_linear(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    match x.rank() {
        2 => x.matmul(rhs),
        _ => {
            let dims = x.dims().to_vec();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let y = x.reshape((rows, dims[dims.len() - 1]))?.matmul(rhs)?;
            let mut out = dims;
            *out.last_mut().expect("rank > 0") = rhs.dim(1)?;
            y.reshape(out)
        }
    }
}
