//! Reading users' kernels: the release in a bzImage's setup header, the config embedded in an
//! image (`CONFIG_IKCONFIG`), module directories and their module lists.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::config::Evidence;
use super::KernelError;

/// The kernel release (`uname -r`) in an x86 bzImage's setup header (`kernel_version`, boot
/// protocol ≥ 2.00): the first word of the version string.
pub fn image_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]);
    if ptr == 0 {
        return None;
    }
    let start = usize::from(ptr) + 0x200;
    let rest = image.get(start..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    text.split_whitespace().next().map(str::to_string)
}

/// The config embedded in a kernel image (`CONFIG_IKCONFIG`: gzip data between `IKCFG_ST` and
/// `IKCFG_ED`), like the kernel's `scripts/extract-ikconfig`: looked for in the file itself (a
/// vmlinux) and in every gzip/xz/zstd/bzip2/lzma/lz4 stream found in it (a bzImage's payload),
/// decompressed with the host's tools. `None` if there is none (or no tool to find it).
pub fn ikconfig(image: &[u8]) -> Option<String> {
    if let Some(c) = ikconfig_in(image) {
        return Some(c);
    }
    const STREAMS: &[(&[u8], &str)] = &[
        (b"\x1f\x8b\x08", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh", "bzip2"),
        (b"\x5d\x00\x00\x00", "xz"),
        (b"\x02\x21\x4c\x18", "lz4"),
    ];
    for (magic, tool) in STREAMS {
        let mut from = 0;
        let mut tries = 0;
        while let Some(pos) = find(&image[from..], magic).map(|p| p + from) {
            from = pos + 1;
            tries += 1;
            if tries > 8 {
                break;
            }
            let args: &[&str] = match (*tool, magic.first()) {
                ("xz", Some(0x5d)) => &["-dcq", "--format=lzma"],
                ("lz4", _) => &["-dcq", "-"],
                _ => &["-dcq"],
            };
            if let Some(out) = decompress(tool, args, &image[pos..]) {
                if let Some(c) = ikconfig_in(&out) {
                    return Some(c);
                }
            }
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn ikconfig_in(data: &[u8]) -> Option<String> {
    let start = find(data, b"IKCFG_ST")? + 8;
    let len = find(&data[start..], b"IKCFG_ED")?;
    let out = decompress("gzip", &["-dcq"], &data[start..start + len])?;
    String::from_utf8(out).ok()
}

/// Runs `tool args` with `input` on stdin; whatever it wrote before failing counts (trailing
/// garbage after a stream is normal here). `None` if it wrote nothing or does not exist.
pub(crate) fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let mut out = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_end(&mut out);
    }
    let _ = child.wait();
    let _ = writer.join();
    (!out.is_empty()).then_some(out)
}

/// Whether `dir` is a `lib/modules/<kver>` directory itself.
fn is_kver_dir(dir: &Path) -> bool {
    ["modules.dep", "modules.order", "modules.builtin", "kernel"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// The `<kver>` module directory `--modules DIR` means, for kernel release `kver`: `DIR` itself
/// if it is one (has `modules.dep`, `modules.order`, `modules.builtin` or `kernel/`), else
/// `DIR/lib/modules/<kver>` or `DIR/usr/lib/modules/<kver>` (an `INSTALL_MOD_PATH` tree).
pub fn resolve_modules_dir(dir: &Path, kver: &str) -> Result<PathBuf, KernelError> {
    if !dir.is_dir() {
        return Err(KernelError::Unusable(format!(
            "--modules {}: not a directory",
            dir.display()
        )));
    }
    if is_kver_dir(dir) {
        return Ok(dir.to_path_buf());
    }
    let mut found = Vec::new();
    for base in ["lib/modules", "usr/lib/modules"] {
        let b = dir.join(base);
        let c = b.join(kver);
        if c.is_dir() {
            return Ok(c);
        }
        if let Ok(entries) = fs::read_dir(&b) {
            found.extend(
                entries
                    .flatten()
                    .map(|e| format!("{base}/{}", e.file_name().to_string_lossy())),
            );
        }
    }
    Err(KernelError::Unusable(format!(
        "--modules {}: no modules for the image's release {kver}: expected {0}/lib/modules/{kver}/ (an INSTALL_MOD_PATH tree) or the {kver} directory itself{1}",
        dir.display(),
        if found.is_empty() {
            String::new()
        } else {
            format!(" (it has {})", found.join(", "))
        }
    )))
}

/// Module names listed in a `modules.dep` or `modules.builtin` text (`kernel/.../vfio-pci.ko.xz:
/// deps` → `vfio_pci`).
pub fn module_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(crate::vm::initramfs::module_name)
        .collect()
}

/// Reads `modules.dep` and `modules.builtin` of a `<kver>` directory into `ev`.
pub(crate) fn read_module_lists(moddir: &Path, ev: &mut Evidence) {
    if let Ok(t) = fs::read_to_string(moddir.join("modules.dep")) {
        ev.loadable = module_names(&t);
    }
    if let Ok(t) = fs::read_to_string(moddir.join("modules.builtin")) {
        ev.builtin = module_names(&t);
    }
}

/// A config file found beside a module tree: `<kver>/config` (Debian 7.x packages),
/// `<kver>/build/.config`, `DIR/boot/config-<kver>`, `DIR/config-<kver>`.
pub(crate) fn config_near_modules(dir: &Path, moddir: &Path, kver: &str) -> Option<PathBuf> {
    [
        moddir.join("config"),
        moddir.join("build/.config"),
        dir.join(format!("boot/config-{kver}")),
        dir.join(format!("config-{kver}")),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::{decompress_like, fake_bzimage, gzip, scratch};

    #[test]
    fn test_image_release_from_setup_header() {
        assert_eq!(
            image_release(&fake_bzimage("6.12.0-dbg", b"")).as_deref(),
            Some("6.12.0-dbg")
        );
        assert_eq!(image_release(b"not a kernel"), None);
        let mut b = fake_bzimage("x", b"");
        b[0x202] = b'X';
        assert_eq!(image_release(&b), None);
    }

    #[test]
    fn test_ikconfig_found_in_vmlinux_and_in_compressed_payload() {
        let cfg = "CONFIG_VFIO=y\n# CONFIG_IOMMUFD is not set\n";
        let mut vmlinux = b"\x7fELF junk IKCFG_ST".to_vec();
        vmlinux.extend(gzip(cfg.as_bytes()));
        vmlinux.extend_from_slice(b"IKCFG_ED more junk");
        assert_eq!(ikconfig(&vmlinux).as_deref(), Some(cfg));
        // Inside a compressed payload (as in a bzImage), here xz and zstd.
        for (tool, args) in [("xz", &["-c"][..]), ("zstd", &["-c", "-q"][..])] {
            let payload = decompress_like(tool, args, &vmlinux);
            let bz = fake_bzimage("6.12.0", &payload);
            assert_eq!(ikconfig(&bz).as_deref(), Some(cfg), "{tool}");
        }
        // No embedded config: None (the instrument above shows a present one is found).
        assert_eq!(ikconfig(&fake_bzimage("6.12.0", b"plain payload")), None);
    }

    #[test]
    fn test_modules_dir_layouts() {
        let d = scratch("layouts");
        // An INSTALL_MOD_PATH tree: DIR/lib/modules/<kver>/.
        let inst = d.join("inst");
        fs::create_dir_all(inst.join("lib/modules/6.12.0-x/kernel")).unwrap();
        fs::create_dir_all(inst.join("lib/modules/6.1.0-old/kernel")).unwrap();
        assert_eq!(
            resolve_modules_dir(&inst, "6.12.0-x").unwrap(),
            inst.join("lib/modules/6.12.0-x")
        );
        // Merged /usr.
        let usr = d.join("usr");
        fs::create_dir_all(usr.join("usr/lib/modules/6.12.0-x")).unwrap();
        assert_eq!(
            resolve_modules_dir(&usr, "6.12.0-x").unwrap(),
            usr.join("usr/lib/modules/6.12.0-x")
        );
        // The <kver> directory itself, whatever its name.
        let direct = d.join("modules");
        fs::create_dir_all(&direct).unwrap();
        fs::write(direct.join("modules.dep"), "").unwrap();
        assert_eq!(resolve_modules_dir(&direct, "6.12.0-x").unwrap(), direct);
        // The wrong release: the error names what is there.
        let e = resolve_modules_dir(&inst, "7.0.0").unwrap_err().to_string();
        assert!(
            e.contains("7.0.0") && e.contains("lib/modules/6.12.0-x"),
            "{e}"
        );
        assert!(resolve_modules_dir(&d.join("nope"), "x").is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
