//! Rotary-embedding tables (cosine and sine per position) and their rows for a
//! batch's positions, half-split or interleaved.

use super::*;

/// Cosine and sine tables of the rotary embedding, for every position.
pub(super) struct RopeTables {
    pub(super) cos: Tensor, // (max_pos, D/2)
    pub(super) sin: Tensor,
    pub(super) layout: RopeLayout,
}

/// The rotary embedding for one batch's positions.
pub(super) struct RopeAt {
    pub(super) cos: Tensor, // (B, T, D/2)
    pub(super) sin: Tensor,
    pub(super) layout: RopeLayout,
}

impl RopeAt {
    /// A projection `y` `(B, T, N·D)` as rotated heads `(B, N, T, D)`, each
    /// RMS-normalised first by `norm` (weight, ε: Qwen3's q/k norm).
    pub(super) fn heads(&self, y: &Tensor, d: usize, norm: Option<(&Tensor, f64)>) -> Result<Tensor> {
        let interleaved = self.layout == RopeLayout::Interleaved;
        if let Some(h) = ops::rotated_heads(y, d, norm, &self.cos, &self.sin, interleaved)? {
            return Ok(h);
        }
        let (b, t, width) = y.dims3()?;
        let mut h = y.reshape((b, t, width / d, d))?.transpose(1, 2)?.contiguous()?;
        if let Some((w, eps)) = norm {
            h = ops::rms_norm(&h, w, eps)?;
        }
        Ok(match self.layout {
            RopeLayout::Half => ops::rope_half(&h, &self.cos, &self.sin)?,
            RopeLayout::Interleaved => ops::rope_interleaved(&h, &self.cos, &self.sin)?,
        })
    }
}

impl RopeTables {
    pub(super) fn new(cfg: &ModelConfig, layout: RopeLayout, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let mut inv_freq: Vec<f64> =
            (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64)).collect();
        if let Some(s) = &cfg.rope_scaling {
            // Llama 3.1: long wavelengths are slowed by `factor`, short ones
            // kept, and the band between interpolated.
            let old = s.original_max_position_embeddings as f64;
            let (low_wl, high_wl) = (old / s.low_freq_factor, old / s.high_freq_factor);
            for f in &mut inv_freq {
                let wl = 2.0 * std::f64::consts::PI / *f;
                if wl > low_wl {
                    *f /= s.factor;
                } else if wl >= high_wl {
                    let smooth = (old / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
            layout,
        })
    }

    pub(super) fn at(&self, positions: &Tensor) -> Result<RopeAt> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        Ok(RopeAt {
            cos: self.cos.index_select(&flat, 0)?.reshape((b, t, half))?,
            sin: self.sin.index_select(&flat, 0)?.reshape((b, t, half))?,
            layout: self.layout,
        })
    }
}
