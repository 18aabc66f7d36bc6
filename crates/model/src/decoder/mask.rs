//! Additive attention masks: causal, and causal with padded keys.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Additive causal mask `(B, T, offset + T)`: query `i` sees key slots `0..=offset + i`.
pub fn causal_mask(b: usize, t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let s = offset + t;
    let v: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(v, (t, s), device)?.unsqueeze(0)?.broadcast_as((b, t, s))?.contiguous()?)
}

/// Additive mask `(B, T, S)` for left-padded rows: query `i` of row `r` sees
/// key slot `j` when `j <= offset + i` and slot `j` holds a real token of
/// row `r` (`key_valid[r][j]`). Every query also sees its own slot, so that a
/// padding position has finite values (a row of -inf would give NaN, and NaN
/// keys poison every row that masks them).
pub fn padded_causal_mask(key_valid: &[Vec<bool>], t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let b = key_valid.len();
    let s = offset + t;
    let mut v = Vec::with_capacity(b * t * s);
    for row in key_valid {
        for i in 0..t {
            for j in 0..s {
                let ok = j == offset + i || (j < offset + i && row.get(j).copied().unwrap_or(false));
                v.push(if ok { 0.0 } else { f32::NEG_INFINITY });
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, t, s), device)?)
}
