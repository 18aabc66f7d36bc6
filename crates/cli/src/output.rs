//! Output files of the commands: their location checked before any work,
//! JSON lines written whole or not at all.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// Creates the folder of `path` and checks that a file can be written
/// there: a command that runs for hours fails before its first step, not
/// at its last (`what` names the flag, e.g. `--out`).
pub fn prepare(path: &Path, what: &str) -> anyhow::Result<()> {
    if path.is_dir() {
        anyhow::bail!("{what} {} is a folder: give a file path", path.display());
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{what} {}: cannot create {}", path.display(), dir.display()))?;
    let probe = dir.join(format!(".{}.write-test", std::process::id()));
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("{what} {}: {} is not writable", path.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes one JSON line per item into `path` through a temporary file and a
/// rename, so that a crash leaves the old file or the whole new one.
pub fn write_jsonl<T: Serialize>(path: &Path, items: impl IntoIterator<Item = T>) -> anyhow::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    {
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut f = std::io::BufWriter::new(file);
        for item in items {
            serde_json::to_writer(&mut f, &item)?;
            f.write_all(b"\n")?;
        }
        f.flush().with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
