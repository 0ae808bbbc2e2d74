//! The cache entries of users' kernels (`guest/image-<hash>`, `guest/tree-<hash>`): their keys,
//! and making one (the image, its config, its module tree installed and depmod'ed).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use log::{debug, warn};

use super::config::{Evidence, Requirement};
use super::{io_err, KernelError};

/// A user kernel, inspected (config checked) but not yet cached: what [`super::prepare`] found
/// in an image or a tree, and what [`make_entry`] caches.
pub(crate) struct Inspected {
    pub(crate) kver: String,
    pub(crate) image_path: PathBuf,
    pub(crate) image: Vec<u8>,
    pub(crate) moddir: Option<PathBuf>,
    pub(crate) evidence: Evidence,
    /// A kernel build tree to build our modules against (a tree itself, or the `build` link
    /// of an image's module directory when it names one).
    pub(crate) kdir: Option<PathBuf>,
}

/// FNV-1a, 64 bits (stable across Rust releases), length-prefixed fields.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn field(&mut self, data: &[u8]) {
        for &b in (data.len() as u64).to_le_bytes().iter().chain(data) {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Size and modification time (ns) of a file, for keys that must not read big files.
fn stamp(path: &Path) -> Vec<u8> {
    let m = fs::metadata(path).ok();
    let size = m.as_ref().map_or(0, fs::Metadata::len);
    let mtime = m
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{size}:{mtime}").into_bytes()
}

/// The cache entry name of a user image: `image-<hash>` over the image's bytes, its release and
/// the module tree's identity (its directory, `modules.dep`, `modules.builtin`, `modules.order`
/// and the newest-changed stamps of those lists).
pub fn image_entry_name(image: &[u8], kver: &str, moddir: Option<&Path>) -> String {
    let mut h = Fnv::new();
    h.field(b"pcisim kernel image v1");
    h.field(image);
    h.field(kver.as_bytes());
    if let Some(m) = moddir {
        h.field(m.as_os_str().as_encoded_bytes());
        for f in ["modules.dep", "modules.builtin", "modules.order"] {
            h.field(&fs::read(m.join(f)).unwrap_or_default());
            h.field(&stamp(&m.join(f)));
        }
    }
    format!("image-{}", h.hex())
}

/// The cache entry name of a built tree: `tree-<hash>` over its path,
/// `include/generated/utsrelease.h`, `.config` and the bzImage's size and mtime (a rebuild
/// changes at least the last).
pub fn tree_entry_name(tree: &Path) -> String {
    let mut h = Fnv::new();
    h.field(b"pcisim kernel tree v1");
    h.field(tree.as_os_str().as_encoded_bytes());
    h.field(&fs::read(tree.join("include/generated/utsrelease.h")).unwrap_or_default());
    h.field(&fs::read(tree.join(".config")).unwrap_or_default());
    h.field(&stamp(&tree.join("arch/x86/boot/bzImage")));
    format!("tree-{}", h.hex())
}

/// The release a built tree says it is (`include/config/kernel.release`, else
/// `include/generated/utsrelease.h`).
pub fn tree_release(tree: &Path) -> Option<String> {
    if let Ok(t) = fs::read_to_string(tree.join("include/config/kernel.release")) {
        let t = t.trim();
        if !t.is_empty() {
            return Some(t.to_string());
        }
    }
    let t = fs::read_to_string(tree.join("include/generated/utsrelease.h")).ok()?;
    let start = t.find("UTS_RELEASE \"")? + "UTS_RELEASE \"".len();
    let end = t[start..].find('"')?;
    Some(t[start..start + end].to_string())
}

/// Builds a user kernel's cache entry in a scratch directory beside it, then renames it into
/// place (`kver` last: it marks a complete entry): `vmlinuz`, `config` (if known), `source`
/// (what it was made from) and `modules/` (the `<kver>` tree, depmod'ed).
pub(crate) fn make_entry(
    guest: &Path,
    entry: &Path,
    i: &Inspected,
    tree: Option<&Path>,
    chroot: Option<(&Path, &Path)>,
    reqs: &[Requirement],
    log: &Path,
) -> Result<(), KernelError> {
    fs::create_dir_all(guest).map_err(io_err("Cannot create", guest))?;
    let scratch = guest.join(format!(
        ".{}.tmp.{}",
        entry
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(io_err("Cannot remove", &scratch))?;
    }
    fs::create_dir_all(&scratch).map_err(io_err("Cannot create", &scratch))?;
    let result = fill_entry(&scratch, i, tree, chroot, reqs, log);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&scratch);
        return Err(e);
    }
    if let Err(e) = fs::rename(&scratch, entry) {
        let _ = fs::remove_dir_all(&scratch);
        // Another run made the same entry first: use it.
        if !entry.join("kver").is_file() {
            return Err(KernelError::Io {
                what: "Cannot move the kernel into the cache",
                path: entry.to_path_buf(),
                source: e,
            });
        }
    }
    debug!("guest kernel {} cached in {}", i.kver, entry.display());
    Ok(())
}

fn fill_entry(
    scratch: &Path,
    i: &Inspected,
    tree: Option<&Path>,
    chroot: Option<(&Path, &Path)>,
    reqs: &[Requirement],
    log: &Path,
) -> Result<(), KernelError> {
    let vmlinuz = scratch.join("vmlinuz");
    fs::write(&vmlinuz, &i.image).map_err(io_err("Cannot write", &vmlinuz))?;
    if let Some((cfg, from)) = &i.evidence.config {
        // The original text is not kept in KConfig; copy the file when there is one.
        let p = Path::new(from);
        let dst = scratch.join("config");
        if p.is_file() {
            fs::copy(p, &dst).map_err(io_err("Cannot copy", p))?;
        } else {
            let text: String = cfg
                .values
                .iter()
                .map(|(k, v)| format!("CONFIG_{k}={v}\n"))
                .collect();
            fs::write(&dst, text).map_err(io_err("Cannot write", &dst))?;
        }
    }
    let stage = scratch.join("stage");
    let kdir = stage.join("lib/modules").join(&i.kver);
    match (tree, &i.moddir) {
        (Some(_), _) if tree_has_modules(i) && chroot.is_some() => {
            if let Some((root, tree_in_root)) = chroot {
                modules_install_chrooted(root, tree_in_root, &stage, &i.kver, log)?;
            }
        }
        (Some(tree), _) if tree_has_modules(i) => {
            run_logged(
                "make modules_install",
                Command::new("make")
                    .arg("-C")
                    .arg(tree)
                    .arg(format!("INSTALL_MOD_PATH={}", stage.display()))
                    .arg("INSTALL_MOD_STRIP=1")
                    .arg("modules_install"),
                log,
            )?;
        }
        (None, Some(moddir)) => {
            fs::create_dir_all(kdir.parent().unwrap_or(&stage))
                .map_err(io_err("Cannot create", &stage))?;
            run_logged(
                "cp -a (the module tree)",
                Command::new("cp").arg("-a").arg(moddir).arg(&kdir),
                log,
            )?;
            // Links to the build and source trees would point anywhere.
            for l in ["build", "source"] {
                let p = kdir.join(l);
                if p.symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
                {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        _ => {
            // No loadable modules at all: every requirement is built in (the check said so).
            fs::create_dir_all(&kdir).map_err(io_err("Cannot create", &kdir))?;
            let builtin: String = reqs
                .iter()
                .filter_map(|r| r.module)
                .map(|m| format!("kernel/{m}.ko\n"))
                .collect();
            let mut text = match tree.map(|t| t.join("modules.builtin")) {
                Some(p) if p.is_file() => {
                    fs::read_to_string(&p).map_err(io_err("Cannot read", &p))?
                }
                _ => String::new(),
            };
            text.push_str(&builtin);
            fs::write(kdir.join("modules.builtin"), text).map_err(io_err("Cannot write", &kdir))?;
            fs::write(kdir.join("modules.dep"), "").map_err(io_err("Cannot write", &kdir))?;
        }
    }
    if !kdir.join("modules.dep").is_file() {
        run_logged(
            "depmod",
            Command::new("depmod").arg("-b").arg(&stage).arg(&i.kver),
            log,
        )?;
    }
    if !kdir.join("modules.dep").is_file() {
        return Err(KernelError::Unusable(format!(
            "no modules.dep for {} after depmod",
            i.kver
        )));
    }
    let modules = scratch.join("modules");
    fs::rename(&kdir, &modules).map_err(io_err("Cannot move", &kdir))?;
    let _ = fs::remove_dir_all(&stage);
    let source = scratch.join("source");
    let text = match tree {
        Some(t) => format!("tree {}\n", t.display()),
        None => format!(
            "image {}\nmodules {}\n",
            i.image_path.display(),
            i.moddir
                .as_ref()
                .map_or_else(|| "-".into(), |m| m.display().to_string())
        ),
    };
    fs::write(&source, text).map_err(io_err("Cannot write", &source))?;
    let kver = scratch.join("kver");
    fs::write(&kver, format!("{}\n", i.kver)).map_err(io_err("Cannot write", &kver))?;
    Ok(())
}

/// `make modules_install` of a tree inside `root` (at `tree_in_root` there), chrooted: the
/// tree's Makefile must see the compiler it was configured with (the host's would make kbuild
/// re-run its config step and rewrite the tree's `.config`). Installs into a scratch directory
/// in the root's `/tmp`, then moves `lib/modules/<kver>` to `stage` (same file system: the
/// cache). The `build`/`source` links name paths inside the root: dropped.
fn modules_install_chrooted(
    root: &Path,
    tree_in_root: &Path,
    stage: &Path,
    kver: &str,
    log: &Path,
) -> Result<(), KernelError> {
    let tmp_in_root = format!("/tmp/pcisim-modinst.{}", std::process::id());
    let tmp = root.join(tmp_in_root.trim_start_matches('/'));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err("Cannot remove", &tmp))?;
    }
    let result = run_logged(
        "make modules_install (chrooted into the trixie root)",
        Command::new("chroot")
            .arg(root)
            .args([
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LC_ALL=C",
            ])
            .arg("make")
            .arg("-C")
            .arg(tree_in_root)
            .arg(format!("INSTALL_MOD_PATH={tmp_in_root}"))
            .arg("INSTALL_MOD_STRIP=1")
            .arg("modules_install"),
        log,
    )
    .and_then(|()| {
        let from = tmp.join("lib/modules").join(kver);
        let to = stage.join("lib/modules").join(kver);
        fs::create_dir_all(stage.join("lib/modules")).map_err(io_err("Cannot create", stage))?;
        fs::rename(&from, &to).map_err(io_err("Cannot move", &from))?;
        for l in ["build", "source"] {
            let p = to.join(l);
            if p.symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                let _ = fs::remove_file(&p);
            }
        }
        Ok(())
    });
    let _ = fs::remove_dir_all(&tmp);
    result
}

fn tree_has_modules(i: &Inspected) -> bool {
    i.evidence
        .config
        .as_ref()
        .is_some_and(|(c, _)| c.get("MODULES") == Some("y"))
}

/// Runs a helper command, its output appended to `log`.
fn run_logged(what: &str, cmd: &mut Command, log: &Path) -> Result<(), KernelError> {
    debug!("{what}: {cmd:?}");
    let out = crate::vm::process::run_captured(what, cmd, crate::vm::kmod::BUILD_TIMEOUT, log)
        .map_err(|e| KernelError::Command {
            what: format!("{what}: {e}"),
            status: "did not run".into(),
            log: log.to_path_buf(),
        })?;
    if !out.status.success() {
        warn!("{what} failed; see {}", log.display());
        return Err(KernelError::Command {
            what: what.to_string(),
            status: crate::vm::process::describe_status(out.status),
            log: log.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::scratch;

    #[test]
    fn test_cache_entry_names() {
        let d = scratch("keys");
        let a = image_entry_name(b"image A", "6.12.0", None);
        assert!(a.starts_with("image-") && a.len() == 6 + 16, "{a}");
        assert_eq!(a, image_entry_name(b"image A", "6.12.0", None));
        assert_ne!(a, image_entry_name(b"image B", "6.12.0", None));
        assert_ne!(a, image_entry_name(b"image A", "6.12.1", None));
        // The module tree is part of the key: a re-installed modules.dep changes it.
        let m = d.join("m");
        fs::create_dir_all(&m).unwrap();
        fs::write(m.join("modules.dep"), "a.ko:\n").unwrap();
        let with = image_entry_name(b"image A", "6.12.0", Some(&m));
        assert_ne!(a, with);
        fs::write(m.join("modules.dep"), "a.ko:\nb.ko:\n").unwrap();
        assert_ne!(with, image_entry_name(b"image A", "6.12.0", Some(&m)));
        // A tree: its release header, .config and bzImage stamp.
        let t = d.join("tree");
        fs::create_dir_all(t.join("include/generated")).unwrap();
        fs::create_dir_all(t.join("arch/x86/boot")).unwrap();
        fs::write(
            t.join("include/generated/utsrelease.h"),
            "#define UTS_RELEASE \"6.12.0-dbg\"\n",
        )
        .unwrap();
        fs::write(t.join(".config"), "CONFIG_VFIO=m\n").unwrap();
        fs::write(t.join("arch/x86/boot/bzImage"), "1").unwrap();
        let k1 = tree_entry_name(&t);
        assert!(k1.starts_with("tree-"), "{k1}");
        assert_eq!(k1, tree_entry_name(&t));
        assert_eq!(tree_release(&t).as_deref(), Some("6.12.0-dbg"));
        fs::write(t.join(".config"), "CONFIG_VFIO=y\n").unwrap();
        let k2 = tree_entry_name(&t);
        assert_ne!(k1, k2);
        fs::write(t.join("arch/x86/boot/bzImage"), "12").unwrap();
        assert_ne!(k2, tree_entry_name(&t));
        fs::create_dir_all(t.join("include/config")).unwrap();
        fs::write(t.join("include/config/kernel.release"), "6.12.0-dbg+\n").unwrap();
        assert_eq!(tree_release(&t).as_deref(), Some("6.12.0-dbg+"));
        fs::remove_dir_all(&d).unwrap();
    }
}
