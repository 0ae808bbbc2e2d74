//! `pcisim lab kselftest vfio`: the kernel's own vfio selftests
//! (`tools/testing/selftests/vfio`) run in the lab's guest against pcisim's GPU, judged like any
//! scenario (KTAP, the device journals, and whatever the suite judges per scenario).
//!
//! ```text
//! provision.sh ─► qemu-scripts/kselftest.sh (Debian's linux-source-7.3 in the trixie root,
//!   our driver patched into the library's driver list, `make headers`, the selftests' Makefile
//!   with LDFLAGS=-static; cached by package version and our inputs' hash)
//!   ─► selftests.cpio (/kselftest/vfio/<test>) appended to the suite's initramfs
//!   ─► the suite, with the V scenarios below instead of the catalogue, in a `gpu-2g` VM:
//!        bind vfio-pci to gpu0 ─► IOMMU modes: iommufd if the guest has /dev/iommu, else type1
//!        ─► the test binary with the other modes' fixture variants excluded (-V) ─► its TAP,
//!           as KTAP, nested under the scenario
//! ```
//!
//! The IOMMU modes: the library's fixtures run each test once per mode (`vfio_type1_iommu`,
//! `vfio_type1v2_iommu`, `iommufd_compat_type1`, `iommufd_compat_type1v2`, `iommufd`). Neither
//! Debian kernel has IOMMUFD (6.12 and 7.3 both ship `# CONFIG_IOMMUFD is not set`: no
//! `/dev/iommu`), so there the iommufd variants are excluded and the two type1 ones run; a
//! kernel with `/dev/iommu` (a user's kernel with IOMMUFD built in, or as a module the guest can
//! `modprobe`) runs the three iommufd ones. Tests without mode
//! variants (`vfio_pci_device_test`, the driver probe of `vfio_pci_driver_test`) use the
//! library's default mode (iommufd), which our driver file lets `PCISIM_VFIO_IOMMU_MODE`
//! override (`vfio_type1v2_iommu` or `iommufd`). A subtest of each scenario names the mode and the kernel.
//!
//! `vfio_pci_driver_test` runs with pcisim's driver (guest-tests/kselftest/drivers/pcisim_gpu/)
//! and is split in two: V5 runs the tests whose DMA stays inside mapped memory (the journal must
//! be clean); V5b runs the three that make the device copy from and to an unmapped IOVA on
//! purpose, which the device journal reports as `dma_outside_map` — declared expected, so V5b
//! is `ok # XFAIL` only if the violation was journaled and nothing else was.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::LabError;
use crate::harness::host::{HostCtx, HostError, HostProgram};
use crate::harness::scenario::{Program, Scenario};
use crate::harness::suite::{self, SuiteOptions, SuiteOutcome};
use crate::vm::initramfs::CpioWriter;
use crate::vm::process::ProcessError;
use crate::vm::process::{self, describe_status};
use crate::vm::profile::ProfileId;
use crate::vm::provision;

/// Where the selftest binaries are in the guest.
pub const GUEST_DIR: &str = "/kselftest/vfio";
/// How long the selftests' build may take (download, unpack, `make headers`, the tests).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
/// The device the selftests run against.
pub const DEVICE: &str = "gpu0";
/// The Debian source package series the selftests come from (6.12's source has none).
pub const SOURCE_SERIES: &str = "7.3";

/// The type1 IOMMU modes (the container `/dev/vfio/vfio`).
pub const TYPE1_MODES: [&str; 2] = ["vfio_type1_iommu", "vfio_type1v2_iommu"];
/// The iommufd IOMMU modes (`/dev/iommu`).
pub const IOMMUFD_MODES: [&str; 3] = ["iommufd_compat_type1", "iommufd_compat_type1v2", "iommufd"];
/// The suffixes `vfio_dma_mapping_test` adds to a mode in its variant names.
const VARIANT_SUFFIXES: [&str; 4] = [
    "",
    "_anonymous",
    "_anonymous_hugetlb_2mb",
    "_anonymous_hugetlb_1gb",
];
/// What `vfio_dma_map_limit_test.*.overflow` reports on a kernel whose vfio type1 rejects a
/// mapping that wraps past the end of the IOVA space with EINVAL (Debian's 6.12); the test,
/// written with the kernel that returns EOVERFLOW there (the 7.3 source does), cannot pass on
/// it. V2 runs it apart and reports that case as a skip with this reason; a pass passes, any
/// other failure fails.
pub const OVERFLOW_OLD_KERNEL: &str = "Expected rc (-22) == -EOVERFLOW (-75)";

/// 2 MiB huge pages reserved in the guest for `vfio_dma_mapping_test`'s hugetlb_2mb variants
/// (its 1 GiB variants find none and report SKIP with the reason).
const HUGEPAGES_2M: u32 = 64;

/// Why the selftests could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum KselftestError {
    /// `qemu-scripts/kselftest.sh` is not there.
    #[error("{0} is missing")]
    ScriptMissing(PathBuf),
    /// The build script could not be run.
    #[error("Cannot run {script}")]
    Run {
        /// The script.
        script: PathBuf,
        /// Why.
        #[source]
        source: ProcessError,
    },
    /// The build script failed.
    #[error("{script} failed ({status}); its log: {log}")]
    Failed {
        /// The script.
        script: PathBuf,
        /// How it ended.
        status: String,
        /// Its stderr.
        log: PathBuf,
    },
    /// The build script's output lacked a line.
    #[error("{0} printed no {1} line")]
    Output(PathBuf, &'static str),
    /// The binaries could not be packed for the guest.
    #[error("Cannot pack the selftests from {dir} into {cpio}")]
    Cpio {
        /// The binaries.
        dir: PathBuf,
        /// The archive.
        cpio: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The lab run failed.
    #[error(transparent)]
    Lab(#[from] LabError),
}

/// What `kselftest.sh` built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelftestBuild {
    /// The directory of the static binaries.
    pub bin_dir: PathBuf,
    /// The source package and version (`linux-source-7.3 7.3.4-1~bpo13+1`).
    pub source: String,
    /// How long the build took (0: taken from the cache).
    pub build_secs: u64,
}

impl SelftestBuild {
    /// Parses the script's `PCISIM_KSELFTEST_*` lines.
    pub fn parse(script: &Path, stdout: &str) -> Result<SelftestBuild, KselftestError> {
        let get = |key: &'static str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| KselftestError::Output(script.to_path_buf(), key))
        };
        Ok(SelftestBuild {
            bin_dir: PathBuf::from(get("PCISIM_KSELFTEST_BIN")?),
            source: get("PCISIM_KSELFTEST_SOURCE")?,
            build_secs: get("PCISIM_KSELFTEST_BUILD_SECS")?.parse().unwrap_or(0),
        })
    }
}

/// Runs `kselftest.sh --series SOURCE_SERIES` from `scripts` (after provision.sh: it builds in
/// the trixie root); its stderr goes to `log`.
pub fn build(scripts: &Path, log: &Path) -> Result<SelftestBuild, KselftestError> {
    let script = scripts.join("kselftest.sh");
    if !script.is_file() {
        return Err(KselftestError::ScriptMissing(script));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(["--series", SOURCE_SERIES]);
    let out =
        process::run_captured("kselftest.sh", &mut cmd, BUILD_TIMEOUT, log).map_err(|source| {
            KselftestError::Run {
                script: script.clone(),
                source,
            }
        })?;
    if !out.status.success() {
        return Err(KselftestError::Failed {
            script,
            status: describe_status(out.status),
            log: log.to_path_buf(),
        });
    }
    SelftestBuild::parse(&script, &String::from_utf8_lossy(&out.stdout))
}

/// Packs every file of `bin_dir` as `GUEST_DIR/<name>` (mode 0755) into a newc archive at
/// `out`, to be appended to the suite's initramfs (the kernel unpacks concatenated archives).
pub fn pack(bin_dir: &Path, out: &Path) -> Result<usize, KselftestError> {
    let err = |source| KselftestError::Cpio {
        dir: bin_dir.to_path_buf(),
        cpio: out.to_path_buf(),
        source,
    };
    let mut names: Vec<PathBuf> = fs::read_dir(bin_dir)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut w = CpioWriter::new(BufWriter::new(File::create(out).map_err(err)?));
    w.add_dir("/kselftest", 0o755).map_err(err)?;
    w.add_dir(GUEST_DIR, 0o755).map_err(err)?;
    for p in &names {
        let data = fs::read(p).map_err(err)?;
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        w.add_file(&format!("{GUEST_DIR}/{name}"), 0o755, &data)
            .map_err(err)?;
    }
    w.finish().map_err(err)?.flush().map_err(err)?;
    Ok(names.len())
}

/// One selftest as the lab runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selftest {
    /// The binary.
    pub binary: &'static str,
    /// Harness filters after the mode exclusions (`-t`/`-T` test names).
    pub filters: &'static [&'static str],
    /// Whether its buffers should come from shmem huge pages (see [`ShmemThp`]).
    pub huge_shmem: bool,
}

const DRIVER_UNMAPPED: [&str; 3] = [
    "memcpy_from_unmapped_iova",
    "memcpy_to_unmapped_iova",
    "mix_and_match",
];

/// The V scenarios' selftests, by scenario id.
pub fn selftest(id: &str) -> Option<Selftest> {
    let t = |binary, filters| {
        Some(Selftest {
            binary,
            filters,
            huge_shmem: binary == "vfio_pci_driver_test",
        })
    };
    match id {
        "V1" => t("vfio_pci_device_test", &[]),
        // `overflow` runs on its own (see OVERFLOW_OLD_KERNEL).
        "V2" => t("vfio_dma_mapping_test", &["-T", "overflow"]),
        "V3" => t("vfio_dma_mapping_mmio_test", &[]),
        "V4" => t("vfio_pci_device_init_perf_test", &[]),
        "V5" => t(
            "vfio_pci_driver_test",
            &[
                "-T",
                DRIVER_UNMAPPED[0],
                "-T",
                DRIVER_UNMAPPED[1],
                "-T",
                DRIVER_UNMAPPED[2],
            ],
        ),
        "V5b" => t(
            "vfio_pci_driver_test",
            &[
                "-t",
                DRIVER_UNMAPPED[0],
                "-t",
                DRIVER_UNMAPPED[1],
                "-t",
                DRIVER_UNMAPPED[2],
            ],
        ),
        _ => None,
    }
}

macro_rules! k {
    ($id:literal, $name:literal, $f:ident, $secs:literal) => {
        Scenario {
            id: $id,
            name: $name,
            timeout: Duration::from_secs($secs),
            program: Program::Host(HostProgram {
                name: $name,
                profile: ProfileId::GpuLarge,
                run: $f,
            }),
            profile: ProfileId::GpuLarge,
            ..Scenario::NO_XFAIL
        }
    };
}

fn k1(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_selftest(ctx, "V1")
}
fn k2(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_selftest(ctx, "V2")
}
fn k3(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_selftest(ctx, "V3")
}
fn k4(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_selftest(ctx, "V4")
}
fn k5(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_selftest(ctx, "V5")
}
fn k5b(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    ctx.expect_violation(DEVICE, pcisim_journal::ViolationKind::DmaOutsideMap);
    run_selftest(ctx, "V5b")
}

/// The vfio selftest scenarios, in run order (all in one `gpu-2g` VM: 2 GiB of RAM for the
/// driver test's 1 GiB buffer, vIOMMU).
pub fn scenarios() -> Vec<Scenario> {
    vec![
        k!("V1", "V1 vfio_pci_device_test", k1, 600),
        k!("V2", "V2 vfio_dma_mapping_test", k2, 900),
        k!("V3", "V3 vfio_dma_mapping_mmio_test", k3, 600),
        k!("V4", "V4 vfio_pci_device_init_perf_test", k4, 600),
        k!("V5", "V5 vfio_pci_driver_test", k5, 1800),
        k!("V5b", "V5b vfio_pci_driver_test-unmapped-iova", k5b, 1800),
    ]
}

/// Which IOMMU modes a guest runs: iommufd's if it has `/dev/iommu`, else type1's.
pub fn modes(has_dev_iommu: bool) -> (&'static str, &'static [&'static str]) {
    if has_dev_iommu {
        ("iommufd", &IOMMUFD_MODES)
    } else {
        ("type1", &TYPE1_MODES)
    }
}

/// The harness arguments that exclude every fixture variant of the modes not run.
pub fn exclusions(has_dev_iommu: bool) -> Vec<String> {
    let (_, other) = modes(!has_dev_iommu);
    other
        .iter()
        .flat_map(|m| VARIANT_SUFFIXES.iter().map(move |s| format!("{m}{s}")))
        .flat_map(|v| ["-V".to_string(), v])
        .collect()
}

/// The guest shell script that runs `binary args bdf` with the library's default mode set,
/// and prints its TAP as KTAP: `TAP version 13` becomes `KTAP version 1`, lines before it go
/// to stderr, lines after it that are not KTAP (the tests' own printf) become `# ` diagnostics.
/// The script exits with the binary's status.
pub fn guest_script(binary: &str, args: &[String], bdf: &str, default_mode: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    format!(
        "o=/tmp/{binary}.tap; PCISIM_VFIO_IOMMU_MODE={default_mode} {GUEST_DIR}/{binary} {} {bdf} >$o; rc=$?; \
         sed '/^TAP version 13$/,$d' $o >&2; \
         sed -n '/^TAP version 13$/,$p' $o | sed -E 's/^TAP version 13$/KTAP version 1/; /^(ok |not ok |#|1\\.\\.|KTAP version)/!s/^/# /'; \
         exit $rc",
        args.join(" ")
    )
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Test lines (`ok N fixture.variant.test`) of `ktap` whose variant belongs to `modes`.
fn count_mode_lines(ktap: &str, modes: &[&str]) -> usize {
    ktap.lines()
        .filter_map(|l| {
            l.strip_prefix("ok ")
                .or_else(|| l.strip_prefix("not ok "))
                .and_then(|r| r.split_whitespace().nth(1))
        })
        .filter(|name| {
            let variant = name.split('.').nth(1).unwrap_or("");
            modes.iter().any(|m| {
                VARIANT_SUFFIXES
                    .iter()
                    .any(|s| variant == format!("{m}{s}"))
            })
        })
        .count()
}

/// Whether every failure in `stderr` is the old kernel's EINVAL for the overflow case.
pub fn overflow_is_old_kernel(stderr: &str) -> bool {
    let expected: Vec<&str> = stderr.lines().filter(|l| l.contains("Expected")).collect();
    !expected.is_empty() && expected.iter().all(|l| l.contains(OVERFLOW_OLD_KERNEL))
}

fn run_selftest(ctx: &mut HostCtx<'_>, id: &str) -> Result<(), HostError> {
    let test = selftest(id).ok_or_else(|| HostError::Step(format!("no selftest for {id}")))?;
    let bdf = ctx
        .qmp()
        .query_pci()?
        .iter()
        .find(|p| p.qdev_id == DEVICE)
        .map(|p| p.bdf())
        .ok_or_else(|| HostError::Step(format!("{DEVICE} is not in query-pci")))?;
    // vfio-pci on the GPU (driver_override survives the tests' resets; idempotent).
    let driver = ctx.sh(&format!(
        "d=/sys/bus/pci/devices/{bdf}; \
         if [ \"$(basename \"$(readlink $d/driver)\" 2>/dev/null)\" != vfio-pci ]; then \
           echo vfio-pci > $d/driver_override; \
           [ -e $d/driver ] && echo {bdf} > $d/driver/unbind; \
           echo {bdf} > /sys/bus/pci/drivers_probe; \
         fi; basename \"$(readlink $d/driver)\""
    ))?;
    if !ctx.check(
        &format!("vfio-pci bound to {DEVICE} at {bdf}"),
        driver.trim() == "vfio-pci",
        format!("driver is {:?}", driver.trim()),
    ) {
        return Ok(());
    }
    let probe = ctx.sh(&format!(
        "modprobe iommufd 2>/dev/null; [ -c /dev/iommu ] && echo iommu=yes || echo iommu=no; uname -r; \
         [ -x {GUEST_DIR}/{b} ] && echo bin=yes || echo bin=no",
        b = test.binary
    ))?;
    let has_iommu = probe.contains("iommu=yes");
    let kernel = probe.lines().nth(1).unwrap_or("?").trim().to_string();
    if !ctx.check(
        &format!("{GUEST_DIR}/{} is in the guest", test.binary),
        probe.contains("bin=yes"),
        "missing from the initramfs",
    ) {
        return Ok(());
    }
    let (mode, run_modes) = modes(has_iommu);
    let default_mode = if has_iommu {
        "iommufd"
    } else {
        "vfio_type1v2_iommu"
    };
    ctx.pass(&format!(
        "IOMMU modes: {mode} ({}; default {default_mode}) on kernel {kernel}: {}",
        run_modes.join(", "),
        if has_iommu {
            "/dev/iommu present"
        } else {
            "no /dev/iommu (no IOMMUFD): the iommufd variants are excluded"
        }
    ));
    if id == "V2" {
        ctx.sh(&format!(
            "echo {HUGEPAGES_2M} > /proc/sys/vm/nr_hugepages; cat /proc/sys/vm/nr_hugepages"
        ))?;
    }
    let thp = if test.huge_shmem {
        Some(ShmemThp::enable(ctx)?)
    } else {
        None
    };
    let mut args = exclusions(has_iommu);
    args.extend(test.filters.iter().map(|s| s.to_string()));
    let script = guest_script(test.binary, &args, &bdf, default_mode);
    let argv = ["/bin/busybox", "sh", "-c", &script].map(str::to_string);
    let t = Instant::now();
    let (_, out) = ctx.guest_test_output(&format!("{} ({mode})", test.binary), &argv)?;
    ctx.progress(&format!(
        "{} ({mode}) ran {:.1} s",
        test.binary,
        t.elapsed().as_secs_f64()
    ));
    if let Some(thp) = thp {
        thp.restore_and_check(ctx, count_mode_lines(&out.stdout, run_modes))?;
    }
    if id == "V2" {
        ctx.sh("echo 0 > /proc/sys/vm/nr_hugepages")?;
        let mut args = exclusions(has_iommu);
        args.extend(["-t", "overflow"].map(str::to_string));
        let script = guest_script(test.binary, &args, &bdf, default_mode);
        let argv = ["/bin/busybox", "sh", "-c", &script].map(str::to_string);
        let o = ctx.guest(&argv)?;
        let name = format!("{} overflow ({mode})", test.binary);
        let ran = count_mode_lines(&o.stdout, run_modes);
        if o.exit == Some(0) && ran > 0 {
            ctx.pass(&name);
        } else if o.exit == Some(1) && ran > 0 && overflow_is_old_kernel(&o.stderr) {
            ctx.skip(
                &name,
                &format!(
                    "kernel {kernel}'s vfio type1 returns EINVAL, not the EOVERFLOW the test expects, for a mapping that wraps the IOVA space ({ran} test(s): {OVERFLOW_OLD_KERNEL})"
                ),
            );
        } else {
            let tail: Vec<&str> = o.stderr.lines().rev().take(6).collect();
            ctx.fail(
                &name,
                &format!(
                    "exit {:?}, {ran} test(s) in {mode} modes; stderr: {}",
                    o.exit,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            );
        }
    }
    // The mode selection did what it says: tests of the chosen modes ran and none of the
    // others (the device test has no mode variants: its mode is the default above).
    if test.binary != "vfio_pci_device_test" {
        let (_, other) = modes(!has_iommu);
        let ran = count_mode_lines(&out.stdout, run_modes);
        let wrong = count_mode_lines(&out.stdout, other);
        ctx.check(
            &format!("{ran} test(s) ran in {mode} modes, none in the others"),
            ran > 0 && wrong == 0,
            format!("{ran} in {mode} modes, {wrong} in the others"),
        );
    }
    Ok(())
}

/// The guest kernel's shmem transparent-huge-page policy (for `MAP_SHARED | MAP_ANONYMOUS`).
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
/// 2 MiB pages in `vfio_pci_driver_test`'s 1 GiB `memcpy_region`.
const FIXTURE_HUGE_PAGES: u64 = 512;

/// Shmem huge pages for `vfio_pci_driver_test`, whose fixture (set up anew for every test)
/// maps a 1 GiB `MAP_SHARED | MAP_ANONYMOUS` buffer for DMA. With Debian's default policy
/// (`never`) that buffer is 262,144 scattered 4 KiB pages: vfio type1 maps them one by one,
/// the guest's intel-iommu writes one PTE each, and QEMU (caching mode) relays each as a
/// DMA_MAP to pcisim and back as a DMA_UNMAP — ~40 s per test under TCG (86 s at load 11).
/// With `always` the buffer is 512 2 MiB pages, contiguous and aligned (the selftests' IOVA
/// allocator aligns to the size), which vfio maps as 512 superpage mappings: 13 s at load 11.
/// The tests, their assertions and the DMA they do are the same; only the buffer's backing
/// changes. The previous policy is restored after the run, and `thp_file_alloc` in
/// `/proc/vmstat` shows that huge pages were used.
#[derive(Debug)]
struct ShmemThp {
    /// The policy before (`None`: the kernel has no shmem THP; nothing was changed).
    previous: Option<String>,
    /// `thp_file_alloc` before the run.
    alloc: u64,
    /// `thp_file_fallback` before the run.
    fallback: u64,
}

/// The `thp_file_alloc` and `thp_file_fallback` counters in `/proc/vmstat` text.
fn thp_counters(vmstat: &str) -> (u64, u64) {
    let get = |key: &str| {
        vmstat
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    (get("thp_file_alloc"), get("thp_file_fallback"))
}

/// The selected policy in `shmem_enabled` text (`always within_size advise [never] ...`).
fn thp_policy(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(&text[start..start + len])
}

impl ShmemThp {
    /// Sets the shmem policy to `always` (if the kernel has shmem THP) and reads the counters.
    fn enable(ctx: &mut HostCtx<'_>) -> Result<ShmemThp, HostError> {
        let out = ctx.sh(&format!(
            "f={SHMEM_THP}; if [ -w $f ]; then echo \"policy=$(cat $f)\"; echo always > $f; \
             else echo policy=none; fi; grep '^thp_file_' /proc/vmstat"
        ))?;
        let previous = out
            .lines()
            .find_map(|l| l.strip_prefix("policy="))
            .and_then(thp_policy)
            .map(str::to_string);
        let (alloc, fallback) = thp_counters(&out);
        Ok(ShmemThp {
            previous,
            alloc,
            fallback,
        })
    }

    /// Restores the policy and checks that `tests` test(s) got their buffers from huge pages
    /// (at least one whole 1 GiB buffer's worth: the mechanism works; how many fell back to
    /// small pages, which only costs time, is in the subtest's name).
    fn restore_and_check(self, ctx: &mut HostCtx<'_>, tests: usize) -> Result<(), HostError> {
        let Some(previous) = self.previous else {
            ctx.pass(&format!(
                "no {SHMEM_THP} (a kernel without shmem THP): the fixture's buffer is in 4 KiB pages, mapped one by one (slow)"
            ));
            return Ok(());
        };
        let out = ctx.sh(&format!(
            "echo {} > {SHMEM_THP}; grep '^thp_file_' /proc/vmstat",
            shell_quote(&previous)
        ))?;
        let (alloc, fallback) = thp_counters(&out);
        let (alloc, fallback) = (
            alloc.saturating_sub(self.alloc),
            fallback.saturating_sub(self.fallback),
        );
        ctx.check(
            &format!(
                "the fixtures' buffers were in shmem huge pages ({alloc} 2 MiB pages for {tests} test(s), {fallback} fallback(s); policy {previous} restored)"
            ),
            alloc >= FIXTURE_HUGE_PAGES,
            format!("thp_file_alloc grew by {alloc}, less than one 1 GiB buffer ({FIXTURE_HUGE_PAGES})"),
        );
        Ok(())
    }
}

/// What `pcisim lab kselftest vfio` asks for.
#[derive(Debug, Clone)]
pub struct KselftestOptions {
    /// The suite options (kernel, filter, keep, device options); its scenarios and extra
    /// initramfs archives are set here.
    pub suite: SuiteOptions,
}

/// Builds (or takes from the cache) the vfio selftests, then runs the V scenarios through the
/// suite: KTAP on `ktap_out`, progress on `progress`.
pub fn run(
    opts: &KselftestOptions,
    ktap_out: &mut dyn Write,
    progress: &mut dyn Write,
) -> Result<SuiteOutcome, KselftestError> {
    let out = |p: &mut dyn Write, text: &str| {
        writeln!(p, "lab: {text}").map_err(|e| KselftestError::Lab(LabError::Output(e)))
    };
    let scripts = provision::scripts_dir();
    // The build needs the trixie root: provision first (the suite's own call is then a no-op).
    let logs = std::env::temp_dir().join(format!("pcisim-kselftest-{}", std::process::id()));
    fs::create_dir_all(&logs).map_err(|source| {
        KselftestError::Lab(LabError::RunDir {
            path: logs.clone(),
            source,
        })
    })?;
    out(
        progress,
        "provisioning (the selftests build inside the trixie root)",
    )?;
    provision::provision(
        &scripts,
        opts.suite.kernel.provision_series(),
        &logs.join("provision.log"),
    )
    .map_err(LabError::from)?;
    out(
        progress,
        &format!(
            "building the vfio selftests ({}/kselftest.sh; a cold build downloads linux-source-{SOURCE_SERIES})",
            scripts.display()
        ),
    )?;
    let t = Instant::now();
    let built = build(&scripts, &logs.join("kselftest-build.log"))?;
    out(
        progress,
        &format!(
            "vfio selftests {} in {:.1} s from {}: {}",
            if built.build_secs == 0 {
                "taken from the cache"
            } else {
                "built"
            },
            t.elapsed().as_secs_f64(),
            built.source,
            built.bin_dir.display()
        ),
    )?;
    let cpio = built
        .bin_dir
        .parent()
        .unwrap_or(&built.bin_dir)
        .join("selftests.cpio");
    let packed = pack(&built.bin_dir, &cpio)?;
    out(
        progress,
        &format!(
            "{packed} selftest binaries packed into {} ({:.1} MiB), appended to the initramfs under {GUEST_DIR}",
            cpio.display(),
            fs::metadata(&cpio).map(|m| m.len()).unwrap_or(0) as f64 / (1024.0 * 1024.0)
        ),
    )?;
    let _ = fs::remove_dir_all(&logs);
    let mut suite_opts = opts.suite.clone();
    suite_opts.extra_initramfs = vec![cpio];
    Ok(suite::run_scenarios(
        &suite_opts,
        scenarios(),
        ktap_out,
        progress,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_build_lines() {
        let b = SelftestBuild::parse(
            Path::new("k.sh"),
            "noise\nPCISIM_KSELFTEST_BIN=/c/k/bin\nPCISIM_KSELFTEST_SOURCE=linux-source-7.3 7.3.4-1~bpo13+1\nPCISIM_KSELFTEST_BUILD_SECS=57\n",
        )
        .unwrap();
        assert_eq!(b.bin_dir, PathBuf::from("/c/k/bin"));
        assert_eq!(b.source, "linux-source-7.3 7.3.4-1~bpo13+1");
        assert_eq!(b.build_secs, 57);
        assert!(matches!(
            SelftestBuild::parse(Path::new("k.sh"), "PCISIM_KSELFTEST_BIN=/x\n"),
            Err(KselftestError::Output(_, "PCISIM_KSELFTEST_SOURCE"))
        ));
    }

    #[test]
    fn test_overflow_old_kernel_recognised_only_alone() {
        let old = "# vfio_dma_mapping_test.c:297:overflow:Expected rc (-22) == -EOVERFLOW (-75)\n# overflow: Test terminated by assertion\n";
        assert!(overflow_is_old_kernel(old));
        let other = format!(
            "{old}# vfio_dma_mapping_test.c:300:overflow:Expected rc (-5) == -EOVERFLOW (-75)\n"
        );
        assert!(!overflow_is_old_kernel(&other));
        assert!(!overflow_is_old_kernel(
            "# overflow: Test terminated by timeout\n"
        ));
    }

    #[test]
    fn test_exclusions_cover_the_other_modes_only() {
        let type1 = exclusions(false);
        assert!(type1.contains(&"iommufd".to_string()));
        assert!(type1.contains(&"iommufd_compat_type1v2_anonymous_hugetlb_2mb".to_string()));
        assert!(!type1.iter().any(|a| a.starts_with("vfio_type1")));
        assert_eq!(type1.iter().filter(|a| *a == "-V").count(), 3 * 4);
        let iommufd = exclusions(true);
        assert!(iommufd.contains(&"vfio_type1_iommu".to_string()));
        assert!(iommufd.contains(&"vfio_type1v2_iommu_anonymous".to_string()));
        assert!(!iommufd.iter().any(|a| a.starts_with("iommufd")));
    }

    #[test]
    fn test_thp_policy_and_counters_parse() {
        assert_eq!(
            thp_policy("always within_size advise [never] deny force"),
            Some("never")
        );
        assert_eq!(
            thp_policy("[always] within_size advise never"),
            Some("always")
        );
        assert_eq!(thp_policy("none"), None);
        let vmstat = "thp_fault_alloc 3\nthp_file_alloc 7182\nthp_file_fallback 2\nthp_file_fallback_charge 9\n";
        assert_eq!(thp_counters(vmstat), (7182, 2));
        assert_eq!(thp_counters("nr_free_pages 1\n"), (0, 0));
    }

    #[test]
    fn test_count_mode_lines_by_variant() {
        let ktap = "KTAP version 1\n1..3\nok 1 vfio_dma_mapping_test.vfio_type1_iommu_anonymous.dma_map_unmap\n\
                    ok 2 vfio_dma_map_limit_test.vfio_type1v2_iommu.overflow # SKIP x\n\
                    not ok 3 vfio_dma_map_limit_test.iommufd.overflow\n";
        assert_eq!(count_mode_lines(ktap, &TYPE1_MODES), 2);
        assert_eq!(count_mode_lines(ktap, &IOMMUFD_MODES), 1);
        assert_eq!(count_mode_lines("ok 1 x.y.z\n", &TYPE1_MODES), 0);
    }

    #[test]
    fn test_scenarios_all_in_the_2g_vm_and_filters_split_the_driver_test() {
        let s = scenarios();
        assert_eq!(
            s.iter().map(|s| s.id).collect::<Vec<_>>(),
            ["V1", "V2", "V3", "V4", "V5", "V5b"]
        );
        assert!(s.iter().all(|s| s.profile() == ProfileId::GpuLarge));
        assert!(s.iter().all(|s| s.name.starts_with(s.id)));
        let k5 = selftest("V5").unwrap();
        let k5b = selftest("V5b").unwrap();
        for t in DRIVER_UNMAPPED {
            assert!(k5.filters.contains(&t) && k5b.filters.contains(&t));
        }
        assert!(k5.filters.iter().all(|f| !f.starts_with("-t")));
        assert!(k5b.filters.iter().all(|f| !f.starts_with("-T")));
        assert!(k5.huge_shmem && k5b.huge_shmem);
        assert!(!selftest("V2").unwrap().huge_shmem);
        assert!(ProfileId::GpuLarge.profile().viommu);
        assert!(ProfileId::GpuLarge.profile().memory_mib >= 2048);
    }

    #[test]
    fn test_guest_script_converts_tap_and_keeps_status() {
        let s = guest_script(
            "vfio_pci_device_test",
            &["-V".into(), "iommufd".into()],
            "0000:01:00.0",
            "vfio_type1v2_iommu",
        );
        assert!(s.contains(
            "PCISIM_VFIO_IOMMU_MODE=vfio_type1v2_iommu /kselftest/vfio/vfio_pci_device_test -V iommufd 0000:01:00.0"
        ));
        assert!(s.ends_with("exit $rc"));
        assert!(s.contains("s/^TAP version 13$/KTAP version 1/"));
    }

    #[test]
    fn test_suite_appends_the_archive_after_the_initramfs() {
        let dir = std::env::temp_dir().join(format!("pcisim-ksa-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("initramfs.cpio"), dir.join("extra.cpio"));
        fs::write(&a, b"first").unwrap();
        fs::write(&b, b"second").unwrap();
        crate::harness::suite::append_archives(&a, &[]).unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"first");
        crate::harness::suite::append_archives(&a, std::slice::from_ref(&b)).unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"firstsecond");
        assert!(crate::harness::suite::append_archives(&a, &[dir.join("missing")]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_pack_lays_binaries_under_the_guest_dir() {
        let dir = std::env::temp_dir().join(format!("pcisim-kst-{}", std::process::id()));
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::write(bin.join("vfio_pci_device_test"), b"\x7fELF").unwrap();
        let cpio = dir.join("s.cpio");
        assert_eq!(pack(&bin, &cpio).unwrap(), 1);
        let bytes = fs::read(&cpio).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("kselftest/vfio/vfio_pci_device_test"));
        assert!(text.contains("TRAILER!!!"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
