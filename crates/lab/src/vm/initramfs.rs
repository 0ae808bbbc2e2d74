//! The guest's initramfs: a newc cpio archive written in Rust (no external `cpio`), with busybox,
//! the vfio kernel modules (resolved from `modules.dep`, decompressed on the host), the guest
//! programs and an `/init` that loads the modules and `exec`s the guest agent.
//!
//! ```text
//! /init                         shell script (busybox sh), see [`init_script`]
//! /bin/busybox, /bin/sh, ...    busybox and its applet symlinks
//! /bin/pcisim-guest             the guest programs (static)
//! /lib/modules/<kver>/...       vfio_pci and its dependencies as plain .ko, plus a modules.dep
//! /lib/modules/<kver>/extra/    our own guest modules (crate::vm::kmod), NOT loaded by /init
//! /dev/console                  so /init has a console even before devtmpfs is mounted
//! ```
//!
//! Our own modules (`extra/<name>.ko`) are loaded by the scenarios, with their parameters
//! (`insmod /lib/modules/$(uname -r)/extra/pcisim_npu.ko param=...`). The kernel modules they
//! depend on (their `.modinfo` `depends=`) are put in the archive and loaded by /init, so a
//! plain `insmod` works; `modules.dep` lists the extras too, so `modprobe <name>` works as well.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use log::{debug, warn};

/// The modules the guest needs for vfio, before dependency resolution. `vfio_iommu_type1` is only
/// a soft dependency of `vfio` (not in `modules.dep`), so it is named explicitly.
pub const VFIO_MODULES: &[&str] = &["vfio_pci", "vfio_iommu_type1"];

/// The modules every lab guest loads for `--share` (virtio-9p; `netfs` and the rest follow
/// from `modules.dep`). A kernel that has them built in needs nothing here.
pub const SHARE_MODULES: &[&str] = &["9p", "9pnet_virtio"];

/// Errors while building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading an input or writing the archive failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done ("Cannot read").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A member could not be added to the archive (bad or duplicate path, too large).
    #[error("Cannot add to the initramfs: {0}")]
    Archive(String),
    /// `modules.dep` has a line that is not `path: deps...`.
    #[error("modules.dep line {line}: {text:?}")]
    BadModulesDep {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A module is neither in `modules.dep` nor built in.
    #[error("Kernel module {0} not found in modules.dep or modules.builtin")]
    ModuleNotFound(String),
    /// `modules.dep` has a dependency cycle.
    #[error("Dependency cycle through kernel module {0}")]
    ModuleCycle(String),
    /// A module file is compressed in a way we cannot undo.
    #[error("Unsupported kernel module compression: {0}")]
    UnsupportedCompression(PathBuf),
    /// An `.xz` module did not decompress.
    #[error("Cannot decompress {path}: {reason}")]
    Decompress {
        /// The module file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// One of our modules cannot be added (unreadable `.modinfo`, bad name).
    #[error("Cannot add guest module {path}: {reason}")]
    ExtraModule {
        /// The `.ko` file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `busybox --list-full` failed.
    #[error("Cannot list the applets of {path}: {reason}")]
    Busybox {
        /// The busybox binary.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InitramfsError {
    let path = path.to_path_buf();
    move |source| InitramfsError::Io { what, path, source }
}

// ---------------------------------------------------------------------------------------------
// newc cpio
// ---------------------------------------------------------------------------------------------

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// The newc magic.
const NEWC_MAGIC: &[u8; 6] = b"070701";
/// The name of the last member.
const TRAILER: &str = "TRAILER!!!";

/// Writes a newc ("SVR4 no CRC") cpio archive, the format the kernel unpacks into its rootfs.
///
/// Paths are relative (`bin/busybox`); parent directories are added automatically (mode 0755)
/// the first time a path below them is added, because the kernel does not create missing parents.
/// Owners are root, timestamps are 0, so the archive is reproducible.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    paths: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// A writer emitting to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            paths: HashSet::new(),
        }
    }

    /// Adds a directory (and its missing parents).
    pub fn add_dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = Self::clean(path)?;
        if self.paths.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.entry(&path, S_IFDIR | (perm & 0o7777), 2, 0, &[])
    }

    /// Adds a regular file.
    pub fn add_file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = self.new_path(path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), 1, 0, data)
    }

    /// Adds a symbolic link to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = self.new_path(path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn add_char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let path = self.new_path(path)?;
        let rdev = (u64::from(major) << 32) | u64::from(minor);
        self.entry(&path, S_IFCHR | (perm & 0o7777), 1, rdev, &[])
    }

    /// Whether `path` was added (explicitly or as a parent).
    pub fn contains(&self, path: &str) -> bool {
        Self::clean(path).is_ok_and(|p| self.paths.contains(&p))
    }

    /// Writes the trailer, pads the archive to a 512-byte multiple and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, 0, &[])?;
        let pad = (512 - (self.written % 512)) % 512;
        self.write(&vec![0u8; pad as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn clean(path: &str) -> io::Result<String> {
        let p = path.trim_start_matches('/').trim_end_matches('/');
        let ok = !p.is_empty()
            && p != TRAILER
            && !p.contains('\0')
            && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
        if ok {
            Ok(p.to_string())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid archive path {path:?}"),
            ))
        }
    }

    fn new_path(&mut self, path: &str) -> io::Result<String> {
        let path = Self::clean(path)?;
        if self.paths.contains(&path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("duplicate archive path {path:?}"),
            ));
        }
        self.parents(&path)?;
        Ok(path)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if !self.paths.contains(&prefix) {
                let dir = prefix.clone();
                self.entry(&dir, S_IFDIR | 0o755, 2, 0, &[])?;
            }
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4)) % 4;
        self.write(&[0u8; 3][..pad as usize])
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path:?} is too large"),
            )
        })?;
        let ino = if path == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = path.len() as u32 + 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            (rdev >> 32) as u32,
            rdev as u32,
            namesize,
            0, // check
        ];
        let mut header = Vec::with_capacity(110 + path.len() + 4);
        header.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        header.extend_from_slice(path.as_bytes());
        header.push(0);
        self.write(&header)?;
        self.pad4()?;
        self.write(data)?;
        self.pad4()?;
        if path != TRAILER {
            self.paths.insert(path.to_string());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel modules
// ---------------------------------------------------------------------------------------------

/// The module name of a module file path: `kernel/drivers/vfio/pci/vfio-pci.ko.xz` → `vfio_pci`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split('.').next().unwrap_or(base);
    stem.replace('-', "_")
}

/// The dependency information of a kernel's module tree (`modules.dep`, `modules.builtin`).
#[derive(Debug, Default)]
pub struct ModuleDeps {
    /// Module path (as in modules.dep) → the paths it depends on.
    deps: HashMap<String, Vec<String>>,
    /// Module name → its path.
    by_name: HashMap<String, String>,
    /// Names of modules built into the kernel.
    builtin: HashSet<String>,
    /// Module name → (`pre:` names, `post:` names) from `modules.softdep`.
    softdeps: HashMap<String, (Vec<String>, Vec<String>)>,
}

impl ModuleDeps {
    /// Parses `modules.dep` text (`path: dep dep ...` per line).
    pub fn parse(modules_dep: &str) -> Result<Self, InitramfsError> {
        let mut me = ModuleDeps::default();
        for (i, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) = line
                .split_once(':')
                .filter(|(p, _)| !p.trim().is_empty())
                .ok_or_else(|| InitramfsError::BadModulesDep {
                    line: i + 1,
                    text: line.to_string(),
                })?;
            let path = path.trim().to_string();
            let deps = deps.split_whitespace().map(str::to_string).collect();
            me.by_name.insert(module_name(&path), path.clone());
            me.deps.insert(path, deps);
        }
        Ok(me)
    }

    /// Adds the names listed in `modules.builtin` (one module path per line).
    pub fn add_builtin(&mut self, modules_builtin: &str) {
        self.builtin.extend(
            modules_builtin
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| module_name(l.trim())),
        );
    }

    /// Adds the soft dependencies of `modules.softdep` (`softdep MOD pre: A B post: C D`). Soft
    /// dependencies that do not exist for this kernel are ignored when resolving.
    pub fn add_softdeps(&mut self, modules_softdep: &str) {
        for line in modules_softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let entry = self.softdeps.entry(module.replace('-', "_")).or_default();
            let mut post = false;
            for w in words {
                match w {
                    "pre:" => post = false,
                    "post:" => post = true,
                    name if post => entry.1.push(name.replace('-', "_")),
                    name => entry.0.push(name.replace('-', "_")),
                }
            }
        }
    }

    /// Whether the kernel has module `name`, loadable or built in.
    pub fn has(&self, name: &str) -> bool {
        let name = name.replace('-', "_");
        self.by_name.contains_key(&name) || self.builtin.contains(&name)
    }

    /// Reads `modules.dep` and (if present) `modules.builtin` and `modules.softdep` from a
    /// `lib/modules/<kver>` dir.
    pub fn load(dir: &Path) -> Result<Self, InitramfsError> {
        let dep_path = dir.join("modules.dep");
        let text = fs::read_to_string(&dep_path).map_err(io_err("Cannot read", &dep_path))?;
        let mut me = Self::parse(&text)?;
        let builtin = dir.join("modules.builtin");
        match fs::read_to_string(&builtin) {
            Ok(text) => me.add_builtin(&text),
            Err(e) => debug!("no {}: {e}", builtin.display()),
        }
        let softdep = dir.join("modules.softdep");
        match fs::read_to_string(&softdep) {
            Ok(text) => me.add_softdeps(&text),
            Err(e) => debug!("no {}: {e}", softdep.display()),
        }
        Ok(me)
    }

    /// The module paths to load, dependencies first, for the given module names (`-` and `_`
    /// are equivalent). Soft dependencies are honoured (`pre:` before, `post:` after the module)
    /// when they exist. Built-in modules are skipped; each module appears once.
    pub fn load_order(&self, roots: &[&str]) -> Result<Vec<String>, InitramfsError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut active = HashSet::new();
        for root in roots {
            let name = root.replace('-', "_");
            match self.by_name.get(&name) {
                Some(path) => self.visit(path, &mut order, &mut done, &mut active)?,
                None if self.builtin.contains(&name) => debug!("module {name} is built in"),
                None => return Err(InitramfsError::ModuleNotFound(name)),
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        order: &mut Vec<String>,
        done: &mut HashSet<String>,
        active: &mut HashSet<String>,
    ) -> Result<(), InitramfsError> {
        if done.contains(path) {
            return Ok(());
        }
        if !active.insert(path.to_string()) {
            return Err(InitramfsError::ModuleCycle(module_name(path)));
        }
        let deps = self
            .deps
            .get(path)
            .ok_or_else(|| InitramfsError::ModuleNotFound(module_name(path)))?;
        let (pre, post) = self
            .softdeps
            .get(&module_name(path))
            .map(|(a, b)| (a.as_slice(), b.as_slice()))
            .unwrap_or_default();
        let existing = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter_map(|n| self.by_name.get(n).cloned())
                .collect()
        };
        for dep in existing(pre).iter().chain(deps) {
            self.visit(dep, order, done, active)?;
        }
        active.remove(path);
        done.insert(path.to_string());
        order.push(path.to_string());
        for dep in existing(post) {
            // A post dependency may depend on this module (vfio_iommu_type1 on vfio).
            self.visit(&dep, order, done, active)?;
        }
        Ok(())
    }
}

/// Reads a module file, decompressing `.ko.xz`. Returns the `.ko` bytes.
pub fn read_module(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let name = path.to_string_lossy();
    let data = fs::read(path).map_err(io_err("Cannot read", path))?;
    if name.ends_with(".ko") {
        Ok(data)
    } else if name.ends_with(".ko.xz") {
        let mut out = Vec::with_capacity(data.len() * 4);
        lzma_rs::xz_decompress(&mut io::Cursor::new(&data), &mut out).map_err(|e| {
            InitramfsError::Decompress {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(out)
    } else {
        Err(InitramfsError::UnsupportedCompression(path.to_path_buf()))
    }
}

/// `kernel/x/vfio.ko.xz` → `kernel/x/vfio.ko`.
fn plain_ko_path(path: &str) -> String {
    match path.find(".ko") {
        Some(i) => format!("{}.ko", &path[..i]),
        None => path.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The guest's /init and the whole archive
// ---------------------------------------------------------------------------------------------

/// Marker line /init prints on the console once the modules are loaded.
pub const INIT_READY_MARKER: &str = "pcisim-init: starting agent";

/// The `/init` script: mounts proc/sys/devtmpfs, loads `modules` (paths relative to
/// `/lib/modules/<kver>`, in order), prints [`INIT_READY_MARKER`] and `exec`s the guest agent on
/// `agent_port`.
pub fn init_script(kver: &str, modules: &[String], agent_port: &str) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh
# pcisim lab guest init (generated by pcisim-lab; do not edit)
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
[ -e /bin/sh ] || /bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo \"pcisim-init: kernel $(uname -r), loading modules\"
failed=
",
    );
    s.push_str(&format!("cd /lib/modules/{kver}\n"));
    for m in modules {
        s.push_str(&format!(
            "insmod {m} || failed=\"$failed {}\"\n",
            module_name(m)
        ));
    }
    s.push_str("cd /\n");
    s.push_str("[ -z \"$failed\" ] || echo \"pcisim-init: insmod failed:$failed\"\n");
    s.push_str(&share_mounts_script());
    s.push_str(&format!(
        "echo \"{INIT_READY_MARKER} on {agent_port} at $(cut -d' ' -f1 /proc/uptime) s\"\n"
    ));
    s.push_str(&format!(
        "exec /bin/pcisim-guest agent --port {agent_port}\n"
    ));
    s
}

/// The part of /init that mounts each `pcisim.share=TAG:PATH` of the kernel command line
/// (`--share`): 9p over virtio, `cache=none` so a write on either side shows at once on the
/// other, a large msize for throughput.
fn share_mounts_script() -> String {
    format!(
        "for a in $(cat /proc/cmdline); do
  case $a in {param}=*:*)
    v=${{a#{param}=}}; tag=${{v%%:*}}; p=${{v#*:}}; cache=none
    case \" $(cat /proc/cmdline) \" in *\" {cached}=$tag \"*) cache=loose;; esac
    mkdir -p \"$p\" && mount -t 9p -o trans=virtio,version=9p2000.L,msize={msize},cache=$cache,access=any \"$tag\" \"$p\" \\
      && echo \"pcisim-init: share $tag mounted at $p\" || echo \"pcisim-init: mounting share $tag at $p failed\"
  ;; esac
done
",
        param = crate::vm::qemu::SHARE_PARAM,
        cached = crate::vm::qemu::SHARE_CACHED_PARAM,
        msize = crate::vm::qemu::SHARE_MSIZE,
    )
}

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// A static busybox.
    pub busybox: PathBuf,
    /// The static `pcisim-guest` binary.
    pub guest_bin: PathBuf,
    /// The guest kernel's `lib/modules/<kver>` directory.
    pub modules_dir: PathBuf,
    /// The guest kernel release.
    pub kver: String,
    /// Modules to load at boot (dependencies are added).
    pub modules: Vec<String>,
    /// Our own built modules (`.ko` files on the host, e.g. from [`crate::vm::kmod::build`]): put in
    /// `lib/modules/<kver>/extra/<file name>`, not loaded at boot (their dependencies are).
    pub extra_modules: Vec<PathBuf>,
    /// The serial port of the agent, e.g. `/dev/ttyS1`.
    pub agent_port: String,
    /// A Debian root to take the guest userland from ([`USERLAND_PROGRAMS`] with their shared
    /// libraries and loader, and `pci.ids`); `None`: busybox only.
    pub userland_root: Option<PathBuf>,
}

/// The Debian programs the guest gets beyond busybox (paths in the root and in the guest), for
/// kernel work: bash for scripts, lspci/setpci (pciutils; busybox's lspci lacks `-vvv`, `-xxx`
/// and names).
pub const USERLAND_PROGRAMS: &[&str] = &["usr/bin/bash", "usr/bin/lspci", "usr/bin/setpci"];

/// Data files copied with them (`lspci` reads its names from here).
pub const USERLAND_DATA: &[&str] = &["usr/share/misc/pci.ids"];

/// Where the guest's loader and libraries go (Debian's multiarch directory, which its loader
/// searches without an `ld.so.cache`).
const GUEST_LIBDIR: &str = "usr/lib/x86_64-linux-gnu";

/// One file of the guest userland.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserlandFile {
    /// Its path in the archive (relative).
    pub guest: String,
    /// Where it is read from on the host.
    pub host: PathBuf,
    /// Executable.
    pub exec: bool,
}

/// The shared libraries `program` needs, resolved inside `root` by the root's own loader
/// (`ld.so --list`, which does not run the program): `(soname, host path)` pairs, the loader
/// itself included under its PT_INTERP path (`/lib64/ld-linux-x86-64.so.2`).
pub fn resolve_libraries(root: &Path, program: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let loader = root.join("usr/lib64/ld-linux-x86-64.so.2");
    let libpath = format!(
        "{}:{}",
        root.join("usr/lib/x86_64-linux-gnu").display(),
        root.join("lib/x86_64-linux-gnu").display()
    );
    let out = Command::new(&loader)
        .arg("--library-path")
        .arg(&libpath)
        .arg("--list")
        .arg(program)
        .output()
        .map_err(|e| format!("{} --list {}: {e}", loader.display(), program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --list {}: {} {}",
            loader.display(),
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_ld_list(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `ld.so --list` output (`libc.so.6 => /path/libc.so.6 (0x...)`; the vdso has no
/// `=>`); "not found" is an error.
pub fn parse_ld_list(text: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once("=>") else {
            continue;
        };
        let name = name.trim();
        let path = rest.trim().split(" (").next().unwrap_or("").trim();
        if path.is_empty() || path == "not found" {
            return Err(format!("{name}: not found"));
        }
        libs.push((name.to_string(), PathBuf::from(path)));
    }
    Ok(libs)
}

/// The guest userland files from `root`: each of [`USERLAND_PROGRAMS`] that the root has (a
/// missing one is logged and left out: run the provisioning again), its libraries in
/// [`GUEST_LIBDIR`], the loader at its PT_INTERP path, and [`USERLAND_DATA`].
pub fn userland_files(root: &Path) -> Vec<UserlandFile> {
    let mut files: Vec<UserlandFile> = Vec::new();
    let add = |files: &mut Vec<UserlandFile>, f: UserlandFile| {
        if !files.iter().any(|x| x.guest == f.guest) {
            files.push(f);
        }
    };
    for prog in USERLAND_PROGRAMS {
        let host = root.join(prog);
        if !host.is_file() {
            warn!(
                "initramfs: {} is missing (qemu-scripts/provision.sh installs it): the guest has no {}",
                host.display(),
                prog.rsplit('/').next().unwrap_or(prog)
            );
            continue;
        }
        let libs = match resolve_libraries(root, &host) {
            Ok(l) => l,
            Err(e) => {
                warn!("initramfs: leaving out {prog}: {e}");
                continue;
            }
        };
        add(
            &mut files,
            UserlandFile {
                guest: prog.to_string(),
                host,
                exec: true,
            },
        );
        for (name, path) in libs {
            let guest = if name.starts_with('/') {
                name.trim_start_matches('/').to_string()
            } else {
                format!("{GUEST_LIBDIR}/{name}")
            };
            add(
                &mut files,
                UserlandFile {
                    guest,
                    host: path,
                    exec: true,
                },
            );
        }
    }
    for data in USERLAND_DATA {
        let host = root.join(data);
        if host.is_file() {
            add(
                &mut files,
                UserlandFile {
                    guest: data.to_string(),
                    host,
                    exec: false,
                },
            );
        } else {
            warn!("initramfs: {} is missing", host.display());
        }
    }
    files
}

/// What [`build`] produced.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The archive.
    pub path: PathBuf,
    /// The module paths loaded by /init, in order.
    pub modules: Vec<String>,
    /// The paths of our own modules in the guest (`/lib/modules/<kver>/extra/<name>.ko`).
    pub extra_modules: Vec<String>,
    /// The archive's size in bytes.
    pub size: u64,
}

/// The applet paths of `busybox` (`bin/sh`, `sbin/insmod`, ...) from `busybox --list-full`.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, InitramfsError> {
    let err = |reason: String| InitramfsError::Busybox {
        path: busybox.to_path_buf(),
        reason,
    };
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!("{}", out.status)));
    }
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if list.is_empty() {
        return Err(err("empty applet list".into()));
    }
    Ok(list)
}

/// Builds the initramfs described by `spec` into `out`.
pub fn build(spec: &InitramfsSpec, out: &Path) -> Result<Initramfs, InitramfsError> {
    let deps = ModuleDeps::load(&spec.modules_dir)?;
    let extras = read_extra_modules(&spec.extra_modules)?;
    let extra_names: Vec<&str> = extras.iter().map(|e| e.name.as_str()).collect();
    // /init loads the boot modules and what our own modules depend on (not those themselves).
    let mut roots: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    for m in SHARE_MODULES {
        if deps.has(m) {
            roots.push(m);
        } else {
            warn!(
                "initramfs: kernel {} has no module {m}: --share will not work",
                spec.kver
            );
        }
    }
    for e in &extras {
        roots.extend(
            e.depends
                .iter()
                .map(String::as_str)
                .filter(|d| !extra_names.contains(d)),
        );
    }
    let order = deps.load_order(&roots)?;
    let busybox = fs::read(&spec.busybox).map_err(io_err("Cannot read", &spec.busybox))?;
    let applets = busybox_applets(&spec.busybox)?;
    let guest = fs::read(&spec.guest_bin).map_err(io_err("Cannot read", &spec.guest_bin))?;
    let mut modules = Vec::new();
    for path in &order {
        let data = read_module(&spec.modules_dir.join(path))?;
        debug!("initramfs: module {path} ({} bytes as .ko)", data.len());
        modules.push((plain_ko_path(path), data));
    }
    let loaded: Vec<String> = modules.iter().map(|(p, _)| p.clone()).collect();
    let init = init_script(&spec.kver, &loaded, &spec.agent_port);

    let mut cpio = CpioWriter::new(Vec::new());
    let member = |e: io::Error| InitramfsError::Archive(e.to_string());
    for dir in [
        "dev", "proc", "sys", "tmp", "run", "root", "bin", "sbin", "usr/bin", "usr/sbin",
    ] {
        cpio.add_dir(dir, 0o755).map_err(member)?;
    }
    cpio.add_char_device("dev/console", 0o600, 5, 1)
        .map_err(member)?;
    cpio.add_file("bin/busybox", 0o755, &busybox)
        .map_err(member)?;
    // The Debian userland first: a busybox applet of the same name (bash, lspci) is left out, so
    // PATH finds the real one.
    let userland = spec
        .userland_root
        .as_deref()
        .map(userland_files)
        .unwrap_or_default();
    let mut taken: HashSet<String> = HashSet::new();
    for f in &userland {
        let data = fs::read(&f.host).map_err(io_err("Cannot read", &f.host))?;
        cpio.add_file(&f.guest, if f.exec { 0o755 } else { 0o644 }, &data)
            .map_err(member)?;
        if f.exec && USERLAND_PROGRAMS.contains(&f.guest.as_str()) {
            taken.insert(f.guest.rsplit('/').next().unwrap_or("").to_string());
        }
    }
    if taken.contains("bash") && !cpio.contains("bin/bash") {
        cpio.add_symlink("bin/bash", "/usr/bin/bash")
            .map_err(member)?;
    }
    for applet in &applets {
        let base = applet.rsplit('/').next().unwrap_or(applet);
        if cpio.contains(applet) || taken.contains(base) {
            continue;
        }
        if let Err(e) = cpio.add_symlink(applet, "/bin/busybox") {
            warn!("initramfs: skipping busybox applet {applet}: {e}");
        }
    }
    cpio.add_file("bin/pcisim-guest", 0o755, &guest)
        .map_err(member)?;
    let moddir = format!("lib/modules/{}", spec.kver);
    for (path, data) in &modules {
        cpio.add_file(&format!("{moddir}/{path}"), 0o644, data)
            .map_err(member)?;
    }
    let mut extra_paths = Vec::new();
    for e in &extras {
        let rel = format!("{}/{}.ko", crate::vm::kmod::EXTRA_DIR, e.name);
        debug!("initramfs: our module {rel} ({} bytes)", e.data.len());
        cpio.add_file(&format!("{moddir}/{rel}"), 0o644, &e.data)
            .map_err(member)?;
        extra_paths.push(format!("/{moddir}/{rel}"));
    }
    let mut dep_text = subset_modules_dep(&deps, &order);
    dep_text.push_str(&extra_modules_dep(&deps, &extras)?);
    cpio.add_file(&format!("{moddir}/modules.dep"), 0o644, dep_text.as_bytes())
        .map_err(member)?;
    cpio.add_file("init", 0o755, init.as_bytes())
        .map_err(member)?;
    let bytes = cpio.finish().map_err(member)?;
    fs::write(out, &bytes).map_err(io_err("Cannot write", out))?;
    Ok(Initramfs {
        path: out.to_path_buf(),
        modules: loaded,
        extra_modules: extra_paths,
        size: bytes.len() as u64,
    })
}

/// One of our own modules, read for the archive.
struct ExtraModule {
    /// Its name (the file stem, `-` as `_`).
    name: String,
    /// The module names of its `.modinfo` `depends=`.
    depends: Vec<String>,
    /// The `.ko` bytes.
    data: Vec<u8>,
}

fn read_extra_modules(paths: &[PathBuf]) -> Result<Vec<ExtraModule>, InitramfsError> {
    let mut out: Vec<ExtraModule> = Vec::new();
    for path in paths {
        let bad = |reason: String| InitramfsError::ExtraModule {
            path: path.clone(),
            reason,
        };
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(stem) = file.strip_suffix(".ko") else {
            return Err(bad("not a .ko file".into()));
        };
        let name = stem.replace('-', "_");
        if name.is_empty() || name.contains('.') {
            return Err(bad(format!("bad module name {name:?}")));
        }
        if out.iter().any(|e| e.name == name) {
            return Err(bad(format!("a module named {name} is already added")));
        }
        let data = fs::read(path).map_err(io_err("Cannot read", path))?;
        let info = crate::vm::kmod::modinfo(&data).map_err(bad)?;
        let depends = info
            .iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| v.split(','))
            .map(|d| d.trim().replace('-', "_"))
            .filter(|d| !d.is_empty())
            .collect();
        out.push(ExtraModule {
            name,
            depends,
            data,
        });
    }
    Ok(out)
}

/// `modules.dep` lines for our modules: each one's dependencies (transitively, last to load
/// first, as depmod writes them), with the `.ko` paths the archive holds.
fn extra_modules_dep(deps: &ModuleDeps, extras: &[ExtraModule]) -> Result<String, InitramfsError> {
    let mut text = String::new();
    for e in extras {
        let mut paths: Vec<String> = Vec::new();
        for d in &e.depends {
            if extras.iter().any(|x| &x.name == d) {
                paths.push(format!("{}/{d}.ko", crate::vm::kmod::EXTRA_DIR));
            } else {
                let order = deps.load_order(&[d.as_str()])?;
                paths.extend(order.iter().map(|p| plain_ko_path(p)));
            }
        }
        paths.reverse();
        let mut seen = HashSet::new();
        paths.retain(|p| seen.insert(p.clone()));
        text.push_str(&format!(
            "{}/{}.ko: {}\n",
            crate::vm::kmod::EXTRA_DIR,
            e.name,
            paths.join(" ")
        ));
    }
    Ok(text)
}

/// A `modules.dep` for just the modules in `order`, with `.ko` paths (what the archive holds), so
/// that `modprobe` works in the guest for them.
fn subset_modules_dep(deps: &ModuleDeps, order: &[String]) -> String {
    let included: HashSet<&String> = order.iter().collect();
    let mut text = String::new();
    for path in order {
        let deps_of: Vec<String> = deps
            .deps
            .get(path)
            .map(|d| {
                d.iter()
                    .filter(|p| included.contains(p))
                    .map(|p| plain_ko_path(p))
                    .collect()
            })
            .unwrap_or_default();
        text.push_str(&format!("{}: {}\n", plain_ko_path(path), deps_of.join(" ")));
    }
    text
}

/// Appends each of `extra` (newc archives) to the initramfs at `initrd`: the kernel unpacks
/// concatenated archives in order (`SuiteOptions::extra_initramfs`).
pub fn append_archives(initrd: &Path, extra: &[PathBuf]) -> Result<(), InitramfsError> {
    let io_err = |source| InitramfsError::Io {
        what: "Cannot append an archive to",
        path: initrd.to_path_buf(),
        source,
    };
    if extra.is_empty() {
        return Ok(());
    }
    let mut out = fs::OpenOptions::new()
        .append(true)
        .open(initrd)
        .map_err(io_err)?;
    for a in extra {
        let mut f = fs::File::open(a).map_err(io_err)?;
        std::io::copy(&mut f, &mut out).map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One member of a parsed newc archive.
    #[derive(Debug, PartialEq)]
    pub struct Member {
        pub name: String,
        pub mode: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// A strict newc parser: checks magic, alignment, the trailer and the 512-byte padding.
    pub fn parse_newc(bytes: &[u8]) -> Vec<Member> {
        let mut pos = 0usize;
        let mut out = Vec::new();
        loop {
            assert_eq!(pos % 4, 0, "header alignment");
            let h = &bytes[pos..pos + 110];
            assert_eq!(&h[..6], NEWC_MAGIC);
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let mode = field(1);
            let size = field(6) as usize;
            let rdev = (field(9), field(10));
            let namesize = field(11) as usize;
            let name_start = pos + 110;
            let name = &bytes[name_start..name_start + namesize];
            assert_eq!(name[namesize - 1], 0, "name NUL");
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_start = (name_start + namesize).next_multiple_of(4);
            let data = bytes[data_start..data_start + size].to_vec();
            pos = (data_start + size).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(bytes.len() % 512, 0, "archive padded to 512");
                assert!(bytes[pos..].iter().all(|&b| b == 0));
                return out;
            }
            out.push(Member {
                name,
                mode,
                rdev,
                data,
            });
        }
    }

    #[test]
    fn test_cpio_round_trip_files_links_dirs_devices() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        w.add_file("lib/modules/6.12/kernel/vfio.ko", 0o644, b"abcde")
            .unwrap();
        w.add_symlink("bin/sh", "/bin/busybox").unwrap();
        w.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        w.add_dir("tmp/", 0o1777).unwrap();
        assert!(w.contains("lib/modules"));
        let bytes = w.finish().unwrap();
        let members = parse_newc(&bytes);
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.12",
                "lib/modules/6.12/kernel",
                "lib/modules/6.12/kernel/vfio.ko",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "tmp"
            ]
        );
        assert_eq!(members[0].mode, S_IFREG | 0o755);
        assert_eq!(members[0].data, b"#!/bin/sh\n");
        assert_eq!(members[1].mode, S_IFDIR | 0o755);
        assert_eq!(members[5].data, b"abcde");
        assert_eq!(members[7].mode, S_IFLNK | 0o777);
        assert_eq!(members[7].data, b"/bin/busybox");
        assert_eq!(members[9].mode, S_IFCHR | 0o600);
        assert_eq!(members[9].rdev, (5, 1));
        assert_eq!(members[10].mode, S_IFDIR | 0o1777);
    }

    #[test]
    fn test_cpio_rejects_duplicates_and_bad_paths() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_file("a/b", 0o644, b"").unwrap();
        assert!(w.add_file("a/b", 0o644, b"").is_err());
        assert!(w.add_symlink("/a/b", "x").is_err());
        assert!(w.add_file("a/../etc", 0o644, b"").is_err());
        assert!(w.add_file("", 0o644, b"").is_err());
        assert!(w.add_file(TRAILER, 0o644, b"").is_err());
        // A directory added twice is fine (mkdir -p semantics).
        w.add_dir("a", 0o755).unwrap();
        let members = parse_newc(&w.finish().unwrap());
        assert_eq!(members.len(), 2);
    }

    #[test]
    fn test_cpio_empty_archive_is_just_trailer() {
        let bytes = CpioWriter::new(Vec::new()).finish().unwrap();
        assert_eq!(bytes.len(), 512);
        assert!(parse_newc(&bytes).is_empty());
    }

    const DEP: &str = "\
kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz kernel/drivers/iommu/iommufd/iommufd.ko.xz
kernel/drivers/vfio/pci/vfio-pci-core.ko.xz: kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz kernel/drivers/iommu/iommufd/iommufd.ko.xz
kernel/drivers/vfio/vfio.ko.xz: kernel/drivers/iommu/iommufd/iommufd.ko.xz
kernel/drivers/vfio/vfio_iommu_type1.ko.xz: kernel/drivers/vfio/vfio.ko.xz kernel/drivers/iommu/iommufd/iommufd.ko.xz
kernel/drivers/iommu/iommufd/iommufd.ko.xz:
kernel/virt/lib/irqbypass.ko.xz:
kernel/drivers/net/dummy.ko.xz:
";

    #[test]
    fn test_module_name_normalises() {
        assert_eq!(
            module_name("kernel/drivers/vfio/pci/vfio-pci.ko.xz"),
            "vfio_pci"
        );
        assert_eq!(module_name("vfio_iommu_type1.ko"), "vfio_iommu_type1");
        assert_eq!(plain_ko_path("a/b-c.ko.xz"), "a/b-c.ko");
    }

    #[test]
    fn test_load_order_dependencies_first_once_each() {
        let deps = ModuleDeps::parse(DEP).unwrap();
        let order = deps.load_order(VFIO_MODULES).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "iommufd",
                "vfio",
                "irqbypass",
                "vfio_pci_core",
                "vfio_pci",
                "vfio_iommu_type1"
            ]
        );
        // Every module comes after all its dependencies.
        for (i, path) in order.iter().enumerate() {
            for dep in &deps.deps[path] {
                let j = order.iter().position(|p| p == dep).unwrap();
                assert!(j < i, "{dep} must precede {path}");
            }
        }
    }

    #[test]
    fn test_load_order_builtin_skipped_unknown_rejected() {
        let mut deps = ModuleDeps::parse(DEP).unwrap();
        deps.add_builtin("kernel/drivers/iommu/intel/intel-iommu.ko\n");
        let order = deps.load_order(&["intel_iommu", "irqbypass"]).unwrap();
        assert_eq!(order, ["kernel/virt/lib/irqbypass.ko.xz"]);
        assert!(matches!(
            deps.load_order(&["nvidia"]),
            Err(InitramfsError::ModuleNotFound(n)) if n == "nvidia"
        ));
    }

    #[test]
    fn test_load_order_softdeps_pre_and_post() {
        let mut deps = ModuleDeps::parse(DEP).unwrap();
        deps.add_softdeps(
            "# comment\nsoftdep vfio post: vfio_iommu_type1 vfio_iommu_spapr_tce\nsoftdep vfio-pci pre: dummy\n",
        );
        let order = deps.load_order(&["vfio_pci"]).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "dummy",
                "iommufd",
                "vfio",
                "vfio_iommu_type1",
                "irqbypass",
                "vfio_pci_core",
                "vfio_pci"
            ]
        );
    }

    #[test]
    fn test_load_order_cycle_detected() {
        let deps = ModuleDeps::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(
            deps.load_order(&["a"]),
            Err(InitramfsError::ModuleCycle(_))
        ));
        assert!(ModuleDeps::parse("no colon here\n").is_err());
    }

    #[test]
    fn test_init_script_loads_modules_in_order_then_execs_agent() {
        let mods = vec!["kernel/a.ko".to_string(), "kernel/b-c.ko".to_string()];
        let s = init_script("6.12.1", &mods, "/dev/ttyS1");
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        let a = s.find("insmod kernel/a.ko").unwrap();
        let b = s
            .find("insmod kernel/b-c.ko || failed=\"$failed b_c\"")
            .unwrap();
        let exec = s
            .find("exec /bin/pcisim-guest agent --port /dev/ttyS1")
            .unwrap();
        assert!(s.find("mount -t devtmpfs").unwrap() < a);
        assert!(a < b && b < exec);
        assert!(s.contains("cd /lib/modules/6.12.1\n"));
        assert!(s.trim_end().ends_with("--port /dev/ttyS1"));
    }

    #[test]
    fn test_extra_modules_named_with_dependencies() {
        let dir = std::env::temp_dir().join(format!("pcisim-lab-extra-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let npu = dir.join("pcisim-npu.ko");
        fs::write(
            &npu,
            crate::vm::kmod::tests::module_elf(b"name=pcisim_npu\0depends=vfio,helper\0"),
        )
        .unwrap();
        let helper = dir.join("helper.ko");
        fs::write(&helper, crate::vm::kmod::tests::module_elf(b"depends=\0")).unwrap();
        let extras = read_extra_modules(&[npu.clone(), helper.clone()]).unwrap();
        assert_eq!(extras[0].name, "pcisim_npu");
        assert_eq!(extras[0].depends, ["vfio", "helper"]);
        assert!(extras[1].depends.is_empty());
        let deps = ModuleDeps::parse(DEP).unwrap();
        let text = extra_modules_dep(&deps, &extras).unwrap();
        assert_eq!(
            text,
            "extra/pcisim_npu.ko: extra/helper.ko kernel/drivers/vfio/vfio.ko kernel/drivers/iommu/iommufd/iommufd.ko\n\
             extra/helper.ko: \n"
        );
        // The same module twice, a non-.ko file, a module that is not an ELF: refused.
        assert!(read_extra_modules(&[npu.clone(), npu.clone()]).is_err());
        assert!(read_extra_modules(&[dir.join("x.o")]).is_err());
        let bogus = dir.join("bogus.ko");
        fs::write(&bogus, b"not elf").unwrap();
        assert!(matches!(
            read_extra_modules(&[bogus]),
            Err(InitramfsError::ExtraModule { .. })
        ));
        // A dependency that the kernel does not have.
        let missing = ExtraModule {
            name: "m".into(),
            depends: vec!["nvidia".into()],
            data: Vec::new(),
        };
        assert!(matches!(
            extra_modules_dep(&deps, &[missing]),
            Err(InitramfsError::ModuleNotFound(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_read_module_xz_round_trip() {
        let dir = std::env::temp_dir().join(format!("pcisim-lab-xz-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut compressed = Vec::new();
        lzma_rs::xz_compress(&mut io::Cursor::new(&payload), &mut compressed).unwrap();
        let path = dir.join("m.ko.xz");
        fs::write(&path, &compressed).unwrap();
        assert_eq!(read_module(&path).unwrap(), payload);
        let plain = dir.join("p.ko");
        fs::write(&plain, b"elf").unwrap();
        assert_eq!(read_module(&plain).unwrap(), b"elf");
        let zst = dir.join("z.ko.zst");
        fs::write(&zst, b"x").unwrap();
        assert!(matches!(
            read_module(&zst),
            Err(InitramfsError::UnsupportedCompression(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_parse_ld_list() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibtinfo.so.6 => /r/usr/lib/x86_64-linux-gnu/libtinfo.so.6 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 => /r/usr/lib64/ld-linux-x86-64.so.2 (0x2)\n";
        assert_eq!(
            parse_ld_list(text).unwrap(),
            vec![
                (
                    "libtinfo.so.6".to_string(),
                    PathBuf::from("/r/usr/lib/x86_64-linux-gnu/libtinfo.so.6")
                ),
                (
                    "/lib64/ld-linux-x86-64.so.2".to_string(),
                    PathBuf::from("/r/usr/lib64/ld-linux-x86-64.so.2")
                ),
            ]
        );
        assert!(parse_ld_list("\tlibx.so.1 => not found\n")
            .unwrap_err()
            .contains("libx.so.1"));
    }

    /// With the host's own root (a Debian-like host has bash and the loader under /usr):
    /// bash, its libraries in the multiarch dir and the loader at its PT_INTERP path.
    #[test]
    fn test_userland_files_resolve_bash_and_its_libraries() {
        if !Path::new("/usr/lib64/ld-linux-x86-64.so.2").exists()
            || !Path::new("/usr/bin/bash").exists()
        {
            panic!("this test needs a host with /usr/bin/bash and /usr/lib64/ld-linux-x86-64.so.2");
        }
        let files = userland_files(Path::new("/"));
        let guest: Vec<&str> = files.iter().map(|f| f.guest.as_str()).collect();
        assert!(guest.contains(&"usr/bin/bash"), "{guest:?}");
        assert!(guest.contains(&"lib64/ld-linux-x86-64.so.2"), "{guest:?}");
        assert!(
            guest.contains(&"usr/lib/x86_64-linux-gnu/libc.so.6"),
            "{guest:?}"
        );
        assert!(files.iter().all(|f| f.host.is_file()));
    }

    #[test]
    fn test_init_mounts_shares_from_the_command_line() {
        let s = init_script("6.12.0", &[], "/dev/ttyS1");
        assert!(s.contains("pcisim.share=*:*)"), "{s}");
        assert!(
            s.contains("mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=$cache")
        );
        assert!(s.contains("cache=none\n"));
        assert!(s.contains("*\" pcisim.share_cached=$tag \"*) cache=loose"));
        // Before the agent starts (a scenario may use a share at once).
        assert!(s.find("mount -t 9p").unwrap() < s.find("exec /bin/pcisim-guest").unwrap());
    }
}
