//! `bar-io`: 32-bit reads and writes of a BAR through its sysfs `resourceN` mapping, for host
//! scenarios that check what the device answers (H5: all-ones while the link is down).
//!
//! `pcisim-guest bar-io --bdf BDF [--bar N] --off OFF[,OFF..] [--write VALUE]` writes VALUE
//! at the first offset (if given), then prints `OFF=0xVALUE` per offset read.

use crate::args::Args;
use crate::mmio::Mapping;
use crate::pci;
use std::path::Path;

pub fn run(argv: &[String]) -> i32 {
    match go(argv) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bar-io: {e}");
            1
        }
    }
}

fn go(argv: &[String]) -> Result<(), String> {
    let args = Args::parse(argv, &["bdf", "bar", "off", "write"])?;
    let bdf = args.required("bdf")?;
    let bar = args.get("bar").unwrap_or("0");
    let offs = args
        .required("off")?
        .split(',')
        .map(pci::parse_number)
        .collect::<Result<Vec<u64>, String>>()?;
    let end = offs.iter().max().copied().unwrap_or(0) + 4;
    let len = (end as usize).div_ceil(4096) * 4096;
    let path = Path::new(pci::SYSFS_PCI_DEVICES)
        .join(bdf)
        .join(format!("resource{bar}"));
    let m = Mapping::map_file(&path, len)?;
    if let Some(v) = args.get("write") {
        let v = pci::parse_number(v)?;
        m.write32(offs[0], v as u32)?;
    }
    for off in offs {
        println!("{off:#x}={:#010x}", m.read32(off)?);
    }
    Ok(())
}
