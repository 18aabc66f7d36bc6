//! `tabletrace run [pipeline.toml]`: data → traces → pairs → train → eval → report.
//!
//! Each stage runs this binary's own command (`traces`, `pairs`, `train`,
//! `eval`, `report`) as a child process, writes into its folder of the run
//! directory, and leaves a `.done` file holding the stage's resolved
//! settings. A re-run skips stages whose `.done` matches, and resumes
//! interrupted ones (the LLM call cache, training checkpoints); `--from
//! STAGE` redoes from there. Ctrl-C stops the child; the run directory
//! stays resumable.

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
}

impl Default for TracesStage {
    fn default() -> Self {
        TracesStage {
            generators: vec!["program".into(), "local:smollm2-135m".into()],
            negatives: 2,
            llm_questions: 8,
            max_tokens: 160,
            batch: 8,
        }
    }
}

/// Pairing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairsStage {
    /// `heterogeneous` (chosen and rejected from different generators) or `homogeneous`. Default heterogeneous.
    pub policy: String,
    /// When the policy yields no pair, pair homogeneously instead (said in the report). Default true.
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
}

impl Default for EvalStage {
    fn default() -> Self {
        EvalStage { limit: 0, max_tokens: 128, batch: 8, prompt_format: "trace".into() }
    }
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
    /// The model trained and evaluated. Default smollm2-135m.
    pub model: String,
    /// Table rows per table in prompts. Default 6.
    pub max_rows: usize,
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
            model: "smollm2-135m".into(),
            max_rows: 6,
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
        if self.traces.generators.is_empty() {
            bail!("config: traces.generators: at least one generator is needed");
        }
        if self.train_split.is_some() != self.eval_split.is_some() {
            bail!("config: set both train_split and eval_split, or neither (then eval_fraction is held out)");
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
    /// Run directory (overrides the config's run_dir).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

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
        tabletrace_train::write_atomic(&self.marker(stage), digest(settings).as_bytes())?;
        Ok(())
    }

    /// Runs this binary with `args`; a failure names the stage and the
    /// command. With `hide_stdout`, the child's stdout (JSON results) is kept
    /// off the terminal.
    fn tabletrace(&self, stage: &str, args: &[String], hide_stdout: bool) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.exe);
        if self.quiet {
            cmd.arg("--quiet");
        }
        cmd.args(args);
        if hide_stdout {
            cmd.stdout(std::process::Stdio::null());
        }
        let status = cmd.status().with_context(|| format!("stage {stage}: cannot start {}", self.exe.display()))?;
        if !status.success() {
            bail!(
                "stage {stage} failed ({status}): tabletrace {}\nfix the cause and run again: finished stages are kept",
                args.join(" ")
            );
        }
        Ok(())
    }

    fn data_args(&self) -> Vec<String> {
        let mut v = vec!["--data".into(), self.cfg.data.display().to_string()];
        if let Some(d) = &self.cfg.db_dir {
            v.extend(["--db-dir".into(), d.display().to_string()]);
        }
        v
    }
}

/// Splits question ids into train and held-out lists (by split, or by a hash of the id).
fn split_ids(cfg: &PipelineConfig, dir: &Path) -> anyhow::Result<(usize, usize)> {
    let ds = tabletrace_data::load(
        &cfg.data,
        &tabletrace_data::LoadOptions { db_dir: cfg.db_dir.clone(), tables_json: None },
    )
    .with_context(|| format!("loading {} (set `data` in the pipeline config)", cfg.data.display()))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for q in &ds.questions {
        let held_out = match (&cfg.train_split, &cfg.eval_split) {
            (Some(t), Some(e)) => {
                let (t, e) = (tabletrace_data::Split::parse(t), tabletrace_data::Split::parse(e));
                if q.split.is_some() && q.split == e {
                    true
                } else if q.split.is_some() && q.split == t {
                    false
                } else {
                    continue;
                }
            }
            _ => {
                let h = Sha256::digest(q.id.0.as_bytes());
                (u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as f64 / u32::MAX as f64) < cfg.eval_fraction
            }
        };
        if held_out {
            eval.push(q.id.0.clone());
        } else {
            train.push(q.id.0.clone());
        }
    }
    anyhow::ensure!(
        !train.is_empty() && !eval.is_empty(),
        "the split left {} training and {} held-out questions",
        train.len(),
        eval.len()
    );
    std::fs::write(dir.join("train_ids.txt"), train.join("\n") + "\n")?;
    std::fs::write(dir.join("eval_ids.txt"), eval.join("\n") + "\n")?;
    Ok((train.len(), eval.len()))
}

pub fn run(a: RunArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<PipelineConfig>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => PipelineConfig::default(),
    };
    if let Some(d) = a.run_dir {
        cfg.run_dir = d;
    }
    cfg.validate()?;
    let dir = cfg.run_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    // An unwritable run directory is reported now, not after hours of work.
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").with_context(|| format!("the run directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    tabletrace_train::write_atomic(&dir.join("pipeline.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
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
    let t0 = Instant::now();
    let stage = |name: &str| eprintln!("== {name} ({:.0} s)", t0.elapsed().as_secs_f64());

    // data
    let data_settings = (&cfg.data, &cfg.db_dir, &cfg.train_split, &cfg.eval_split, cfg.eval_fraction);
    if !p.done("data", &data_settings) {
        stage("data: split questions");
        let (n_train, n_eval) = split_ids(&cfg, &dir)?;
        eprintln!("   {n_train} training questions, {n_eval} held out");
        p.finish("data", &data_settings)?;
    }

    // traces
    let traces_dir = dir.join("traces");
    std::fs::create_dir_all(&traces_dir)?;
    let traces = traces_dir.join("traces.jsonl");
    let traces_settings = (&data_settings, &cfg.traces, cfg.max_rows);
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
                    "--max-rows",
                    &cfg.max_rows.to_string(),
                    "--cache",
                    &traces_dir.join("llm_cache.sqlite").display().to_string(),
                    "--out",
                    &out.display().to_string(),
                ]
                .map(String::from),
            );
            if g != "program" {
                args.extend(["--limit".into(), cfg.traces.llm_questions.to_string()]);
            }
            p.tabletrace("traces", &args, false)?;
            parts.push(out);
        }
        let mut all = String::new();
        for part in &parts {
            all.push_str(&std::fs::read_to_string(part)?);
        }
        tabletrace_train::write_atomic(&traces, all.as_bytes())?;
        p.finish("traces", &traces_settings)?;
    }

    // pairs
    let pairs = dir.join("pairs").join("pairs.jsonl");
    std::fs::create_dir_all(dir.join("pairs"))?;
    let pairs_settings = (&traces_settings, &cfg.pairs);
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
        let mut policy = cfg.pairs.policy.clone();
        loop {
            stage(&format!("pairs: {policy}"));
            let mut args = vec!["pairs".to_string(), "--traces".into(), input.display().to_string()];
            args.extend(p.data_args());
            args.extend(
                [
                    "--policy",
                    &policy,
                    "--format",
                    "conversational",
                    "--max-rows",
                    &cfg.max_rows.to_string(),
                    "--max-per-question",
                    &cfg.pairs.max_per_question.to_string(),
                    "--out",
                    &pairs.display().to_string(),
                ]
                .map(String::from),
            );
            p.tabletrace("pairs", &args, false)?;
            let n = std::fs::read_to_string(&pairs)?.lines().filter(|l| !l.trim().is_empty()).count();
            if n > 0 {
                eprintln!("   {n} pairs ({policy})");
                std::fs::write(dir.join("pairs").join("policy_used.txt"), &policy)?;
                break;
            }
            if policy == "heterogeneous" && cfg.pairs.fallback_homogeneous {
                eprintln!("   no heterogeneous pairs (the LLM generators wrote no valid trace of the opposite polarity): pairing homogeneously");
                policy = "homogeneous".into();
                continue;
            }
            bail!(
                "stage pairs: no pairs from {} (see {})",
                traces.display(),
                pairs.with_extension("report.json").display()
            );
        }
        p.finish("pairs", &pairs_settings)?;
    }

    // train
    for method in &cfg.train.methods {
        let out = dir.join(method);
        let settings = (&pairs_settings, &cfg.model, &cfg.train, method);
        let key = format!("train-{method}");
        if p.done(&key, &settings) {
            continue;
        }
        stage(&format!("train: {method}"));
        let t = &cfg.train;
        let toml = format!(
            "method = {method:?}\nmodel = {:?}\ntrain = {:?}\noutput_dir = {:?}\nmax_steps = {}\nbatch_size = {}\n\
             grad_accum = {}\nmax_length = {}\nsave_every = 4\ndevice = {:?}\n[lora]\nr = {}\nalpha = {}\n[optim]\nlr = {}\n\
             [loss]\nbeta = {}\n",
            cfg.model,
            pairs.display().to_string(),
            out.display().to_string(),
            t.max_steps,
            t.batch_size,
            t.grad_accum,
            t.max_length,
            t.device,
            t.lora_r,
            2.0 * t.lora_r as f64,
            t.lr,
            t.beta,
        );
        std::fs::create_dir_all(&out)?;
        let toml_path = out.join("train.toml");
        std::fs::write(&toml_path, toml)?;
        let mut args = vec!["train".to_string(), "--config".into(), toml_path.display().to_string()];
        if t.max_steps == 0 {
            args.extend(["--epochs".into(), "1".into()]);
        }
        p.tabletrace("train", &args, true)?;
        p.finish(&key, &settings)?;
    }

    // eval
    let mut runs = vec![("base".to_string(), None)];
    runs.extend(cfg.train.methods.iter().map(|m| (m.clone(), Some(dir.join(m).join("adapter")))));
    for (name, adapter) in &runs {
        let out = dir.join(name);
        let settings = (
            &data_settings,
            &cfg.model,
            &cfg.eval,
            cfg.max_rows,
            adapter.as_ref().map(|_| (&pairs_settings, &cfg.train)),
        );
        let key = format!("eval-{name}");
        if p.done(&key, &settings) {
            continue;
        }
        stage(&format!("eval: {name}"));
        std::fs::create_dir_all(&out)?;
        let mut args = vec!["eval".to_string(), "--model".into(), cfg.model.clone()];
        if let Some(ad) = adapter {
            args.extend(["--adapter".into(), ad.display().to_string()]);
        }
        args.extend(p.data_args());
        args.extend(
            [
                "--ids",
                &dir.join("eval_ids.txt").display().to_string(),
                "--prompt-format",
                &cfg.eval.prompt_format,
                "--max-rows",
                &cfg.max_rows.to_string(),
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
        p.tabletrace("eval", &args, true)?;
        p.finish(&key, &settings)?;
    }

    // report
    stage("report");
    let mut args = vec!["report".to_string()];
    args.extend(runs.iter().map(|(n, _)| dir.join(n).display().to_string()));
    args.extend(["--out".into(), dir.display().to_string()]);
    p.tabletrace("report", &args, false)?;
    eprintln!("== done in {:.0} s: {}", t0.elapsed().as_secs_f64(), dir.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}
