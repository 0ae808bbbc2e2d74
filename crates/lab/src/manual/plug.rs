//! `pcisim lab status`, `plug` and `unplug`.

use super::*;

/// `pcisim lab status`.
pub fn status(dir: &Path, out: &mut dyn Write) -> Result<bool> {
    let state = load_state(dir)?;
    let up = alive(state.qemu_pid, &state.dir);
    let pci = if up {
        let _lock = Lock::take(dir)?;
        qmp(&state)
            .and_then(|mut q| q.query_pci().map_err(lab))
            .ok()
    } else {
        None
    };
    writeln!(
        out,
        "lab VM (profile {}): {}",
        state.profile,
        if up {
            "running"
        } else {
            "NOT running (`pcisim lab down` cleans up)"
        }
    )
    .map_err(io_out)?;
    print_state(&state, pci.as_deref(), out)?;
    Ok(up)
}

pub(super) fn port_by_arg<'a>(state: &'a LabState, slot: &str) -> Result<&'a StatePort> {
    let slot_t = slot.trim();
    state
        .ports
        .iter()
        .find(|p| p.id == slot_t || p.slot.to_string() == slot_t)
        .ok_or_else(|| {
            let all: Vec<String> = state
                .ports
                .iter()
                .map(|p| format!("{} ({})", p.slot, p.id))
                .collect();
            msg(format!(
                "no slot {slot:?} in this VM: the slots are {}",
                all.join(", ")
            ))
        })
}

/// What `plug` did.
#[derive(Debug, Clone)]
pub struct Plugged {
    /// The guest's sysfs name.
    pub bdf: String,
    /// The root port.
    pub port: String,
    /// device_add to the guest's sysfs entry (includes one agent round trip).
    pub took: Duration,
    /// The driver bound in the guest, if any.
    pub driver: String,
}

/// `pcisim lab plug DEV [--slot N]`: `device_add` on a free root port, then waits until the
/// guest has the device in sysfs.
pub fn plug(dir: &Path, id: &str, slot: Option<&str>, out: &mut dyn Write) -> Result<Plugged> {
    let r = running(dir)?;
    let state = &r.state;
    let dev = state.device(id)?;
    let mut q = qmp(state)?;
    let pci = q.query_pci().map_err(lab)?;
    if let Some(at) = pci.iter().find(|p| p.qdev_id == id) {
        return Err(msg(format!(
            "{id} is already plugged (on {} at {}): `pcisim lab unplug {id}` first",
            at.parent.as_deref().unwrap_or("?"),
            at.bdf()
        )));
    }
    let busy = |port: &str| -> Vec<String> {
        pci.iter()
            .filter(|p| p.parent.as_deref() == Some(port))
            .map(|p| format!("{} at {}", p.qdev_id, p.bdf()))
            .collect()
    };
    let port = match slot {
        Some(s) => {
            let p = port_by_arg(state, s)?;
            let b = busy(&p.id);
            if !b.is_empty() {
                return Err(msg(format!(
                    "slot {} ({}) is busy: {} sits there; free slots: {}",
                    p.slot,
                    p.id,
                    b.join(", "),
                    free_slots(state, &pci)
                )));
            }
            p.id.clone()
        }
        // Its own port if free, else the first free hot-add port.
        None if busy(&dev.bus).is_empty() => dev.bus.clone(),
        None => state
            .ports
            .iter()
            .find(|p| p.hotplug && busy(&p.id).is_empty())
            .map(|p| p.id.clone())
            .ok_or_else(|| {
                msg(format!(
                    "no free hot-add slot for {id}: unplug something first"
                ))
            })?,
    };
    let t = Instant::now();
    q.device_add(&state.device_json(dev, &port))
        .map_err(|e| msg(format!("device_add {id} on {port} failed: {e}")))?;
    let info = q
        .query_pci()
        .map_err(lab)?
        .into_iter()
        .find(|p| p.qdev_id == id)
        .ok_or_else(|| {
            msg(format!(
                "QEMU does not list {id} in query-pci after device_add"
            ))
        })?;
    let bdf = info.bdf();
    let mut a = agent(state)?;
    let o = guest_sh(
        &mut a,
        &sysfs::wait_script(&bdf, true, PROBE_TIMEOUT),
        PROBE_TIMEOUT + Duration::from_secs(5),
    )?;
    let took = t.elapsed();
    if o.exit != Some(0) {
        return Err(msg(format!(
            "QEMU added {id} at {bdf} but the guest did not enumerate it within {} s \
             (see {})",
            PROBE_TIMEOUT.as_secs(),
            dir.join("console.log").display()
        )));
    }
    let driver = sysfs::driver(
        &mut Timed {
            agent: &mut a,
            timeout: Duration::from_secs(10),
        },
        &bdf,
    )
    .map_err(timed)?;
    writeln!(
        out,
        "{id} plugged on {port} at {bdf}: the guest saw it {} after device_add (driver: {})",
        ms(took),
        if driver.is_empty() { "none" } else { &driver }
    )
    .map_err(io_out)?;
    Ok(Plugged {
        bdf,
        port,
        took,
        driver,
    })
}

pub(super) fn free_slots(state: &LabState, pci: &[PciDeviceInfo]) -> String {
    let free: Vec<String> = state
        .ports
        .iter()
        .filter(|p| {
            !pci.iter()
                .any(|x| x.parent.as_deref() == Some(p.id.as_str()))
        })
        .map(|p| format!("{} ({})", p.slot, p.id))
        .collect();
    if free.is_empty() {
        "none".into()
    } else {
        free.join(", ")
    }
}

/// `pcisim lab unplug DEV`: `device_del` and waits for `DEVICE_DELETED` and for the guest's sysfs
/// entry to go. Refuses a device with MSI-X unless `force` (QEMU 11.1.3 aborts on it).
pub fn unplug(dir: &Path, id: &str, force: bool, out: &mut dyn Write) -> Result<Duration> {
    let r = running(dir)?;
    let state = &r.state;
    let dev = state.device(id)?;
    let mut q = qmp(state)?;
    let pci = q.query_pci().map_err(lab)?;
    let Some(info) = pci.iter().find(|p| p.qdev_id == id) else {
        return Err(msg(format!(
            "{id} is not plugged: `pcisim lab plug {id}` first"
        )));
    };
    let bdf = info.bdf();
    let msix = dev.kind == "gpu" && !dev.spec.split(',').any(|o| o == "irq=msi");
    if msix && !force {
        return Err(msg(format!(
            "{id} uses MSI-X, and QEMU 11.1.3 aborts on device_del of a vfio-user device with \
             MSI-X (memory_region_del_subregion assertion; the VM would be lost). Serve it with \
             irq=msi (as gpu1 of the manual profile), or pass --force to try anyway"
        )));
    }
    let t = Instant::now();
    let deadline = t + DELETE_TIMEOUT;
    let res = loop {
        match q.device_del(id, DELETE_TIMEOUT) {
            Err(QmpError::Command { desc, .. })
                if desc.contains("guest is busy") && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            r => break r,
        }
    };
    let took = t.elapsed();
    if let Err(e) = res {
        thread::sleep(Duration::from_millis(200));
        let dead = !alive(state.qemu_pid, &state.dir);
        let mut m = format!("device_del {id}: {e}");
        if dead {
            m.push_str(&format!(
                "; QEMU died (see {}){}",
                dir.join("qemu.log").display(),
                if msix {
                    " — expected with MSI-X on QEMU 11.1.3 (use irq=msi)"
                } else {
                    ""
                }
            ));
        } else {
            m.push_str(&format!(
                " (no DEVICE_DELETED within {} s: the guest may hold the device, e.g. a vfio user \
                 that does not release it; QEMU finishes the removal when it does)",
                DELETE_TIMEOUT.as_secs()
            ));
        }
        return Err(msg(m));
    }
    let mut a = agent(state)?;
    let o = guest_sh(
        &mut a,
        &sysfs::wait_script(&bdf, false, Duration::from_secs(10)),
        Duration::from_secs(15),
    )?;
    if o.exit != Some(0) {
        return Err(msg(format!(
            "QEMU reported {id} deleted but the guest still has {bdf} in sysfs"
        )));
    }
    writeln!(
        out,
        "{id} unplugged from {} ({bdf}): DEVICE_DELETED {} after device_del; gone from the guest",
        info.parent.as_deref().unwrap_or("?"),
        ms(took)
    )
    .map_err(io_out)?;
    Ok(took)
}
