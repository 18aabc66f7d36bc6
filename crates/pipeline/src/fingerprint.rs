//! Stage fingerprints: a digest of every setting that changes what a stage
//! produces. A stage whose `.STAGE.done` marker holds its fingerprint is
//! skipped; a changed setting redoes it and every stage downstream (each
//! fingerprint includes its inputs' fingerprints).
//!
//! The serialised forms are frozen: a run directory made by an earlier
//! build must resume (a study runs over many sessions). The tests pin the
//! digests of `configs/mmqa-qwen-cpu.toml`; a new setting joins a stage's
//! fingerprint only where it differs from its default (serde's
//! `skip_serializing_if`), so that older run directories keep theirs.

use serde::Serialize;
use sha2::{Digest, Sha256};
use tabletrace_train::Method;

use crate::config::PipelineConfig;

/// The first 8 bytes of the SHA-256 of `v`'s JSON, in hex.
pub fn digest(v: &impl Serialize) -> String {
    let d = Sha256::digest(serde_json::to_string(v).expect("stage settings serialise").as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The fingerprints of a pipeline's stages.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprints<'a> {
    cfg: &'a PipelineConfig,
}

impl<'a> Fingerprints<'a> {
    /// The fingerprints of `cfg`'s stages.
    pub fn new(cfg: &'a PipelineConfig) -> Self {
        Fingerprints { cfg }
    }

    fn data_settings(&self) -> impl Serialize + 'a {
        let c = self.cfg;
        (
            (&c.data, &c.db_dir, &c.train_split, &c.eval_split, c.eval_fraction),
            (&c.cross_db, c.cross_db_fraction, &c.eval_sets, c.dev_fraction),
        )
    }

    fn prompt_settings(&self) -> impl Serialize + 'a {
        (self.cfg.table_tokens, self.cfg.max_rows, &self.cfg.model)
    }

    fn traces_settings(&self) -> impl Serialize + 'a {
        (self.data_settings(), &self.cfg.traces, self.prompt_settings())
    }

    fn pairs_settings(&self) -> impl Serialize + 'a {
        let t = &self.cfg.train;
        (self.traces_settings(), &self.cfg.pairs, (t.max_steps, t.batch_size, t.grad_accum))
    }

    /// The data stage: data, splits, held-out databases, further sets.
    pub fn data(&self) -> String {
        digest(&self.data_settings())
    }

    /// The traces stage: the data stage, the generators' settings, how prompts show tables.
    pub fn traces(&self) -> String {
        digest(&self.traces_settings())
    }

    /// The pairs stage: the traces stage, pairing, and how many pairs training takes.
    pub fn pairs(&self) -> String {
        digest(&self.pairs_settings())
    }

    /// Training `method`: the pairs stage, the model and the training settings
    /// that change the result (not `save_every` or `keep_mlp_products`).
    pub fn train(&self, method: Method) -> String {
        digest(&(self.pairs_settings(), &self.cfg.model, &self.cfg.train.result_settings(), method))
    }

    /// Evaluating one arm on one set (`""`: the held-out questions): the data
    /// stage, the model, evaluation and prompt settings and, for a trained
    /// arm, what its training depended on.
    pub fn eval(&self, set: &str, trained: bool) -> String {
        let c = self.cfg;
        digest(&(
            self.data_settings(),
            &c.model,
            &c.eval,
            self.prompt_settings(),
            set,
            trained.then(|| (self.pairs_settings(), c.train.result_settings())),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digests in `runs/mmqa-qwen/.STAGE.done` when the study's stages
    /// ran (commits up to bd7c76c): a build that changes them would redo
    /// hours of the study.
    #[test]
    fn the_study_configs_fingerprints_are_those_its_run_directory_holds() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/mmqa-qwen-cpu.toml");
        let cfg: PipelineConfig = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let f = Fingerprints::new(&cfg);
        assert_eq!(f.data(), "52d947e0313f6d75");
        assert_eq!(f.traces(), "89be00fde9bac0af");
        assert_eq!(f.pairs(), "10d9cb2fab0842d8");
        assert_eq!(f.train(Method::SftQa), "9d61e52b972d857e");
    }

    #[test]
    fn a_changed_setting_changes_its_stage_and_those_downstream_only() {
        let base = PipelineConfig::default();
        let f = Fingerprints::new(&base);
        let mut more_negatives = base.clone();
        more_negatives.traces.negatives += 1;
        let g = Fingerprints::new(&more_negatives);
        assert_eq!(f.data(), g.data());
        assert_ne!(f.traces(), g.traces());
        assert_ne!(f.pairs(), g.pairs());
        assert_ne!(f.train(Method::Cpo), g.train(Method::Cpo));
        assert_ne!(f.eval("", true), g.eval("", true));
        assert_eq!(f.eval("", false), g.eval("", false), "the base model's evaluation does not depend on traces");
        let mut saves_more = base.clone();
        saves_more.train.save_every = 1;
        saves_more.train.keep_mlp_products = false;
        assert_eq!(f.train(Method::Cpo), Fingerprints::new(&saves_more).train(Method::Cpo));
        let mut alpha = base.clone();
        alpha.train.lora_alpha = Some(8.0);
        assert_ne!(f.train(Method::Cpo), Fingerprints::new(&alpha).train(Method::Cpo));
    }
}
