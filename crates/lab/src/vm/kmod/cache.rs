//! The build cache in the kbuild root (`/tmp/pcisim-kmod/<key>/`): created like `/tmp`, entries
//! touched when used, all but the newest [`super::CACHE_KEEP`] (and the current one) pruned.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::debug;

use super::{io_err, KmodError, CACHE_KEEP};

/// Creates the cache directory, world-writable with the sticky bit like `/tmp` (so builds by
/// different users can share it).
pub(super) fn ensure_cache_dir(cache: &Path) -> Result<(), KmodError> {
    use std::os::unix::fs::PermissionsExt;
    if cache.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(cache).map_err(io_err("Cannot create", cache))?;
    if let Err(e) = fs::set_permissions(cache, fs::Permissions::from_mode(0o1777)) {
        debug!("cannot chmod {}: {e}", cache.display());
    }
    Ok(())
}

/// Marks a cache entry as used now (pruning keeps the most recently used).
pub(super) fn touch(dir: &Path) {
    let marker = dir.join(".used");
    if let Err(e) = fs::write(&marker, b"") {
        debug!("cannot touch {}: {e}", marker.display());
    }
}

fn last_used(dir: &Path) -> SystemTime {
    let time = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    time(&dir.join(".used"))
        .or_else(|| time(dir))
        .unwrap_or(UNIX_EPOCH)
}

/// Removes every file under `dir` that is not in `keep` (empty subdirectories stay).
pub(super) fn remove_except(dir: &Path, keep: &[PathBuf]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => remove_except(&path, keep),
            Ok(_) if !keep.contains(&path) => {
                if let Err(e) = fs::remove_file(&path) {
                    debug!("cannot remove {}: {e}", path.display());
                }
            }
            _ => {}
        }
    }
}

/// Keeps the [`CACHE_KEEP`] most recently used builds (never `current`) and drops scratch
/// directories of builds that died more than an hour ago.
pub(super) fn prune_cache(cache: &Path, current: &str) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    let mut builds = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with("build.") {
            let stale = SystemTime::now()
                .duration_since(last_used(&path))
                .is_ok_and(|age| age > Duration::from_secs(3600));
            if stale {
                let _ = fs::remove_dir_all(&path);
            }
        } else if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) && name != current
        {
            builds.push((last_used(&path), path));
        }
    }
    builds.sort_by_key(|b| std::cmp::Reverse(b.0));
    for (_, path) in builds.into_iter().skip(CACHE_KEEP.saturating_sub(1)) {
        debug!(
            "guest kernel modules: pruning cached build {}",
            path.display()
        );
        if let Err(e) = fs::remove_dir_all(&path) {
            debug!("cannot remove {}: {e}", path.display());
        }
    }
}
