//! Frozen weights as training's products use them: `x Wᵀ` for a projection's
//! value and `dy W` for its input's gradient, by candle's f32 matmul, or —
//! once [`crate::Model::use_bf16_products`] packed them — on bf16 AMX tiles
//! (inputs rounded to bf16, f32 sums; adapters and optimizer stay f32).

use crate::kernels::{self, Bf16Tiles};
use crate::Result;
use candle_core::{DType, Tensor};

/// A frozen weight `W (out, in)` packed both ways for bf16 tile products.
#[derive(Clone)]
pub struct LinearTiles {
    /// `Wᵀ (in × out)`: the forward product's right-hand side.
    pub forward: Bf16Tiles,
    /// `W (out × in)`: the input gradient's right-hand side.
    pub backward: Bf16Tiles,
}

impl std::fmt::Debug for LinearTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinearTiles({} × {} bf16)", self.backward.k(), self.backward.n())
    }
}

impl LinearTiles {
    /// Packs `w (out, in)`; `None` where bf16 tiles do not run here (no AMX,
    /// not f32 on the CPU, sizes not multiples of 32).
    pub fn pack(w: &Tensor) -> Option<LinearTiles> {
        if !kernels::amx_available() {
            return None;
        }
        let (n, k) = w.dims2().ok()?;
        kernels::with_cpu_f32(w, |ws| {
            Some(LinearTiles {
                forward: Bf16Tiles::transposed_weight(ws, n, k)?,
                backward: Bf16Tiles::weight(ws, n, k)?,
            })
        })?
    }
}

/// `x (.., k) · tiles (k × n)` without a graph; `None` where `x` is not f32
/// on the CPU.
pub fn tile_product(x: &Tensor, tiles: &Bf16Tiles) -> Result<Option<Tensor>> {
    let k = tiles.k();
    if x.dtype() != DType::F32 || !x.device().is_cpu() || x.dims().last() != Some(&k) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let rows = x.elem_count() / k;
    let Some(y) = kernels::with_cpu_f32(&x, |xs| kernels::bf16_matmul(xs, rows, tiles)) else {
        return Ok(None);
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank > 0") = tiles.n();
    Ok(Some(Tensor::from_vec(y, dims, x.device())?))
}

/// A frozen weight `W (out, in)` handed to an adapter's fused projection,
/// which needs the input gradient `dy W` of the frozen product.
#[derive(Clone)]
pub enum Frozen {
    /// `W (out, in)` in f32 (or the model's dtype).
    Float(Tensor),
    /// `W` packed as [`Bf16Tiles::weight`].
    Tiles(Bf16Tiles),
}

impl Frozen {
    /// `out`.
    pub fn out_features(&self) -> Result<usize> {
        Ok(match self {
            Frozen::Float(w) => w.dim(0)?,
            Frozen::Tiles(t) => t.k(),
        })
    }

    /// Rows `start..start + len` of `W` (a fused projection's part).
    pub fn rows(&self, start: usize, len: usize) -> Result<Frozen> {
        Ok(match self {
            Frozen::Float(w) => Frozen::Float(w.narrow(0, start, len)?),
            Frozen::Tiles(t) => Frozen::Tiles(t.rows(start, len).ok_or_else(|| {
                crate::Error::Request(format!("rows {start}..{} of packed tiles: not multiples of 32", start + len))
            })?),
        })
    }

    /// `value` (the product `x Wᵀ`, computed without a graph; zeros when
    /// only gradients are wanted) attached to `x` with its input gradient.
    pub fn attach(&self, x: &Tensor, value: &Tensor) -> Result<Tensor> {
        let w = self.clone();
        Ok(crate::ops::with_input_gradient(x, value, Box::new(move |dy| w.input_gradient(dy)))?)
    }

    /// `dy W` for `dy (rows, out)`.
    pub fn input_gradient(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Frozen::Float(w) => dy.matmul(w),
            Frozen::Tiles(t) => tile_product(dy, t)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .ok_or_else(|| candle_core::Error::Msg("bf16 tile products take f32 gradients on the CPU".into())),
        }
    }
}
