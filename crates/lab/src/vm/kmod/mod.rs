//! Guest kernel modules: builds the modules of `guest-tests/kmod/` against the guest kernel's
//! exact headers and checks that the guest kernel will accept them.
//!
//! Provisioning (`qemu-scripts/provision.sh`, step 6) installs into its Debian trixie root the
//! guest kernel's `linux-headers-<kver>` at the kernel package's version, the gcc that built the
//! kernel, make and perl; each Debian series' headers side by side. [`build`] copies the module
//! sources into a scratch directory inside that root and runs, chrooted into it in a private mount
//! namespace with the host's `/proc` bind-mounted (`unshare [--map-root-user] --mount`),
//!
//! ```text
//! make -C /usr/src/linux-headers-<kver> M=/tmp/pcisim-kmod/build.<key>.<pid> W=1 -j<n> modules
//! ```
//!
//! so the root's own compiler and kbuild tools are used, never the host's. For a user's kernel
//! tree (`pcisim lab --kernel-tree`, [`crate::kernel`]) it is the other way round: the tree was
//! built with the host's toolchain, so `make -C <tree> M=<scratch dir> ...` runs on the host, as
//! for any out-of-tree module of that tree. The build fails on any
//! `warning:` about our sources (compiler, kernel-doc under `W=1`, modpost), and every `.ko` must
//! carry a `vermagic=` starting with the guest's kernel release. Results are cached in the root
//! (`/tmp/pcisim-kmod/<key>/`, the last [`CACHE_KEEP`] builds), keyed by a hash of the sources,
//! the kernel release and the headers' `Module.symvers`, so an unchanged module is not rebuilt.
//!
//! In the guest the modules live at `/lib/modules/<kver>/extra/<name>.ko` ([`guest_module_path`]);
//! `/init` does not load them: scenarios `insmod` them with their own parameters.
//!
//! The parts: [`sources`] (what is built and its cache key), [`check`] (a built module's
//! `.modinfo`, vermagic and warnings), `cache` (the cache's directory and pruning); this file
//! runs the build.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use log::{debug, info, warn};

use crate::vm::process::{self, describe_status, ProcessError};

mod cache;
pub mod check;
pub mod sources;
use self::cache::*;
pub use self::check::*;
pub use self::sources::*;
use crate::vm::provision::{repo_root, ProvisionEnv};

/// How long one module build may take (a cold build of a large driver on two busy cores).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Environment variable naming another module source directory than `guest-tests/kmod/`
/// (for trying the pipeline with a scratch module).
pub const KMOD_SRC_ENV: &str = "PCISIM_KMOD_SRC";

/// The directory under `/lib/modules/<kver>/` that holds our modules in the guest (the kernel's
/// conventional place for out-of-tree modules).
pub const EXTRA_DIR: &str = "extra";

/// The module name of the guest NPU driver (`guest-tests/kmod/npu_*.c`).
pub const NPU_MODULE: &str = "pcisim_npu";

/// The guest GPU driver's module name (userptr, docs/userptr.md).
pub const GPU_MODULE: &str = "pcisim_gpu";

/// How many cached builds are kept in the root (the most recently used ones).
pub const CACHE_KEEP: usize = 8;

/// The cache directory, relative to the kbuild root. The root's `/tmp` is world-writable, so
/// a non-root user can build there too.
const CACHE_IN_ROOT: &str = "tmp/pcisim-kmod";

/// Mixed into the cache key: change it when the build command or the checks change.
const KEY_SALT: &str = "pcisim-kmod v1: make W=1 modules; vermagic; warnings";

/// Errors building or checking the guest kernel modules.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// A file could not be read, written or removed.
    #[error("{what} {path}")]
    Io {
        /// What was being done ("Cannot read").
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Running make failed (could not start, timed out, interrupted).
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The source directory has C files but no `Kbuild` naming the modules.
    #[error("{0} has C sources but no Kbuild file (with obj-m += <name>.o)")]
    NoKbuild(PathBuf),
    /// The `Kbuild` file names no module.
    #[error("{0} names no module (expected obj-m += <name>.o)")]
    NoModules(PathBuf),
    /// make exited with an error.
    #[error("Building the guest kernel modules failed ({status}); see {log}")]
    Build {
        /// How make ended.
        status: String,
        /// The build log.
        log: PathBuf,
    },
    /// The build succeeded but warned about our sources.
    #[error(
        "The guest kernel module build warned ({count} warning(s), first: {first}); see {log}"
    )]
    Warnings {
        /// How many warning lines were about our sources.
        count: usize,
        /// The first of them.
        first: String,
        /// The build log.
        log: PathBuf,
    },
    /// make succeeded but a module named in `Kbuild` was not produced.
    #[error("Module {name}.ko was not built in {dir}")]
    Missing {
        /// The module name.
        name: String,
        /// The build directory.
        dir: PathBuf,
    },
    /// A `.ko` is not a usable kernel module file.
    #[error("{path} is not a valid x86-64 kernel module: {reason}")]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A module was built for another kernel than the guest's.
    #[error(
        "{path} has vermagic {vermagic:?}, not for the guest kernel {kver} (headers and kernel differ: re-run qemu-scripts/provision.sh)"
    )]
    Vermagic {
        /// The module file.
        path: PathBuf,
        /// Its `vermagic=` value.
        vermagic: String,
        /// The guest kernel release.
        kver: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KmodError {
    let path = path.to_path_buf();
    move |source| KmodError::Io { what, path, source }
}

/// The module source directory: `$PCISIM_KMOD_SRC` if set, else `guest-tests/kmod/`.
pub fn kmod_src_dir() -> PathBuf {
    match std::env::var_os(KMOD_SRC_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join("guest-tests/kmod"),
    }
}

/// Where module `name` lives in the guest whose kernel release is `kver`:
/// `/lib/modules/<kver>/extra/<name>.ko`.
pub fn guest_module_path(kver: &str, name: &str) -> String {
    format!("/lib/modules/{kver}/{EXTRA_DIR}/{name}.ko")
}

/// The same path for a guest shell command, with the release left to the guest:
/// `/lib/modules/$(uname -r)/extra/<name>.ko`, e.g. `insmod <this> mode=1`.
pub fn guest_module_path_sh(name: &str) -> String {
    format!("/lib/modules/$(uname -r)/{EXTRA_DIR}/{name}.ko")
}

// ---------------------------------------------------------------------------------------------
// The build
// ---------------------------------------------------------------------------------------------

/// One built module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltModule {
    /// Its name (`pcisim_npu`).
    pub name: String,
    /// The `.ko` on the host (in the build cache inside the kbuild root).
    pub path: PathBuf,
    /// Its `vermagic=`.
    pub vermagic: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`build`] produced.
#[derive(Debug, Clone)]
pub struct KmodBuild {
    /// The source directory.
    pub src: PathBuf,
    /// The modules, in `Kbuild` order.
    pub modules: Vec<BuiltModule>,
    /// The cache key of this build.
    pub key: String,
    /// Whether it came from the cache (no compiler ran).
    pub cached: bool,
}

/// Builds the modules of [`kmod_src_dir`] for the provisioned guest kernel (see the module
/// documentation). `Ok(None)` when the directory has no `.c` file (nothing to build; logged).
/// make's output (stdout and stderr) goes to `log`.
pub fn build(env: &ProvisionEnv, log: &Path) -> Result<Option<KmodBuild>, KmodError> {
    build_from(
        &kmod_src_dir(),
        &env.kbuild_root,
        &env.kheaders,
        env.kdir_host.as_deref(),
        &env.kver,
        log,
    )
}

/// [`build`] with everything explicit: the sources in `src`, the root `kbuild_root`, the
/// headers at `kheaders` inside it (or, with `kdir_host`, a user's built kernel tree on the host,
/// built against with the host's make and compiler, not chrooted), the guest release `kver`.
pub fn build_from(
    src: &Path,
    kbuild_root: &Path,
    kheaders: &Path,
    kdir_host: Option<&Path>,
    kver: &str,
    log: &Path,
) -> Result<Option<KmodBuild>, KmodError> {
    let Some(sources) = read_sources(src)? else {
        info!(
            "{} has no .c file: no guest kernel module to build",
            src.display()
        );
        return Ok(None);
    };
    let headers = match kdir_host {
        Some(dir) => dir.to_path_buf(),
        None => kbuild_root.join(kheaders.strip_prefix("/").unwrap_or(kheaders)),
    };
    let symvers_path = headers.join("Module.symvers");
    let symvers = fs::read(&symvers_path).map_err(io_err("Cannot read", &symvers_path))?;
    let key = cache_key(&sources, kver, &symvers);
    let cache = kbuild_root.join(CACHE_IN_ROOT);
    ensure_cache_dir(&cache)?;
    let entry = cache.join(&key);

    let cached = entry.is_dir();
    if cached {
        debug!("guest kernel modules: cache hit {}", entry.display());
        append_log(
            log,
            &format!(
                "pcisim: sources of {} unchanged (key {key}): using the cached build {}\n",
                src.display(),
                entry.display()
            ),
        )?;
    } else {
        run_make(
            &sources,
            kbuild_root,
            kheaders,
            kdir_host,
            &cache,
            &key,
            log,
        )?;
    }
    touch(&entry);
    let mut modules = Vec::new();
    for name in &sources.modules {
        let path = entry.join(format!("{name}.ko"));
        if !path.is_file() {
            return Err(KmodError::Missing {
                name: name.clone(),
                dir: entry.clone(),
            });
        }
        modules.push(check_module(name, &path, kver)?);
    }
    prune_cache(&cache, &key);
    Ok(Some(KmodBuild {
        src: src.to_path_buf(),
        modules,
        key,
        cached,
    }))
}

/// Compiles `sources` in `cache/build.<key>.<pid>` and, once checked, renames that directory to
/// `cache/<key>` (keeping only the sources, the `.ko` files and the log).
fn run_make(
    sources: &Sources,
    kbuild_root: &Path,
    kheaders: &Path,
    kdir_host: Option<&Path>,
    cache: &Path,
    key: &str,
    log: &Path,
) -> Result<(), KmodError> {
    let scratch_name = format!("build.{key}.{}", std::process::id());
    let scratch = cache.join(&scratch_name);
    // The same directory as the compiler sees it, chrooted.
    let in_root = Path::new("/").join(CACHE_IN_ROOT).join(&scratch_name);
    // Where make runs: inside the root (chrooted), or the scratch directory itself for a host
    // build against a user's tree.
    let build_dir = if kdir_host.is_some() {
        scratch.clone()
    } else {
        in_root
    };
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(io_err("Cannot remove", &scratch))?;
    }
    for (rel, data) in &sources.files {
        let path = scratch.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err("Cannot create", parent))?;
        }
        fs::write(&path, data).map_err(io_err("Cannot write", &path))?;
    }
    let result = compile_and_check(sources, kbuild_root, kheaders, kdir_host, &build_dir, log);
    if let Err(e) = result {
        // Keep nothing half-built in the cache; the log has the story.
        let _ = fs::remove_dir_all(&scratch);
        return Err(e);
    }
    // Keep the sources, the modules and the log; drop the objects (the .ko are what we use).
    let keep: Vec<PathBuf> = sources
        .files
        .iter()
        .map(|(r, _)| scratch.join(r))
        .chain(
            sources
                .modules
                .iter()
                .map(|m| scratch.join(format!("{m}.ko"))),
        )
        .collect();
    remove_except(&scratch, &keep);
    if let Err(e) = fs::copy(log, scratch.join("build.log")) {
        debug!("cannot copy the build log into the cache: {e}");
    }
    let entry = cache.join(key);
    if let Err(e) = fs::rename(&scratch, &entry) {
        // Another lab run finished the same build first: use it.
        let _ = fs::remove_dir_all(&scratch);
        if !entry.is_dir() {
            return Err(KmodError::Io {
                what: "Cannot move the build into the cache",
                path: entry,
                source: e,
            });
        }
    }
    Ok(())
}

fn compile_and_check(
    sources: &Sources,
    kbuild_root: &Path,
    kheaders: &Path,
    kdir_host: Option<&Path>,
    build_dir: &Path,
    log: &Path,
) -> Result<(), KmodError> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut make_args: Vec<String> = vec![
        "-C".into(),
        kdir_host.unwrap_or(kheaders).display().to_string(),
        format!("M={}", build_dir.display()),
        "W=1".into(),
        format!("-j{jobs}"),
        "modules".into(),
    ];
    append_log(
        log,
        &format!(
            "pcisim: building {} ({}) in {} ({}): make {}\n",
            sources.modules.join(" "),
            sources.dir.display(),
            build_dir.display(),
            match kdir_host {
                Some(_) => "on the host, with the host's make and compiler".to_string(),
                None => format!("chroot {}", kbuild_root.display()),
            },
            make_args.join(" ")
        ),
    )?;
    // Everything make prints goes to stderr, which run_captured appends to the log in order.
    let mut sh: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        "exec make \"$@\" 1>&2".into(),
        "sh".into(),
    ];
    sh.append(&mut make_args);
    let mut cmd = match kdir_host {
        // A user's tree is built with the host's toolchain, the one that built the tree (as an
        // out-of-tree module of that tree would be), in the user's environment.
        Some(_) => {
            let mut c = Command::new(&sh[0]);
            c.args(&sh[1..]).env("LC_ALL", "C");
            c
        }
        // Debian's headers: chrooted into the root with its gcc and kbuild tools, in a private
        // mount namespace (through a user namespace when not root: building only reads the root
        // and writes in its world-writable /tmp, and the namespace's root has CAP_SYS_CHROOT and
        // may bind-mount). The host's /proc is bind-mounted at the root's /proc (7.x's objtool
        // reads it); the mount goes away with the namespace.
        None => {
            let mut c = Command::new("unshare");
            if !is_root() {
                c.arg("--map-root-user");
            }
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg("mount --rbind /proc \"$1/proc\" || exit 125; root=$1; shift; exec chroot \"$root\" \"$@\"")
                .arg("sh")
                .arg(kbuild_root)
                .args([
                    "/usr/bin/env",
                    "-i",
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                    "LC_ALL=C",
                    "HOME=/tmp",
                ])
                .args(&sh);
            c
        }
    };
    let started = std::time::Instant::now();
    let out = process::run_captured("make (guest kernel modules)", &mut cmd, BUILD_TIMEOUT, log)?;
    append_log(
        log,
        &format!(
            "pcisim: make ended ({}) after {:.1} s\n",
            describe_status(out.status),
            started.elapsed().as_secs_f64()
        ),
    )?;
    if !out.status.success() {
        return Err(KmodError::Build {
            status: describe_status(out.status),
            log: log.to_path_buf(),
        });
    }
    let text = fs::read_to_string(log).map_err(io_err("Cannot read", log))?;
    let names: Vec<String> = sources.files.iter().map(|(p, _)| p.clone()).collect();
    let ours = our_warnings(&text, &build_dir.display().to_string(), &names);
    for l in text
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("warning:"))
        .filter(|l| !ours.iter().any(|o| o == l))
    {
        warn!("guest kernel module build: {l}");
    }
    if let Some(first) = ours.first() {
        return Err(KmodError::Warnings {
            count: ours.len(),
            first: first.clone(),
            log: log.to_path_buf(),
        });
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn append_log(log: &Path, text: &str) -> Result<(), KmodError> {
    let mut f = fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err("Cannot write", log))?;
    f.write_all(text.as_bytes())
        .map_err(io_err("Cannot write", log))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// A minimal ELF64 relocatable for x86-64 with `.shstrtab` and a `.modinfo` section.
    pub(crate) fn module_elf(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little-endian
        b[6] = 1;
        b[0x10] = 1; // ET_REL
        b[0x12] = 62; // EM_X86_64
        let strtab_off = b.len();
        b.extend_from_slice(shstrtab);
        let modinfo_off = b.len();
        b.extend_from_slice(modinfo);
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        let shoff = b.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[4] = 1; // SHT_PROGBITS (STRTAB for .shstrtab; not checked)
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            b.extend_from_slice(&h);
        };
        sh(0, 0, 0); // SHN_UNDEF
        sh(1, strtab_off, shstrtab.len());
        sh(11, modinfo_off, modinfo.len());
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        b
    }

    const KVER: &str = "6.12.107+deb13-amd64";
    const INFO: &[u8] = b"license=GPL\0description=hello\0\0\0depends=\0name=hello\0vermagic=6.12.107+deb13-amd64 SMP preempt mod_unload modversions \0";

    #[test]
    fn test_modinfo_and_vermagic_parsed_from_elf() {
        let elf = module_elf(INFO);
        let info = modinfo(&elf).unwrap();
        assert_eq!(info[0], ("license".into(), "GPL".into()));
        assert!(info.contains(&("depends".into(), String::new())));
        assert!(info.contains(&("name".into(), "hello".into())));
        let v = vermagic(&elf).unwrap();
        assert_eq!(
            v,
            "6.12.107+deb13-amd64 SMP preempt mod_unload modversions "
        );
        assert!(vermagic_matches(&v, KVER));
    }

    #[test]
    fn test_vermagic_for_another_kernel_rejected() {
        let v = "6.12.107+deb13-amd64 SMP preempt mod_unload modversions ";
        assert!(!vermagic_matches(v, "6.12.107+deb13-cloud-amd64"));
        // A release that is only a prefix of the module's is another kernel.
        assert!(!vermagic_matches("6.12.1070+deb13-amd64 SMP ", "6.12.107"));
        assert!(!vermagic_matches("6.12.107+deb13-amd64-rt SMP", KVER));
        assert!(!vermagic_matches(v, ""));
        assert!(vermagic_matches(KVER, KVER));
    }

    #[test]
    fn test_modinfo_errors() {
        assert!(modinfo(b"#!/bin/sh\n").unwrap_err().contains("not an ELF"));
        let no_vermagic = module_elf(b"license=GPL\0");
        assert!(vermagic(&no_vermagic).unwrap_err().contains("no vermagic"));
        // No .modinfo: rename the section to .modinfX.
        let mut renamed = module_elf(INFO);
        let at = renamed.windows(8).position(|w| w == b".modinfo").unwrap();
        renamed[at + 7] = b'X';
        assert!(modinfo(&renamed).unwrap_err().contains("no .modinfo"));
        // Truncated before the section headers.
        let mut truncated = module_elf(INFO);
        truncated.truncate(100);
        assert!(modinfo(&truncated).is_err());
        // An executable is not a module.
        let mut exec = module_elf(INFO);
        exec[0x10] = 2;
        assert!(modinfo(&exec).unwrap_err().contains("ET_REL"));
    }

    #[test]
    fn test_check_module_reports_vermagic_mismatch() {
        let dir = scratch_dir("check");
        let path = dir.join("hello.ko");
        fs::write(&path, module_elf(INFO)).unwrap();
        let m = check_module("hello", &path, KVER).unwrap();
        assert_eq!(m.name, "hello");
        assert!(m.vermagic.starts_with(KVER));
        match check_module("hello", &path, "6.12.99+deb13-amd64") {
            Err(KmodError::Vermagic { vermagic, kver, .. }) => {
                assert!(vermagic.starts_with(KVER));
                assert_eq!(kver, "6.12.99+deb13-amd64");
            }
            other => panic!("expected a vermagic error, got {other:?}"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_kbuild_modules_parsed() {
        let kbuild = "# modules\nobj-m += pcisim_npu.o\nobj-m := b.o c.o # two\nobj-y += d.o\n\
                      obj-m += e.o \\\n  f.o\nccflags-y += -Werror\nobj-m += pcisim_npu.o\n";
        assert_eq!(kbuild_modules(kbuild), ["pcisim_npu", "b", "c", "e", "f"]);
        assert!(kbuild_modules("ccflags-y += -Werror\n").is_empty());
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pcisim-kmod-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_read_sources_skips_build_products_and_needs_c() {
        let dir = scratch_dir("sources");
        // No .c file: nothing to build, even with a Kbuild.
        fs::write(dir.join("Kbuild"), "obj-m += npu.o\n").unwrap();
        fs::write(dir.join("npu_uapi.h"), "#define X 1\n").unwrap();
        assert_eq!(read_sources(&dir).unwrap(), None);
        fs::write(dir.join("npu.c"), "int x;\n").unwrap();
        for product in [
            "npu.o",
            "npu.ko",
            "npu.mod.c",
            ".npu.o.cmd",
            "modules.order",
        ] {
            fs::write(dir.join(product), "x").unwrap();
        }
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/helper.h"), "#define Y 2\n").unwrap();
        let s = read_sources(&dir).unwrap().unwrap();
        let names: Vec<&str> = s.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["Kbuild", "npu.c", "npu_uapi.h", "sub/helper.h"]);
        assert_eq!(s.modules, ["npu"]);
        // C files without a Kbuild are an error, not a silent skip.
        fs::remove_file(dir.join("Kbuild")).unwrap();
        assert!(matches!(read_sources(&dir), Err(KmodError::NoKbuild(_))));
        fs::write(dir.join("Kbuild"), "ccflags-y += -Werror\n").unwrap();
        assert!(matches!(read_sources(&dir), Err(KmodError::NoModules(_))));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read_sources(&dir).unwrap(), None);
    }

    fn sources(files: &[(&str, &str)]) -> Sources {
        let mut files: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(p, d)| (p.to_string(), d.as_bytes().to_vec()))
            .collect();
        files.sort();
        Sources {
            dir: PathBuf::from("/src"),
            files,
            modules: vec!["npu".into()],
        }
    }

    #[test]
    fn test_cache_key_changes_with_sources_kernel_and_headers() {
        let base = sources(&[("Kbuild", "obj-m += npu.o\n"), ("npu.c", "int x;\n")]);
        let key = cache_key(&base, KVER, b"symvers");
        assert_eq!(key.len(), 16);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        // Deterministic, and independent of the source directory's location.
        let mut moved = base.clone();
        moved.dir = PathBuf::from("/elsewhere");
        assert_eq!(cache_key(&moved, KVER, b"symvers"), key);
        // One byte of a source, a file name, an added file, the kernel, the headers: new keys.
        let variants = [
            cache_key(
                &sources(&[("Kbuild", "obj-m += npu.o\n"), ("npu.c", "int y;\n")]),
                KVER,
                b"symvers",
            ),
            cache_key(
                &sources(&[("Kbuild", "obj-m += npu.o\n"), ("npu2.c", "int x;\n")]),
                KVER,
                b"symvers",
            ),
            cache_key(
                &sources(&[
                    ("Kbuild", "obj-m += npu.o\n"),
                    ("npu.c", "int x;\n"),
                    ("npu.h", ""),
                ]),
                KVER,
                b"symvers",
            ),
            cache_key(&base, "6.12.108+deb13-amd64", b"symvers"),
            cache_key(&base, KVER, b"symverz"),
            // Field boundaries count: "ab"+"c" is not "a"+"bc".
            cache_key(
                &sources(&[("Kbuild", "obj-m += npu.o\nn"), ("pu.c", "int x;\n")]),
                KVER,
                b"symvers",
            ),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, key, "variant {i} must change the key");
        }
    }

    #[test]
    fn test_our_warnings_only_for_our_files() {
        let log = "\
make: Entering directory '/usr/src/linux-headers-6.12.107+deb13-amd64'
  CC [M]  /tmp/pcisim-kmod/build.k.1/npu.o
/tmp/pcisim-kmod/build.k.1/npu.c:9:5: warning: no previous prototype for 'f' [-Wmissing-prototypes]
/usr/src/linux-headers-6.12.107+deb13-common/include/linux/x.h:1:1: warning: something in the kernel
WARNING: modpost: missing MODULE_DESCRIPTION() in /tmp/pcisim-kmod/build.k.1/npu.o
npu.c:12: warning: Function parameter or struct member 'x' not described in 'g'
  LD [M]  /tmp/pcisim-kmod/build.k.1/npu.ko
";
        let names = vec!["Kbuild".to_string(), "npu.c".to_string()];
        let w = our_warnings(log, "/tmp/pcisim-kmod/build.k.1", &names);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("missing-prototypes"));
        assert!(w[1].starts_with("WARNING: modpost"));
        assert!(w[2].starts_with("npu.c:12:"));
        assert!(our_warnings("  CC [M]  /tmp/x/npu.o\n", "/tmp/x", &names).is_empty());
    }

    #[test]
    fn test_guest_paths() {
        assert_eq!(
            guest_module_path(KVER, NPU_MODULE),
            "/lib/modules/6.12.107+deb13-amd64/extra/pcisim_npu.ko"
        );
        assert_eq!(
            guest_module_path_sh("pcisim_npu"),
            "/lib/modules/$(uname -r)/extra/pcisim_npu.ko"
        );
    }

    #[test]
    fn test_prune_keeps_recent_and_current() {
        let dir = scratch_dir("prune");
        let keys: Vec<String> = (0..CACHE_KEEP + 3).map(|i| format!("{i:016x}")).collect();
        for (i, k) in keys.iter().enumerate() {
            let d = dir.join(k);
            fs::create_dir_all(&d).unwrap();
            let t = UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64 * 10);
            fs::File::create(d.join(".used"))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        fs::create_dir_all(dir.join("notakey")).unwrap();
        // The oldest is the current one: it stays whatever its age.
        prune_cache(&dir, &keys[0]);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected: Vec<String> = keys[keys.len() - (CACHE_KEEP - 1)..].to_vec();
        expected.push(keys[0].clone());
        expected.push("notakey".into());
        expected.sort();
        assert_eq!(left, expected);
        fs::remove_dir_all(&dir).unwrap();
    }
}
