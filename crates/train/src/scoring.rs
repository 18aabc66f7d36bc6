//! Scoring preference pairs without training (`tabletrace pairs score`):
//! each pair's log-probabilities and margin under a model (and adapter), and
//! the loss metrics of all pairs as one batch, with TRL's names.

use serde::Serialize;
use tabletrace_model::{Adapter, Model};

use crate::config::LossParams;
use crate::error::{Error, Result};
use crate::examples::Example;
use crate::objective::{preference_loss, score, MetricSums};

/// One pair's scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairScore {
    /// The pair's id.
    pub id: String,
    /// `log π(chosen | prompt)`: summed, or averaged per token for the
    /// length-normalised losses (ipo, simpo), as the loss uses it.
    #[serde(rename = "logps/chosen")]
    pub logp_chosen: f64,
    /// The same for the rejected trace.
    #[serde(rename = "logps/rejected")]
    pub logp_rejected: f64,
    /// `β (logps/chosen − logps/rejected)`.
    pub margin: f64,
    /// Scored tokens of the chosen completion.
    pub chosen_tokens: usize,
    /// Scored tokens of the rejected completion.
    pub rejected_tokens: usize,
}

/// Every pair's scores and the metrics of all of them as one batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairScores {
    /// Per pair, in input order.
    pub pairs: Vec<PairScore>,
    /// `loss`, `rewards/*`, `logps/*`, `nll_loss`, … as the trainer logs them.
    pub metrics: Vec<(String, f64)>,
}

/// Scores the preference rows of `examples` in forward passes of
/// `batch_size` pairs (SFT rows are ignored), padding with `pad_id`.
pub fn score_pairs(
    model: &Model,
    adapter: Option<&dyn Adapter>,
    examples: &[Example],
    params: &LossParams,
    batch_size: usize,
    pad_id: u32,
) -> Result<PairScores> {
    let pairs: Vec<(&str, _, _)> = examples
        .iter()
        .filter_map(|e| match e {
            Example::Preference { id, chosen, rejected, .. } => Some((id.as_str(), chosen, rejected)),
            _ => None,
        })
        .collect();
    if pairs.is_empty() {
        return Err(Error::Setup("no preference pairs to score".into()));
    }
    let chosen_tokens: usize = pairs.iter().map(|p| p.1.scored()).sum();
    let vocab = model.config().vocab_size;
    let mut sums = MetricSums::default();
    let mut out = Vec::with_capacity(pairs.len());
    for batch in pairs.chunks(batch_size.max(1)) {
        let seqs: Vec<_> = batch.iter().map(|p| p.1).chain(batch.iter().map(|p| p.2)).collect();
        let scored = score(model, adapter, &seqs, true, pad_id, 256)?;
        let (_, s) = preference_loss(&scored, params, pairs.len(), chosen_tokens, vocab)?;
        let logp: Vec<f32> = scored.logp_sums.to_vec1()?;
        let n = batch.len();
        for (i, p) in batch.iter().enumerate() {
            let (c, r) = (logp[i] as f64, logp[n + i] as f64);
            let (cn, rn) = (scored.counts[i].max(1) as f64, scored.counts[n + i].max(1) as f64);
            let (lc, lr) = if params.loss_type.averages() { (c / cn, r / rn) } else { (c, r) };
            out.push(PairScore {
                id: p.0.to_string(),
                logp_chosen: lc,
                logp_rejected: lr,
                margin: params.beta * (lc - lr),
                chosen_tokens: scored.counts[i],
                rejected_tokens: scored.counts[n + i],
            });
        }
        // Mean-logit metrics are per forward pass in TRL; average them over passes.
        sums.add(&s);
    }
    let metrics = sums.to_metrics(true, params.cpo_alpha).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Ok(PairScores { pairs: out, metrics })
}
