//! `tabletrace run [pipeline.toml]`: data → traces → pairs → train → eval → report.
//!
//! The pipeline itself (config, split, command lines, fingerprints, markers)
//! is `tabletrace-pipeline`; this file holds the flags, the lock on the run
//! directory, signals, the child processes and what is printed.
//!
//! Each stage runs this binary's own command (`traces`, `pairs`, `train`,
//! `eval`, `report`) as a child process, writes into its folder of the run
//! directory, and leaves a `.done` file holding the stage's fingerprint. A
//! re-run skips stages whose `.done` matches, and resumes interrupted ones
//! (the LLM call cache, training checkpoints); `--from STAGE` redoes from
//! there. Ctrl-C stops the child; a signal sent to this process alone is
//! passed on to the child, which is waited for; the run directory stays
//! resumable. One process at a time holds a run directory.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use tabletrace_pipeline::{pairs, Commands, Fingerprints, PipelineConfig, RunDir, Stage, EMBEDDED_DEFAULT};
use tabletrace_trace::PairPolicy;

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
    /// Only this arm in the train and eval stages (repeatable: `--arm sft-qa
    /// --arm cpo`; names as in the report: base, sft-qa, cpo, …): a study run
    /// in sessions gets its headline comparison first. The report waits for a
    /// run without `--arm`.
    #[arg(long = "arm", value_name = "ARM")]
    arms: Vec<String>,
    /// Print each step (stage, arm, set), its fingerprint and whether the run
    /// directory holds it done or pending, with the command it would run; runs nothing.
    #[arg(long)]
    plan: bool,
}

/// The arms `--arm` asks for, checked against the config's; `None` for all.
fn chosen_arms(asked: &[String], known: &[String]) -> anyhow::Result<Option<Vec<String>>> {
    if asked.is_empty() {
        return Ok(None);
    }
    if let Some(bad) = asked.iter().find(|a| !known.contains(a)) {
        bail!("--arm {bad}: not an arm of this config (its arms: {})", known.join(", "));
    }
    Ok(Some(asked.to_vec()))
}

/// Runs the stages' child processes and counts their time.
struct Runner {
    run: RunDir,
    exe: PathBuf,
    quiet: bool,
}

impl Runner {
    /// Runs this binary with `args`; a failure names the stage and the
    /// command. With `hide_stdout`, the child's stdout (JSON results) is kept
    /// off the terminal.
    fn tabletrace(&self, stage: Stage, args: &[String], hide_stdout: bool) -> anyhow::Result<()> {
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

    /// Runs this binary like [`Runner::tabletrace`] and counts its wall time under `key`.
    fn timed(&self, key: &str, stage: Stage, args: &[String], hide_stdout: bool) -> anyhow::Result<()> {
        let t = Instant::now();
        let result = self.tabletrace(stage, args, hide_stdout);
        self.run.count_time(key, t.elapsed().as_secs_f64())?;
        result
    }
}

/// An error when a signal asked the pipeline to stop (the child got it too).
fn stopped(stage: Stage) -> anyhow::Result<()> {
    if let Some(sig) = crate::signals::received() {
        bail!(
            "stopped by {} during stage {stage}: run the same command again to resume (finished stages, the LLM call \
             cache and training checkpoints are kept)",
            crate::signals::name(sig)
        );
    }
    Ok(())
}

fn load_config(a: &RunArgs) -> anyhow::Result<PipelineConfig> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<PipelineConfig>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => toml::from_str::<PipelineConfig>(EMBEDDED_DEFAULT).context("configs/default.toml (embedded)")?,
    };
    if let Some(d) = &a.run_dir {
        cfg.run_dir = d.clone();
    }
    cfg.validate()?;
    cfg.check_environment()?;
    Ok(cfg)
}

pub fn run(a: RunArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a)?;
    if a.plan {
        print_plan(&cfg)?;
        return Ok(ExitCode::SUCCESS);
    }
    let from = a.from.as_deref().map(Stage::parse).transpose().map_err(|e| anyhow::anyhow!("--from {e}"))?;
    let last = a.to.as_deref().map(Stage::parse).transpose().map_err(|e| anyhow::anyhow!("--to {e}"))?;
    let last = last.unwrap_or(Stage::Report);
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
    let run = RunDir::new(&dir);
    let exe = std::env::current_exe().context("cannot find the tabletrace binary")?;
    let runner = Runner { run: run.clone(), exe, quiet };
    if let Some(from) = from {
        run.clear_from(from)?;
    }
    let fp = Fingerprints::new(&cfg);
    let commands = Commands::new(&cfg, &run);
    let arms = chosen_arms(&a.arms, &commands.arms())?;
    let wanted = |arm: &str| arms.as_ref().is_none_or(|v| v.iter().any(|a| a == arm));
    if let Some(v) = &arms {
        eprintln!("   train and eval only: {}", v.join(", "));
    }
    let t0 = Instant::now();
    let stage = |name: &str| eprintln!("== {name} ({:.0} s)", t0.elapsed().as_secs_f64());
    let stop_after = |done: Stage| -> bool {
        let stop = last == done;
        if stop {
            eprintln!("== stopped after {done} (--to) in {:.0} s", t0.elapsed().as_secs_f64());
        }
        stop
    };

    // data
    if !run.is_done("data", &fp.data()) {
        stage("data: split questions");
        let s = tabletrace_pipeline::split_questions(&cfg, &dir)?;
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
        run.finish("data", &fp.data())?;
    }
    if stop_after(Stage::Data) {
        return Ok(ExitCode::SUCCESS);
    }

    // traces
    let traces_dir = dir.join("traces");
    std::fs::create_dir_all(&traces_dir)?;
    let traces = traces_dir.join("traces.jsonl");
    if !run.is_done("traces", &fp.traces()) {
        let mut parts = Vec::new();
        for (i, g) in cfg.traces.generators.iter().enumerate() {
            stage(&format!("traces: {g}"));
            let out = traces_dir.join(format!("traces-{i}.jsonl"));
            runner.timed(&format!("traces-{g}"), Stage::Traces, &commands.traces(g, &out), false)?;
            parts.push(out);
        }
        let mut all = String::new();
        for part in &parts {
            all.push_str(&std::fs::read_to_string(part).with_context(|| format!("reading {}", part.display()))?);
        }
        tabletrace_data::write_atomic(&traces, all.as_bytes())?;
        run.finish("traces", &fp.traces())?;
    }
    if stop_after(Stage::Traces) {
        return Ok(ExitCode::SUCCESS);
    }

    // pairs
    let pairs_dir = dir.join("pairs");
    let pairs_path = pairs_dir.join("pairs.jsonl");
    std::fs::create_dir_all(&pairs_dir)?;
    if !run.is_done("pairs", &fp.pairs()) {
        let mut input = traces.clone();
        if !cfg.pairs.program_positives {
            // Ablation: positives from LLM generators only.
            input = pairs_dir.join("traces-no-program-positives.jsonl");
            pairs::without_program_positives(&traces, &input)?;
        }
        let pairs_with = |policy: PairPolicy, out: &Path| -> anyhow::Result<Vec<String>> {
            let name = policy.name();
            stage(&format!("pairs: {name}"));
            runner.timed(&format!("pairs-{name}"), Stage::Pairs, &commands.pairs(&input, policy, out), false)?;
            Ok(pairs::read_lines(out)?)
        };
        let policy = cfg.pairs.policy;
        let mut lines = pairs_with(policy, &pairs_path)?;
        let mut used = format!("{} ({} pairs)", policy.name(), lines.len());
        // Heterogeneous pairs too few to train on: top up with homogeneous
        // pairs of the questions that have none (said here and in policy_used.txt).
        let needed = pairs::needed(&cfg.train);
        if policy == PairPolicy::Heterogeneous && cfg.pairs.fallback_homogeneous && lines.len() < needed {
            let homo = pairs_with(PairPolicy::Homogeneous, &pairs_dir.join("pairs-homogeneous.jsonl"))?;
            let added = pairs::top_up(&lines, homo);
            eprintln!(
                "   {} heterogeneous pairs, fewer than the {needed} that training takes: {} homogeneous pairs of other \
                 questions added",
                lines.len(),
                added.len()
            );
            used = format!("heterogeneous ({} pairs) + homogeneous ({} pairs)", lines.len(), added.len());
            lines.extend(added);
            tabletrace_data::write_atomic(&pairs_path, (lines.join("\n") + "\n").as_bytes())?;
        }
        if lines.is_empty() {
            bail!(
                "stage pairs: no pairs from {} (see {})",
                traces.display(),
                pairs_path.with_extension("report.json").display()
            );
        }
        eprintln!("   {} pairs: {used}", lines.len());
        std::fs::write(pairs_dir.join("policy_used.txt"), &used)?;
        run.finish("pairs", &fp.pairs())?;
    }
    if stop_after(Stage::Pairs) {
        return Ok(ExitCode::SUCCESS);
    }

    // train
    for &method in cfg.train.methods.iter().filter(|m| wanted(m.name())) {
        let out = dir.join(method.name());
        let fingerprint = fp.train(method);
        let key = format!("train-{}", method.name());
        if run.is_done(&key, &fingerprint) {
            continue;
        }
        stage(&format!("train: {}", method.name()));
        // Resume only a training of these very settings: checkpoints of
        // other settings (or of a redone stage upstream) are stale.
        let started = out.join(".train-settings");
        if out.exists() && !std::fs::read_to_string(&started).is_ok_and(|d| d.trim() == fingerprint) {
            eprintln!("   {} holds a training of other settings: starting afresh", out.display());
            std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
        }
        std::fs::create_dir_all(&out)?;
        tabletrace_data::write_atomic(&started, fingerprint.as_bytes())?;
        let args = commands.train(method, &pairs_path)?;
        runner.timed(&key, Stage::Train, &args, true)?;
        run.finish(&key, &fingerprint)?;
    }
    if stop_after(Stage::Train) {
        return Ok(ExitCode::SUCCESS);
    }

    // eval: every arm on the held-out questions, the cross-database set
    // (when databases are held out) and each further set.
    for step in commands.evals().into_iter().filter(|s| wanted(&s.arm)) {
        if run.is_done(&step.key, &step.fingerprint) {
            continue;
        }
        let on = if step.set.is_empty() { String::new() } else { format!(" on {}", step.set) };
        stage(&format!("eval: {}{on}", step.arm));
        std::fs::create_dir_all(&step.out)?;
        runner.timed(&step.key, Stage::Eval, &step.args, true)?;
        run.finish(&step.key, &step.fingerprint)?;
    }
    if stop_after(Stage::Eval) {
        return Ok(ExitCode::SUCCESS);
    }

    if arms.is_some() {
        eprintln!(
            "== stopped before the report (--arm) in {:.0} s: run without --arm for every arm and the report",
            t0.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    }

    // report: Q&A SFT is the baseline the method has to beat, when trained.
    stage("report");
    runner.tabletrace(Stage::Report, &commands.report(), false)?;
    tabletrace_pipeline::note_failed_calls(&dir, cfg.traces.max_failed)?;
    tabletrace_pipeline::add_compute_to_summary(&run, &commands.arms())?;
    eprintln!("== done in {:.0} s: {}", t0.elapsed().as_secs_f64(), dir.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}

/// `--plan`: every step of the config with its fingerprint, whether the run
/// directory's marker says it is done, and what it would run. Reads only.
fn print_plan(cfg: &PipelineConfig) -> anyhow::Result<()> {
    let run = RunDir::new(&cfg.run_dir);
    let fp = Fingerprints::new(cfg);
    let commands = Commands::new(cfg, &run);
    let mut steps: Vec<(String, String, String)> = vec![
        ("data".into(), fp.data(), String::new()),
        (
            "traces".into(),
            fp.traces(),
            format!(
                "generators: {}",
                cfg.traces.generators.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", ")
            ),
        ),
        ("pairs".into(), fp.pairs(), format!("policy: {}", cfg.pairs.policy.name())),
    ];
    for &method in &cfg.train.methods {
        steps.push((format!("train-{}", method.name()), fp.train(method), format!("{} steps", cfg.train.max_steps)));
    }
    for step in commands.evals() {
        steps.push((step.key, step.fingerprint, format!("tabletrace {}", step.args.join(" "))));
    }
    println!("run directory {}", cfg.run_dir.display());
    for (key, fingerprint, what) in steps {
        let state = if run.is_done(&key, &fingerprint) { "done" } else { "pending" };
        println!("{key:<24} {fingerprint}  {state:<7}  {what}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_are_checked_against_the_configs() {
        let known: Vec<String> = ["base", "sft-qa", "cpo"].map(String::from).to_vec();
        assert_eq!(chosen_arms(&[], &known).unwrap(), None);
        let two = ["sft-qa".to_string(), "cpo".to_string()];
        assert_eq!(chosen_arms(&two, &known).unwrap().unwrap(), two);
        let err = chosen_arms(&["dpo".to_string()], &known).unwrap_err().to_string();
        assert!(err.contains("--arm dpo") && err.contains("base, sft-qa, cpo"), "{err}");
    }

    #[test]
    fn the_embedded_default_and_the_presets_load_and_validate() {
        let cfg: PipelineConfig = toml::from_str(EMBEDDED_DEFAULT).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.model, "smollm2-135m");
        // Every preset in configs/.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let preset = path.display();
            let cfg: PipelineConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{preset}: {e}"));
            cfg.validate().unwrap_or_else(|e| panic!("{preset}: {e}"));
            checked += 1;
        }
        assert!(checked >= 7, "{checked} presets in {}", dir.display());
    }
}
