use std::sync::OnceLock;

use tabletrace_model::{load_model, LoadOptions, LoadedModel};

/// SmolLM2-135M in f32, loaded once per test binary. Panics with the command
/// to run when the weights are missing: scripts/test.sh fetches them first.
pub fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let p = tabletrace_model::cache_dir().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh smollm2-135m", p.display());
        load_model(p.to_str().unwrap(), &LoadOptions::default()).unwrap()
    })
}
