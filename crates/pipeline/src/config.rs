//! `pipeline.toml`: the run directory, the data and its split, the model,
//! and one section per stage (`[traces]`, `[pairs]`, `[train]`, `[eval]`).
//! Values are checked on their own ([`PipelineConfig::validate`]) and
//! against this machine ([`PipelineConfig::check_environment`]) before any
//! stage runs.
//!
//! The stage sections keep flat keys (`lora_r`, `beta`, …) rather than
//! embedding the stage crates' configs: their serialised form is the stages'
//! fingerprint ([`crate::Fingerprints`]), and run directories made before must
//! keep resuming. [`TrainStage::train_config`] converts into the trainer's own
//! [`TrainConfig`]; methods and the pair policy are the stage crates' types.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tabletrace_trace::{GeneratorSpec, PairPolicy, PromptStyle};
use tabletrace_train::{Method, TrainConfig};

use crate::error::{config, Result};

/// The embedded default pipeline: `configs/default.toml`, compiled in.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../configs/default.toml");

/// Trace generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracesStage {
    /// Generators: `program`, `local:MODEL`, `http:URL[,URL]#MODEL`. Default program and local:smollm2-135m.
    pub generators: Vec<GeneratorSpec>,
    /// Negatives per question and generator. Default 2.
    pub negatives: usize,
    /// Training questions given to LLM generators (the program tracer takes all). Default 8.
    pub llm_questions: usize,
    /// New tokens per LLM trace. Default 160.
    pub max_tokens: usize,
    /// LLM prompts per batch. Default 8.
    pub batch: usize,
    /// Share of an LLM generator's calls that may fail without failing the
    /// stage (`traces --max-failed`); report.md then says how many failed.
    /// Default 0: any failed call fails the stage, and a re-run retries the
    /// failed calls only.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_failed: f64,
    /// LLM generators sample this many traces per question with the
    /// training prompt (`traces --on-policy`): the model's own correct
    /// traces are positives, its wrong ones negatives — with program
    /// positives, heterogeneous pairs of on-policy negatives. Default 0
    /// (prompted positives and negatives).
    #[serde(skip_serializing_if = "is_zero_count")]
    pub on_policy: usize,
    /// Local generators run on the GGUF's stored quantisation (`traces
    /// --quantized`). Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub quantized: bool,
    /// A LoRA adapter for the local generators (`traces --adapter`), e.g. the
    /// trace-SFT adapter of an earlier run, to sample on-policy traces from
    /// the warm-started model. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    /// HTTP generators send up to this many samples of one prompt as one
    /// request with OpenAI's `n` (`traces --samples-per-request`). Default 1.
    #[serde(skip_serializing_if = "is_one")]
    pub samples_per_request: usize,
    /// The program tracer's join and condition steps that leave at most this
    /// many rows list them (`traces --list-rows`), so that a small model can
    /// copy the rows a count or sum is taken over. Default 0: row counts only.
    #[serde(skip_serializing_if = "is_zero_count")]
    pub list_rows: usize,
}

fn is_zero_count(n: &usize) -> bool {
    *n == 0
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for TracesStage {
    fn default() -> Self {
        TracesStage {
            generators: vec![GeneratorSpec::Program, GeneratorSpec::Local { model: "smollm2-135m".into() }],
            negatives: 2,
            llm_questions: 8,
            max_tokens: 160,
            batch: 8,
            max_failed: 0.0,
            on_policy: 0,
            quantized: false,
            adapter: None,
            samples_per_request: 1,
            list_rows: 0,
        }
    }
}

/// Pairing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairsStage {
    /// `heterogeneous` (chosen and rejected from different generators) or `homogeneous`. Default heterogeneous.
    pub policy: PairPolicy,
    /// When heterogeneous pairs are fewer than training takes (max_steps × batch_size × grad_accum),
    /// add homogeneous pairs of the questions without one (said in `pairs/policy_used.txt`). Default true.
    pub fallback_homogeneous: bool,
    /// Keep program-traced positives (the ablation turns them off). Default true.
    pub program_positives: bool,
    /// Pairs per question at most. Default 2.
    pub max_per_question: usize,
}

impl Default for PairsStage {
    fn default() -> Self {
        PairsStage {
            policy: PairPolicy::Heterogeneous,
            fallback_homogeneous: true,
            program_positives: true,
            max_per_question: 2,
        }
    }
}

/// Training, shared by every method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainStage {
    /// Methods trained from the same questions. Default sft-qa and cpo.
    pub methods: Vec<Method>,
    /// Optimizer steps per method (0: one epoch). Default 10.
    pub max_steps: usize,
    /// Pairs per micro-batch. Default 2.
    pub batch_size: usize,
    /// Micro-batches per step. Default 1.
    pub grad_accum: usize,
    /// Peak learning rate. Default 2e-4.
    pub lr: f64,
    /// LoRA rank. Default 16.
    pub lora_r: usize,
    /// LoRA alpha. Default: twice the rank.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Longest prompt + completion in tokens. Default 1024.
    pub max_length: usize,
    /// CPO β. Default 0.1.
    pub beta: f64,
    /// `cpu`, or `cuda` / `cuda:N` (a `--features cuda` build). Default cpu.
    pub device: String,
    /// The layers' frozen products on bf16 AMX tiles (train.toml's
    /// `bf16_products`; CPUs with AMX-BF16 only). Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bf16_products: bool,
    /// A checkpoint every this many steps (train.toml's `save_every`); a
    /// stopped trainer (Ctrl-C, SIGTERM) also writes one at the end of its
    /// current step, so this bounds only what a kill -9 or a crash loses.
    /// Not part of the stage's settings: changing it resumes, not restarts.
    /// Default 4.
    #[serde(skip_serializing_if = "is_default_save_every")]
    pub save_every: usize,
    /// Keep each layer's gate/up products for the checkpointed backward
    /// (train.toml's `keep_mlp_products`): faster; false saves
    /// `2 × intermediate_size` floats per token and layer (~6.7 GB for two
    /// Qwen2.5-0.5B pairs of 3,500 tokens). The same gradients either way:
    /// not part of the stage's settings, and a run resumes across a change.
    /// Default true.
    #[serde(skip_serializing_if = "is_true")]
    pub keep_mlp_products: bool,
    /// Start every method from this adapter (train.toml's `init_adapter`),
    /// e.g. a trace-SFT adapter of an earlier run: the warm start of
    /// iterative preference optimisation. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
}

pub(crate) const DEFAULT_SAVE_EVERY: usize = 4;

fn is_default_save_every(n: &usize) -> bool {
    *n == DEFAULT_SAVE_EVERY
}

impl TrainStage {
    /// The settings that change what training produces (the stage's fingerprint).
    pub(crate) fn result_settings(&self) -> TrainStage {
        TrainStage { save_every: DEFAULT_SAVE_EVERY, keep_mlp_products: true, ..self.clone() }
    }
    /// The trainer's config for `method` on `model`: rows from `pairs`,
    /// output into `output_dir`, the rest of the trainer's defaults.
    pub fn train_config(&self, method: Method, model: &str, pairs: &Path, output_dir: &Path) -> TrainConfig {
        let d = TrainConfig::default();
        TrainConfig {
            method,
            model: model.to_string(),
            train: pairs.to_path_buf(),
            output_dir: output_dir.to_path_buf(),
            max_steps: self.max_steps,
            // One epoch when no step count is given (the trainer's default too).
            epochs: 1,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_length: self.max_length,
            save_every: self.save_every,
            device: self.device.clone(),
            bf16_products: self.bf16_products,
            keep_mlp_products: self.keep_mlp_products,
            init_adapter: self.init_adapter.clone(),
            lora: tabletrace_train::LoraSettings {
                r: self.lora_r,
                alpha: self.lora_alpha.unwrap_or(2.0 * self.lora_r as f64),
                ..d.lora.clone()
            },
            loss: tabletrace_train::LossConfig { beta: Some(self.beta), ..d.loss.clone() },
            optim: tabletrace_train::OptimConfig { lr: self.lr, ..d.optim.clone() },
            ..d
        }
    }
}

impl Default for TrainStage {
    fn default() -> Self {
        TrainStage {
            methods: vec![Method::SftQa, Method::Cpo],
            max_steps: 10,
            batch_size: 2,
            grad_accum: 1,
            lr: 2e-4,
            lora_r: 16,
            lora_alpha: None,
            max_length: 1024,
            beta: 0.1,
            device: "cpu".into(),
            bf16_products: false,
            save_every: DEFAULT_SAVE_EVERY,
            keep_mlp_products: true,
            init_adapter: None,
        }
    }
}

/// Evaluation of the base model and every trained adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalStage {
    /// Held-out questions evaluated at most, spread evenly over them (0: all). Default 0.
    pub limit: usize,
    /// New tokens per answer. Default 128.
    pub max_tokens: usize,
    /// Questions per batch. Default 8.
    pub batch: usize,
    /// `trace` (the training prompt) or `qa`. Default trace.
    pub prompt_format: PromptStyle,
    /// Generate on the GGUF's stored quantisation (`eval --quantized`), the
    /// adapters beside it as factors. Default false (f32 weights).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub quantized: bool,
    /// Evaluate the base model too. Default true; false for a run whose
    /// arms are compared with another run's base and baselines (same split
    /// and settings), so that the base is not evaluated twice.
    #[serde(skip_serializing_if = "is_true")]
    pub base: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for EvalStage {
    fn default() -> Self {
        EvalStage {
            limit: 0,
            max_tokens: 128,
            batch: 8,
            prompt_format: PromptStyle::Trace,
            quantized: false,
            base: true,
        }
    }
}

/// A further evaluation set from another dataset (e.g. Spider questions on
/// a database the training data never uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraEvalSet {
    /// Its name: the sub-folder of each arm and the report's column.
    pub name: String,
    /// The dataset.
    pub data: PathBuf,
    /// Spider's database/ folder, if the dataset needs it.
    #[serde(default)]
    pub db_dir: Option<PathBuf>,
    /// Only questions on this database (`spider_db_id` / the SQLite file's stem).
    #[serde(default)]
    pub database: Option<String>,
    /// Only questions over at least this many tables. Default 1.
    #[serde(default = "one")]
    pub min_tables: usize,
}

fn one() -> usize {
    1
}

/// `pipeline.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Run directory. Default runs/default.
    pub run_dir: PathBuf,
    /// Dataset. Default data/sample/mmqa (the bundled sample).
    pub data: PathBuf,
    /// Spider's database/ folder, if the dataset needs it.
    pub db_dir: Option<PathBuf>,
    /// Split trained on, when the data has splits (else `eval_fraction` is held out).
    pub train_split: Option<String>,
    /// Split evaluated on, when the data has splits.
    pub eval_split: Option<String>,
    /// Share of questions held out for evaluation when there are no splits. Default 0.2.
    pub eval_fraction: f64,
    /// Pilot mode: evaluate on this share of the *training* questions (the
    /// dev slice, picked by a hash of the id) instead of the eval split,
    /// which is then not read at all. Settings are chosen here, never on
    /// the reported split. Default 0 (off).
    pub dev_fraction: f64,
    /// Databases held out of training entirely: their training questions
    /// form the `cross_db` evaluation set. Listed by id here, or…
    pub cross_db: Vec<String>,
    /// …this share of the training questions' databases, picked by a hash of
    /// the database id. Default 0 (no cross-database set).
    pub cross_db_fraction: f64,
    /// Further evaluation sets from other data.
    pub eval_sets: Vec<ExtraEvalSet>,
    /// The model trained and evaluated. Default smollm2-135m.
    pub model: String,
    /// Tokens of the model's tokenizer that a prompt's tables may take:
    /// whole tables when they fit, else rows chosen from the question text.
    /// Default 3000.
    pub table_tokens: usize,
    /// Table rows per table in prompts at most. Default: no limit.
    pub max_rows: Option<usize>,
    /// Traces.
    pub traces: TracesStage,
    /// Pairs.
    pub pairs: PairsStage,
    /// Training.
    pub train: TrainStage,
    /// Evaluation.
    pub eval: EvalStage,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            run_dir: "runs/default".into(),
            data: "data/sample/mmqa".into(),
            db_dir: None,
            train_split: None,
            eval_split: None,
            eval_fraction: 0.2,
            dev_fraction: 0.0,
            cross_db: Vec::new(),
            cross_db_fraction: 0.0,
            eval_sets: Vec::new(),
            model: "smollm2-135m".into(),
            table_tokens: tabletrace_data::DEFAULT_TABLE_TOKENS,
            max_rows: None,
            traces: TracesStage::default(),
            pairs: PairsStage::default(),
            train: TrainStage::default(),
            eval: EvalStage::default(),
        }
    }
}

impl PipelineConfig {
    /// Checks every value on its own: shares in range, names, at least one
    /// generator, both splits or none.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(config("eval_fraction", format!("{} is not in [0, 1)", self.eval_fraction)));
        }
        if !(0.0..1.0).contains(&self.dev_fraction) {
            return Err(config("dev_fraction", format!("{} is not in [0, 1)", self.dev_fraction)));
        }
        if !(0.0..1.0).contains(&self.cross_db_fraction) {
            return Err(config("cross_db_fraction", format!("{} is not in [0, 1)", self.cross_db_fraction)));
        }
        for (i, s) in self.eval_sets.iter().enumerate() {
            if s.name.is_empty() || !s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(config(
                    format!("eval_sets[{i}].name"),
                    format!("{:?}: use letters, digits, _ and -", s.name),
                ));
            }
            if s.name == "cross_db" || self.eval_sets[..i].iter().any(|o| o.name == s.name) {
                return Err(config(format!("eval_sets[{i}].name"), format!("{:?} is taken", s.name)));
            }
        }
        if !(0.0..=1.0).contains(&self.traces.max_failed) {
            return Err(config("traces.max_failed", format!("{} is not a share in [0, 1]", self.traces.max_failed)));
        }
        if self.train.save_every == 0 {
            return Err(config("train.save_every", "0; give a number of steps (a stopped trainer also saves)"));
        }
        if self.traces.generators.is_empty() {
            return Err(config("traces.generators", "at least one generator is needed"));
        }
        if self.train_split.is_some() != self.eval_split.is_some() {
            return Err(config(
                "train_split",
                "set both train_split and eval_split, or neither (then eval_fraction is held out)",
            ));
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// Checks what the stages will need from this machine — the data and
    /// database paths, the model and every local generator's model, the
    /// splits' names — so that a typo fails now, not after hours of stages.
    pub fn check_environment(&self) -> Result<()> {
        let path_exists = |key: &str, p: &Path| -> Result<()> {
            if !p.exists() {
                return Err(config(key, format!("{} does not exist", p.display())));
            }
            Ok(())
        };
        path_exists("data", &self.data)?;
        if let Some(d) = &self.db_dir {
            path_exists("db_dir", d)?;
        }
        for (i, s) in self.eval_sets.iter().enumerate() {
            path_exists(&format!("eval_sets[{i}].data"), &s.data)?;
            if let Some(d) = &s.db_dir {
                path_exists(&format!("eval_sets[{i}].db_dir"), d)?;
            }
        }
        for (key, split) in [("train_split", &self.train_split), ("eval_split", &self.eval_split)] {
            if let Some(s) = split {
                if tabletrace_data::Split::parse(s).is_none() {
                    return Err(config(key, format!("{s:?} is not a split (train, val, test)")));
                }
            }
        }
        tabletrace_model::resolve(&self.model).map_err(|e| config("model", e.to_string()))?;
        for (key, dir) in [("traces.adapter", &self.traces.adapter), ("train.init_adapter", &self.train.init_adapter)] {
            if let Some(dir) = dir {
                if !dir.join("adapter_config.json").is_file() {
                    return Err(config(key, format!("{} holds no adapter_config.json", dir.display())));
                }
            }
        }
        for g in &self.traces.generators {
            if let GeneratorSpec::Local { model } = g {
                tabletrace_model::resolve(model).map_err(|e| config("traces.generators", format!("{g}: {e}")))?;
            }
        }
        Ok(())
    }
}
