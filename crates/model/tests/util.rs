use std::path::PathBuf;

/// The SmolLM2 GGUF in the model cache. Panics with the command to run when
/// it is missing: scripts/test.sh always fetches it first.
pub fn smollm2() -> PathBuf {
    let p = tabletrace_model::cache_dir().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh smollm2-135m", p.display());
    p
}

/// Asserts that `grad`, the gradient of `loss` for `var`, matches central
/// finite differences (step 1e-2, tolerance 2% or 0.02 absolute) at the
/// flattened `indices`; `var` is left as it was.
pub fn assert_finite_differences(
    name: &str,
    var: &candle_core::Var,
    grad: &candle_core::Tensor,
    indices: &[usize],
    loss: impl Fn() -> f32,
) {
    use candle_core::{Device, Tensor};
    let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let set = |x: Vec<f32>| var.set(&Tensor::from_vec(x, var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
    for &i in indices {
        let eps = 1e-2f32;
        let at = |delta: f32| {
            let mut x = base.clone();
            x[i] += delta;
            set(x);
            loss()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        set(base.clone());
        assert!(
            (fd - g[i]).abs() <= 2e-2 * fd.abs().max(1.0),
            "{name}[{i}]: finite difference {fd}, autograd {}",
            g[i]
        );
    }
}
