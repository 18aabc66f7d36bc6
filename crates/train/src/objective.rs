//! Sequence log-probabilities and the losses: the CPO family exactly as
//! TRL's `CPOTrainer` computes them, and SFT on completion tokens.
//!
//! Chosen and rejected share one forward pass. TRL concatenates them into
//! one right-padded batch, so the prompt is computed twice; here a pair is
//! laid out as one row `[prompt | chosen + padding | rejected + padding]`
//! whose mask lets each completion see the prompt and itself only, with the
//! positions of TRL's layout ([`Batch::shared_prompt`]). Every score and
//! metric is that of TRL's layout (tested); the prompt costs one forward and
//! one backward instead of two. Token log-probs come from the final hidden
//! states through [`ops::token_logprobs`], chunked, so no `(tokens, vocab)`
//! tensor stays alive for the backward.
//!
//! Losses are normalised by the whole optimizer step's totals (pairs,
//! chosen tokens), so that accumulating micro-batches gives exactly the
//! gradient of one big batch.

use candle_core::{DType, Tensor};
use tabletrace_model::{ops, Adapter, Model};

use crate::config::{LossParams, LossType};
use crate::error::Result;
use crate::examples::Sequence;

/// Per-sequence scores of one forward pass.
pub struct Scored {
    /// Summed completion log-probs, `(S,)`, differentiable in the adapter.
    pub logp_sums: Tensor,
    /// Completion tokens per sequence.
    pub counts: Vec<usize>,
    /// Per sequence, the sum of all logits over every position of the
    /// padded batch and the whole vocabulary (for TRL's `logits/*`).
    pub logit_sums: Vec<f64>,
    /// Padded length of the batch.
    pub padded_len: usize,
    /// Per sequence, the sum of all logits (whole vocabulary) at the
    /// positions that predict its completion tokens (TRL DPO's `logits/*`).
    pub scored_logit_sums: Vec<f64>,
}

/// Sequences laid out as one right-padded batch.
///
/// Padding follows Hugging Face with right padding: positions count from 0
/// through the padding, and every query attends to the real tokens at or
/// before it (padding queries too, so their logits match for the metrics).
pub struct Batch {
    /// `(S, T)` token ids.
    pub ids: Tensor,
    /// `(S, T)` positions.
    pub positions: Tensor,
    /// `(S, T, T)` additive mask.
    pub mask: Tensor,
    /// Flat positions `s * T + t` whose next token is scored.
    rows: Tensor,
    /// The same positions, on the host.
    row_positions: Vec<u32>,
    /// The scored tokens.
    targets: Vec<u32>,
    /// `(S, N)` 0/1: which scored token belongs to which sequence.
    segments: Tensor,
    counts: Vec<usize>,
    padded_len: usize,
    /// Per sequence, the flat positions whose logits TRL's `logits/*`
    /// metric sums for it (its whole padded row in TRL's layout).
    logit_positions: Vec<Vec<usize>>,
}

impl Batch {
    /// Lays out `seqs`, padding with `pad_id`.
    pub fn new(seqs: &[&Sequence], pad_id: u32, device: &candle_core::Device) -> Result<Batch> {
        let s = seqs.len();
        let t = seqs.iter().map(|q| q.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(s * t);
        let mut mask = Vec::with_capacity(s * t * t);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut counts = Vec::with_capacity(s);
        for (r, q) in seqs.iter().enumerate() {
            let n = q.ids.len();
            ids.extend(q.ids.iter().copied().chain(std::iter::repeat_n(pad_id, t - n)));
            for i in 0..t {
                for j in 0..t {
                    mask.push(if j <= i && j < n { 0.0f32 } else { f32::NEG_INFINITY });
                }
            }
            for k in q.completion_start.max(1)..n {
                rows.push((r * t + k - 1) as u32);
                targets.push(q.ids[k]);
            }
            counts.push(q.scored());
        }
        let total: usize = counts.iter().sum();
        let positions: Vec<u32> = (0..s).flat_map(|_| 0..t as u32).collect();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (s, t), device)?,
            positions: Tensor::from_vec(positions, (s, t), device)?,
            mask: Tensor::from_vec(mask, (s, t, t), device)?,
            rows: Tensor::from_vec(rows.clone(), total, device)?,
            row_positions: rows,
            targets,
            segments: segments(&counts, device)?,
            counts,
            padded_len: t,
            logit_positions: (0..s).map(|r| (r * t..(r + 1) * t).collect()).collect(),
        })
    }

    /// Lays out preference pairs (`seqs` = chosen sequences, then the
    /// rejected ones in the same order, as
    /// [`batch_sequences`](crate::examples::batch_sequences) gives them) with
    /// each pair's prompt computed once: row `i` holds
    /// `[prompt | chosen + padding | rejected + padding]`.
    ///
    /// Positions and visibility are those of TRL's right-padded layout with
    /// `T` = the longest sequence: prompt tokens at `0..P` see the prompt
    /// causally; a completion token (or a padding slot after it) at
    /// position `p` sees the prompt and its own completion's real tokens up
    /// to `p`, never the other completion. Slots past a row's end (rows
    /// differ in length when prompts do) see the first token only and are
    /// never read. So every hidden state TRL computes is computed here once,
    /// the shared prompt's once for both completions, and scores, gradients
    /// and metrics are TRL's.
    ///
    /// `None` when a pair's chosen and rejected do not start with the same
    /// prompt tokens (or the prompt is empty): use [`Batch::new`] then.
    pub fn shared_prompt(seqs: &[&Sequence], pad_id: u32, device: &candle_core::Device) -> Result<Option<Batch>> {
        let n = seqs.len() / 2;
        if n == 0 || seqs.len() != 2 * n {
            return Ok(None);
        }
        let (chosen, rejected) = seqs.split_at(n);
        for (c, r) in chosen.iter().zip(rejected) {
            let p = c.completion_start;
            if p == 0 || r.completion_start != p || c.ids.len() < p || r.ids.len() < p || c.ids[..p] != r.ids[..p] {
                return Ok(None);
            }
        }
        let t = seqs.iter().map(|q| q.ids.len()).max().unwrap_or(0);
        let row_len = |p: usize| p + 2 * (t - p);
        let l = chosen.iter().map(|c| row_len(c.completion_start)).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(n * l);
        let mut positions = Vec::with_capacity(n * l);
        let mut mask = vec![f32::NEG_INFINITY; n * l * l];
        let mut chosen_rows = Vec::new();
        let mut rejected_rows = Vec::new();
        let (mut chosen_targets, mut rejected_targets) = (Vec::new(), Vec::new());
        let mut logit_positions = vec![Vec::new(); 2 * n];
        for (i, (c, r)) in chosen.iter().zip(rejected).enumerate() {
            let p = c.completion_start;
            let w = t - p; // slots per completion, padding included
            let (nc, nr) = (c.ids.len() - p, r.ids.len() - p);
            ids.extend_from_slice(&c.ids[..p]);
            ids.extend(c.ids[p..].iter().copied().chain(std::iter::repeat_n(pad_id, w - nc)));
            ids.extend(r.ids[p..].iter().copied().chain(std::iter::repeat_n(pad_id, w - nr)));
            ids.extend(std::iter::repeat_n(pad_id, l - row_len(p)));
            positions.extend(0..p as u32);
            positions.extend((p..t).map(|x| x as u32));
            positions.extend((p..t).map(|x| x as u32));
            positions.extend(std::iter::repeat_n(0, l - row_len(p)));
            let m = &mut mask[i * l * l..(i + 1) * l * l];
            for q in 0..p {
                m[q * l..q * l + q + 1].fill(0.0);
            }
            for (start, real) in [(p, nc), (p + w, nr)] {
                for k in 0..w {
                    let q = start + k;
                    m[q * l..q * l + p].fill(0.0);
                    m[q * l + start..q * l + start + (k + 1).min(real)].fill(0.0);
                }
            }
            for q in row_len(p)..l {
                m[q * l] = 0.0;
            }
            // The hidden state that predicts completion token k (k ≥ p ≥ 1).
            let at = |k: usize, start: usize| (i * l + if k - 1 < p { k - 1 } else { start + k - 1 - p }) as u32;
            for k in p..c.ids.len() {
                chosen_rows.push(at(k, p));
                chosen_targets.push(c.ids[k]);
            }
            for k in p..r.ids.len() {
                rejected_rows.push(at(k, p + w));
                rejected_targets.push(r.ids[k]);
            }
            logit_positions[i] = (i * l..i * l + p + w).collect();
            logit_positions[n + i] = (i * l..i * l + p).chain(i * l + p + w..i * l + p + 2 * w).collect();
        }
        let counts: Vec<usize> = seqs.iter().map(|q| q.scored()).collect();
        let total: usize = counts.iter().sum();
        chosen_rows.extend(rejected_rows);
        chosen_targets.extend(rejected_targets);
        Ok(Some(Batch {
            ids: Tensor::from_vec(ids, (n, l), device)?,
            positions: Tensor::from_vec(positions, (n, l), device)?,
            mask: Tensor::from_vec(mask, (n, l, l), device)?,
            rows: Tensor::from_vec(chosen_rows.clone(), total, device)?,
            row_positions: chosen_rows,
            targets: chosen_targets,
            segments: segments(&counts, device)?,
            counts,
            padded_len: t,
            logit_positions,
        }))
    }

    /// The layout for `seqs`: pairs with a shared prompt when `preference`
    /// and the prompts allow it, else one right-padded row per sequence.
    pub fn layout(seqs: &[&Sequence], preference: bool, pad_id: u32, device: &candle_core::Device) -> Result<Batch> {
        if preference {
            if let Some(b) = Batch::shared_prompt(seqs, pad_id, device)? {
                return Ok(b);
            }
        }
        Batch::new(seqs, pad_id, device)
    }

    /// Scores the batch from the model's final hidden states `(S, T, H)`.
    pub fn score_hidden(&self, model: &Model, hidden: &Tensor, chunk: usize) -> Result<Scored> {
        let (s, t, h) = hidden.dims3()?;
        let flat = hidden.reshape((s * t, h))?.to_dtype(DType::F32)?;
        let (weight, bias) = model.output_weight()?;
        let weight = weight.to_dtype(DType::F32)?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let picked = flat.index_select(&self.rows, 0)?; // (N, H)
        let logp = ops::token_logprobs(&picked, &weight, bias.as_ref(), &self.targets, chunk)?; // (N,)
        let logp_sums = self.segments.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?; // (S,)
        let per_position: Vec<f64> = ops::logit_sums(&flat, &weight, bias.as_ref())?.to_dtype(DType::F64)?.to_vec1()?;
        let logit_sums = self.logit_positions.iter().map(|ps| ps.iter().map(|&i| per_position[i]).sum()).collect();
        let mut rows = self.row_positions.iter();
        let scored_logit_sums =
            self.counts.iter().map(|&c| rows.by_ref().take(c).map(|&i| per_position[i as usize]).sum()).collect();
        Ok(Scored {
            logp_sums,
            counts: self.counts.clone(),
            logit_sums,
            padded_len: self.padded_len,
            scored_logit_sums,
        })
    }
}

/// `(S, N)` 0/1 matrix: sequence `r` owns the next `counts[r]` of the `N`
/// scored tokens, in order.
fn segments(counts: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let total: usize = counts.iter().sum();
    let mut seg = vec![0f32; counts.len() * total];
    let mut at = 0;
    for (r, &c) in counts.iter().enumerate() {
        seg[r * total + at..r * total + at + c].fill(1.0);
        at += c;
    }
    Ok(Tensor::from_vec(seg, (counts.len(), total), device)?)
}

/// Scores `seqs` in one forward pass: token `t + 1` of each completion
/// under the model's prediction at position `t`. With `preference`, `seqs`
/// are chosen then rejected sequences and prompts are shared where they
/// can be (see [`Batch::layout`]).
pub fn score(
    model: &Model,
    adapter: Option<&dyn Adapter>,
    seqs: &[&Sequence],
    preference: bool,
    pad_id: u32,
    chunk: usize,
) -> Result<Scored> {
    let batch = Batch::layout(seqs, preference, pad_id, model.device())?;
    let hidden = model.hidden_states(&batch.ids, &batch.positions, Some(&batch.mask), adapter)?; // (S, T, H)
    batch.score_hidden(model, &hidden, chunk)
}

/// Sums over one micro-batch of what TRL logs, to be averaged over a step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricSums {
    /// Pairs (or SFT rows) seen.
    pub rows: usize,
    /// Completion tokens of chosen sequences (the NLL's denominator).
    pub chosen_tokens: usize,
    /// Σ loss contributions (already normalised by the step's totals).
    pub loss: f64,
    /// Σ chosen log-prob (negated: NLL numerator).
    pub nll: f64,
    /// Σ β·logp(chosen).
    pub reward_chosen: f64,
    /// Σ β·logp(rejected).
    pub reward_rejected: f64,
    /// Pairs with chosen reward above rejected.
    pub accurate: usize,
    /// Σ logp(chosen) (summed or averaged per the loss type).
    pub logp_chosen: f64,
    /// Σ logp(rejected).
    pub logp_rejected: f64,
    /// Σ over micro-batches of the mean chosen logit.
    pub logits_chosen: f64,
    /// Σ over micro-batches of the mean rejected logit.
    pub logits_rejected: f64,
    /// Micro-batches.
    pub batches: usize,
    /// Tokens forwarded (prompt + completion, unpadded).
    pub tokens: usize,
}

impl MetricSums {
    /// Adds another micro-batch.
    pub fn add(&mut self, o: &MetricSums) {
        self.rows += o.rows;
        self.chosen_tokens += o.chosen_tokens;
        self.loss += o.loss;
        self.nll += o.nll;
        self.reward_chosen += o.reward_chosen;
        self.reward_rejected += o.reward_rejected;
        self.accurate += o.accurate;
        self.logp_chosen += o.logp_chosen;
        self.logp_rejected += o.logp_rejected;
        self.logits_chosen += o.logits_chosen;
        self.logits_rejected += o.logits_rejected;
        self.batches += o.batches;
        self.tokens += o.tokens;
    }

    /// TRL's metric names and values (means over the step), preference or SFT.
    pub fn to_metrics(&self, preference: bool, cpo_alpha: f64) -> Vec<(&'static str, f64)> {
        let n = self.rows.max(1) as f64;
        let b = self.batches.max(1) as f64;
        let nll = self.nll / self.chosen_tokens.max(1) as f64;
        if !preference {
            return vec![("loss", self.loss), ("nll_loss", nll)];
        }
        vec![
            ("loss", self.loss),
            ("rewards/chosen", self.reward_chosen / n),
            ("rewards/rejected", self.reward_rejected / n),
            ("rewards/accuracies", self.accurate as f64 / n),
            ("rewards/margins", (self.reward_chosen - self.reward_rejected) / n),
            ("logps/chosen", self.logp_chosen / n),
            ("logps/rejected", self.logp_rejected / n),
            ("logits/chosen", self.logits_chosen / b),
            ("logits/rejected", self.logits_rejected / b),
            ("nll_loss", if cpo_alpha == 0.0 { 0.0 } else { nll }),
        ]
    }
}

/// `log σ(x)`, stable and differentiable: `min(x, 0) - log(1 + e^{-|x|})`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0.0)? - soft)?)
}

/// The CPO-family loss of one micro-batch of pairs, normalised by the
/// step's `step_pairs` and `step_chosen_tokens`, and its metric sums.
///
/// `scored` holds the chosen sequences first, then the rejected ones.
pub fn preference_loss(
    scored: &Scored,
    p: &LossParams,
    step_pairs: usize,
    step_chosen_tokens: usize,
    vocab: usize,
) -> Result<(Tensor, MetricSums)> {
    let s = scored.counts.len();
    let n = s / 2;
    let device = scored.logp_sums.device();
    let counts: Vec<f32> = scored.counts.iter().map(|&c| c.max(1) as f32).collect();
    let per_seq = if p.loss_type.averages() {
        (&scored.logp_sums / Tensor::from_vec(counts, s, device)?)?
    } else {
        scored.logp_sums.clone()
    };
    let chosen = per_seq.narrow(0, 0, n)?;
    let rejected = per_seq.narrow(0, n, n)?;
    let mut logits = (&chosen - &rejected)?;
    let beta = p.beta;
    let losses = match p.loss_type {
        LossType::Sigmoid | LossType::Simpo => {
            if p.loss_type == LossType::Simpo {
                logits = (logits - p.simpo_gamma / beta)?;
            }
            let pos = log_sigmoid(&(&logits * beta)?)?;
            let neg = log_sigmoid(&(&logits * -beta)?)?;
            ((pos * -(1.0 - p.label_smoothing))? - (neg * p.label_smoothing)?)?
        }
        LossType::Hinge => ((&logits * -beta)? + 1.0)?.relu()?,
        LossType::Ipo => (logits - 1.0 / (2.0 * beta))?.sqr()?,
        LossType::Robust => {
            return Err(crate::Error::Setup("the robust loss is DPO's: it needs reference log-probs".into()))
        }
    };
    let pref = (losses.sum_all()? / step_pairs.max(1) as f64)?;
    let chosen_sum = scored.logp_sums.narrow(0, 0, n)?.sum_all()?;
    let nll = (chosen_sum.neg()? / step_chosen_tokens.max(1) as f64)?;
    let loss = if p.cpo_alpha == 0.0 { pref } else { (pref + (&nll * p.cpo_alpha)?)? };

    let c: Vec<f64> = chosen.to_dtype(DType::F64)?.to_vec1()?;
    let r: Vec<f64> = rejected.to_dtype(DType::F64)?.to_vec1()?;
    let denom = (n * scored.padded_len * vocab).max(1) as f64;
    let sums = MetricSums {
        rows: n,
        chosen_tokens: scored.counts[..n].iter().sum(),
        loss: loss.to_dtype(DType::F64)?.to_scalar()?,
        nll: -chosen_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        reward_chosen: beta * c.iter().sum::<f64>(),
        reward_rejected: beta * r.iter().sum::<f64>(),
        accurate: c.iter().zip(&r).filter(|(a, b)| beta * **a > beta * **b).count(),
        logp_chosen: c.iter().sum(),
        logp_rejected: r.iter().sum(),
        logits_chosen: scored.logit_sums[..n].iter().sum::<f64>() / denom,
        logits_rejected: scored.logit_sums[n..].iter().sum::<f64>() / denom,
        batches: 1,
        tokens: 0,
    };
    Ok((loss, sums))
}

/// Reference log-probs of one pair: `(chosen, rejected)`, summed over
/// completion tokens.
pub type RefLogps = (f64, f64);

/// The DPO loss of one micro-batch of pairs (TRL 1.16's `DPOTrainer`,
/// `sigmoid` or `robust`), normalised by the step's `step_pairs`, and its
/// metric sums. `scored` holds the chosen sequences first, then the
/// rejected ones; `refs` the reference's log-probs of each pair, in order.
pub fn dpo_loss(
    scored: &Scored,
    refs: &[RefLogps],
    p: &LossParams,
    step_pairs: usize,
    vocab: usize,
) -> Result<(Tensor, MetricSums)> {
    let n = scored.counts.len() / 2;
    debug_assert_eq!(refs.len(), n);
    let device = scored.logp_sums.device();
    let chosen = scored.logp_sums.narrow(0, 0, n)?;
    let rejected = scored.logp_sums.narrow(0, n, n)?;
    let ref_chosen: Vec<f32> = refs.iter().map(|r| r.0 as f32).collect();
    let ref_rejected: Vec<f32> = refs.iter().map(|r| r.1 as f32).collect();
    let ref_delta = (Tensor::from_vec(ref_chosen, n, device)? - Tensor::from_vec(ref_rejected, n, device)?)?;
    let delta = ((&chosen - &rejected)? - ref_delta)?;
    let (beta, eps) = (p.beta, p.label_smoothing);
    let pos = log_sigmoid(&(&delta * beta)?)?;
    let losses = match p.loss_type {
        LossType::Sigmoid => pos.neg()?,
        LossType::Robust => {
            let neg = log_sigmoid(&(&delta * -beta)?)?;
            (((pos * -(1.0 - eps))? + (neg * eps)?)? / (1.0 - 2.0 * eps))?
        }
        other => return Err(crate::Error::Setup(format!("DPO trains with sigmoid or robust, not {other:?}"))),
    };
    let loss = (losses.sum_all()? / step_pairs.max(1) as f64)?;

    let c: Vec<f64> = chosen.to_dtype(DType::F64)?.to_vec1()?;
    let r: Vec<f64> = rejected.to_dtype(DType::F64)?.to_vec1()?;
    let reward = |x: f64, reference: f64| beta * (x - reference);
    let chosen_tokens: usize = scored.counts[..n].iter().sum();
    let rejected_tokens: usize = scored.counts[n..].iter().sum();
    let mean_logit =
        |sums: &[f64], tokens: usize| sums.iter().sum::<f64>() / vocab.max(1) as f64 / tokens.max(1) as f64;
    let sums = MetricSums {
        rows: n,
        chosen_tokens,
        loss: loss.to_dtype(DType::F64)?.to_scalar()?,
        nll: -c.iter().sum::<f64>(),
        reward_chosen: c.iter().zip(refs).map(|(x, rf)| reward(*x, rf.0)).sum(),
        reward_rejected: r.iter().zip(refs).map(|(x, rf)| reward(*x, rf.1)).sum(),
        accurate: c.iter().zip(&r).zip(refs).filter(|((a, b), rf)| reward(**a, rf.0) > reward(**b, rf.1)).count(),
        logp_chosen: c.iter().sum(),
        logp_rejected: r.iter().sum(),
        logits_chosen: mean_logit(&scored.scored_logit_sums[..n], chosen_tokens),
        logits_rejected: mean_logit(&scored.scored_logit_sums[n..], rejected_tokens),
        batches: 1,
        tokens: 0,
    };
    Ok((loss, sums))
}

/// The SFT loss of one micro-batch: negative log-likelihood of completion
/// tokens, divided by the step's completion tokens.
pub fn sft_loss(scored: &Scored, step_tokens: usize) -> Result<(Tensor, MetricSums)> {
    let total = scored.logp_sums.sum_all()?;
    let loss = (total.neg()? / step_tokens.max(1) as f64)?;
    let sums = MetricSums {
        rows: scored.counts.len(),
        chosen_tokens: scored.counts.iter().sum(),
        loss: loss.to_dtype(DType::F64)?.to_scalar()?,
        nll: -total.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        batches: 1,
        ..Default::default()
    };
    Ok((loss, sums))
}
