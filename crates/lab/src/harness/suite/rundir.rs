//! The run directory: one a run, kept when anything failed.

use super::*;

/// A unique per-run directory, removed on drop only if [`RunDir::set_remove`] was called.
pub struct RunDir {
    path: PathBuf,
    remove: bool,
}

/// Unix socket paths are limited to 107 bytes; `RUN/<profile>/<device>.sock` must fit (profile
/// names and device ids have at most 16 characters).
pub(super) const MAX_DIR_LEN: usize = 64;

impl RunDir {
    /// Creates `pcisim-lab-<pid>-<nonce>` under `$XDG_RUNTIME_DIR` (if set, a directory, and short
    /// enough for socket paths) or else under `/tmp`.
    pub fn create() -> Result<RunDir, LabError> {
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let name = format!(
            "pcisim-lab-{}-{:x}",
            std::process::id(),
            nonce & 0xffff_ffff
        );
        let xdg = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir() && p.join(&name).as_os_str().len() <= MAX_DIR_LEN);
        let base = xdg.unwrap_or_else(|| PathBuf::from("/tmp"));
        let path = base.join(name);
        let mut builder = fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&path).map_err(|source| LabError::RunDir {
            path: base.clone(),
            source,
        })?;
        Ok(RunDir {
            path,
            remove: false,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file in the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Remove the directory when dropped.
    pub fn set_remove(&mut self, remove: bool) {
        self.remove = remove;
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.remove {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}
