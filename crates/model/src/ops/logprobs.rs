//! Per-token log-probabilities through the output layer in chunks (no `(N, V)`
//! logits kept for the backward), and the logit sums of TRL's mean-logit metrics.

use candle_core::{Result, Tensor, D};

use super::{attach, matmul, Backward};

/// Log-probabilities of `targets[i]` under `softmax(hidden[i] @ weight^T + bias)`,
/// for `hidden` `(N, H)`, `weight` `(V, H)`: the language-model loss's core
/// without a `(N, V)` logits tensor alive beyond one chunk of `chunk` rows.
///
/// The backward recomputes each chunk's logits (one extra product) and
/// returns `g_i (W[y_i] - softmax_i W)` for `hidden` only: the output
/// weight is frozen. A weight that is itself a variable takes the plain
/// differentiable path (full logits).
pub fn token_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    if targets.len() != n {
        candle_core::bail!("token_logprobs: {} targets for {n} rows", targets.len());
    }
    let device = hidden.device().clone();
    let targets_t = Tensor::from_slice(targets, n, &device)?;
    let logits_of = |h: &Tensor| -> Result<Tensor> {
        let l = matmul(h, &weight.t()?)?;
        match bias {
            Some(b) => l.broadcast_add(b),
            None => Ok(l),
        }
    };
    if weight.track_op() || bias.is_some_and(|b| b.track_op()) {
        let logp = candle_nn::ops::log_softmax(&logits_of(hidden)?, D::Minus1)?;
        return logp.gather(&targets_t.unsqueeze(1)?, 1)?.squeeze(1);
    }
    let chunk = chunk.max(1);
    let detached = hidden.detach();
    let (mut logps, mut lses) = (Vec::new(), Vec::new());
    for at in (0..n).step_by(chunk) {
        let c = chunk.min(n - at);
        let logits = logits_of(&detached.narrow(0, at, c)?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?; // (c, 1)
        let picked = logits.gather(&targets_t.narrow(0, at, c)?.unsqueeze(1)?, 1)?;
        logps.push((picked - &lse)?.squeeze(1)?);
        lses.push(lse.squeeze(1)?);
    }
    let logp = Tensor::cat(&logps, 0)?;
    if !hidden.track_op() {
        return Ok(logp);
    }
    let lse = Tensor::cat(&lses, 0)?;
    let (weight, bias) = (weight.clone(), bias.cloned());
    let backward: Backward = Box::new(move |grad: &Tensor| {
        let mut parts = Vec::new();
        for at in (0..n).step_by(chunk) {
            let c = chunk.min(n - at);
            let h = detached.narrow(0, at, c)?;
            let mut logits = matmul(&h, &weight.t()?)?;
            if let Some(b) = &bias {
                logits = logits.broadcast_add(b)?;
            }
            let p = logits.broadcast_sub(&lse.narrow(0, at, c)?.unsqueeze(1)?)?.exp()?; // (c, V)
            let picked = weight.index_select(&targets_t.narrow(0, at, c)?, 0)?; // (c, H)
            let g = grad.narrow(0, at, c)?.unsqueeze(1)?;
            parts.push((picked - matmul(&p, &weight)?)?.broadcast_mul(&g)?);
        }
        Tensor::cat(&parts, 0)
    });
    attach(hidden, &logp, "token-logprobs", backward)
}

/// Per row of `hidden` `(N, H)`, the sum over the vocabulary of
/// `hidden @ weight^T + bias`, without the `(N, V)` product: `hidden · Σ_v W[v] + Σ b`.
/// For the mean-logit metrics TRL logs. No gradient.
pub fn logit_sums(hidden: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let col = weight.detach().sum_keepdim(0)?.t()?; // (H, 1)
    let s = hidden.detach().matmul(&col)?.squeeze(1)?;
    match bias {
        Some(b) => s.affine(1.0, b.detach().sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?),
        None => Ok(s),
    }
}
