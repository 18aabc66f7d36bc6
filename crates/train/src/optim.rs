//! AdamW with state that saves and loads (PyTorch's `AdamW` semantics:
//! decoupled weight decay, bias-corrected moments), global-norm clipping,
//! and the learning-rate schedules of Hugging Face's `get_scheduler`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::config::{OptimConfig, ScheduleConfig, ScheduleKind};
use crate::error::{Error, Result};

/// AdamW over named variables.
pub struct AdamW {
    config: OptimConfig,
    /// First and second moments per variable name.
    moments: HashMap<String, (Tensor, Tensor)>,
    /// Updates taken.
    pub steps: usize,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: &OptimConfig) -> AdamW {
        AdamW { config: config.clone(), moments: HashMap::new(), steps: 0 }
    }

    /// One update of every variable that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, vars: &[(String, &Var)], grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.steps += 1;
        let c = &self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let (m, v) = match self.moments.remove(name) {
                Some(mv) => mv,
                None => (var.zeros_like()?, var.zeros_like()?),
            };
            let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut p = var.as_tensor().clone();
            if c.weight_decay != 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bias2.sqrt())? + c.eps)?;
            let update = ((&m / denom)? * (lr / bias1))?;
            var.set(&(p - update)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// Writes the moments (`m.NAME`, `v.NAME`) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut all = HashMap::new();
        for (name, (m, v)) in &self.moments {
            all.insert(format!("m.{name}"), m.clone());
            all.insert(format!("v.{name}"), v.clone());
        }
        candle_core::safetensors::save(&all, path)?;
        Ok(())
    }

    /// Reads moments written by [`AdamW::save`] after `steps` updates.
    pub fn load(config: &OptimConfig, path: &Path, steps: usize, device: &Device) -> Result<AdamW> {
        let all = candle_core::safetensors::load(path, device)
            .map_err(|e| Error::Setup(format!("{}: cannot read the optimizer state: {e}", path.display())))?;
        let mut moments = HashMap::new();
        for (key, m) in &all {
            if let Some(name) = key.strip_prefix("m.") {
                let v = all
                    .get(&format!("v.{name}"))
                    .ok_or_else(|| Error::Setup(format!("{}: no second moment for {name}", path.display())))?;
                moments.insert(name.to_string(), (m.clone(), v.clone()));
            }
        }
        Ok(AdamW { config: config.clone(), moments, steps })
    }
}

/// `sqrt(Σ g²)` over all gradients.
pub fn global_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, capped at 1).
pub fn clip(grads: &mut HashMap<String, Tensor>, norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

/// The learning rate of update `step` (0-based) out of `total`, as Hugging
/// Face's schedulers give it (`LambdaLR` at `last_epoch = step`).
pub fn learning_rate(s: &ScheduleConfig, peak: f64, step: usize, total: usize) -> f64 {
    let warmup = warmup_steps(s, total);
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match s.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Linear => peak * (1.0 - progress).max(0.0),
        ScheduleKind::Cosine => peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// Warm-up steps: `warmup_steps` if set, else `ceil(warmup_ratio · total)`.
pub fn warmup_steps(s: &ScheduleConfig, total: usize) -> usize {
    if s.warmup_steps > 0 {
        s.warmup_steps
    } else {
        (s.warmup_ratio * total as f64).ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from PyTorch 2.15:
    /// ```python
    /// p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    /// o = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    /// for g in ([0.5, -1.0, 2.0], [0.1, 0.3, -0.2], [-1.0, 0.0, 0.5]):
    ///     p.grad = torch.tensor(g); o.step()
    /// print(p.tolist())  # [0.8457245230674744, -1.8183910846710205, 2.77211332321167]
    /// ```
    #[test]
    fn adamw_matches_pytorch() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = OptimConfig { lr: 0.1, weight_decay: 0.01, ..Default::default() };
        let mut opt = AdamW::new(&cfg);
        for g in [[0.5f32, -1.0, 2.0], [0.1, 0.3, -0.2], [-1.0, 0.0, 0.5]] {
            let grads = HashMap::from([("p".to_string(), Tensor::new(&g, &Device::Cpu).unwrap())]);
            opt.step(&[("p".to_string(), &var)], &grads, 0.1).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip([0.845_724_5f32, -1.818_391, 2.772_113_3]) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        let s = ScheduleConfig { kind: ScheduleKind::Linear, warmup_steps: 2, warmup_ratio: 0.0 };
        let lrs: Vec<f64> = (0..6).map(|k| learning_rate(&s, 1.0, k, 6)).collect();
        assert_eq!(lrs, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25]);
        let s = ScheduleConfig { kind: ScheduleKind::Cosine, warmup_steps: 0, warmup_ratio: 0.0 };
        assert!((learning_rate(&s, 1.0, 2, 4) - 0.5).abs() < 1e-12);
        let s = ScheduleConfig { warmup_ratio: 0.1, ..Default::default() };
        assert_eq!(warmup_steps(&s, 25), 3);
    }
}
