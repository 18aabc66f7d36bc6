use std::sync::OnceLock;

use tabletrace_model::{load_model, LoadOptions, LoadedModel};

/// SmolLM2-135M in f32 with training's attention (as `tabletrace train`
/// runs it), loaded once per test binary. Panics with the command to run
/// when the weights are missing: scripts/test.sh fetches them first.
pub fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let p = tabletrace_model::cache_dir().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh smollm2-135m", p.display());
        let mut m = load_model(p.to_str().unwrap(), &LoadOptions::default()).unwrap();
        m.model.use_blocked_attention();
        m
    })
}

/// [`smollm2`] with its layers' products on bf16 AMX tiles; `None` on a CPU
/// without AMX-BF16.
pub fn smollm2_bf16() -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            if !tabletrace_model::kernels::amx_available() {
                return None;
            }
            let p = tabletrace_model::cache_dir().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
            let mut m = load_model(p.to_str().unwrap(), &LoadOptions::default()).unwrap();
            m.model.use_bf16_products().unwrap();
            m.model.use_blocked_attention();
            Some(m)
        })
        .as_ref()
}
