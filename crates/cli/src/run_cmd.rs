//! `tabletrace run [pipeline.toml]`: data → traces → pairs → train → eval → report.
//!
//! Each stage runs this binary's own command (`traces`, `pairs`, `train`,
//! `eval`, `report`) as a child process, writes into its folder of the run
//! directory, and leaves a `.done` file holding the stage's resolved
//! settings. A re-run skips stages whose `.done` matches, and resumes
//! interrupted ones (the LLM call cache, training checkpoints); `--from
//! STAGE` redoes from there. Ctrl-C stops the child; a signal sent to this
//! process alone is passed on to the child, which is waited for; the run
//! directory stays resumable. One process at a time holds a run directory.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Trace generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracesStage {
    /// Generators: `program`, `local:MODEL`, `http:URL[,URL]#MODEL`. Default program and local:smollm2-135m.
    pub generators: Vec<String>,
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
}

fn is_zero_count(n: &usize) -> bool {
    *n == 0
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for TracesStage {
    fn default() -> Self {
        TracesStage {
            generators: vec!["program".into(), "local:smollm2-135m".into()],
            negatives: 2,
            llm_questions: 8,
            max_tokens: 160,
            batch: 8,
            max_failed: 0.0,
            on_policy: 0,
            quantized: false,
            adapter: None,
        }
    }
}

/// Pairing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairsStage {
    /// `heterogeneous` (chosen and rejected from different generators) or `homogeneous`. Default heterogeneous.
    pub policy: String,
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
            policy: "heterogeneous".into(),
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
    pub methods: Vec<String>,
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

const DEFAULT_SAVE_EVERY: usize = 4;

fn is_default_save_every(n: &usize) -> bool {
    *n == DEFAULT_SAVE_EVERY
}

impl TrainStage {
    /// The settings that change what training produces (the stage's fingerprint).
    fn result_settings(&self) -> TrainStage {
        TrainStage { save_every: DEFAULT_SAVE_EVERY, keep_mlp_products: true, ..self.clone() }
    }
}

impl Default for TrainStage {
    fn default() -> Self {
        TrainStage {
            methods: vec!["sft-qa".into(), "cpo".into()],
            max_steps: 10,
            batch_size: 2,
            grad_accum: 1,
            lr: 2e-4,
            lora_r: 16,
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
    pub prompt_format: String,
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
        EvalStage { limit: 0, max_tokens: 128, batch: 8, prompt_format: "trace".into(), quantized: false, base: true }
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
    fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!("config: eval_fraction: {} is not in [0, 1)", self.eval_fraction);
        }
        if !(0.0..1.0).contains(&self.dev_fraction) {
            bail!("config: dev_fraction: {} is not in [0, 1)", self.dev_fraction);
        }
        if !(0.0..1.0).contains(&self.cross_db_fraction) {
            bail!("config: cross_db_fraction: {} is not in [0, 1)", self.cross_db_fraction);
        }
        for (i, s) in self.eval_sets.iter().enumerate() {
            if s.name.is_empty() || !s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                bail!("config: eval_sets[{i}].name {:?}: use letters, digits, _ and -", s.name);
            }
            if s.name == "cross_db" || self.eval_sets[..i].iter().any(|o| o.name == s.name) {
                bail!("config: eval_sets[{i}].name {:?} is taken", s.name);
            }
        }
        if !["heterogeneous", "homogeneous"].contains(&self.pairs.policy.as_str()) {
            bail!("config: pairs.policy: {:?} is not heterogeneous or homogeneous", self.pairs.policy);
        }
        if !["trace", "qa"].contains(&self.eval.prompt_format.as_str()) {
            bail!("config: eval.prompt_format: {:?} is not trace or qa", self.eval.prompt_format);
        }
        for m in &self.train.methods {
            if tabletrace_train::Method::parse(m).is_none() {
                bail!("config: train.methods: {m:?} is not a method (cpo, simpo, cpo-simpo, hinge, ipo, sft-qa, sft-trace)");
            }
        }
        if !(0.0..=1.0).contains(&self.traces.max_failed) {
            bail!("config: traces.max_failed: {} is not a share in [0, 1]", self.traces.max_failed);
        }
        if self.train.save_every == 0 {
            bail!("config: train.save_every: 0; give a number of steps (a stopped trainer also saves)");
        }
        if self.traces.generators.is_empty() {
            bail!("config: traces.generators: at least one generator is needed");
        }
        if self.train_split.is_some() != self.eval_split.is_some() {
            bail!("config: set both train_split and eval_split, or neither (then eval_fraction is held out)");
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// Checks what the stages will need from this machine — the data and
    /// database paths, the model and every local generator's model, the
    /// splits' names — so that a typo fails now, not after hours of stages.
    fn check_environment(&self) -> anyhow::Result<()> {
        let path_exists = |key: &str, p: &Path| -> anyhow::Result<()> {
            if !p.exists() {
                bail!("config: {key}: {} does not exist", p.display());
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
                    bail!("config: {key}: {s:?} is not a split (train, val, test)");
                }
            }
        }
        tabletrace_model::resolve(&self.model).map_err(|e| anyhow::anyhow!("config: model: {e}"))?;
        for (key, dir) in [("traces.adapter", &self.traces.adapter), ("train.init_adapter", &self.train.init_adapter)] {
            if let Some(dir) = dir {
                if !dir.join("adapter_config.json").is_file() {
                    bail!("config: {key}: {} holds no adapter_config.json", dir.display());
                }
            }
        }
        for g in &self.traces.generators {
            if g == "program" {
                continue;
            }
            if let Some(spec) = g.strip_prefix("local:") {
                tabletrace_model::resolve(spec).map_err(|e| anyhow::anyhow!("config: traces.generators: {g}: {e}"))?;
            } else if g.starts_with("http:") {
                tabletrace_trace::parse_http_spec(g).map_err(|e| anyhow::anyhow!("config: traces.generators: {e}"))?;
            } else {
                bail!("config: traces.generators: {g:?} is not program, local:MODEL or http:URL[,URL…]#MODEL");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipeline config (TOML). Without one: the embedded default on the bundled sample.
    config: Option<PathBuf>,
    /// Redo from this stage: data, traces, pairs, train, eval, report.
    #[arg(long)]
    from: Option<String>,
    /// Stop after this stage (data, traces, pairs, train, eval): for running
    /// a long study in sessions of bounded length.
    #[arg(long)]
    to: Option<String>,
    /// Run directory (overrides the config's run_dir).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

/// The embedded default pipeline: `configs/default.toml`, compiled in.
const EMBEDDED_DEFAULT: &str = include_str!("../../../configs/default.toml");

const STAGES: [&str; 6] = ["data", "traces", "pairs", "train", "eval", "report"];

struct Pipeline {
    cfg: PipelineConfig,
    dir: PathBuf,
    exe: PathBuf,
    quiet: bool,
}

fn digest(v: &impl Serialize) -> String {
    let d = Sha256::digest(serde_json::to_string(v).expect("serialises").as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl Pipeline {
    fn marker(&self, stage: &str) -> PathBuf {
        self.dir.join(format!(".{stage}.done"))
    }

    /// Whether `stage` finished with these settings.
    fn done(&self, stage: &str, settings: &impl Serialize) -> bool {
        std::fs::read_to_string(self.marker(stage)).is_ok_and(|s| s.trim() == digest(settings))
    }

    fn finish(&self, stage: &str, settings: &impl Serialize) -> anyhow::Result<()> {
        tabletrace_data::write_atomic(&self.marker(stage), digest(settings).as_bytes())?;
        Ok(())
    }

    /// Runs this binary with `args`; a failure names the stage and the
    /// command. With `hide_stdout`, the child's stdout (JSON results) is kept
    /// off the terminal.
    fn tabletrace(&self, stage: &str, args: &[String], hide_stdout: bool) -> anyhow::Result<()> {
        stopped(stage)?;
        let mut cmd = Command::new(&self.exe);
        if self.quiet {
            cmd.arg("--quiet");
        }
        cmd.args(args);
        if hide_stdout {
            cmd.stdout(std::process::Stdio::null());
        }
        let status = crate::signals::run_child(&mut cmd)
            .with_context(|| format!("stage {stage}: cannot start {}", self.exe.display()))?;
        stopped(stage)?;
        if !status.success() {
            bail!(
                "stage {stage} failed ({status}): tabletrace {}\nfix the cause and run again: finished stages are kept",
                args.join(" ")
            );
        }
        Ok(())
    }

    /// How prompts show the tables, counted with the model's tokenizer.
    fn prompt_args(&self, with_tokenizer: bool) -> Vec<String> {
        let mut v = vec!["--table-tokens".to_string(), self.cfg.table_tokens.to_string()];
        if with_tokenizer {
            v.extend(["--tokenizer".into(), self.cfg.model.clone()]);
        }
        if let Some(r) = self.cfg.max_rows {
            v.extend(["--max-rows".into(), r.to_string()]);
        }
        v
    }

    /// Adds `seconds` of wall time to `key` in `compute.json` (kept across
    /// resumed runs, so a stage split over sessions is counted whole).
    fn count_time(&self, key: &str, seconds: f64) -> anyhow::Result<()> {
        let path = self.dir.join("compute.json");
        let mut all: std::collections::BTreeMap<String, f64> =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        *all.entry(key.to_string()).or_default() += seconds;
        tabletrace_data::write_atomic(&path, serde_json::to_string_pretty(&all)?.as_bytes())?;
        Ok(())
    }

    /// Runs this binary like [`Pipeline::tabletrace`] and counts its wall time under `key`.
    fn timed(&self, key: &str, stage: &str, args: &[String], hide_stdout: bool) -> anyhow::Result<()> {
        let t = Instant::now();
        let result = self.tabletrace(stage, args, hide_stdout);
        self.count_time(key, t.elapsed().as_secs_f64())?;
        result
    }

    fn data_args(&self) -> Vec<String> {
        let mut v = vec!["--data".into(), self.cfg.data.display().to_string()];
        if let Some(d) = &self.cfg.db_dir {
            v.extend(["--db-dir".into(), d.display().to_string()]);
        }
        v
    }
}

/// `s` as a TOML basic string (Rust's `{:?}` escapes some characters, e.g.
/// `\u{…}`, in ways TOML rejects).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// An error when a signal asked the pipeline to stop (the child got it too).
fn stopped(stage: &str) -> anyhow::Result<()> {
    if let Some(sig) = crate::signals::received() {
        bail!(
            "stopped by {} during stage {stage}: run the same command again to resume (finished stages, the LLM call \
             cache and training checkpoints are kept)",
            crate::signals::name(sig)
        );
    }
    Ok(())
}

/// What the data stage wrote: the sizes of every question set.
#[derive(Debug, Serialize)]
struct SplitSummary {
    /// Training questions (`train_ids.txt`).
    train: usize,
    /// Held-out questions (`eval_ids.txt`).
    eval: usize,
    /// Held-out questions whose gold SQL no training question shares (`eval_sets/unseen_sql.txt`).
    unseen_sql: usize,
    /// Training-split questions on held-out databases (`eval_sets/cross_db.txt`).
    cross_db: usize,
    /// The held-out databases.
    cross_db_databases: Vec<String>,
    /// Databases the training questions use.
    train_databases: usize,
    /// Further sets (`eval_sets/NAME.txt`).
    extra: std::collections::BTreeMap<String, usize>,
    /// Items of the data that could not be loaded (in no set: their split is unknown).
    load_errors: Vec<String>,
}

/// Gold SQL as compared for the unseen-SQL subset: lowercased, whitespace
/// collapsed, a trailing semicolon dropped.
fn normalised_sql(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase().trim_end_matches(';').trim_end().to_string()
}

/// A number in [0, 1) from a hash of `key`.
fn unit_hash(key: &str) -> f64 {
    let h = Sha256::digest(key.as_bytes());
    u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as f64 / (u32::MAX as f64 + 1.0)
}

fn write_ids(path: &Path, ids: &[String]) -> anyhow::Result<()> {
    let text = if ids.is_empty() { String::new() } else { ids.join("\n") + "\n" };
    tabletrace_data::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Splits question ids into training, held-out, unseen-SQL and
/// cross-database lists (by split or by a hash of the id; held-out
/// databases by list or by a hash of the database id), and the further
/// evaluation sets; writes them into the run directory.
fn split_ids(cfg: &PipelineConfig, dir: &Path) -> anyhow::Result<SplitSummary> {
    let ds = tabletrace_data::load(
        &cfg.data,
        &tabletrace_data::LoadOptions { db_dir: cfg.db_dir.clone(), tables_json: None },
    )
    .with_context(|| format!("loading {} (set `data` in the pipeline config)", cfg.data.display()))?;
    let held_out_db = |db: &str| cfg.cross_db.iter().any(|d| d == db) || unit_hash(db) < cfg.cross_db_fraction;
    let (mut train, mut eval, mut cross) = (Vec::new(), Vec::new(), Vec::new());
    let mut cross_dbs = std::collections::BTreeSet::new();
    let mut train_dbs = std::collections::BTreeSet::new();
    let mut train_sql = std::collections::HashSet::new();
    for q in &ds.questions {
        let held_out = match (&cfg.train_split, &cfg.eval_split) {
            (Some(t), Some(e)) => {
                let (t, e) = (tabletrace_data::Split::parse(t), tabletrace_data::Split::parse(e));
                if cfg.dev_fraction > 0.0 {
                    // Pilot: the dev slice of the training split; the eval split stays unread.
                    if q.split.is_none() || q.split != t {
                        continue;
                    }
                    unit_hash(&format!("dev:{}", q.id.0)) < cfg.dev_fraction
                } else if q.split.is_some() && q.split == e {
                    true
                } else if q.split.is_some() && q.split == t {
                    false
                } else {
                    continue;
                }
            }
            _ if cfg.dev_fraction > 0.0 => {
                // Pilot without splits: the dev slice of what would be trained on.
                if unit_hash(&q.id.0) < cfg.eval_fraction {
                    continue;
                }
                unit_hash(&format!("dev:{}", q.id.0)) < cfg.dev_fraction
            }
            _ => unit_hash(&q.id.0) < cfg.eval_fraction,
        };
        if held_out {
            eval.push(q);
            continue;
        }
        let db = q.database_id();
        if held_out_db(&db) {
            cross.push(q.id.0.clone());
            cross_dbs.insert(db);
        } else {
            train.push(q.id.0.clone());
            train_sql.extend(q.gold_sql.as_deref().map(normalised_sql));
            train_dbs.insert(db);
        }
    }
    if let (Some(t), Some(e)) = (&cfg.train_split, &cfg.eval_split) {
        // A split the data does not have is named as such, not as an empty split.
        let mut have: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for q in &ds.questions {
            *have.entry(q.split.map_or("none".to_string(), |s| s.to_string())).or_default() += 1;
        }
        let listed = have.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ");
        for (key, name) in [("train_split", t), ("eval_split", e)] {
            let want = tabletrace_data::Split::parse(name);
            if !ds.questions.iter().any(|q| q.split.is_some() && q.split == want) {
                bail!(
                    "config: {key} = {name:?}: {} has no question of that split (it has: {listed})",
                    cfg.data.display()
                );
            }
        }
    }
    anyhow::ensure!(
        !train.is_empty() && !eval.is_empty(),
        "the split left {} training and {} held-out questions",
        train.len(),
        eval.len()
    );
    let unseen: Vec<String> = eval
        .iter()
        .filter(|q| q.gold_sql.as_deref().is_none_or(|s| !train_sql.contains(&normalised_sql(s))))
        .map(|q| q.id.0.clone())
        .collect();
    let eval: Vec<String> = eval.iter().map(|q| q.id.0.clone()).collect();
    write_ids(&dir.join("train_ids.txt"), &train)?;
    write_ids(&dir.join("eval_ids.txt"), &eval)?;
    let sets = dir.join("eval_sets");
    std::fs::create_dir_all(&sets)?;
    write_ids(&sets.join("unseen_sql.txt"), &unseen)?;
    write_ids(&sets.join("cross_db.txt"), &cross)?;
    let mut extra = std::collections::BTreeMap::new();
    for set in &cfg.eval_sets {
        let ds = tabletrace_data::load(
            &set.data,
            &tabletrace_data::LoadOptions { db_dir: set.db_dir.clone(), tables_json: None },
        )
        .with_context(|| format!("eval set {}: loading {}", set.name, set.data.display()))?;
        let ids: Vec<String> = ds
            .questions
            .iter()
            .filter(|q| set.database.as_ref().is_none_or(|d| q.database_id() == *d) && q.n_tables() >= set.min_tables)
            .map(|q| q.id.0.clone())
            .collect();
        anyhow::ensure!(!ids.is_empty(), "eval set {}: no question of {} is selected", set.name, set.data.display());
        write_ids(&sets.join(format!("{}.txt", set.name)), &ids)?;
        extra.insert(set.name.clone(), ids.len());
    }
    let summary = SplitSummary {
        train: train.len(),
        eval: eval.len(),
        unseen_sql: unseen.len(),
        cross_db: cross.len(),
        cross_db_databases: cross_dbs.into_iter().collect(),
        train_databases: train_dbs.len(),
        extra,
        load_errors: ds.errors.iter().map(ToString::to_string).collect(),
    };
    tabletrace_data::write_atomic(&dir.join("split.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}

pub fn run(a: RunArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<PipelineConfig>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => toml::from_str::<PipelineConfig>(EMBEDDED_DEFAULT).context("configs/default.toml (embedded)")?,
    };
    if let Some(d) = a.run_dir {
        cfg.run_dir = d;
    }
    cfg.validate()?;
    cfg.check_environment()?;
    let dir = cfg.run_dir.clone();
    if dir.exists() && !dir.is_dir() {
        bail!("run_dir {} is a file, not a folder: set run_dir (or --run-dir) to a folder", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    let _lock = crate::lock::DirLock::acquire(&dir, "tabletrace run")?;
    crate::signals::install(false);
    // An unwritable run directory is reported now, not after hours of work.
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").with_context(|| format!("the run directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    tabletrace_data::write_atomic(&dir.join("pipeline.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    let exe = std::env::current_exe().context("cannot find the tabletrace binary")?;
    let p = Pipeline { cfg: cfg.clone(), dir: dir.clone(), exe, quiet };
    if let Some(from) = &a.from {
        let at = STAGES
            .iter()
            .position(|s| s == from)
            .with_context(|| format!("--from {from:?} is not one of {}", STAGES.join(", ")))?;
        // Markers are `.STAGE.done` or, per method or run, `.STAGE-NAME.done`.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if STAGES[at..].iter().any(|s| {
                name == format!(".{s}.done") || (name.starts_with(&format!(".{s}-")) && name.ends_with(".done"))
            }) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let last = match &a.to {
        Some(to) => STAGES
            .iter()
            .position(|s| s == to)
            .with_context(|| format!("--to {to:?} is not one of {}", STAGES.join(", ")))?,
        None => STAGES.len() - 1,
    };
    let t0 = Instant::now();
    let stage = |name: &str| eprintln!("== {name} ({:.0} s)", t0.elapsed().as_secs_f64());
    let stop_after = |done: &str| -> bool {
        let stop = STAGES[last] == done;
        if stop {
            eprintln!("== stopped after {done} (--to) in {:.0} s", t0.elapsed().as_secs_f64());
        }
        stop
    };

    // data
    let data_settings = (
        (&cfg.data, &cfg.db_dir, &cfg.train_split, &cfg.eval_split, cfg.eval_fraction),
        (&cfg.cross_db, cfg.cross_db_fraction, &cfg.eval_sets, cfg.dev_fraction),
    );
    if !p.done("data", &data_settings) {
        stage("data: split questions");
        let s = split_ids(&cfg, &dir)?;
        eprintln!(
            "   {} training questions on {} databases; {} held out ({} with unseen gold SQL); {} on {} held-out databases",
            s.train,
            s.train_databases,
            s.eval,
            s.unseen_sql,
            s.cross_db,
            s.cross_db_databases.len()
        );
        if !s.load_errors.is_empty() {
            eprintln!(
                "   {} items could not be loaded (listed in split.json), e.g. {}",
                s.load_errors.len(),
                s.load_errors[0]
            );
        }
        for (name, n) in &s.extra {
            eprintln!("   eval set {name}: {n} questions");
        }
        p.finish("data", &data_settings)?;
    }

    if stop_after("data") {
        return Ok(ExitCode::SUCCESS);
    }

    // traces
    let traces_dir = dir.join("traces");
    std::fs::create_dir_all(&traces_dir)?;
    let traces = traces_dir.join("traces.jsonl");
    let prompt_settings = (cfg.table_tokens, cfg.max_rows, &cfg.model);
    let traces_settings = (&data_settings, &cfg.traces, prompt_settings);
    if !p.done("traces", &traces_settings) {
        let mut parts = Vec::new();
        for (i, g) in cfg.traces.generators.iter().enumerate() {
            stage(&format!("traces: {g}"));
            let out = traces_dir.join(format!("traces-{i}.jsonl"));
            let mut args = vec!["traces".to_string()];
            args.extend(p.data_args());
            args.extend(
                [
                    "--ids",
                    &dir.join("train_ids.txt").display().to_string(),
                    "--generator",
                    g,
                    "--polarity",
                    "both",
                    "--negatives",
                    &cfg.traces.negatives.to_string(),
                    "--max-tokens",
                    &cfg.traces.max_tokens.to_string(),
                    "--batch",
                    &cfg.traces.batch.to_string(),
                    "--cache",
                    &traces_dir.join("llm_cache.sqlite").display().to_string(),
                    "--out",
                    &out.display().to_string(),
                ]
                .map(String::from),
            );
            args.extend(p.prompt_args(true));
            if g != "program" {
                args.extend(["--limit".into(), cfg.traces.llm_questions.to_string()]);
                args.extend(["--max-failed".into(), cfg.traces.max_failed.to_string()]);
                if cfg.traces.on_policy > 0 {
                    args.extend(["--on-policy".into(), cfg.traces.on_policy.to_string()]);
                }
                if cfg.traces.quantized {
                    args.push("--quantized".into());
                }
                if let Some(dir) = &cfg.traces.adapter {
                    args.extend(["--adapter".into(), dir.display().to_string()]);
                }
            }
            p.timed(&format!("traces-{g}"), "traces", &args, false)?;
            parts.push(out);
        }
        let mut all = String::new();
        for part in &parts {
            all.push_str(&std::fs::read_to_string(part)?);
        }
        tabletrace_data::write_atomic(&traces, all.as_bytes())?;
        p.finish("traces", &traces_settings)?;
    }

    if stop_after("traces") {
        return Ok(ExitCode::SUCCESS);
    }

    // pairs
    let pairs = dir.join("pairs").join("pairs.jsonl");
    std::fs::create_dir_all(dir.join("pairs"))?;
    let pairs_settings =
        (&traces_settings, &cfg.pairs, (cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum));
    if !p.done("pairs", &pairs_settings) {
        let mut input = traces.clone();
        if !cfg.pairs.program_positives {
            // Ablation: positives from LLM generators only.
            let text = std::fs::read_to_string(&traces)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
                    !(v["generator"] == "program" && v["polarity"] == "positive")
                })
                .collect();
            input = dir.join("pairs").join("traces-no-program-positives.jsonl");
            std::fs::write(&input, kept.join("\n") + "\n")?;
        }
        let pairs_with = |policy: &str, out: &Path| -> anyhow::Result<Vec<String>> {
            stage(&format!("pairs: {policy}"));
            let mut args = vec!["pairs".to_string(), "--traces".into(), input.display().to_string()];
            args.extend(p.data_args());
            args.extend(
                [
                    "--policy",
                    policy,
                    "--format",
                    "conversational",
                    "--max-per-question",
                    &cfg.pairs.max_per_question.to_string(),
                    "--out",
                    &out.display().to_string(),
                ]
                .map(String::from),
            );
            args.extend(p.prompt_args(true));
            p.timed(&format!("pairs-{policy}"), "pairs", &args, false)?;
            Ok(std::fs::read_to_string(out)?.lines().filter(|l| !l.trim().is_empty()).map(String::from).collect())
        };
        let mut lines = pairs_with(&cfg.pairs.policy, &pairs)?;
        let mut used = format!("{} ({} pairs)", cfg.pairs.policy, lines.len());
        // Heterogeneous pairs too few to train on: top up with homogeneous
        // pairs of the questions that have none (said here and in policy_used.txt).
        let t = &cfg.train;
        let needed = if t.max_steps > 0 { t.max_steps * t.batch_size * t.grad_accum.max(1) } else { 1 };
        if cfg.pairs.policy == "heterogeneous" && cfg.pairs.fallback_homogeneous && lines.len() < needed {
            let homo_path = dir.join("pairs").join("pairs-homogeneous.jsonl");
            let homo = pairs_with("homogeneous", &homo_path)?;
            let question = |l: &str| -> String {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["metadata"]["question_id"].as_str().map(String::from))
                    .unwrap_or_default()
            };
            let have: std::collections::HashSet<String> = lines.iter().map(|l| question(l)).collect();
            let added: Vec<String> = homo.into_iter().filter(|l| !have.contains(&question(l))).collect();
            eprintln!(
                "   {} heterogeneous pairs, fewer than the {needed} that training takes: {} homogeneous pairs of other \
                 questions added",
                lines.len(),
                added.len()
            );
            used = format!("heterogeneous ({} pairs) + homogeneous ({} pairs)", lines.len(), added.len());
            lines.extend(added);
            tabletrace_data::write_atomic(&pairs, (lines.join("\n") + "\n").as_bytes())?;
        }
        if lines.is_empty() {
            bail!(
                "stage pairs: no pairs from {} (see {})",
                traces.display(),
                pairs.with_extension("report.json").display()
            );
        }
        eprintln!("   {} pairs: {used}", lines.len());
        std::fs::write(dir.join("pairs").join("policy_used.txt"), &used)?;
        p.finish("pairs", &pairs_settings)?;
    }

    if stop_after("pairs") {
        return Ok(ExitCode::SUCCESS);
    }

    // train
    for method in &cfg.train.methods {
        let out = dir.join(method);
        let train_settings = cfg.train.result_settings();
        let settings = (&pairs_settings, &cfg.model, &train_settings, method);
        let key = format!("train-{method}");
        if p.done(&key, &settings) {
            continue;
        }
        stage(&format!("train: {method}"));
        // Resume only a training of these very settings: checkpoints of
        // other settings (or of a redone stage upstream) are stale.
        let started = out.join(".train-settings");
        if out.exists() && !std::fs::read_to_string(&started).is_ok_and(|d| d.trim() == digest(&settings)) {
            eprintln!("   {} holds a training of other settings: starting afresh", out.display());
            std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
        }
        std::fs::create_dir_all(&out)?;
        tabletrace_data::write_atomic(&started, digest(&settings).as_bytes())?;
        let t = &cfg.train;
        let toml = format!(
            "method = {method:?}\nmodel = {:?}\ntrain = {:?}\noutput_dir = {:?}\nmax_steps = {}\nbatch_size = {}\n\
             grad_accum = {}\nmax_length = {}\nsave_every = {}\ndevice = {:?}\n[lora]\nr = {}\nalpha = {}\n[optim]\nlr = {}\n\
             [loss]\nbeta = {}\n",
            cfg.model,
            pairs.display().to_string(),
            out.display().to_string(),
            t.max_steps,
            t.batch_size,
            t.grad_accum,
            t.max_length,
            t.save_every,
            t.device,
            t.lora_r,
            2.0 * t.lora_r as f64,
            t.lr,
            t.beta,
        );
        std::fs::create_dir_all(&out)?;
        let toml = if t.bf16_products { format!("bf16_products = true\n{toml}") } else { toml };
        let toml = if t.keep_mlp_products { toml } else { format!("keep_mlp_products = false\n{toml}") };
        let toml = match &t.init_adapter {
            Some(dir) => format!("init_adapter = {}\n{toml}", toml_string(&dir.display().to_string())),
            None => toml,
        };
        let toml_path = out.join("train.toml");
        std::fs::write(&toml_path, toml)?;
        let mut args = vec!["train".to_string(), "--config".into(), toml_path.display().to_string()];
        if t.max_steps == 0 {
            args.extend(["--epochs".into(), "1".into()]);
        }
        p.timed(&key, "train", &args, true)?;
        p.finish(&key, &settings)?;
    }

    if stop_after("train") {
        return Ok(ExitCode::SUCCESS);
    }

    // eval: every arm on the held-out questions, the cross-database set
    // (when databases are held out) and each further set.
    let mut runs = if cfg.eval.base { vec![("base".to_string(), None)] } else { Vec::new() };
    runs.extend(cfg.train.methods.iter().map(|m| (m.clone(), Some(dir.join(m).join("adapter")))));
    let sets_dir = dir.join("eval_sets");
    let mut sets: Vec<(String, Vec<String>, PathBuf)> = vec![(String::new(), p.data_args(), dir.join("eval_ids.txt"))];
    let cross_ids = sets_dir.join("cross_db.txt");
    if std::fs::read_to_string(&cross_ids).is_ok_and(|t| !t.trim().is_empty()) {
        sets.push(("cross_db".into(), p.data_args(), cross_ids));
    }
    for set in &cfg.eval_sets {
        let mut data = vec!["--data".to_string(), set.data.display().to_string()];
        if let Some(d) = &set.db_dir {
            data.extend(["--db-dir".into(), d.display().to_string()]);
        }
        sets.push((set.name.clone(), data, sets_dir.join(format!("{}.txt", set.name))));
    }
    for (name, adapter) in &runs {
        for (set, data_args, ids) in &sets {
            let out = if set.is_empty() { dir.join(name) } else { dir.join(name).join(set) };
            let settings = (
                &data_settings,
                &cfg.model,
                &cfg.eval,
                prompt_settings,
                set,
                adapter.as_ref().map(|_| (&pairs_settings, cfg.train.result_settings())),
            );
            let key = if set.is_empty() { format!("eval-{name}") } else { format!("eval-{name}-{set}") };
            if p.done(&key, &settings) {
                continue;
            }
            stage(&format!("eval: {name}{}", if set.is_empty() { String::new() } else { format!(" on {set}") }));
            std::fs::create_dir_all(&out)?;
            let mut args = vec!["eval".to_string(), "--model".into(), cfg.model.clone()];
            if let Some(ad) = adapter {
                args.extend(["--adapter".into(), ad.display().to_string()]);
            }
            args.extend(data_args.iter().cloned());
            args.extend(p.prompt_args(false));
            args.extend(
                [
                    "--ids",
                    &ids.display().to_string(),
                    "--prompt-format",
                    &cfg.eval.prompt_format,
                    "--max-tokens",
                    &cfg.eval.max_tokens.to_string(),
                    "--batch",
                    &cfg.eval.batch.to_string(),
                    "--out",
                    &out.join("eval.json").display().to_string(),
                ]
                .map(String::from),
            );
            if cfg.eval.limit > 0 {
                args.extend(["--limit".into(), cfg.eval.limit.to_string()]);
            }
            if cfg.eval.quantized {
                args.push("--quantized".into());
            }
            p.timed(&key, "eval", &args, true)?;
            p.finish(&key, &settings)?;
        }
    }

    if stop_after("eval") {
        return Ok(ExitCode::SUCCESS);
    }

    // report: Q&A SFT is the baseline the method has to beat, when trained.
    stage("report");
    let mut args = vec!["report".to_string()];
    args.extend(runs.iter().map(|(n, _)| dir.join(n).display().to_string()));
    args.extend(["--out".into(), dir.display().to_string()]);
    args.extend(["--subset".into(), format!("unseen_sql={}", sets_dir.join("unseen_sql.txt").display())]);
    for (set, _, _) in sets.iter().skip(1) {
        args.extend(["--set".into(), set.clone()]);
    }
    if cfg.train.methods.iter().any(|m| m == "sft-qa") {
        args.extend(["--baseline".into(), "sft-qa".into()]);
    }
    if pairs.is_file() {
        args.extend(["--pairs".into(), pairs.display().to_string()]);
    }
    p.tabletrace("report", &args, false)?;
    note_failed_calls(&dir, cfg.traces.max_failed)?;
    add_compute_to_summary(&dir, &runs.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())?;
    eprintln!("== done in {:.0} s: {}", t0.elapsed().as_secs_f64(), dir.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}

/// Says in report.md's first lines how many LLM calls failed (possible only
/// where `traces.max_failed` allows it): the pairs were made without them.
fn note_failed_calls(dir: &Path, max_failed: f64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(dir.join("traces").join("traces.jsonl")) else { return Ok(()) };
    let mut calls: std::collections::BTreeMap<String, (usize, usize)> = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(t) = serde_json::from_str::<tabletrace_data::Trace>(line) else { continue };
        if t.generator == "program" {
            continue;
        }
        let e = calls.entry(t.generator.clone()).or_default();
        e.1 += 1;
        e.0 += usize::from(t.invalid_reason.as_deref().is_some_and(|r| r.starts_with("generation failed")));
    }
    let failed: Vec<String> =
        calls.iter().filter(|(_, (f, _))| *f > 0).map(|(g, (f, n))| format!("{f} of {n} calls to {g}")).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let path = dir.join("report.md");
    let report = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let note = format!(
        "> **Failed LLM calls:** {} failed (allowed by traces.max_failed = {max_failed}); their questions have no \
         trace from that generator. Run again with traces redone (`--from traces`) to retry them.\n\n",
        failed.join(", ")
    );
    tabletrace_data::write_atomic(&path, (note + &report).as_bytes())?;
    Ok(())
}

/// Adds each arm's wall time (`train-ARM`, `eval-ARM*` of `compute.json`)
/// and the shared stages' to `summary.json`.
fn add_compute_to_summary(dir: &Path, arms: &[String]) -> anyhow::Result<()> {
    let path = dir.join("summary.json");
    let mut summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let compute: std::collections::BTreeMap<String, f64> = std::fs::read_to_string(dir.join("compute.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let sum = |pred: &dyn Fn(&str) -> bool| compute.iter().filter(|(k, _)| pred(k)).map(|(_, v)| v).sum::<f64>();
    for arm in arms {
        let eval_s = sum(&|k: &str| k == format!("eval-{arm}") || k.starts_with(&format!("eval-{arm}-")));
        // A training split over sessions may have been killed before the
        // pipeline could count its time: the steps' own seconds count then.
        let steps_s: f64 = std::fs::read_to_string(dir.join(arm).join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("step_seconds")?.as_f64())
            .sum();
        let train_s = sum(&|k: &str| k == format!("train-{arm}")).max(steps_s);
        if let Some(a) = summary["arms"].get_mut(arm) {
            a["compute"] = serde_json::json!({ "train_seconds": train_s, "eval_seconds": eval_s });
        }
    }
    summary["compute"] = serde_json::json!({
        "traces_seconds": sum(&|k: &str| k.starts_with("traces-")),
        "pairs_seconds": sum(&|k: &str| k.starts_with("pairs-")),
        "note": "wall seconds on this machine, summed over resumed runs (compute.json has every stage)",
    });
    tabletrace_data::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_is_compared_without_case_whitespace_or_a_final_semicolon() {
        assert_eq!(normalised_sql("SELECT  a\n FROM t ;"), normalised_sql("select a from T"));
        assert_ne!(normalised_sql("SELECT a FROM t WHERE x = 'A'"), normalised_sql("SELECT a FROM t"));
    }

    #[test]
    fn the_embedded_default_is_configs_default_toml() {
        let cfg: PipelineConfig = toml::from_str(EMBEDDED_DEFAULT).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.model, "smollm2-135m");
        for preset in ["mmqa-qwen-cpu.toml", "mmqa-qwen-onpolicy.toml", "mmqa-qwen-pilot.toml", "gpu-vllm.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(preset);
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg: PipelineConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{preset}: {e}"));
            cfg.validate().unwrap_or_else(|e| panic!("{preset}: {e}"));
        }
    }
}
