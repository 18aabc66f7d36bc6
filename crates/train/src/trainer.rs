//! The training loop: data order, micro-batches and accumulation, the
//! optimizer step, evaluation, metrics, checkpoints and exact resume.
//!
//! Run directory (`output_dir`):
//!
//! ```text
//! train_config.json        the resolved config (with its fingerprint)
//! tokenize_report.json     rows kept, cut and skipped (with reasons)
//! metrics.jsonl            one line per step (TRL names) and per evaluation (eval_ prefix)
//! checkpoints/step-N/      adapter (PEFT files), optimizer.safetensors, trainer_state.json
//! reference_logps.jsonl    DPO: the reference's log-probs of each pair, computed once
//! adapter/                 the final adapter (PEFT files)
//! curves.png               loss and reward-margin curves
//! ```
//!
//! A checkpoint is written into a temporary folder and renamed, so a kill
//! leaves either the whole checkpoint or none. Resume takes the newest
//! checkpoint, checks the config fingerprint, drops metric lines past its
//! step and continues with the same data order and dropout stream, so the
//! losses equal an uninterrupted run's.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use tabletrace_data::Reporter;
use tabletrace_model::{LoadedModel, Lora};

use tabletrace_data::write_atomic;

use crate::checkpoints::{latest_checkpoint, list_checkpoints, truncate_metrics, warm_start};
use crate::config::{LossParams, TrainConfig};
use crate::error::{io, Error, Result};
use crate::examples::{batch_sequences, read_rows, tokenize, tokenize_dpo, Example, SftTarget, TokenizeReport};
use crate::objective::{dpo_loss, preference_loss, sft_loss, Batch, MetricSums, RefLogps};
use crate::optim::{clip, global_norm, learning_rate, AdamW};
use crate::reference::Reference;

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Total steps of the run.
    pub total_steps: usize,
    /// [`TrainConfig::fingerprint`] of the run.
    pub fingerprint: String,
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Steps done.
    pub steps: usize,
    /// Step it resumed from (0: fresh).
    pub resumed_from: usize,
    /// Training rows used.
    pub train_rows: usize,
    /// Held-out rows.
    pub eval_rows: usize,
    /// Last training metrics.
    pub last: Vec<(String, f64)>,
    /// Final evaluation metrics.
    pub eval: Vec<(String, f64)>,
    /// Training tokens per second (forward + backward, unpadded).
    pub tokens_per_second: f64,
    /// The final adapter.
    pub adapter_dir: PathBuf,
}

/// The micro-batches of an optimizer step: indices into the training rows.
fn step_batches(order: &[usize], step_in_epoch: usize, cfg: &TrainConfig) -> Vec<Vec<usize>> {
    let per_step = cfg.batch_size * cfg.grad_accum;
    let start = step_in_epoch * per_step;
    let end = (start + per_step).min(order.len());
    order[start..end].chunks(cfg.batch_size).map(<[usize]>::to_vec).collect()
}

/// The epoch's row order: a seeded Fisher–Yates shuffle.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = tabletrace_model::Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_f64() * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
    v
}

/// The trainer for one run.
pub struct Trainer<'a> {
    cfg: TrainConfig,
    loss: LossParams,
    loaded: &'a LoadedModel,
    train: Vec<Example>,
    eval: Vec<Example>,
    lora: Lora,
    /// DPO's reference model and its cached log-probs.
    reference: Option<Reference>,
    reporter: &'a dyn Reporter,
    stop: Option<&'a AtomicBool>,
}

impl<'a> Trainer<'a> {
    /// Prepares a run: reads and tokenises rows (reporting skips into the
    /// run directory), splits off evaluation rows and creates the adapter.
    /// Fails early when the output directory is not writable.
    pub fn new(cfg: TrainConfig, loaded: &'a LoadedModel, reporter: &'a dyn Reporter) -> Result<Trainer<'a>> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.output_dir).map_err(io(&cfg.output_dir))?;
        let probe = cfg.output_dir.join(".write-test");
        std::fs::write(&probe, b"ok").map_err(io(&probe))?;
        let _ = std::fs::remove_file(&probe);
        let tok = &loaded.tokenizer;
        let target = if cfg.method == crate::Method::SftQa { SftTarget::Answer } else { SftTarget::Trace };
        let pref = cfg.method.is_preference();
        let tokenize_rows = |path: &Path| {
            let rows = read_rows(path, tok)?;
            if cfg.method == crate::Method::Dpo {
                tokenize_dpo(&rows, tok, cfg.max_length)
            } else {
                tokenize(&rows, tok, cfg.max_length, pref, target)
            }
        };
        let (mut train, mut report) = tokenize_rows(&cfg.train)?;
        let eval = match &cfg.eval {
            Some(p) => {
                let (e, r) = tokenize_rows(p)?;
                report.skipped.extend(r.skipped.into_iter().map(|(id, why)| (format!("eval {id}"), why)));
                e
            }
            None if cfg.eval_fraction > 0.0 => {
                let order = epoch_order(train.len(), cfg.seed ^ 0xE7A1, 0);
                let n_eval = ((train.len() as f64 * cfg.eval_fraction).round() as usize).max(1);
                let held: std::collections::HashSet<usize> = order[..n_eval].iter().copied().collect();
                let mut keep = Vec::new();
                let mut eval = Vec::new();
                for (i, e) in train.into_iter().enumerate() {
                    if held.contains(&i) {
                        eval.push(e)
                    } else {
                        keep.push(e)
                    }
                }
                train = keep;
                eval
            }
            None => Vec::new(),
        };
        write_report(&cfg.output_dir, &report)?;
        if train.is_empty() {
            return Err(Error::Setup(format!(
                "no training rows left from {} ({} skipped; see {})",
                cfg.train.display(),
                report.skipped.len(),
                cfg.output_dir.join("tokenize_report.json").display()
            )));
        }
        let lora = Lora::new(&loaded.model, &cfg.lora.resolve()?, cfg.seed)?;
        if let Some(dir) = &cfg.init_adapter {
            warm_start(&lora, dir, &loaded.model)?;
        }
        let reference = if cfg.method.uses_reference() {
            let init = cfg.init_adapter.as_deref();
            Some(Reference::open(&cfg.output_dir, &cfg.fingerprint(), init, &loaded.model)?)
        } else {
            None
        };
        let loss = cfg.loss.resolve(cfg.method);
        Ok(Trainer { loss, cfg, loaded, train, eval, lora, reference, reporter, stop: None })
    }

    /// Stops at the end of the step during which `flag` becomes true (a
    /// signal handler sets it), after writing a checkpoint of the steps
    /// done: [`Trainer::run`] then returns [`Error::Stopped`].
    pub fn stop_when(&mut self, flag: &'a AtomicBool) {
        self.stop = Some(flag);
    }

    /// The adapter being trained.
    pub fn lora(&self) -> &Lora {
        &self.lora
    }

    /// Optimizer steps in one pass over the training rows (the last may be short).
    fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size * self.cfg.grad_accum)
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> usize {
        if self.cfg.max_steps > 0 {
            self.cfg.max_steps
        } else {
            self.steps_per_epoch() * self.cfg.epochs
        }
    }

    /// The micro-batches of optimizer step `step` (0-based): indices into
    /// the training rows, in the seeded order of its epoch.
    fn step_rows(&self, step: usize) -> Vec<Vec<usize>> {
        let per_epoch = self.steps_per_epoch();
        let order = epoch_order(self.train.len(), self.cfg.seed, step / per_epoch);
        step_batches(&order, step % per_epoch, &self.cfg)
    }

    /// The resolved loss settings.
    pub fn loss_params(&self) -> LossParams {
        self.loss
    }

    /// The 1-based lines (in `train`'s file) of the rows the run's steps
    /// take, in order, every step of every epoch: what another trainer must
    /// read in file order to see the same batches.
    pub fn visit_order(&self) -> Vec<usize> {
        (0..self.total_steps()).flat_map(|step| self.step_rows(step).concat()).map(|i| self.train[i].line()).collect()
    }

    /// Whether every step but the run's last takes `batch_size × grad_accum`
    /// rows (no short step at an epoch's end), so that rows read in file
    /// order fall into the same batches.
    pub fn full_steps(&self) -> bool {
        let per_step = self.cfg.batch_size * self.cfg.grad_accum;
        self.train.len().is_multiple_of(per_step) || self.total_steps() <= self.steps_per_epoch()
    }

    /// The loss of scored sequences, normalised by the step totals; `refs`:
    /// the reference's log-probs of each pair (DPO).
    fn loss_of(
        &self,
        scored: &crate::objective::Scored,
        totals: (usize, usize),
        refs: Option<&[RefLogps]>,
    ) -> Result<(Tensor, MetricSums)> {
        let vocab = self.loaded.model.config().vocab_size;
        if let Some(refs) = refs {
            dpo_loss(scored, refs, &self.loss, totals.0, vocab)
        } else if self.cfg.method.is_preference() {
            preference_loss(scored, &self.loss, totals.0, totals.1, vocab)
        } else {
            sft_loss(scored, totals.1)
        }
    }

    /// Metric sums of one micro-batch and, when `vars` are given, the
    /// gradients of its loss (normalised by the step totals) for them.
    fn micro_batch(
        &self,
        rows: &[&Example],
        totals: (usize, usize),
        vars: Option<&[Tensor]>,
    ) -> Result<(Vec<Option<Tensor>>, MetricSums)> {
        let model = &self.loaded.model;
        let seqs = batch_sequences(rows);
        let batch =
            Batch::layout(&seqs, self.cfg.method.is_preference(), self.loaded.tokenizer.pad_id(), model.device())?;
        let chunk = self.cfg.logprob_chunk;
        let tokens: usize = rows.iter().map(|e| e.tokens()).sum();
        let pad_id = self.loaded.tokenizer.pad_id();
        let refs = self.reference.as_ref().map(|r| r.logps(model, rows, pad_id, chunk)).transpose()?;
        let refs = refs.as_deref();
        let (grads, mut sums) = match vars {
            None => {
                self.lora.set_tracking(false);
                let hidden = model.hidden_states(&batch.ids, &batch.positions, Some(&batch.mask), Some(&self.lora));
                self.lora.set_tracking(true);
                let (_, sums) = self.loss_of(&batch.score_hidden(model, &hidden?, chunk)?, totals, refs)?;
                (Vec::new(), sums)
            }
            Some(vars) if self.cfg.activation_checkpointing => model.backward_checkpointed(
                &batch.ids,
                &batch.positions,
                &batch.mask,
                &self.lora,
                vars,
                self.cfg.keep_mlp_products,
                |hidden| {
                    let scored = batch.score_hidden(model, hidden, chunk).map_err(to_model_error)?;
                    self.loss_of(&scored, totals, refs).map_err(to_model_error)
                },
            )?,
            Some(vars) => {
                let hidden = model.hidden_states(&batch.ids, &batch.positions, Some(&batch.mask), Some(&self.lora))?;
                let (loss, sums) = self.loss_of(&batch.score_hidden(model, &hidden, chunk)?, totals, refs)?;
                let store = loss.backward()?;
                (vars.iter().map(|v| store.get(v).cloned()).collect(), sums)
            }
        };
        sums.tokens = tokens;
        Ok((grads, sums))
    }

    /// `(rows, chosen completion tokens)` of a set of examples.
    fn totals(rows: &[&Example]) -> (usize, usize) {
        let tokens = rows
            .iter()
            .map(|e| match e {
                Example::Preference { chosen, .. } => chosen.scored(),
                Example::Completion { seq, .. } => seq.scored(),
            })
            .sum();
        (rows.len(), tokens)
    }

    /// Loss and metrics on the held-out rows (no update).
    pub fn evaluate(&self) -> Result<Vec<(String, f64)>> {
        self.lora.set_dropout_seed(None);
        let rows: Vec<&Example> = self.eval.iter().collect();
        let totals = Self::totals(&rows);
        let mut sums = MetricSums::default();
        for batch in rows.chunks(self.cfg.batch_size) {
            let (_, s) = self.micro_batch(batch, totals, None)?;
            sums.add(&s);
        }
        Ok(sums
            .to_metrics(self.cfg.method.is_preference(), self.loss.cpo_alpha)
            .into_iter()
            .map(|(k, v)| (format!("eval_{k}"), v))
            .collect())
    }

    /// Runs (or resumes) training to the end; returns the summary.
    pub fn run(&mut self) -> Result<TrainSummary> {
        let cfg = self.cfg.clone();
        let out = cfg.output_dir.clone();
        let total = self.total_steps();
        let fingerprint = cfg.fingerprint();
        let mut resolved = serde_json::to_value(&cfg).expect("the config serialises");
        resolved["fingerprint"] = fingerprint.clone().into();
        resolved["resolved_loss"] = serde_json::to_value(self.loss).expect("serialises");
        resolved["total_steps"] = total.into();
        write_atomic(
            &out.join("train_config.json"),
            serde_json::to_string_pretty(&resolved).expect("json").as_bytes(),
        )?;

        let (mut opt, start) = match latest_checkpoint(&out)? {
            Some((dir, state)) => {
                if state.fingerprint != fingerprint {
                    return Err(Error::Setup(format!(
                        "{} was written by another config (fingerprint {} vs {fingerprint}); \
                         use a new output_dir or delete the checkpoints",
                        dir.display(),
                        state.fingerprint
                    )));
                }
                let saved = Lora::load(&dir.join("adapter"), &self.loaded.model)?;
                let values: HashMap<String, Tensor> =
                    saved.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
                self.lora.assign(&values)?;
                let opt = AdamW::load(
                    &cfg.optim,
                    &dir.join("optimizer.safetensors"),
                    state.step,
                    self.loaded.model.device(),
                )?;
                truncate_metrics(&out.join("metrics.jsonl"), state.step)?;
                tracing::info!(step = state.step, "resuming from {}", dir.display());
                (opt, state.step)
            }
            None => {
                let _ = std::fs::remove_file(out.join("metrics.jsonl"));
                (AdamW::new(&cfg.optim), 0)
            }
        };
        let mut metrics_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out.join("metrics.jsonl"))
            .map_err(io(&out.join("metrics.jsonl")))?;
        let per_epoch = self.steps_per_epoch();
        self.reporter.start(total as u64, &format!("train {}", cfg.method.name()));
        self.reporter.advance(start as u64);
        let (mut last, mut tokens_done, t0) = (Vec::new(), 0usize, Instant::now());
        let named: Vec<(String, candle_core::Var)> =
            self.lora.named_vars().into_iter().map(|(n, v)| (n, v.clone())).collect();
        let var_tensors: Vec<Tensor> = named.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        if start < total && self.stop.is_some_and(|f| f.load(Ordering::SeqCst)) {
            // Asked to stop while setting up: nothing new to save.
            self.reporter.finish();
            let checkpoint = latest_checkpoint(&out)?.map_or_else(|| out.join("checkpoints"), |(dir, _)| dir);
            return Err(Error::Stopped { step: start, total, checkpoint });
        }
        for step in start..total {
            let batches = self.step_rows(step);
            let all: Vec<&Example> = batches.iter().flatten().map(|&i| &self.train[i]).collect();
            let totals = Self::totals(&all);
            let mut grads: HashMap<String, Tensor> = HashMap::new();
            let mut sums = MetricSums::default();
            let t_step = Instant::now();
            for (m, batch) in batches.iter().enumerate() {
                let rows: Vec<&Example> = batch.iter().map(|&i| &self.train[i]).collect();
                let ids = || rows.iter().map(|e| e.id()).collect::<Vec<_>>().join(", ");
                self.lora.set_dropout_seed(Some(
                    cfg.seed ^ ((step as u64) << 16 | m as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
                ));
                let (g, s) = self.micro_batch(&rows, totals, Some(&var_tensors))?;
                if !s.loss.is_finite() {
                    return Err(Error::NotFinite { step: step + 1, micro_batch: m, rows: ids(), what: "loss" });
                }
                for ((name, _), gv) in named.iter().zip(g) {
                    if let Some(gv) = gv {
                        let acc = match grads.remove(name) {
                            Some(prev) => (prev + gv)?,
                            None => gv,
                        };
                        grads.insert(name.clone(), acc);
                    }
                }
                sums.add(&s);
            }
            self.lora.set_dropout_seed(None);
            let norm = global_norm(&grads)?;
            if !norm.is_finite() {
                let ids = all.iter().map(|e| e.id()).collect::<Vec<_>>().join(", ");
                return Err(Error::NotFinite { step: step + 1, micro_batch: 0, rows: ids, what: "gradient" });
            }
            clip(&mut grads, norm, cfg.optim.max_grad_norm)?;
            let lr = learning_rate(&cfg.schedule, cfg.optim.lr, step, total);
            let refs: Vec<(String, &candle_core::Var)> = named.iter().map(|(n, v)| (n.clone(), v)).collect();
            opt.step(&refs, &grads, lr)?;
            let secs = t_step.elapsed().as_secs_f64();
            tokens_done += sums.tokens;
            let mut line = serde_json::Map::new();
            line.insert("step".into(), (step + 1).into());
            line.insert("epoch".into(), ((step + 1) as f64 / per_epoch as f64).into());
            for (k, v) in sums.to_metrics(cfg.method.is_preference(), self.loss.cpo_alpha) {
                line.insert(k.into(), v.into());
            }
            line.insert("learning_rate".into(), lr.into());
            line.insert("grad_norm".into(), norm.into());
            line.insert("tokens_per_second".into(), (sums.tokens as f64 / secs.max(1e-9)).into());
            // Wall seconds of this step: summed, the compute of a run split over sessions.
            line.insert("step_seconds".into(), secs.into());
            last = line.iter().filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f))).collect();
            writeln!(metrics_file, "{}", serde_json::Value::Object(line)).map_err(io(&out.join("metrics.jsonl")))?;
            self.reporter.message(&format!("loss {:.4}", sums.loss));
            self.reporter.advance(1);
            let done = step + 1;
            if cfg.eval_every > 0 && done % cfg.eval_every == 0 && done < total && !self.eval.is_empty() {
                self.log_eval(&mut metrics_file, done)?;
            }
            let stop = done < total && self.stop.is_some_and(|f| f.load(Ordering::SeqCst));
            if (cfg.save_every > 0 && done % cfg.save_every == 0) || done == total || stop {
                metrics_file.flush().map_err(io(&out))?;
                self.save_checkpoint(
                    &out,
                    &opt,
                    TrainerState { step: done, total_steps: total, fingerprint: fingerprint.clone() },
                )?;
            }
            if stop {
                self.reporter.finish();
                let checkpoint = out.join("checkpoints").join(format!("step-{done}"));
                return Err(Error::Stopped { step: done, total, checkpoint });
            }
        }
        self.reporter.finish();
        let eval = if self.eval.is_empty() { Vec::new() } else { self.log_eval(&mut metrics_file, total)? };
        drop(metrics_file);
        let adapter_dir = out.join("adapter");
        let tmp = out.join("adapter.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        self.lora.save(&tmp, &cfg.model)?;
        let _ = std::fs::remove_dir_all(&adapter_dir);
        std::fs::rename(&tmp, &adapter_dir).map_err(io(&adapter_dir))?;
        if let Err(e) = crate::curves::training_curves(&out.join("metrics.jsonl"), &out.join("curves.png")) {
            tracing::warn!("cannot draw the training curves: {e}");
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok(TrainSummary {
            steps: total,
            resumed_from: start,
            train_rows: self.train.len(),
            eval_rows: self.eval.len(),
            last,
            eval,
            tokens_per_second: tokens_done as f64 / secs.max(1e-9),
            adapter_dir,
        })
    }

    fn log_eval(&self, file: &mut std::fs::File, step: usize) -> Result<Vec<(String, f64)>> {
        let metrics = self.evaluate()?;
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        for (k, v) in &metrics {
            line.insert(k.clone(), (*v).into());
        }
        writeln!(file, "{}", serde_json::Value::Object(line)).map_err(io(&self.cfg.output_dir))?;
        Ok(metrics)
    }

    fn save_checkpoint(&self, out: &Path, opt: &AdamW, state: TrainerState) -> Result<()> {
        let root = out.join("checkpoints");
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let dir = root.join(format!("step-{}", state.step));
        let tmp = root.join(format!(".step-{}.tmp", state.step));
        let _ = std::fs::remove_dir_all(&tmp);
        self.lora.save(&tmp.join("adapter"), &self.cfg.model)?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(&state).expect("json"))
            .map_err(io(&tmp))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        // Keep the newest `keep_checkpoints`.
        let mut steps = list_checkpoints(out)?;
        steps.sort();
        let keep = self.cfg.keep_checkpoints.max(1);
        for (s, d) in steps.iter().take(steps.len().saturating_sub(keep)) {
            tracing::debug!(step = s, "removing old checkpoint");
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }
}

fn write_report(out: &Path, report: &TokenizeReport) -> Result<()> {
    if !report.skipped.is_empty() {
        tracing::warn!("{} rows skipped while tokenising (see tokenize_report.json)", report.skipped.len());
    }
    Ok(write_atomic(&out.join("tokenize_report.json"), serde_json::to_string_pretty(report).expect("json").as_bytes())?)
}

/// Carries a trainer error through the model's checkpointed backward.
fn to_model_error(e: Error) -> tabletrace_model::Error {
    match e {
        Error::Model(m) => m,
        Error::Candle(c) => tabletrace_model::Error::Candle(c),
        other => tabletrace_model::Error::Request(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_steps_cover_them() {
        let o = epoch_order(10, 7, 0);
        let mut s = o.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_ne!(o, epoch_order(10, 7, 1));
        let cfg = TrainConfig { batch_size: 3, grad_accum: 2, ..Default::default() };
        let b0 = step_batches(&o, 0, &cfg);
        let b1 = step_batches(&o, 1, &cfg);
        assert_eq!(b0.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3]);
        assert_eq!(b1.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 1]);
    }
}
