use std::path::PathBuf;

/// The SmolLM2 GGUF in the model cache. Panics with the command to run when
/// it is missing: scripts/test.sh always fetches it first.
pub fn smollm2() -> PathBuf {
    let p = tabletrace_model::cache_dir().join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh smollm2-135m", p.display());
    p
}
