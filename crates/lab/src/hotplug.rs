//! The hotplug scenarios that run on the host side ([`crate::host`]) in the `gpu-hotplug` VM:
//! H1 (hot-add: the guest probes the device, a driver binds, BAR access works), H2 (hot-remove
//! with a driver bound) and H3 (add/remove cycles on the same socket without a leak in the
//! server; a 10-cycle version of the catalogue's 100).
//!
//! The hot-plugged GPU is the profile's device that is not plugged at boot (`gpu1`). It uses MSI
//! instead of MSI-X (`irq=msi`): QEMU 11.1.3 aborts on `device_del` of any `vfio-user-pci`
//! device with MSI-X (`vfio_user_pci_finalize` deletes the PBA subregion from a BAR container
//! that is already gone; docs/lab.md).

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::RunOutput;
use crate::host::{count_records, record_is, HostCtx, HostError, HostProgram};
use crate::profile::ProfileId;
use crate::qmp::{PciDeviceInfo, QmpError};

/// `H1 hot-add`: `device_add` of the unplugged GPU onto its free root port; the guest
/// enumerates it (its sysfs entry appears: hot-add → probed is measured), it passes E1 at its
/// address, its BARs work (E2), and vfio-pci binds it through `driver_override`. It stays
/// plugged and bound for H2.
pub const H1: HostProgram = HostProgram {
    name: "h1-hot-add",
    profile: ProfileId::GpuHotplug,
    run: h1_hot_add,
};

/// `H2 hot-remove`: `device_del` of the hot-plugged GPU while vfio-pci is bound to it:
/// `DEVICE_DELETED` arrives (device_del → DEVICE_DELETED is measured), QEMU lives on, the
/// guest's sysfs entry is gone, and the server saw the client go (EOF): the device journals
/// `client_disconnected` and a `lost-connection` reset.
pub const H2: HostProgram = HostProgram {
    name: "h2-hot-remove",
    profile: ProfileId::GpuHotplug,
    run: h2_hot_remove,
};

/// `H3 add-remove-cycles`: [`H3_CYCLES`] device_add/device_del cycles on the same socket; the
/// guest enumerates the device every time, and the server's open fds, threads and RSS do not
/// grow.
pub const H3: HostProgram = HostProgram {
    name: "h3-add-remove-cycles",
    profile: ProfileId::GpuHotplug,
    run: h3_add_remove_cycles,
};

/// How many add/remove cycles H3 runs.
pub const H3_CYCLES: usize = 10;
/// How long the guest has to enumerate a hot-added device (ACPI: ~0.1 s).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `DEVICE_DELETED` may take (ACPI: ~20 ms; native pciehp: ~6 s).
const DELETE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server has to notice that the client went away.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Open fds the server may gain over H3's cycles (none is expected).
const FD_TOLERANCE: usize = 0;
/// Threads the server may gain over H3's cycles (none is expected).
const THREAD_TOLERANCE: usize = 0;
/// RSS the server may gain over H3's cycles, in KiB (allocator slack, not a per-cycle leak).
const RSS_TOLERANCE_KIB: u64 = 4096;

/// The profile's device that is not plugged at boot.
fn hotplug_device(ctx: &HostCtx<'_>) -> Result<String, HostError> {
    ctx.layout()
        .devices
        .iter()
        .find(|d| !d.at_boot)
        .map(|d| d.id.clone())
        .ok_or_else(|| HostError::Step("the profile has no device left for device_add".into()))
}

/// Where QEMU has `id`, if it is on the machine.
fn locate(ctx: &mut HostCtx<'_>, id: &str) -> Result<Option<PciDeviceInfo>, HostError> {
    Ok(ctx.qmp().query_pci()?.into_iter().find(|p| p.qdev_id == id))
}

/// Runs a busybox `sh -c` script in the guest (output and status are the caller's to judge).
fn guest_sh(ctx: &mut HostCtx<'_>, script: &str) -> Result<RunOutput, HostError> {
    let argv = ["/bin/busybox", "sh", "-c", script].map(str::to_string);
    ctx.guest(&argv)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A guest script that waits (10 ms steps) until `/sys/bus/pci/devices/<bdf>` exists
/// (`present`) or is gone, for at most `timeout`; exits 0 when it happened, 1 on timeout.
fn wait_sysfs_script(bdf: &str, present: bool, timeout: Duration) -> String {
    let steps = (timeout.as_millis() / 10).max(1);
    let test = if present { "! -e" } else { "-e" };
    format!(
        "d=/sys/bus/pci/devices/{bdf}; n=0; while [ {test} $d ]; do n=$((n+1)); \
         if [ $n -ge {steps} ]; then exit 1; fi; usleep 10000; done; exit 0"
    )
}

/// `device_add id`, then waits until the guest has enumerated it. Returns where it is and the
/// time from `device_add` to the guest seeing its sysfs entry (what the host sees: it includes
/// one agent round trip).
fn plug(ctx: &mut HostCtx<'_>, id: &str) -> Result<(PciDeviceInfo, Duration), HostError> {
    let t = Instant::now();
    ctx.device_add(id)?;
    let info = locate(ctx, id)?.ok_or_else(|| {
        HostError::Step(format!(
            "QEMU does not list {id} in query-pci after device_add"
        ))
    })?;
    let bdf = info.bdf();
    let out = guest_sh(ctx, &wait_sysfs_script(&bdf, true, PROBE_TIMEOUT))?;
    let took = t.elapsed();
    if out.exit != Some(0) {
        return Err(HostError::Step(format!(
            "the guest did not enumerate {id} at {bdf} within {} s of device_add",
            PROBE_TIMEOUT.as_secs()
        )));
    }
    Ok((info, took))
}

/// Waits until the guest's sysfs entry `bdf` is gone; `Ok(false)` if it stayed.
fn wait_gone(ctx: &mut HostCtx<'_>, bdf: &str) -> Result<bool, HostError> {
    let out = guest_sh(ctx, &wait_sysfs_script(bdf, false, Duration::from_secs(10)))?;
    Ok(out.exit == Some(0))
}

/// The driver bound to `bdf` in the guest (empty if none).
fn guest_driver(ctx: &mut HostCtx<'_>, bdf: &str) -> Result<String, HostError> {
    let out = guest_sh(
        ctx,
        &format!("l=$(readlink /sys/bus/pci/devices/{bdf}/driver) && basename $l; true"),
    )?;
    Ok(out.stdout.trim().to_string())
}

/// Binds vfio-pci to `bdf` through `driver_override` and `drivers_probe`; returns the driver
/// bound afterwards and how long the guest took.
fn bind_vfio(ctx: &mut HostCtx<'_>, bdf: &str) -> Result<(String, Duration), HostError> {
    let out = guest_sh(
        ctx,
        &format!(
            "d=/sys/bus/pci/devices/{bdf}; echo vfio-pci > $d/driver_override && \
             echo {bdf} > /sys/bus/pci/drivers_probe; l=$(readlink $d/driver) && basename $l; true"
        ),
    )?;
    Ok((
        out.stdout.trim().to_string(),
        Duration::from_millis(out.elapsed_ms),
    ))
}

/// `device_del id` and waits for `DEVICE_DELETED`; returns the time from the accepted
/// `device_del` to the event. Under native pciehp QEMU refuses a `device_del` while the slot's
/// power indicator still blinks from the hot-add ("guest is busy"): it is retried every 100 ms
/// (for up to [`DELETE_TIMEOUT`]). If QEMU died on the way, its log's last lines become
/// diagnostics.
fn unplug(ctx: &mut HostCtx<'_>, id: &str) -> Result<Duration, HostError> {
    let deadline = Instant::now() + DELETE_TIMEOUT;
    let r = loop {
        match ctx.device_del(id, DELETE_TIMEOUT) {
            Err(HostError::Qmp(QmpError::Command { desc, .. }))
                if desc.contains("guest is busy") && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            r => break r,
        }
    };
    match r {
        Ok(t) => Ok(t),
        Err(e) => {
            thread::sleep(Duration::from_millis(200));
            if let Err(dead) = ctx.check_qemu() {
                let log = ctx.vm_dir().join("qemu.log");
                for l in tail(&log, 5) {
                    ctx.diag(&format!("qemu.log: {l}"));
                }
                return Err(dead);
            }
            Err(e)
        }
    }
}

/// The last `n` non-empty lines of a file.
fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Waits until the server reports no client attached to `id`.
fn wait_detached(ctx: &mut HostCtx<'_>, id: &str) -> Result<bool, HostError> {
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let st = ctx.control().status(id)?;
        if st.get("client_attached") == Some(&Value::Bool(false)) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Plugs `id` and binds vfio-pci unless that is already so (H2 run alone); returns its BDF.
fn ensure_bound(ctx: &mut HostCtx<'_>, id: &str) -> Result<String, HostError> {
    let bdf = match locate(ctx, id)? {
        Some(info) => info.bdf(),
        None => {
            let (info, took) = plug(ctx, id)?;
            ctx.diag(&format!(
                "setup: hot-added {id} at {} ({})",
                info.bdf(),
                ms(took)
            ));
            info.bdf()
        }
    };
    if guest_driver(ctx, &bdf)? != "vfio-pci" {
        let (driver, _) = bind_vfio(ctx, &bdf)?;
        if driver != "vfio-pci" {
            return Err(HostError::Step(format!(
                "setup: vfio-pci did not bind {bdf} (driver: {driver:?})"
            )));
        }
    }
    Ok(bdf)
}

fn h1_hot_add(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    if locate(ctx, &id)?.is_some() {
        let t = unplug(ctx, &id)?;
        ctx.diag(&format!("setup: {id} was plugged; removed it ({})", ms(t)));
    }
    // What one guest command costs, to read the hot-add latency against.
    let t = Instant::now();
    guest_sh(ctx, "true")?;
    let agent_rt = t.elapsed();
    let (info, took) = match plug(ctx, &id) {
        Ok(p) => p,
        Err(HostError::Step(why)) => {
            ctx.fail(&format!("device_add {id}: the guest enumerates it"), &why);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let bdf = info.bdf();
    ctx.diag(&format!(
        "one guest command costs {} from the host (included in the hot-add latency)",
        ms(agent_rt)
    ));
    ctx.progress(&format!("hot-add → probed (sysfs) {}", ms(took)));
    ctx.pass(&format!(
        "device_add {id}: the guest enumerates it at {bdf} (hot-add → probed {})",
        ms(took)
    ));
    ctx.check(
        &format!("QEMU places {id} behind its hot-add port"),
        info.parent.is_some(),
        "no parent bridge in query-pci",
    );
    let argv = ctx.guest_argv("e1", &id, &["--bdf", &bdf])?;
    ctx.guest_test(&format!("{id} at {bdf} passes E1"), &argv)?;
    check_msi_cap(ctx, &id, &bdf)?;
    let argv = ctx.guest_argv("e2", &id, &["--bdf", &bdf])?;
    ctx.guest_test(&format!("BAR access: {id} at {bdf} passes E2"), &argv)?;
    let (driver, bind_took) = bind_vfio(ctx, &bdf)?;
    ctx.check(
        &format!(
            "vfio-pci binds {bdf} through driver_override (guest {})",
            ms(bind_took)
        ),
        driver == "vfio-pci",
        format!("driver after drivers_probe: {driver:?}"),
    );
    Ok(())
}

/// The offset of capability `cap_id` in a device description (`capabilities[].{id,offset}`).
fn described_cap(description: &Value, cap_id: u64) -> Option<u64> {
    description
        .get("capabilities")?
        .as_array()?
        .iter()
        .find(|c| c.get("id").and_then(Value::as_u64) == Some(cap_id))?
        .get("offset")?
        .as_u64()
}

/// If the device describes an MSI capability, the guest (through QEMU's MSI emulation) sees
/// it there with the Message Control the function advertises (vectors, 64-bit, per-vector
/// masking) and MSI disabled.
fn check_msi_cap(ctx: &mut HostCtx<'_>, id: &str, bdf: &str) -> Result<(), HostError> {
    let raw = ctx.device(id)?.description.raw.clone();
    let Some(at) = described_cap(&raw, 0x05) else {
        ctx.diag(&format!("{id} describes no MSI capability"));
        return Ok(());
    };
    let out = ctx.sh(&format!(
        "od -An -tx1 -j{at} -N4 /sys/bus/pci/devices/{bdf}/config"
    ))?;
    let b: Vec<u8> = out
        .split_whitespace()
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    let control = match b.as_slice() {
        [0x05, _, lo, hi] => Some(u16::from_le_bytes([*lo, *hi])),
        _ => None,
    };
    let vectors = control.map(|c| 1u32 << ((c >> 1) & 7));
    ctx.check(
        &format!(
            "the guest sees MSI at {at:#x}: {} vectors requested, 64-bit, per-vector masking, disabled",
            vectors.unwrap_or(0)
        ),
        control.is_some_and(|c| c & 0x0181 == 0x0180),
        format!("config bytes {at:#x}..+4: {}", out.trim()),
    );
    Ok(())
}

fn h2_hot_remove(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    let bdf = ensure_bound(ctx, &id)?;
    ctx.pass(&format!("{id} at {bdf} is plugged with vfio-pci bound"));
    let took = unplug(ctx, &id)?;
    ctx.progress(&format!("device_del → DEVICE_DELETED {}", ms(took)));
    ctx.pass(&format!("device_del {id} → DEVICE_DELETED in {}", ms(took)));
    thread::sleep(Duration::from_millis(200));
    ctx.check_qemu()?;
    ctx.pass("QEMU lives on after the unplug");
    let gone = wait_gone(ctx, &bdf)?;
    ctx.check(
        &format!("the guest's sysfs entry {bdf} is gone"),
        gone,
        "still in /sys/bus/pci/devices 10 s after DEVICE_DELETED",
    );
    let listed = locate(ctx, &id)?;
    ctx.check(
        &format!("QEMU no longer lists {id}"),
        listed.is_none(),
        "still in query-pci",
    );
    let detached = wait_detached(ctx, &id)?;
    ctx.check(
        "the server saw the client go (no client attached)",
        detached,
        format!(
            "the server still reports a client {} s later",
            DETACH_TIMEOUT.as_secs()
        ),
    );
    let records = ctx.journal(&id)?;
    let disc = records
        .iter()
        .position(|r| record_is(r, "client_disconnected", &[]));
    ctx.check(
        &format!("{id} journaled client_disconnected"),
        disc.is_some(),
        "no client_disconnected since the scenario started",
    );
    let lost = |ty: &str| {
        disc.and_then(|d| {
            records[d..]
                .iter()
                .position(|r| record_is(r, ty, &[("kind", "lost-connection")]))
        })
    };
    ctx.check(
        &format!("{id} journaled a lost-connection reset after it"),
        lost("reset_begin").is_some() && lost("reset_end").is_some(),
        "no reset_begin/reset_end kind=lost-connection after client_disconnected",
    );
    Ok(())
}

/// What H3 measures of the server process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fds, {} threads, RSS {} KiB",
            self.fds, self.threads, self.rss_kib
        )
    }
}

/// A `/proc/<pid>/status` field's first number (`VmRSS:  1234 kB` → 1234).
fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn usage(pid: u32) -> Result<Usage, HostError> {
    let err =
        |what: &str, e: std::io::Error| HostError::Step(format!("reading /proc/{pid}/{what}: {e}"));
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| err("fd", e))?
        .count();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| err("status", e))?;
    let field = |k: &str| {
        status_field(&status, k)
            .ok_or_else(|| HostError::Step(format!("/proc/{pid}/status has no {k}")))
    };
    Ok(Usage {
        fds,
        threads: usize::try_from(field("Threads")?).unwrap_or(usize::MAX),
        rss_kib: field("VmRSS")?,
    })
}

/// The pid of the `pcisim serve` whose control socket is `control`.
fn server_pid(control: &Path) -> Option<u32> {
    let want = control.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serving = args.iter().any(|a| *a == b"serve");
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"--control" && w[1] == want);
        (serving && ours).then_some(pid)
    })
}

fn summary(ds: &[Duration]) -> String {
    let mut v: Vec<Duration> = ds.to_vec();
    v.sort();
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(min), Some(med), Some(max)) => {
            format!("min {} / median {} / max {}", ms(*min), ms(*med), ms(*max))
        }
        _ => "none".into(),
    }
}

fn h3_add_remove_cycles(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    if locate(ctx, &id)?.is_some() {
        let t = unplug(ctx, &id)?;
        ctx.diag(&format!("setup: {id} was plugged; removed it ({})", ms(t)));
    }
    let control = ctx.control().path().to_path_buf();
    let Some(pid) = server_pid(&control) else {
        return Err(HostError::Step(format!(
            "no `pcisim serve` process with --control {}",
            control.display()
        )));
    };
    if !wait_detached(ctx, &id)? {
        return Err(HostError::Step(format!(
            "setup: the server still has a client on {id}"
        )));
    }
    let before = usage(pid)?;
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for cycle in 1..=H3_CYCLES {
        let name = format!("cycle {cycle}: device_add, probed, device_del, detached");
        let (info, add) = match plug(ctx, &id) {
            Ok(p) => p,
            Err(HostError::Step(why)) => {
                ctx.fail(&name, &why);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let del = unplug(ctx, &id)?;
        let gone = wait_gone(ctx, &info.bdf())?;
        let detached = wait_detached(ctx, &id)?;
        ctx.progress(&format!(
            "cycle {cycle}/{H3_CYCLES}: probed {}, DEVICE_DELETED {}",
            ms(add),
            ms(del)
        ));
        adds.push(add);
        dels.push(del);
        if !ctx.check(
            &format!("{name} ({} / {})", ms(add), ms(del)),
            gone && detached,
            match (gone, detached) {
                (false, _) => "the guest still lists the device",
                _ => "the server still reports a client",
            },
        ) {
            return Ok(());
        }
    }
    // Let the last lost-connection reset finish before measuring.
    thread::sleep(Duration::from_millis(200));
    let after = usage(pid)?;
    ctx.diag(&format!("hot-add → probed: {}", summary(&adds)));
    ctx.diag(&format!("device_del → DEVICE_DELETED: {}", summary(&dels)));
    ctx.diag(&format!("server (pid {pid}) before: {before}"));
    ctx.diag(&format!("server (pid {pid}) after:  {after}"));
    ctx.progress(&format!(
        "server before {before}; after {H3_CYCLES} cycles {after}"
    ));
    ctx.check(
        &format!(
            "no fd leak over {H3_CYCLES} cycles ({} → {})",
            before.fds, after.fds
        ),
        after.fds <= before.fds + FD_TOLERANCE,
        format!("{} → {} open fds", before.fds, after.fds),
    );
    ctx.check(
        &format!(
            "no thread leak over {H3_CYCLES} cycles ({} → {})",
            before.threads, after.threads
        ),
        after.threads <= before.threads + THREAD_TOLERANCE,
        format!("{} → {} threads", before.threads, after.threads),
    );
    ctx.check(
        &format!(
            "RSS does not grow over {H3_CYCLES} cycles ({} → {} KiB, tolerance {RSS_TOLERANCE_KIB} KiB)",
            before.rss_kib, after.rss_kib
        ),
        after.rss_kib <= before.rss_kib + RSS_TOLERANCE_KIB,
        format!("{} → {} KiB", before.rss_kib, after.rss_kib),
    );
    let records = ctx.journal(&id)?;
    let (conn, disc, lost) = (
        count_records(&records, "client_connected", &[]),
        count_records(&records, "client_disconnected", &[]),
        count_records(&records, "reset_end", &[("kind", "lost-connection")]),
    );
    ctx.check(
        &format!("{id} journaled {H3_CYCLES} connects, disconnects and lost-connection resets"),
        conn == H3_CYCLES && disc == H3_CYCLES && lost == H3_CYCLES,
        format!(
            "{conn} client_connected, {disc} client_disconnected, {lost} lost-connection resets"
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_status_field() {
        let s = "Name:\tpcisim\nThreads:\t7\nVmRSS:\t   12345 kB\n";
        assert_eq!(status_field(s, "VmRSS"), Some(12345));
        assert_eq!(status_field(s, "Threads"), Some(7));
        assert_eq!(status_field(s, "VmSwap"), None);
    }

    #[test]
    fn test_wait_script() {
        let s = wait_sysfs_script("0000:02:00.0", true, Duration::from_secs(1));
        assert!(s.contains("while [ ! -e $d ]"));
        assert!(s.contains("-ge 100 "));
        let s = wait_sysfs_script("0000:02:00.0", false, Duration::from_secs(1));
        assert!(s.contains("while [ -e $d ]"));
    }

    #[test]
    fn test_server_pid_of_this_process_is_none() {
        assert_eq!(server_pid(Path::new("/nonexistent/control.sock")), None);
    }

    #[test]
    fn test_described_cap() {
        let d =
            serde_json::json!({"capabilities": [{"id": 1, "offset": 64}, {"id": 5, "offset": 72}]});
        assert_eq!(described_cap(&d, 5), Some(72));
        assert_eq!(described_cap(&d, 0x11), None);
        assert_eq!(described_cap(&serde_json::json!({}), 5), None);
    }

    #[test]
    fn test_summary() {
        let d = |m| Duration::from_millis(m);
        assert_eq!(
            summary(&[d(30), d(10), d(20)]),
            "min 10.0 ms / median 20.0 ms / max 30.0 ms"
        );
        assert_eq!(summary(&[]), "none");
    }
}
