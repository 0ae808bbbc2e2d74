//! The guest's PCI sysfs: waiting for a device to appear or go, the driver bound to it, binding
//! vfio-pci.

use std::time::Duration;

use super::{sh_output, GuestShell};

/// A guest script that waits (10 ms steps) until `/sys/bus/pci/devices/<bdf>` exists
/// (`present`) or is gone, for at most `timeout`; exits 0 when it happened, 1 on timeout.
pub fn wait_script(bdf: &str, present: bool, timeout: Duration) -> String {
    let steps = (timeout.as_millis() / 10).max(1);
    let test = if present { "! -e" } else { "-e" };
    format!(
        "d=/sys/bus/pci/devices/{bdf}; n=0; while [ {test} $d ]; do n=$((n+1)); \
         if [ $n -ge {steps} ]; then exit 1; fi; usleep 10000; done; exit 0"
    )
}

/// Waits until the guest's sysfs entry `bdf` exists (`present`) or is gone, for at most
/// `timeout`; `Ok(false)` if it did not happen.
pub fn wait<G: GuestShell + ?Sized>(
    g: &mut G,
    bdf: &str,
    present: bool,
    timeout: Duration,
) -> Result<bool, G::Error> {
    Ok(sh_output(g, &wait_script(bdf, present, timeout))?.exit == Some(0))
}

/// The driver bound to `bdf` in the guest (empty if none).
pub fn driver<G: GuestShell + ?Sized>(g: &mut G, bdf: &str) -> Result<String, G::Error> {
    let out = sh_output(
        g,
        &format!("l=$(readlink /sys/bus/pci/devices/{bdf}/driver) && basename $l; true"),
    )?;
    Ok(out.stdout.trim().to_string())
}

/// Binds vfio-pci to `bdf` through `driver_override` and `drivers_probe`; returns the driver
/// bound afterwards and how long the guest took.
pub fn bind_vfio<G: GuestShell + ?Sized>(
    g: &mut G,
    bdf: &str,
) -> Result<(String, Duration), G::Error> {
    let out = sh_output(
        g,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_wait_script_polls_in_10ms_steps() {
        let s = wait_script("0000:01:00.0", true, Duration::from_secs(2));
        assert!(s.contains("while [ ! -e $d ]"), "{s}");
        assert!(s.contains("-ge 200"), "{s}");
        let s = wait_script("0000:01:00.0", false, Duration::from_millis(1));
        assert!(s.contains("while [ -e $d ]") && s.contains("-ge 1"), "{s}");
    }
}
