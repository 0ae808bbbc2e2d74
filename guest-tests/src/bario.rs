//! `bar-io`: 32-bit reads and writes of a BAR through its sysfs `resourceN` mapping, for host
//! scenarios that check what the device answers (H5: all-ones while the link is down).
//!
//! `pcisim-guest bar-io --bdf BDF [--bar N] --off OFF[,OFF..] [--write VALUE]` writes VALUE
//! at the first offset (if given), then prints `OFF=0xVALUE` per offset read.

use crate::mmio::Mapping;
use crate::pci;
use pcisim_guest_wire::BarIoOptions;
use std::path::Path;

pub fn run(o: BarIoOptions) -> i32 {
    match go(o) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bar-io: {e}");
            1
        }
    }
}

fn go(o: BarIoOptions) -> Result<(), String> {
    let bdf = &o.bdf;
    let bar = o.bar.unwrap_or(0);
    let offs = o.off;
    if offs.is_empty() {
        return Err("--off: no offset".into());
    }
    let end = offs.iter().max().copied().unwrap_or(0) + 4;
    let len = (end as usize).div_ceil(4096) * 4096;
    let path = Path::new(pci::SYSFS_PCI_DEVICES)
        .join(bdf)
        .join(format!("resource{bar}"));
    let m = Mapping::map_file(&path, len)?;
    if let Some(v) = o.write {
        m.write32(offs[0], v)?;
    }
    for off in offs {
        println!("{off:#x}={:#010x}", m.read32(off)?);
    }
    Ok(())
}
