//! The NPU function's register interface (docs/npu.md; defined in pcisim-abi), and
//! `npu-peer`: PEER_STATUS read through BAR0 (R0).

use crate::e1::setup_failure;
use crate::ktap::Ktap;
use crate::mmio::Mapping;
use crate::pci;
use pcisim_guest_wire::{DeviceIds, NpuPeerOptions, YesNo};

// The register interface itself is pcisim-abi's (the one copy the device, the lab and the C
// driver share).
pub use pcisim_abi::npu::regs::*;

/// Registers a reset must return to 0 (offset, value written): queue configuration and
/// interrupt routing, none of which starts anything while CONTROL.ENABLE is 0.
pub fn dirty_set() -> Vec<(u64, u32)> {
    vec![
        (SQ_BASE_LO, 0x0001_0000),
        (SQ_SIZE, 16),
        (CQ_BASE_LO, 0x0002_0000),
        (CQ_SIZE, 16),
        (CQ_IRQ, IRQ_ENABLE | 5),
        (FQ_IRQ, IRQ_ENABLE | 6),
    ]
}

/// Compares the dirtied registers with what a reset should have left (`cleared`: 0; else the
/// values written). Reads through `rd`.
pub fn check_dirty_state(
    expect_cleared: bool,
    rd: impl FnMut(u64) -> Result<u32, String>,
) -> Result<(), String> {
    let what = if expect_cleared {
        "not back to 0"
    } else {
        "lost their values"
    };
    let want: Vec<(u64, u32)> = dirty_set()
        .into_iter()
        .map(|(off, written)| (off, if expect_cleared { 0 } else { written }))
        .collect();
    crate::reset::check_registers((ID, ID_MAGIC), &want, what, rd)
}

/// The register writes that make the NPU raise `vector` on demand: CMD_IRQ routed to it, then
/// an INVALIDATE of the whole of PASID 1 (synchronous, succeeds bound or not), whose completion
/// raises CMD_IRQ's vector.
pub fn irq_writes(vector: u32) -> Vec<(u64, u32)> {
    vec![
        (CMD_IRQ, IRQ_ENABLE | vector),
        (CMD_PASID, 1),
        (CMD_FLAGS, 0),
        (CMD_ADDR_LO, 0),
        (CMD_ADDR_HI, 0),
        (CMD_LEN_LO, u32::MAX),
        (CMD_LEN_HI, u32::MAX),
        (CMD_OP, OP_INVALIDATE),
    ]
}

/// The NPU program's subtests, in the order they are reported.
const SUBTESTS: &[&str] = &["id", "peer-status"];

/// `npu-peer --vendor V --device D [--bdf BDF] --present yes|no`: the NPU's ID, and its
/// PEER_STATUS reports a configured peer, present or not as expected.
pub fn run(ids: DeviceIds, o: NpuPeerOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let present = o.present == YesNo::Yes;
        let (func, _) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        if let Some(d) = func.driver() {
            return Err(format!(
                "{} is bound to {d}; the test needs it unbound",
                func.bdf
            ));
        }
        let was_enabled = func.read_attr("enable")?.trim().to_string();
        func.write_attr("enable", "1")?;
        let res = func.resources()?;
        let size = res
            .first()
            .filter(|r| r.flags & pci::IORESOURCE_MEM != 0 && r.size() >= 0x1000)
            .map(pci::Resource::size)
            .ok_or_else(|| "BAR0 is not a memory BAR of at least 4 KiB".to_string())?;
        let len = usize::try_from(size).map_err(|_| format!("BAR0 size {size:#x}"))?;
        let regs = Mapping::map_file(&func.attr("resource0"), len)?;
        Ok((func, present, was_enabled, regs))
    })();
    let (func, present, was_enabled, regs) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let mut k = Ktap::declared(SUBTESTS);
    k.diag(&format!("NPU {} BAR0 registers", func.bdf));
    let r = regs.read32(ID).and_then(|id| {
        if id == ID_MAGIC {
            Ok(())
        } else {
            Err(format!("ID 0x{id:08x}, expected 0x{ID_MAGIC:08x}"))
        }
    });
    k.check("id", r);
    let r = regs.read32(PEER_STATUS).and_then(|s| {
        let peer_id = regs.read32(PEER_ID)?;
        k.diag(&format!("PEER_STATUS 0x{s:x} PEER_ID 0x{peer_id:08x}"));
        let want = PEER_CONFIGURED | if present { PEER_PRESENT } else { 0 };
        if s & (PEER_CONFIGURED | PEER_PRESENT) != want {
            Err(format!("PEER_STATUS 0x{s:x}, expected bits 0x{want:x}"))
        } else if peer_id == 0 {
            Err("PEER_ID is 0 with a peer configured".into())
        } else {
            Ok(())
        }
    });
    k.check("peer-status", r);
    drop(regs);
    if was_enabled == "0" {
        if let Err(e) = func.write_attr("enable", "0") {
            k.diag(&format!("restoring enable=0: {e}"));
        }
    }
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn marker_writes_leave_the_dirtied_registers_alone() {
        let dirty: Vec<u64> = dirty_set().iter().map(|(o, _)| *o).collect();
        let irq = irq_writes(2);
        assert!(irq.iter().all(|(o, _)| !dirty.contains(o)));
        assert_eq!(irq[0], (CMD_IRQ, IRQ_ENABLE | 2));
        assert_eq!(
            irq.last(),
            Some(&(CMD_OP, OP_INVALIDATE)),
            "the command runs last"
        );
    }

    #[test]
    fn dirty_state_checks() {
        let mut regs: BTreeMap<u64, u32> = dirty_set().into_iter().collect();
        regs.insert(ID, ID_MAGIC);
        let rd = |m: &BTreeMap<u64, u32>| {
            let m = m.clone();
            move |off: u64| Ok(m.get(&off).copied().unwrap_or(0))
        };
        assert_eq!(check_dirty_state(false, rd(&regs)), Ok(()));
        assert!(check_dirty_state(true, rd(&regs)).is_err());
        let cleared: BTreeMap<u64, u32> = [(ID, ID_MAGIC)].into_iter().collect();
        assert_eq!(check_dirty_state(true, rd(&cleared)), Ok(()));
        assert!(
            check_dirty_state(true, rd(&BTreeMap::new())).is_err(),
            "ID checked"
        );
    }
}
