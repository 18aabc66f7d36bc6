//! Fast f32 ↔ f16 conversion of CPU tensors (the quantised model's KV cache).

use candle_core::{DType, Result, Tensor};

/// `x` in `dtype`. Between f32 and f16 on CPU the conversion goes through
/// `half`'s slice conversions (F16C where the CPU has it); candle converts
/// one value at a time, which was 2% of a batch-8 decoding step for the
/// cache's new keys and values.
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    let converted = match (x.dtype(), dtype) {
        (DType::F32, DType::F16) => {
            let x = x.contiguous()?;
            crate::kernels::with_cpu_f32(&x, |v| {
                let mut out = vec![half::f16::ZERO; v.len()];
                out.convert_from_f32_slice(v);
                Tensor::from_vec(out, x.shape(), x.device())
            })
        }
        (DType::F16, DType::F32) => {
            let x = x.contiguous()?;
            crate::kernels::with_cpu_slice::<half::f16, _>(&x, |v| {
                let mut out = vec![0f32; v.len()];
                v.convert_to_f32_slice(&mut out);
                Tensor::from_vec(out, x.shape(), x.device())
            })
        }
        _ => None,
    };
    match converted {
        Some(t) => t,
        None => x.to_dtype(dtype),
    }
}
