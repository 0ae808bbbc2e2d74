//! End to end: the guest kernel flags of `pcisim lab suite` (docs/lab.md, "Your kernel").
//!
//! * `--kernel-image PATH --modules DIR` boots a kernel given as a user's image: the cached
//!   Debian 6.12 vmlinuz and module tree, passed as if they were the user's, go through the image
//!   path (their own `image-<hash>` cache entry, the config check on the module tree) and the
//!   guest reports that kernel's release.
//! * A kernel whose config lacks VFIO (a `--kernel-tree` with a fake `.config`) is refused
//!   before anything boots, naming `CONFIG_VFIO`.
//! * `--kernel 7.3` (Debian trixie-backports) runs E1-E5, and the guest NPU driver builds
//!   against its headers and runs (H6).
//! * An unknown series is refused with the supported list.
//! * `--kernel-tree DIR` with a real built tree (the lab's debug kernel tree unless
//!   `PCISIM_TEST_KERNEL_TREE` names another) boots with its modules and builds our NPU driver.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

mod lab_support;
use lab_support::{lab_suite, result_line_of as result_line};

/// The `KEY=VALUE` lines of `provision.sh --kernel SERIES` (provisioning it if needed).
fn provision_env(series: &str) -> Vec<(String, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../qemu-scripts/provision.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(["--kernel", series])
        .output()
        .expect("run provision.sh");
    assert!(
        out.status.success(),
        "provision.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The lab's debug kernel tree for 6.12 (built if not cached), as a host path.
fn debug_tree() -> String {
    let _ = provision_env("6.12");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../qemu-scripts/debug-kernel.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(["--series", "6.12"])
        .output()
        .expect("run debug-kernel.sh");
    assert!(
        out.status.success(),
        "debug-kernel.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("PCISIM_DEBUG_TREE="))
        .expect("debug-kernel.sh printed PCISIM_DEBUG_TREE")
        .to_string()
}

fn get<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("provision.sh printed no {key}"))
}

#[test]
fn kernel_image_with_modules_boots_through_the_image_path() {
    let env = provision_env("6.12");
    let vmlinuz = get(&env, "PCISIM_KERNEL");
    let modules = get(&env, "PCISIM_MODULES");
    let kver = get(&env, "PCISIM_KVER");
    let cache = PathBuf::from(get(&env, "PCISIM_CACHE"));
    // The user's "image" is a copy elsewhere, so nothing of the series entry is used by path.
    let dir = std::env::temp_dir().join(format!("pcisim-user-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("bzImage");
    std::fs::copy(vmlinuz, &image).unwrap();
    // What a user kernel must not touch: the QEMU wrapper, the series' entry and stamp.
    let shared: Vec<PathBuf> = [
        "bin/qemu-system-x86_64",
        "guest/debian-6.12/vmlinuz",
        "guest/debian-6.12/kver",
        "guest/debian-6.12/modules/modules.dep",
        "stamps/kbuild-debian-6.12",
    ]
    .iter()
    .map(|p| cache.join(p))
    .collect();
    let before: Vec<_> = shared.iter().map(|p| file_stamp(p)).collect();

    let out = lab_suite(&[
        "--kernel-image",
        image.to_str().unwrap(),
        "--modules",
        modules,
        "--filter",
        "E1",
    ]);
    let ktap = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "E1 must pass");
    let line = result_line(&ktap, "E1").expect("an E1 result");
    assert!(line.starts_with("ok "), "{line}");
    // The lab took the image path: the kernel is named as the image, in an image-<hash> entry,
    // checked on its module tree (the Debian image has no embedded config, the tree no config).
    let chosen = progress
        .lines()
        .find(|l| l.contains(&format!("guest kernel {kver}: image {}", image.display())))
        .unwrap_or_else(|| panic!("no 'guest kernel {kver}: image ...' line"));
    assert!(chosen.contains("(cache entry image-"), "{chosen}");
    assert!(
        chosen.contains("the module tree (no config found)"),
        "{chosen}"
    );
    let entry = chosen
        .split("(cache entry ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap();
    assert_eq!(entry.len(), "image-".len() + 16, "{entry}");
    let entry_dir = cache.join("guest").join(entry);
    // The entry is keyed by content (image bytes, release, module lists): the same kernel given
    // from another path reuses it, so `source` names the first path it came from.
    let source = std::fs::read_to_string(entry_dir.join("source")).unwrap();
    assert!(
        source.starts_with("image ") && source.contains(&format!("modules {modules}")),
        "{source}"
    );
    assert_eq!(
        std::fs::read_to_string(entry_dir.join("kver"))
            .unwrap()
            .trim(),
        kver
    );
    assert!(entry_dir.join("modules/modules.dep").is_file());
    // The guest itself reports the image's release (the agent's `uname -r`).
    assert!(
        progress.contains(&format!("guest uname -r {kver}")),
        "the guest must run {kver}"
    );
    let after: Vec<_> = shared.iter().map(|p| file_stamp(p)).collect();
    assert_eq!(before, after, "the shared cache entries are untouched");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Size, mtime and inode of a file (it must exist).
fn file_stamp(p: &Path) -> (u64, std::time::SystemTime, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.len(), m.modified().unwrap(), m.ino())
}

#[test]
fn kernel_without_vfio_is_refused_before_boot() {
    let dir = std::env::temp_dir().join(format!("pcisim-novfio-tree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("arch/x86/boot")).unwrap();
    std::fs::create_dir_all(dir.join("include/config")).unwrap();
    // A bzImage header (the release) is all the check reads of the image.
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
    bz[0x300..0x30e].copy_from_slice(b"6.12.0-novfio\0");
    std::fs::write(dir.join("arch/x86/boot/bzImage"), bz).unwrap();
    std::fs::write(dir.join("include/config/kernel.release"), "6.12.0-novfio\n").unwrap();
    std::fs::write(
        dir.join(".config"),
        "CONFIG_MODULES=y\nCONFIG_BLK_DEV_INITRD=y\n# CONFIG_VFIO is not set\nCONFIG_INTEL_IOMMU=y\n",
    )
    .unwrap();
    let out = lab_suite(&["--kernel-tree", dir.to_str().unwrap(), "--filter", "E1"]);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "an infrastructure failure");
    assert!(
        progress.contains("CONFIG_VFIO is not set"),
        "names CONFIG_VFIO"
    );
    assert!(
        progress.contains("CONFIG_VFIO_PCI"),
        "and the others missing"
    );
    assert!(progress.contains(&format!("{}/.config", dir.display())));
    for never in ["initramfs built", "guest booted", "guest uname -r"] {
        assert!(!progress.contains(never), "nothing boots: {never:?}");
    }
    let ktap = String::from_utf8_lossy(&out.stdout);
    let line = result_line(&ktap, "E1").expect("an E1 line");
    assert!(
        line.starts_with("not ok ") && line.contains("# not run"),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_series_is_refused_with_the_supported_list() {
    let out = lab_suite(&["--kernel", "6.1", "--filter", "E1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("Unsupported --kernel \"6.1\"") && err.contains("6.12") && err.contains("7.3"),
        "{err}"
    );
}

#[test]
fn debian_7_3_runs_e1_to_e5_and_the_npu_driver() {
    let out = lab_suite(&["--kernel", "7.3", "--filter", "E"]);
    let ktap = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0));
    for id in ["E1", "E2", "E3", "E4", "E5"] {
        let line = result_line(&ktap, id).unwrap_or_else(|| panic!("no {id} result"));
        assert!(line.starts_with("ok "), "{line}");
    }
    assert!(progress.contains("guest uname -r 7.3."), "a 7.3 guest");
    assert!(progress.contains("Debian 7.3 (trixie-backports) (cache entry debian-7.3)"));
    // The NPU driver: built against 7.3's headers (vermagic checked by the lab) and loaded by H6.
    let out = lab_suite(&["--kernel", "7.3", "--filter", "H6"]);
    let ktap = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0));
    assert!(progress.contains("pcisim_npu"), "the NPU driver was built");
    let line = result_line(&ktap, "H6").expect("an H6 result");
    assert!(line.starts_with("ok "), "{line}");
    // Both series' headers live side by side in the root: provisioning 6.12 again after 7.3
    // removed nothing of 7.3's, and 7.3's did not replace 6.12's.
    let e612 = provision_env("6.12");
    let e73 = provision_env("7.3");
    for env in [&e612, &e73] {
        let root = PathBuf::from(get(env, "PCISIM_KBUILD_ROOT"));
        let headers = root.join(get(env, "PCISIM_KHEADERS").trim_start_matches('/'));
        assert!(
            headers.join("Module.symvers").is_file(),
            "{}",
            headers.display()
        );
    }
    assert_ne!(get(&e612, "PCISIM_KHEADERS"), get(&e73, "PCISIM_KHEADERS"));
}

/// `--kernel-tree DIR` with a real built tree: the tree's bzImage boots, its modules are
/// installed into a `tree-<hash>` entry (vfio from there), and our NPU driver is built against
/// the tree (vermagic = the tree's release). The tree is `PCISIM_TEST_KERNEL_TREE` if set (a
/// tree built on the host: installed and built against with the host's make and gcc), else the
/// lab's debug kernel tree (`qemu-scripts/debug-kernel.sh`, built on first use and cached; it
/// lies inside the trixie root, so both happen chrooted with the root's gcc).
#[test]
fn kernel_tree_boots_with_its_modules_and_builds_the_npu_driver() {
    let tree = match std::env::var("PCISIM_TEST_KERNEL_TREE") {
        Ok(t) if !t.is_empty() => t,
        _ => debug_tree(),
    };
    let kver = std::fs::read_to_string(Path::new(&tree).join("include/config/kernel.release"))
        .expect("a built tree has include/config/kernel.release");
    let kver = kver.trim();
    let out = lab_suite(&["--kernel-tree", &tree, "--filter", "E1"]);
    let ktap = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0));
    let line = result_line(&ktap, "E1").expect("an E1 result");
    assert!(line.starts_with("ok "), "{line}");
    let chosen = progress
        .lines()
        .find(|l| l.contains(&format!("guest kernel {kver}: tree ")))
        .expect("the tree path was taken");
    assert!(chosen.contains("(cache entry tree-"), "{chosen}");
    assert!(chosen.contains("/.config: all met"), "{chosen}");
    assert!(
        progress.contains("guest kernel modules built")
            || progress.contains("guest kernel modules taken from the cache"),
        "the NPU driver was built against the tree"
    );
    assert!(progress.contains(&format!("/lib/modules/{kver}/extra/pcisim_npu.ko")));
    assert!(progress.contains(&format!("guest uname -r {kver}")));
}
