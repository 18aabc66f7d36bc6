//! `train.toml`: one struct per concern, `#[serde(default, deny_unknown_fields)]`,
//! the documented defaults in `impl Default`.
//!
//! ```toml
//! method = "cpo"                 # cpo | simpo | cpo-simpo | hinge | ipo | dpo | sft-qa | sft-trace
//! model = "smollm2-135m"         # short name, .gguf file, HF folder or hub id
//! train = "runs/demo/pairs.jsonl"
//! output_dir = "runs/demo/train-cpo"
//! [lora]
//! r = 16
//! [loss]
//! beta = 0.1
//! [optim]
//! lr = 2e-4
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tabletrace_model::LoraConfig;

use crate::error::{Error, Result};

/// What the model is trained to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// CPO: sigmoid preference loss on summed log-probs plus NLL on the chosen trace.
    Cpo,
    /// SimPO: length-normalised sigmoid loss with margin `simpo_gamma`, no NLL.
    Simpo,
    /// CPO-SimPO: SimPO plus the NLL term.
    CpoSimpo,
    /// CPO with the hinge loss.
    Hinge,
    /// CPO with the IPO loss (length-normalised).
    Ipo,
    /// DPO: the sigmoid (or robust) loss on log-ratios to a frozen
    /// reference — the base model, or the `init_adapter` it starts from —
    /// whose log-probs are computed once per pair and cached; no NLL term.
    Dpo,
    /// Q&A SFT baseline: prompt → the chosen trace's final answer line only.
    SftQa,
    /// Trace SFT: prompt → the chosen trace.
    SftTrace,
}

impl Method {
    /// Every method, as written in configs.
    pub const ALL: [Method; 8] = [
        Method::Cpo,
        Method::Simpo,
        Method::CpoSimpo,
        Method::Hinge,
        Method::Ipo,
        Method::Dpo,
        Method::SftQa,
        Method::SftTrace,
    ];

    /// The name used in configs and run directories.
    pub fn name(self) -> &'static str {
        match self {
            Method::Cpo => "cpo",
            Method::Simpo => "simpo",
            Method::CpoSimpo => "cpo-simpo",
            Method::Hinge => "hinge",
            Method::Ipo => "ipo",
            Method::Dpo => "dpo",
            Method::SftQa => "sft-qa",
            Method::SftTrace => "sft-trace",
        }
    }

    /// Parses a name.
    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// A preference method (needs chosen and rejected).
    pub fn is_preference(self) -> bool {
        !matches!(self, Method::SftQa | Method::SftTrace)
    }

    /// Whether the loss compares with a frozen reference model (DPO).
    pub fn uses_reference(self) -> bool {
        self == Method::Dpo
    }

    /// The loss type and the defaults of `beta`, `cpo_alpha` a method starts from.
    pub fn loss_defaults(self) -> (LossType, f64, f64) {
        match self {
            Method::Cpo => (LossType::Sigmoid, 0.1, 1.0),
            Method::Simpo => (LossType::Simpo, 2.0, 0.0),
            Method::CpoSimpo => (LossType::Simpo, 2.0, 1.0),
            Method::Hinge => (LossType::Hinge, 0.1, 1.0),
            Method::Ipo => (LossType::Ipo, 0.1, 1.0),
            Method::Dpo => (LossType::Sigmoid, 0.1, 0.0),
            Method::SftQa | Method::SftTrace => (LossType::Sigmoid, 0.0, 1.0),
        }
    }
}

/// TRL's `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// `-log σ(β Δ)` with label smoothing, on summed log-probs.
    Sigmoid,
    /// `relu(1 - β Δ)` on summed log-probs.
    Hinge,
    /// `(Δ - 1/(2β))²` on averaged log-probs.
    Ipo,
    /// `-log σ(β Δ - γ)` on averaged log-probs.
    Simpo,
    /// DPO only: robust DPO, `(-(1-ε) log σ(β Δ) + ε log σ(-β Δ)) / (1 - 2ε)`
    /// with ε = `label_smoothing` (TRL 1.16's DPO smooths labels this way;
    /// its sigmoid loss has no smoothing).
    Robust,
}

impl LossType {
    /// Parses TRL's name.
    pub fn parse(name: &str) -> Option<LossType> {
        match name {
            "sigmoid" => Some(LossType::Sigmoid),
            "hinge" => Some(LossType::Hinge),
            "ipo" => Some(LossType::Ipo),
            "simpo" => Some(LossType::Simpo),
            "robust" => Some(LossType::Robust),
            _ => None,
        }
    }

    /// Whether sequence log-probs are averaged over tokens (IPO, SimPO) rather than summed.
    pub fn averages(self) -> bool {
        matches!(self, LossType::Ipo | LossType::Simpo)
    }
}

/// The preference loss; unset fields take the method's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// TRL `loss_type`. Default: from the method (cpo → sigmoid, simpo → simpo, …).
    pub loss_type: Option<LossType>,
    /// Temperature β. Default 0.1 (SimPO: 2.0).
    pub beta: Option<f64>,
    /// Weight of the NLL term on the chosen trace. Default 1.0 (SimPO: 0).
    pub cpo_alpha: Option<f64>,
    /// Label smoothing ε of the sigmoid losses. Default 0.
    pub label_smoothing: f64,
    /// SimPO's target margin γ. Default 0.5.
    pub simpo_gamma: Option<f64>,
}

/// The resolved preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossParams {
    /// TRL `loss_type`.
    pub loss_type: LossType,
    /// β.
    pub beta: f64,
    /// NLL weight.
    pub cpo_alpha: f64,
    /// Label smoothing.
    pub label_smoothing: f64,
    /// SimPO γ.
    pub simpo_gamma: f64,
}

impl LossConfig {
    /// Fills unset fields from the method.
    pub fn resolve(&self, method: Method) -> LossParams {
        let (loss_type, beta, cpo_alpha) = method.loss_defaults();
        LossParams {
            loss_type: self.loss_type.unwrap_or(loss_type),
            beta: self.beta.unwrap_or(beta),
            cpo_alpha: self.cpo_alpha.unwrap_or(cpo_alpha),
            label_smoothing: self.label_smoothing,
            simpo_gamma: self.simpo_gamma.unwrap_or(0.5),
        }
    }
}

/// LoRA settings (PEFT's names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank. Default 16.
    pub r: usize,
    /// `lora_alpha`. Default 32.
    pub alpha: f64,
    /// Dropout on the adapter input. Default 0.05.
    pub dropout: f64,
    /// Adapted projections. Default all seven: q, k, v, o, gate, up, down.
    pub target_modules: Vec<String>,
    /// rsLoRA scaling `alpha / sqrt(r)`. Default false.
    pub use_rslora: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        let d = LoraConfig::default();
        LoraSettings {
            r: d.r,
            alpha: d.alpha,
            dropout: d.dropout,
            target_modules: d.target_modules.iter().map(|p| p.name().to_string()).collect(),
            use_rslora: d.use_rslora,
        }
    }
}

impl LoraSettings {
    /// The model crate's config, naming a bad module.
    pub fn resolve(&self) -> Result<LoraConfig> {
        let target_modules = self
            .target_modules
            .iter()
            .map(|m| {
                tabletrace_model::Proj::from_name(m).ok_or_else(|| Error::Config {
                    key: "lora.target_modules".into(),
                    message: format!(
                        "{m:?} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules,
            use_rslora: self.use_rslora,
        })
    }
}

/// AdamW (PyTorch's semantics: decoupled weight decay, bias correction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate. Default 2e-4.
    pub lr: f64,
    /// Decoupled weight decay. Default 0.
    pub weight_decay: f64,
    /// Adam β1. Default 0.9.
    pub beta1: f64,
    /// Adam β2. Default 0.999.
    pub beta2: f64,
    /// Adam ε. Default 1e-8.
    pub eps: f64,
    /// Global gradient-norm clip; 0 turns it off. Default 1.0.
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig { lr: 2e-4, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, max_grad_norm: 1.0 }
    }
}

/// Learning-rate schedule shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear decay to 0 after warm-up (Hugging Face's default).
    Linear,
    /// Cosine decay to 0 after warm-up.
    Cosine,
    /// Constant after warm-up.
    Constant,
}

/// Learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Shape. Default linear.
    pub kind: ScheduleKind,
    /// Warm-up steps (wins over `warmup_ratio` when > 0). Default 0.
    pub warmup_steps: usize,
    /// Warm-up as a share of all steps. Default 0.1.
    pub warmup_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig { kind: ScheduleKind::Linear, warmup_steps: 0, warmup_ratio: 0.1 }
    }
}

/// Everything `tabletrace train` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// What to train. Default cpo.
    pub method: Method,
    /// Base model: short name, `.gguf`, HF folder or hub id. Default smollm2-135m.
    pub model: String,
    /// Training rows: TRL preference JSONL (`prompt`/`chosen`/`rejected`,
    /// standard or conversational), or prompt/completion JSONL for SFT.
    pub train: PathBuf,
    /// Held-out rows for evaluation; unset: `eval_fraction` of `train`.
    pub eval: Option<PathBuf>,
    /// Share of `train` held out when `eval` is unset. Default 0.
    pub eval_fraction: f64,
    /// Where the adapter, checkpoints, metrics and plots go. Required.
    pub output_dir: PathBuf,
    /// Seed for the adapter init, data order and dropout. Default 42.
    pub seed: u64,
    /// Longest prompt + completion in tokens; completions are cut to fit,
    /// rows whose prompt alone does not fit are skipped and reported. Default 1024.
    pub max_length: usize,
    /// Rows (pairs) per micro-batch. Default 4.
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Passes over the training rows. Default 1.
    pub epochs: usize,
    /// Stop after this many optimizer steps; 0: run the epochs. Default 0.
    pub max_steps: usize,
    /// Evaluate every N steps (and at the end); 0: only at the end. Default 0.
    pub eval_every: usize,
    /// Checkpoint every N steps; 0: only at the end. Default 50.
    pub save_every: usize,
    /// Checkpoints kept (oldest removed first). Default 2.
    pub keep_checkpoints: usize,
    /// Rows of the output layer scored at once (memory vs speed). Default 256.
    pub logprob_chunk: usize,
    /// `cpu`, or `cuda` / `cuda:N` (needs the `cuda` cargo feature; the base
    /// is then held in bf16 while LoRA and the optimizer stay f32). Default cpu.
    pub device: String,
    /// Recompute each layer in the backward instead of keeping every
    /// layer's activations: memory of one layer's graph, ~1/3 more compute. Default true.
    pub activation_checkpointing: bool,
    /// With activation checkpointing, also keep each layer's frozen gate/up
    /// products (`2 × intermediate_size` floats per token and layer) so that
    /// the recomputation skips them: about half its products, for memory
    /// of six layer inputs per layer on SmolLM2 (~0.9 GB for 4 pairs of 512
    /// tokens). Default true; false for the least memory.
    pub keep_mlp_products: bool,
    /// The layers' frozen base products (forward values and input
    /// gradients of the seven projections) on bf16 AMX tiles: inputs
    /// rounded to bf16, f32 sums; LoRA, its gradients, the optimizer,
    /// attention and the output layer stay f32. Needs a CPU with AMX-BF16
    /// (Intel Sapphire Rapids and later); an error elsewhere. Default false:
    /// f32 products, exact against TRL (README, "The trainer").
    #[serde(skip_serializing_if = "is_false")]
    pub bf16_products: bool,
    /// Start from this adapter's weights (a PEFT folder with the same rank,
    /// alpha and target modules) instead of a fresh LoRA init, e.g. CPO
    /// warm-started from a trace-SFT adapter. The optimizer starts afresh.
    /// Part of the fingerprint by its path. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
    /// LoRA.
    pub lora: LoraSettings,
    /// Preference loss.
    pub loss: LossConfig,
    /// Optimizer.
    pub optim: OptimConfig,
    /// Learning-rate schedule.
    pub schedule: ScheduleConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Cpo,
            model: "smollm2-135m".into(),
            train: PathBuf::new(),
            eval: None,
            eval_fraction: 0.0,
            output_dir: PathBuf::new(),
            seed: 42,
            max_length: 1024,
            batch_size: 4,
            grad_accum: 1,
            epochs: 1,
            max_steps: 0,
            eval_every: 0,
            save_every: 50,
            keep_checkpoints: 2,
            logprob_chunk: 256,
            activation_checkpointing: true,
            keep_mlp_products: true,
            bf16_products: false,
            init_adapter: None,
            device: "cpu".into(),
            lora: LoraSettings::default(),
            loss: LossConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
        }
    }
}

/// For `skip_serializing_if`: a setting left at `false` stays out of the
/// resolved config, so fingerprints of runs before it existed still match.
fn is_false(b: &bool) -> bool {
    !*b
}

impl TrainConfig {
    /// Parses TOML; an unknown key or a bad value is named.
    pub fn from_toml(text: &str, source: &str) -> Result<TrainConfig> {
        toml::from_str(text).map_err(|e| Error::Config { key: source.to_string(), message: e.to_string() })
    }

    /// Checks values, naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| Err(Error::Config { key: key.into(), message });
        if self.train.as_os_str().is_empty() {
            return bad("train", "is required: a pairs.jsonl (or prompt/completion JSONL for SFT)".into());
        }
        if self.output_dir.as_os_str().is_empty() {
            return bad("output_dir", "is required".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size", "batch_size and grad_accum must be at least 1".into());
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return bad("epochs", "set epochs or max_steps to at least 1".into());
        }
        if self.max_length < 2 {
            return bad("max_length", format!("{} is too small", self.max_length));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad("eval_fraction", format!("{} is not in [0, 1)", self.eval_fraction));
        }
        if self.device != "cpu" && self.device != "cuda" && !self.device.starts_with("cuda:") {
            return bad("device", format!("{:?} is not cpu, cuda or cuda:N", self.device));
        }
        if self.lora.r == 0 {
            return bad("lora.r", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad("lora.dropout", format!("{} is not in [0, 1)", self.lora.dropout));
        }
        self.lora.resolve()?;
        let loss = self.loss.resolve(self.method);
        if self.method.is_preference() && loss.beta <= 0.0 {
            return bad("loss.beta", format!("{} must be positive", loss.beta));
        }
        if !(0.0..0.5).contains(&loss.label_smoothing) {
            return bad("loss.label_smoothing", format!("{} is not in [0, 0.5)", loss.label_smoothing));
        }
        if self.method == Method::Dpo {
            if !matches!(loss.loss_type, LossType::Sigmoid | LossType::Robust) {
                return bad("loss.loss_type", format!("{:?}: DPO trains with sigmoid or robust", loss.loss_type));
            }
            if loss.cpo_alpha != 0.0 {
                return bad("loss.cpo_alpha", "DPO has no NLL term here: leave cpo_alpha unset (0)".into());
            }
            if loss.loss_type == LossType::Sigmoid && loss.label_smoothing != 0.0 {
                return bad(
                    "loss.label_smoothing",
                    "DPO's sigmoid loss has no label smoothing (as in TRL 1.16): use loss_type = \"robust\"".into(),
                );
            }
        } else if loss.loss_type == LossType::Robust {
            return bad("loss.loss_type", "robust is a DPO loss: set method = \"dpo\"".into());
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return bad("optim.lr", format!("{} must be positive", self.optim.lr));
        }
        if !(0.0..1.0).contains(&self.optim.beta1) || !(0.0..1.0).contains(&self.optim.beta2) {
            return bad("optim.beta1", "beta1 and beta2 must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&self.schedule.warmup_ratio) {
            return bad("schedule.warmup_ratio", format!("{} is not in [0, 1)", self.schedule.warmup_ratio));
        }
        Ok(())
    }

    /// The device and base-weight dtype to load the model with.
    pub fn device(&self) -> Result<(candle_core::Device, candle_core::DType)> {
        if self.device == "cpu" {
            return Ok((candle_core::Device::Cpu, candle_core::DType::F32));
        }
        let n = self.device.strip_prefix("cuda:").map_or(Ok(0), str::parse::<usize>).map_err(|_| Error::Config {
            key: "device".into(),
            message: format!("{:?}: the GPU number is not a number", self.device),
        })?;
        let d = candle_core::Device::new_cuda(n).map_err(|e| Error::Config {
            key: "device".into(),
            message: format!("{}: {e} (build with `--features cuda` on a machine with the CUDA toolkit)", self.device),
        })?;
        Ok((d, candle_core::DType::BF16))
    }

    /// A digest of everything that shapes the optimisation (not where
    /// outputs go or how often they are written): a checkpoint resumes only
    /// under the same fingerprint.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut c = self.clone();
        c.output_dir = PathBuf::new();
        c.eval_every = 0;
        c.save_every = 0;
        c.keep_checkpoints = 0;
        // Memory against recomputation: the same gradients either way, so a
        // run may resume with the other setting.
        c.keep_mlp_products = true;
        c.max_steps = 0;
        let text = serde_json::to_string(&c).expect("the config serialises");
        let d = Sha256::digest(text.as_bytes());
        d.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = TrainConfig::from_toml("methd = \"cpo\"", "train.toml").unwrap_err().to_string();
        assert!(e.contains("methd"), "{e}");
        let e = TrainConfig::from_toml("method = \"kto\"", "train.toml").unwrap_err().to_string();
        assert!(e.contains("kto") && e.contains("dpo"), "{e}");
        let c = TrainConfig::from_toml(
            "train = \"p.jsonl\"\noutput_dir = \"o\"\n[lora]\ntarget_modules = [\"qproj\"]",
            "train.toml",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("lora.target_modules") && e.contains("qproj"), "{e}");
        let c = TrainConfig::from_toml("train = \"p.jsonl\"\noutput_dir = \"o\"\n[loss]\nbeta = -1.0", "t").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("loss.beta"));
        let dpo = |loss: &str| {
            let text = format!("method = \"dpo\"\ntrain = \"p.jsonl\"\noutput_dir = \"o\"\n[loss]\n{loss}");
            TrainConfig::from_toml(&text, "t").unwrap().validate().map_err(|e| e.to_string())
        };
        assert!(dpo("beta = 0.1").is_ok());
        assert!(dpo("loss_type = \"robust\"\nlabel_smoothing = 0.1").is_ok());
        assert!(dpo("label_smoothing = 0.1").unwrap_err().contains("robust"));
        assert!(dpo("cpo_alpha = 1.0").unwrap_err().contains("loss.cpo_alpha"));
        assert!(dpo("loss_type = \"hinge\"").unwrap_err().contains("loss.loss_type"));
        let c =
            TrainConfig::from_toml("train = \"p\"\noutput_dir = \"o\"\n[loss]\nloss_type = \"robust\"", "t").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("method = \"dpo\""));
    }

    #[test]
    fn methods_resolve_their_losses() {
        let l = LossConfig::default().resolve(Method::Simpo);
        assert_eq!((l.loss_type, l.beta, l.cpo_alpha), (LossType::Simpo, 2.0, 0.0));
        let l = LossConfig { cpo_alpha: Some(0.5), ..Default::default() }.resolve(Method::Cpo);
        assert_eq!((l.loss_type, l.beta, l.cpo_alpha), (LossType::Sigmoid, 0.1, 0.5));
        let a = TrainConfig { train: "a".into(), output_dir: "x".into(), ..Default::default() };
        let b = TrainConfig { output_dir: "y".into(), save_every: 7, keep_mlp_products: false, ..a.clone() };
        assert_eq!(a.fingerprint(), b.fingerprint(), "where outputs go, how often, and memory vs recomputation");
        let c = TrainConfig { seed: 1, ..a.clone() };
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
