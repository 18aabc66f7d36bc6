//! One writer per directory: `tabletrace run` locks its run directory and
//! `tabletrace train` its output directory, so a second process started on
//! the same one stops with a message naming the first. The lock is the
//! operating system's (`flock`): it goes with its process, so a crashed or
//! killed holder leaves nothing stale to clean up.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, Context};

/// Held while the directory is in use; released on drop or exit.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// The lock file inside a locked directory.
pub const LOCK_FILE: &str = ".tabletrace.lock";

impl DirLock {
    /// Locks `dir` (created if missing) for `what` (`tabletrace run`), or
    /// fails naming the process that holds it.
    pub fn acquire(dir: &Path, what: &str) -> anyhow::Result<DirLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                bail!(
                    "{} is in use by {holder}: two processes writing one directory would corrupt it; wait for it \
                     to finish, or stop it (a stopped run resumes)",
                    dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{what} (process {})", std::process::id())?;
        file.flush()?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_a_released_lock_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "tabletrace run").unwrap();
        let e = DirLock::acquire(dir.path(), "tabletrace run").unwrap_err().to_string();
        assert!(e.contains("in use by tabletrace run (process") && e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        DirLock::acquire(dir.path(), "tabletrace train").unwrap();
    }
}
