//! LoRA adapters on the decoder's projections, saved and loaded in PEFT's
//! format (`adapter_model.safetensors` + `adapter_config.json`), so that
//! `peft`, vLLM and SGLang load what we train and we load what they train.
//!
//! A projection `y = x W^T` becomes `y = x W^T + scale · (drop(x) A^T) B^T`
//! with `A` `(r, in)`, `B` `(out, r)` and `scale = alpha / r` (or
//! `alpha / sqrt(r)` with rsLoRA). `A` starts uniform in `±1/sqrt(in)`
//! (PEFT's Kaiming init) and `B` at zero, so a new adapter changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::decoder::{Adapter, Model, Proj};
use crate::error::{Error, Result};
use crate::generate::Rng;
use crate::kernels::{self, DropoutMask};
use crate::ops;

/// The adapter's shape and scale: PEFT's `LoraConfig`, the parts we use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r`. Default 16.
    pub r: usize,
    /// `lora_alpha`; the update is scaled by `alpha / r`. Default 32.
    pub alpha: f64,
    /// Dropout on the adapter's input while training. Default 0.05.
    pub dropout: f64,
    /// Projections that get an adapter. Default all seven.
    pub target_modules: Vec<Proj>,
    /// rsLoRA: scale by `alpha / sqrt(r)`. Default false.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 16, alpha: 32.0, dropout: 0.05, target_modules: Proj::ALL.to_vec(), use_rslora: false }
    }
}

impl LoraConfig {
    /// The factor on `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One adapted projection: `A` `(r, in)` and `B` `(out, r)`.
#[derive(Debug)]
pub struct LoraPair {
    /// `lora_A.weight`.
    pub a: Var,
    /// `lora_B.weight`.
    pub b: Var,
}

/// A LoRA adapter for one model: a pair per adapted (layer, projection).
#[derive(Debug)]
pub struct Lora {
    config: LoraConfig,
    pairs: BTreeMap<(usize, Proj), LoraPair>,
    scale: f64,
    /// Dropout seed while training (`None`: no dropout). Each (layer,
    /// projection) draws its mask from this seed and its own position, so
    /// a recomputed forward (activation checkpointing) draws the same mask.
    dropout: Mutex<Option<u64>>,
    /// Whether forward passes record a graph for the adapter's variables.
    tracking: std::sync::atomic::AtomicBool,
}

/// `adapter_config.json` as PEFT writes it (the fields we read and write).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
}

/// PEFT's tensor name for one side of a pair.
pub fn peft_name(layer: usize, proj: Proj, side: char) -> String {
    format!("base_model.model.model.layers.{layer}.{}.lora_{side}.weight", proj.path())
}

impl Lora {
    /// A fresh adapter for `model`: `A` uniform in `±1/sqrt(in)` from `seed`, `B` zero.
    pub fn new(model: &Model, config: &LoraConfig, seed: u64) -> Result<Lora> {
        Lora::init(model, config, |layer, proj, side, rows, cols| {
            if side == 'B' {
                return vec![0.0; rows * cols];
            }
            let mut rng = Rng::new(seed ^ ((layer as u64) << 8 | proj as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let bound = 1.0 / (cols as f64).sqrt();
            (0..rows * cols).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
        })
    }

    /// An adapter whose entries come from `value(layer, proj, side, rows, cols)`
    /// (row-major, `side` `'A'` or `'B'`): for tests and fixtures.
    pub fn init(
        model: &Model,
        config: &LoraConfig,
        mut value: impl FnMut(usize, Proj, char, usize, usize) -> Vec<f32>,
    ) -> Result<Lora> {
        if config.r == 0 {
            return Err(Error::Request("LoRA rank r must be at least 1".into()));
        }
        let device = model.device();
        let mut pairs = BTreeMap::new();
        for layer in 0..model.config().num_layers {
            for &proj in &config.target_modules {
                let (out, inp) = model.projection_shape(layer, proj).expect("layer < num_layers");
                let a = Tensor::from_vec(value(layer, proj, 'A', config.r, inp), (config.r, inp), device)?;
                let b = Tensor::from_vec(value(layer, proj, 'B', out, config.r), (out, config.r), device)?;
                pairs.insert((layer, proj), LoraPair { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? });
            }
        }
        Ok(Lora {
            scale: config.scale(),
            config: config.clone(),
            pairs,
            dropout: Mutex::new(None),
            tracking: true.into(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Every trainable tensor with its PEFT name, in a fixed order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::with_capacity(self.pairs.len() * 2);
        for ((layer, proj), pair) in &self.pairs {
            out.push((peft_name(*layer, *proj, 'A'), &pair.a));
            out.push((peft_name(*layer, *proj, 'B'), &pair.b));
        }
        out
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.pairs.values().map(|p| p.a.elem_count() + p.b.elem_count()).sum()
    }

    /// Turns gradient tracking on (training, the default) or off (scoring
    /// and evaluation: no graph is recorded, so memory stays at inference level).
    pub fn set_tracking(&self, on: bool) {
        self.tracking.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns dropout on (training, with its own seeded stream) or off.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        *self.dropout.lock().expect("the dropout lock is never poisoned") = seed;
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        let tensors: HashMap<String, Tensor> =
            self.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let weights = dir.join("adapter_model.safetensors");
        candle_core::safetensors::save(&tensors, &weights)?;
        let cfg = PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: self.config.r,
            lora_alpha: self.config.alpha,
            lora_dropout: self.config.dropout,
            target_modules: self.config.target_modules.iter().map(|p| p.name()).collect::<Vec<_>>().into(),
            use_rslora: self.config.use_rslora,
            use_dora: false,
            bias: Some("none".into()),
            base_model_name_or_path: Some(base_model.into()),
            fan_in_fan_out: false,
            inference_mode: true,
            modules_to_save: None,
            layers_to_transform: None,
        };
        let path = dir.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&cfg).expect("the config serialises");
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
    }

    /// The base model an adapter folder names (`base_model_name_or_path`), if any.
    pub fn base_model(dir: &Path) -> Result<Option<String>> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io { path: cfg_path.clone(), source })?;
        let peft: PeftConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            source_name: cfg_path.display().to_string(),
            message: format!("not a PEFT adapter config: {e}"),
        })?;
        Ok(peft.base_model_name_or_path.filter(|b| !b.is_empty()))
    }

    /// Loads a PEFT LoRA adapter from `dir` for `model`, checking that every
    /// tensor fits the model's projections (an adapter for another base
    /// model is refused, naming the first tensor that does not fit).
    pub fn load(dir: &Path, model: &Model) -> Result<Lora> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io { path: cfg_path.clone(), source })?;
        let bad = |message: String| Error::Config { source_name: cfg_path.display().to_string(), message };
        let peft: PeftConfig =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a PEFT adapter config: {e}")))?;
        if peft.peft_type != "LORA" {
            return Err(bad(format!("peft_type is {:?}; only LORA adapters load", peft.peft_type)));
        }
        if peft.use_dora {
            return Err(bad("DoRA adapters are not supported".into()));
        }
        let weights = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, model.device())
            .map_err(|e| Error::Weights { path: weights.clone(), message: e.to_string() })?;
        let mut pairs: BTreeMap<(usize, Proj), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, t) in tensors {
            let (layer, proj, side) = parse_peft_name(&name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                message: format!("in {} is not a LoRA tensor of a decoder projection", weights.display()),
            })?;
            let (out, inp) = model.projection_shape(layer, proj).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                message: format!(
                    "names layer {layer}, but the model has {} layers: the adapter was trained for another base model",
                    model.config().num_layers
                ),
            })?;
            let want = if side == 'A' { (peft.r, inp) } else { (out, peft.r) };
            let got = t.dims2().map_err(|_| Error::Tensor { name: name.clone(), message: "is not 2-D".into() })?;
            if got != want {
                return Err(Error::Tensor {
                    name,
                    message: format!(
                        "has shape {got:?}, but this model's {} needs {want:?}: the adapter was trained for another base model",
                        proj.path()
                    ),
                });
            }
            let t = t.to_dtype(DType::F32)?;
            let slot = pairs.entry((layer, proj)).or_default();
            if side == 'A' {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        let mut out = BTreeMap::new();
        let mut targets: Vec<Proj> = Vec::new();
        for ((layer, proj), (a, b)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::Tensor {
                    name: peft_name(layer, proj, 'A'),
                    message: format!("{} has only one of lora_A and lora_B", weights.display()),
                });
            };
            if !targets.contains(&proj) {
                targets.push(proj);
            }
            out.insert((layer, proj), LoraPair { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? });
        }
        targets.sort();
        let config = LoraConfig {
            r: peft.r,
            alpha: peft.lora_alpha,
            dropout: peft.lora_dropout,
            target_modules: targets,
            use_rslora: peft.use_rslora,
        };
        Ok(Lora { scale: config.scale(), config, pairs: out, dropout: Mutex::new(None), tracking: true.into() })
    }

    /// Copies the values of `other` (same shapes) into this adapter's variables.
    pub fn assign(&self, other: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.named_vars() {
            let t = other.get(&name).ok_or_else(|| Error::Tensor { name: name.clone(), message: "missing".into() })?;
            var.set(&t.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// `scale · B A`, `(out, in)`: the update merged into a base weight.
    pub fn merged_delta(&self, layer: usize, proj: Proj) -> Result<Option<Tensor>> {
        Ok(match self.pairs.get(&(layer, proj)) {
            // Detached: merged weights are plain tensors that never record a graph.
            Some(p) => Some((p.b.as_tensor().detach().matmul(&p.a.as_tensor().detach())? * self.scale)?),
            None => None,
        })
    }

    /// `(A, scale · B)`, `(r, in)` and `(out, r)`: the update as two factors,
    /// for weights it cannot merge into (quantised blocks).
    pub fn factors(&self, layer: usize, proj: Proj) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match self.pairs.get(&(layer, proj)) {
            Some(p) => Some((p.a.as_tensor().detach(), (p.b.as_tensor().detach() * self.scale)?)),
            None => None,
        })
    }

    /// The dropout mask of projection `proj` of layer `layer` while
    /// training with dropout: its own stream of the step's seed.
    fn dropout(&self, layer: usize, proj: Proj) -> Option<DropoutMask> {
        let p = self.config.dropout;
        let seed = *self.dropout.lock().expect("the dropout lock is never poisoned");
        let seed = seed.filter(|_| p > 0.0)?;
        Some(DropoutMask::new(seed ^ ((layer as u64) << 8 | proj as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93), p))
    }

    /// The mask of [`Lora::dropout`] as a tensor like `x` (`1 / (1 − p)` or 0 per element).
    fn dropout_mask(&self, layer: usize, proj: Proj, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(mask) = self.dropout(layer, proj) else {
            return Ok(None);
        };
        let v = mask.values(x.elem_count());
        Ok(Some(Tensor::from_vec(v, x.dims(), &Device::Cpu)?.to_device(x.device())?.to_dtype(x.dtype())?))
    }

    /// [`Adapter::project`] on CPU f32 tensors, the dropout and the adapter's
    /// term fused ([`kernels::add_low_rank`]): `x ⊙ m` and the mask's bits in
    /// one pass, `h = (x ⊙ m) Aᵀ`, the value `base + s·h Bᵀ` written once;
    /// backward `dx = dy W + m ⊙ (dh A)` likewise. `None` for other devices
    /// and dtypes.
    fn project_cpu(
        &self,
        x: &Tensor,
        base: &Tensor,
        weight: &crate::Frozen,
        pair: &LoraPair,
        mask: Option<DropoutMask>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (a, b) = (pair.a.as_tensor().detach(), pair.b.as_tensor().detach());
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !(cpu_f32(x) && cpu_f32(base) && cpu_f32(&a) && cpu_f32(&b)) {
            return Ok(None);
        }
        let (r, k) = a.dims2()?;
        let n = b.dim(0)?;
        let rows = x.elem_count() / k.max(1);
        if base.elem_count() != rows * n {
            return Ok(None);
        }
        let xd = x.detach().contiguous()?;
        let (xm, bits) = match mask {
            Some(m) => {
                let Some((xm, bits)) = kernels::with_cpu_f32(&xd, |v| m.apply(v)) else { return Ok(None) };
                (Tensor::from_vec(xm, (rows, k), x.device())?, Some((bits, m.keep())))
            }
            None => (xd.reshape((rows, k))?, None),
        };
        let h = ops::matmul(&xm, &a.t()?)?; // (rows, r)
        let (c, bt) = ((&h * self.scale)?, b.t()?.contiguous()?); // (rows, r), (r, n)

        let add = |bv: kernels::StridedRows<'_>| {
            kernels::with_cpu_f32(&c, |cv| kernels::with_cpu_f32(&bt, |f| kernels::add_low_rank(&bv, cv, f, r, None)))
        };
        // `base` may be a part of a fused product: its rows are read where they lie (else from a copy).
        let value = match kernels::with_cpu_strided_rows(base, add) {
            Some(v) => Some(v),
            None => kernels::with_cpu_strided_rows(&base.contiguous()?, add),
        };
        let Some(Some(Some(value))) = value else { candle_core::bail!("lora-projection: an input left the CPU") };
        let track = self.tracking.load(std::sync::atomic::Ordering::Relaxed);
        let need_dx = x.track_op();
        if !track && !need_dx {
            return Ok(Some(Tensor::from_vec(value, base.dims(), base.device())?));
        }
        let (scale, weight, x_dims) = (self.scale, weight.clone(), x.dims().to_vec());
        let backward: ops::Backward3 = Box::new(move |dy: &Tensor| {
            let dy = dy.reshape((rows, n))?.contiguous()?;
            let dh = (ops::matmul(&dy, &b)? * scale)?; // (rows, r)
            let dx = if need_dx {
                let g = weight.input_gradient(&dy)?.contiguous()?;
                let mask = bits.as_ref().map(|(bits, keep)| (bits.as_slice(), *keep));
                let dx = kernels::with_cpu_f32(&g, |gv| {
                    let gv = kernels::StridedRows::contiguous(gv, k);
                    kernels::with_cpu_f32(&dh, |d| {
                        kernels::with_cpu_f32(&a, |av| kernels::add_low_rank(&gv, d, av, r, mask))
                    })
                });
                let Some(Some(Some(dx))) = dx else { candle_core::bail!("lora-projection: a gradient left the CPU") };
                Some(Tensor::from_vec(dx, x_dims.as_slice(), dy.device())?)
            } else {
                None
            };
            if !track {
                return Ok([dx, None, None]);
            }
            let db = (ops::matmul(&dy.t()?, &h)? * scale)?; // (out, r)
            let da = ops::matmul(&dh.t()?, &xm)?; // (r, in)
            Ok([dx, Some(da), Some(db)])
        });
        // A frozen adapter (not tracking) takes `x`'s gradient only.
        let zero = Tensor::zeros((), DType::F32, x.device())?;
        let (a_in, b_in) = if track { (pair.a.as_tensor(), pair.b.as_tensor()) } else { (&zero, &zero) };
        Ok(Some(ops::attach3_cpu([x, a_in, b_in], value, base.shape().clone(), "lora-projection", backward)?))
    }
}

/// `(layer, projection, side)` of a PEFT LoRA tensor name.
fn parse_peft_name(name: &str) -> Option<(usize, Proj, char)> {
    let rest = name.split("layers.").nth(1)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let proj = Proj::ALL.into_iter().find(|p| rest.starts_with(&format!("{}.", p.path())))?;
    let side = if rest.ends_with("lora_A.weight") {
        'A'
    } else if rest.ends_with("lora_B.weight") {
        'B'
    } else {
        return None;
    };
    Some((layer, proj, side))
}

impl Adapter for Lora {
    fn track(&self, on: bool) -> bool {
        self.tracking.swap(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// One op for the frozen product and the adapter's term: with `m` the
    /// dropout mask, `h = (x ⊙ m) Aᵀ` and `dh = s · dy B`, the backward is
    /// `dA = dhᵀ (x ⊙ m)`, `dB = s · dyᵀ h`, `dx = dy W + (dh A) ⊙ m`.
    fn project(
        &self,
        layer: usize,
        proj: Proj,
        x: &Tensor,
        base: &Tensor,
        weight: &crate::Frozen,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(pair) = self.pairs.get(&(layer, proj)) else {
            return Ok(None);
        };
        if let Some(y) = self.project_cpu(x, base, weight, pair, self.dropout(layer, proj))? {
            return Ok(Some(y));
        }
        let mask = self.dropout_mask(layer, proj, x)?;
        let (a, b) = (pair.a.as_tensor().detach(), pair.b.as_tensor().detach());
        let (xm, h, delta) = self.low_rank(&x.detach(), mask.as_ref(), &a, &b)?;
        let (rows, k) = xm.dims2()?;
        let n = delta.dim(1)?;
        let value = (base.reshape((rows, n))? + delta.to_dtype(base.dtype())?)?.reshape(base.dims())?;
        let track = self.tracking.load(std::sync::atomic::Ordering::Relaxed);
        let need_dx = x.track_op();
        if !track && !need_dx {
            return Ok(Some(value));
        }
        let (scale, weight, x_dims) = (self.scale, weight.clone(), x.dims().to_vec());
        let backward: ops::Backward3 = Box::new(move |dy: &Tensor| {
            let dy = dy.reshape((rows, n))?;
            let dyf = dy.to_dtype(a.dtype())?;
            let dh = (dyf.matmul(&b)? * scale)?; // (rows, r)
            let dx = if need_dx {
                let lora = dh.matmul(&a)?;
                let lora = match &mask {
                    Some(m) => (lora * m.reshape((rows, k))?.to_dtype(a.dtype())?)?,
                    None => lora,
                };
                Some((weight.input_gradient(&dy)? + lora.to_dtype(dy.dtype())?)?.reshape(x_dims.as_slice())?)
            } else {
                None
            };
            if !track {
                return Ok([dx, None, None]);
            }
            let db = (dyf.t()?.matmul(&h)? * scale)?; // (out, r)
            let da = dh.t()?.matmul(&xm)?; // (r, in)
            Ok([dx, Some(da), Some(db)])
        });
        // A frozen adapter (not tracking) takes `x`'s gradient only.
        let zero = Tensor::zeros((), value.dtype(), value.device())?;
        let (a_in, b_in) = if track { (pair.a.as_tensor(), pair.b.as_tensor()) } else { (&zero, &zero) };
        Ok(Some(ops::attach3([x, a_in, b_in], value, "lora-projection", backward)?))
    }

    fn delta(&self, layer: usize, proj: Proj, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(pair) = self.pairs.get(&(layer, proj)) else {
            return Ok(None);
        };
        let mask = self.dropout_mask(layer, proj, x)?;
        let track = self.tracking.load(std::sync::atomic::Ordering::Relaxed);
        let (a, b) = if track {
            (pair.a.as_tensor().clone(), pair.b.as_tensor().clone())
        } else {
            (pair.a.as_tensor().detach(), pair.b.as_tensor().detach())
        };
        let (_, _, y) = self.low_rank(x, mask.as_ref(), &a, &b)?;
        let mut out = x.dims().to_vec();
        *out.last_mut().expect("rank > 0") = y.dim(1)?;
        Ok(Some(y.to_dtype(x.dtype())?.reshape(out)?))
    }
}

impl Lora {
    /// For `x` `(.., in)`: `x ⊙ m` as `(rows, in)` in the adapter's dtype
    /// (f32 over a bf16/f16 base: mixed precision on GPUs), `h = (x ⊙ m) Aᵀ`
    /// `(rows, r)` and the adapter's term `s · h Bᵀ` `(rows, out)`, in the
    /// adapter's dtype, differentiable in whatever `x`, `a` and `b` track.
    fn low_rank(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let k = *x.dims().last().expect("inputs have a feature dimension");
        let rows = x.elem_count() / k.max(1);
        let xm = match mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        }
        .reshape((rows, k))?
        .to_dtype(a.dtype())?;
        let h = xm.matmul(&a.t()?)?;
        let y = (h.matmul(&b.t()?)? * self.scale)?;
        Ok((xm, h, y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_round_trip() {
        for proj in Proj::ALL {
            for side in ['A', 'B'] {
                assert_eq!(parse_peft_name(&peft_name(17, proj, side)), Some((17, proj, side)));
            }
        }
        assert_eq!(parse_peft_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight"), None);
        assert_eq!(parse_peft_name("base_model.model.lm_head.weight"), None);
    }
}
