//! The `tabletrace` command lines the stages run, built from the config:
//! each stage is this binary's own command run as a child process, so a
//! stage behaves exactly as a user running that command by hand.

use std::path::{Path, PathBuf};

use tabletrace_trace::GeneratorSpec;
use tabletrace_train::Method;

use crate::config::PipelineConfig;
use crate::error::{file, Result};
use crate::fingerprint::Fingerprints;
use crate::run_dir::RunDir;

/// One evaluation: an arm on a question set.
#[derive(Debug, Clone)]
pub struct EvalStep {
    /// `base` or a method's name.
    pub arm: String,
    /// `""` for the held-out questions, else the set's name (`cross_db`, …).
    pub set: String,
    /// The marker key: `eval-ARM` or `eval-ARM-SET`.
    pub key: String,
    /// Where `eval.json` and `predictions.jsonl` go.
    pub out: PathBuf,
    /// `tabletrace` arguments.
    pub args: Vec<String>,
    /// The step's fingerprint.
    pub fingerprint: String,
}

/// Builds the stages' command lines for one config and run directory.
#[derive(Debug, Clone, Copy)]
pub struct Commands<'a> {
    cfg: &'a PipelineConfig,
    run: &'a RunDir,
}

fn strings<const N: usize>(v: [&str; N]) -> Vec<String> {
    v.map(String::from).to_vec()
}

impl<'a> Commands<'a> {
    /// Command lines for `cfg`'s stages in `run`.
    pub fn new(cfg: &'a PipelineConfig, run: &'a RunDir) -> Self {
        Commands { cfg, run }
    }

    fn data_args(&self) -> Vec<String> {
        let mut v = vec!["--data".into(), self.cfg.data.display().to_string()];
        if let Some(d) = &self.cfg.db_dir {
            v.extend(["--db-dir".into(), d.display().to_string()]);
        }
        v
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

    /// `tabletrace traces` for `generator` on the training
    /// questions, writing `out`.
    pub fn traces(&self, generator: &GeneratorSpec, out: &Path) -> Vec<String> {
        let t = &self.cfg.traces;
        let dir = self.run.join("traces");
        let mut args = vec!["traces".to_string()];
        args.extend(self.data_args());
        args.extend(strings([
            "--ids",
            &self.run.join("train_ids.txt").display().to_string(),
            "--generator",
            &generator.to_string(),
            "--polarity",
            "both",
            "--negatives",
            &t.negatives.to_string(),
            "--max-tokens",
            &t.max_tokens.to_string(),
            "--batch",
            &t.batch.to_string(),
            "--cache",
            &dir.join("llm_cache.sqlite").display().to_string(),
            "--out",
            &out.display().to_string(),
        ]));
        args.extend(self.prompt_args(true));
        if *generator == GeneratorSpec::Program && t.list_rows > 0 {
            args.extend(["--list-rows".into(), t.list_rows.to_string()]);
        }
        if generator.is_llm() {
            args.extend(["--limit".into(), t.llm_questions.to_string()]);
            args.extend(["--max-failed".into(), t.max_failed.to_string()]);
            if t.on_policy > 0 {
                args.extend(["--on-policy".into(), t.on_policy.to_string()]);
            }
            if t.quantized {
                args.push("--quantized".into());
            }
            if let Some(dir) = &t.adapter {
                args.extend(["--adapter".into(), dir.display().to_string()]);
            }
            if t.samples_per_request != 1 {
                args.extend(["--samples-per-request".into(), t.samples_per_request.to_string()]);
            }
        }
        args
    }

    /// `tabletrace pairs` of `traces` with `policy`, writing `out`.
    pub fn pairs(&self, traces: &Path, policy: tabletrace_trace::PairPolicy, out: &Path) -> Vec<String> {
        let mut args = vec!["pairs".to_string(), "--traces".into(), traces.display().to_string()];
        args.extend(self.data_args());
        args.extend(strings([
            "--policy",
            policy.name(),
            "--format",
            "conversational",
            "--max-per-question",
            &self.cfg.pairs.max_per_question.to_string(),
            "--out",
            &out.display().to_string(),
        ]));
        args.extend(self.prompt_args(true));
        args
    }

    /// Writes `METHOD/train.toml` (the trainer's own config, serialised) and
    /// returns `tabletrace train --config` of it.
    pub fn train(&self, method: Method, pairs: &Path) -> Result<Vec<String>> {
        let out = self.run.join(method.name());
        let cfg = self.cfg.train.train_config(method, &self.cfg.model, pairs, &out);
        let toml = toml::to_string(&cfg).map_err(file(&out.join("train.toml")))?;
        let path = out.join("train.toml");
        tabletrace_data::write_atomic(&path, toml.as_bytes())?;
        Ok(vec!["train".to_string(), "--config".into(), path.display().to_string()])
    }

    /// Every evaluation: each arm (the base model unless `eval.base` is off,
    /// then each trained method) on the held-out questions, the
    /// cross-database set when databases are held out, and each further set.
    /// Set by set: every arm on the held-out questions comes first, so a
    /// study run in sessions has its headline comparison soonest.
    pub fn evals(&self) -> Vec<EvalStep> {
        let cfg = self.cfg;
        let fp = Fingerprints::new(cfg);
        let arms = self.arm_adapters();
        let mut steps = Vec::new();
        for (set, data_args, ids) in &self.eval_sets() {
            for (arm, adapter) in &arms {
                let out = if set.is_empty() { self.run.join(arm) } else { self.run.join(arm).join(set) };
                let key = if set.is_empty() { format!("eval-{arm}") } else { format!("eval-{arm}-{set}") };
                let mut args = vec!["eval".to_string(), "--model".into(), cfg.model.clone()];
                if let Some(ad) = adapter {
                    args.extend(["--adapter".into(), ad.display().to_string()]);
                }
                args.extend(data_args.iter().cloned());
                args.extend(self.prompt_args(false));
                args.extend(strings([
                    "--ids",
                    &ids.display().to_string(),
                    "--prompt-format",
                    cfg.eval.prompt_format.name(),
                    "--max-tokens",
                    &cfg.eval.max_tokens.to_string(),
                    "--batch",
                    &cfg.eval.batch.to_string(),
                    "--out",
                    &out.join("eval.json").display().to_string(),
                ]));
                if cfg.eval.limit > 0 {
                    args.extend(["--limit".into(), cfg.eval.limit.to_string()]);
                }
                if cfg.eval.quantized {
                    args.push("--quantized".into());
                }
                let fingerprint = fp.eval(set, adapter.is_some());
                steps.push(EvalStep { arm: arm.clone(), set: set.clone(), key, out, args, fingerprint });
            }
        }
        steps
    }

    /// `(name, data arguments, ids file)` of every evaluation set; the
    /// held-out questions first, with the name `""`.
    fn eval_sets(&self) -> Vec<(String, Vec<String>, PathBuf)> {
        let sets_dir = self.run.join("eval_sets");
        let mut sets = vec![(String::new(), self.data_args(), self.run.join("eval_ids.txt"))];
        let cross_ids = sets_dir.join("cross_db.txt");
        if std::fs::read_to_string(&cross_ids).is_ok_and(|t| !t.trim().is_empty()) {
            sets.push(("cross_db".into(), self.data_args(), cross_ids));
        }
        for set in &self.cfg.eval_sets {
            let mut data = vec!["--data".to_string(), set.data.display().to_string()];
            if let Some(d) = &set.db_dir {
                data.extend(["--db-dir".into(), d.display().to_string()]);
            }
            sets.push((set.name.clone(), data, sets_dir.join(format!("{}.txt", set.name))));
        }
        sets
    }

    /// The evaluated arms, in order, each with its adapter (none for the base model).
    fn arm_adapters(&self) -> Vec<(String, Option<PathBuf>)> {
        let mut arms = if self.cfg.eval.base { vec![("base".to_string(), None)] } else { Vec::new() };
        let trained = self.cfg.train.methods.iter().map(|m| m.name());
        arms.extend(trained.map(|m| (m.to_string(), Some(self.run.join(m).join("adapter")))));
        arms
    }

    /// The evaluated arms, in order.
    pub fn arms(&self) -> Vec<String> {
        self.arm_adapters().into_iter().map(|(arm, _)| arm).collect()
    }

    /// `tabletrace report` over every arm: the unseen-SQL subset, each
    /// further set, Q&A SFT as the baseline when trained, the pairs.
    pub fn report(&self) -> Vec<String> {
        let mut args = vec!["report".to_string()];
        args.extend(self.arms().iter().map(|n| self.run.join(n).display().to_string()));
        args.extend(["--out".into(), self.run.path().display().to_string()]);
        let unseen = self.run.join("eval_sets").join("unseen_sql.txt");
        args.extend(["--subset".into(), format!("unseen_sql={}", unseen.display())]);
        for (set, _, _) in self.eval_sets().into_iter().skip(1) {
            args.extend(["--set".into(), set]);
        }
        if self.cfg.train.methods.contains(&Method::SftQa) {
            args.extend(["--baseline".into(), "sft-qa".into()]);
        }
        let pairs = self.run.join("pairs").join("pairs.jsonl");
        if pairs.is_file() {
            args.extend(["--pairs".into(), pairs.display().to_string()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_toml_is_the_trainers_config_and_reads_back_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let mut cfg = PipelineConfig::default();
        cfg.train.init_adapter = Some("adapters/warm \"start\"".into());
        cfg.train.keep_mlp_products = false;
        std::fs::create_dir_all(run.join("cpo")).unwrap();
        let pairs = run.join("pairs/pairs.jsonl");
        let args = Commands::new(&cfg, &run).train(Method::Cpo, &pairs).unwrap();
        assert_eq!(args[..2], ["train", "--config"]);
        let text = std::fs::read_to_string(&args[2]).unwrap();
        let back = tabletrace_train::TrainConfig::from_toml(&text, "train.toml").unwrap();
        let want = cfg.train.train_config(Method::Cpo, &cfg.model, &pairs, &run.join("cpo"));
        assert_eq!(back, want);
        assert_eq!(back.lora.alpha, 32.0, "alpha defaults to twice the rank");
        assert_eq!(back.loss.beta, Some(0.1));
        assert_eq!(back.init_adapter.as_deref(), Some(Path::new("adapters/warm \"start\"")));
    }

    #[test]
    fn every_arm_is_evaluated_on_every_set_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        std::fs::create_dir_all(run.join("eval_sets")).unwrap();
        std::fs::write(run.join("eval_sets/cross_db.txt"), "q1\n").unwrap();
        let mut cfg = PipelineConfig::default();
        cfg.eval.quantized = true;
        let c = Commands::new(&cfg, &run);
        let keys: Vec<String> = c.evals().iter().map(|s| s.key.clone()).collect();
        assert_eq!(
            keys,
            ["eval-base", "eval-sft-qa", "eval-cpo", "eval-base-cross_db", "eval-sft-qa-cross_db", "eval-cpo-cross_db"]
        );
        let cpo = &c.evals()[2];
        assert!(cpo.args.windows(2).any(|w| w[0] == "--adapter" && w[1].ends_with("cpo/adapter")));
        assert!(cpo.args.contains(&"--quantized".to_string()));
        let report = c.report();
        assert!(report.windows(2).any(|w| w == ["--baseline", "sft-qa"]));
        assert!(report.windows(2).any(|w| w == ["--set", "cross_db"]));
        cfg.eval.base = false;
        assert_eq!(Commands::new(&cfg, &run).arms(), ["sft-qa", "cpo"]);
    }

    #[test]
    fn listed_rows_go_to_the_program_tracer_only_and_refresh_its_traces() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let mut cfg = PipelineConfig::default();
        let before = Fingerprints::new(&cfg).traces();
        cfg.traces.list_rows = 5;
        let c = Commands::new(&cfg, &run);
        let out = run.join("traces/t.jsonl");
        let program = c.traces(&GeneratorSpec::Program, &out);
        assert!(program.windows(2).any(|w| w == ["--list-rows", "5"]), "{program:?}");
        let local = c.traces(&GeneratorSpec::Local { model: "smollm2-135m".into() }, &out);
        assert!(!local.contains(&"--list-rows".to_string()), "{local:?}");
        assert_ne!(Fingerprints::new(&cfg).traces(), before);
    }
}
