//! The module sources of `guest-tests/kmod/`: which files are copied into the build directory,
//! the module names the `Kbuild` file declares, and the cache key hashed from them, the kernel
//! release and the headers' `Module.symvers`.

use std::fs;
use std::path::{Path, PathBuf};

use super::{io_err, KmodError, KEY_SALT};

/// The module sources: what is copied into the build directory and hashed into the cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The source directory.
    pub dir: PathBuf,
    /// Relative path (with `/`) and contents of each source file, sorted by path.
    pub files: Vec<(String, Vec<u8>)>,
    /// The module names `Kbuild` lists in `obj-m`, in order.
    pub modules: Vec<String>,
}

/// Whether a file name is a module source (not a build product of an in-place `make`).
fn is_source_name(name: &str) -> bool {
    if name.starts_with('.') || name.ends_with(".mod.c") {
        return false;
    }
    matches!(name, "Kbuild" | "Makefile")
        || [".c", ".h", ".S"].iter().any(|ext| name.ends_with(ext))
}

fn collect_sources(
    root: &Path,
    rel: &str,
    out: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), KmodError> {
    let dir = root.join(rel);
    let entries = fs::read_dir(&dir).map_err(io_err("Cannot list", &dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("Cannot list", &dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let rel_name = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let ty = entry.file_type().map_err(io_err("Cannot stat", &path))?;
        if ty.is_dir() {
            if !name.starts_with('.') {
                collect_sources(root, &rel_name, out)?;
            }
        } else if is_source_name(&name) && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            let data = fs::read(&path).map_err(io_err("Cannot read", &path))?;
            out.push((rel_name, data));
        }
    }
    Ok(())
}

/// The module names of `obj-m` assignments in a `Kbuild` file (`obj-m += a.o b.o`, `obj-m := c.o`,
/// continuation lines; comments ignored).
pub fn kbuild_modules(kbuild: &str) -> Vec<String> {
    let joined = kbuild.replace("\\\n", " ");
    let mut names = Vec::new();
    for line in joined.lines() {
        let line = line.split('#').next().unwrap_or("");
        let Some(rest) = line.trim_start().strip_prefix("obj-m") else {
            continue;
        };
        let rest = rest.trim_start();
        let Some(objs) = ["+=", ":=", "?=", "="]
            .iter()
            .find_map(|op| rest.strip_prefix(op))
        else {
            continue;
        };
        for obj in objs.split_whitespace() {
            if let Some(name) = obj.strip_suffix(".o") {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

/// Reads the module sources of `dir`. `Ok(None)` when it has no `.c` file at all (nothing to
/// build: the lab then skips the module build); an error when it has C files but no usable
/// `Kbuild`.
pub fn read_sources(dir: &Path) -> Result<Option<Sources>, KmodError> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut files = Vec::new();
    collect_sources(dir, "", &mut files)?;
    files.sort();
    if !files.iter().any(|(p, _)| p.ends_with(".c")) {
        return Ok(None);
    }
    let kbuild = files
        .iter()
        .find(|(p, _)| p == "Kbuild")
        .ok_or_else(|| KmodError::NoKbuild(dir.to_path_buf()))?;
    let modules = kbuild_modules(&String::from_utf8_lossy(&kbuild.1));
    if modules.is_empty() {
        return Err(KmodError::NoModules(dir.join("Kbuild")));
    }
    Ok(Some(Sources {
        dir: dir.to_path_buf(),
        files,
        modules,
    }))
}

/// FNV-1a, 64 bits: stable across Rust releases (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Length-prefixed, so that field boundaries are part of the hash.
    fn field(&mut self, data: &[u8]) {
        self.bytes(&(data.len() as u64).to_le_bytes());
        self.bytes(data);
    }
}

/// The cache key of a build: 16 hex digits over the sources (paths and contents), the guest
/// kernel release and the headers' `Module.symvers` (which changes with every kernel build, even
/// one that keeps the release string).
pub fn cache_key(sources: &Sources, kver: &str, symvers: &[u8]) -> String {
    let mut h = Fnv::new();
    h.field(KEY_SALT.as_bytes());
    h.field(kver.as_bytes());
    h.field(symvers);
    h.field(&(sources.files.len() as u64).to_le_bytes());
    for (path, data) in &sources.files {
        h.field(path.as_bytes());
        h.field(data);
    }
    format!("{:016x}", h.0)
}
