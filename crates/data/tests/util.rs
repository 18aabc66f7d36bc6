use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the repository root exists")
}

/// The bundled sample.
pub fn sample() -> PathBuf {
    root().join("data/sample")
}

/// `../shared/data` beside the repository (or `$TABLETRACE_SHARED_DATA`), when present.
pub fn shared_data() -> Option<PathBuf> {
    let p =
        std::env::var_os("TABLETRACE_SHARED_DATA").map(PathBuf::from).unwrap_or_else(|| root().join("../shared/data"));
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipped: {} is not present", p.display());
        None
    }
}
