//! PCI decoding from sysfs: finding functions, config-space fields, capability
//! lists and the `resource` file. The decoding functions are pure (they take
//! bytes or text) so that they can be unit-tested on synthetic input.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// `IORESOURCE_IO`
pub const IORESOURCE_IO: u64 = 0x0000_0100;
/// `IORESOURCE_MEM`
pub const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_PREFETCH`
pub const IORESOURCE_PREFETCH: u64 = 0x0000_2000;
/// `IORESOURCE_MEM_64`
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;

const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
const PCI_CAPABILITY_LIST: usize = 0x34;
const PCI_STD_HEADER_END: usize = 0x40;
const PCI_CFG_SPACE_SIZE: usize = 0x100;
const PCI_EXT_CAP_START: usize = 0x100;

/// A BAR, a capability, an extended capability and everything E1 compares: the types the lab
/// checks `pcisim describe`'s output against ([`pcisim_guest_wire`]), decoded here.
pub use pcisim_guest_wire::{Bar, Cap, ExtCap};
/// Everything E1 compares: the shape `pcisim describe` prints for one device.
pub type DeviceView = pcisim_guest_wire::DeviceDescription;

/// The result of walking a capability list: what was found before any error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk<T> {
    pub caps: Vec<T>,
    pub error: Option<String>,
}

fn rd8(cfg: &[u8], off: usize) -> Option<u8> {
    cfg.get(off).copied()
}

fn rd16(cfg: &[u8], off: usize) -> Option<u16> {
    let b = cfg.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn rd32(cfg: &[u8], off: usize) -> Option<u32> {
    let b = cfg.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Walks the standard capability list starting at the pointer in 0x34.
///
/// Stops with an error on a pointer into the header (< 0x40), past the end of
/// the legacy config space or of the data, or on a loop.
pub fn walk_capabilities(cfg: &[u8]) -> Walk<Cap> {
    let mut caps = Vec::new();
    let status = match rd16(cfg, PCI_STATUS) {
        Some(s) => s,
        None => {
            return Walk {
                caps,
                error: Some("config space shorter than the header".into()),
            }
        }
    };
    if status & PCI_STATUS_CAP_LIST == 0 {
        return Walk { caps, error: None };
    }
    let mut ptr = match rd8(cfg, PCI_CAPABILITY_LIST) {
        Some(p) => usize::from(p & 0xfc),
        None => {
            return Walk {
                caps,
                error: Some("config space shorter than the header".into()),
            }
        }
    };
    let mut seen = HashSet::new();
    while ptr != 0 {
        if !(PCI_STD_HEADER_END..PCI_CFG_SPACE_SIZE).contains(&ptr) {
            return Walk {
                caps,
                error: Some(format!("bad capability pointer 0x{ptr:02x}")),
            };
        }
        if !seen.insert(ptr) {
            return Walk {
                caps,
                error: Some(format!("capability list loops back to 0x{ptr:02x}")),
            };
        }
        let (id, next) = match (rd8(cfg, ptr), rd8(cfg, ptr + 1)) {
            (Some(id), Some(next)) => (id, next),
            _ => {
                return Walk {
                    caps,
                    error: Some(format!("capability at 0x{ptr:02x} past end of data")),
                }
            }
        };
        caps.push(Cap {
            id,
            offset: ptr as u16,
        });
        ptr = usize::from(next & 0xfc);
    }
    Walk { caps, error: None }
}

/// Walks the extended capability list from 0x100 (header: id[15:0],
/// version[19:16], next[31:20]). An all-zero or all-ones header at 0x100 means
/// no list (conventional device, or extended config space not reachable).
pub fn walk_ext_capabilities(cfg: &[u8]) -> Walk<ExtCap> {
    let mut caps = Vec::new();
    if cfg.len() <= PCI_EXT_CAP_START {
        return Walk { caps, error: None };
    }
    let mut ptr = PCI_EXT_CAP_START;
    let mut seen = HashSet::new();
    loop {
        let header = match rd32(cfg, ptr) {
            Some(h) => h,
            None => {
                return Walk {
                    caps,
                    error: Some(format!(
                        "extended capability at 0x{ptr:03x} past end of data"
                    )),
                }
            }
        };
        if ptr == PCI_EXT_CAP_START && (header == 0 || header == 0xffff_ffff) {
            return Walk { caps, error: None };
        }
        if header == 0xffff_ffff {
            return Walk {
                caps,
                error: Some(format!("extended capability at 0x{ptr:03x} reads all-ones")),
            };
        }
        if !seen.insert(ptr) {
            return Walk {
                caps,
                error: Some(format!(
                    "extended capability list loops back to 0x{ptr:03x}"
                )),
            };
        }
        caps.push(ExtCap {
            id: (header & 0xffff) as u16,
            version: ((header >> 16) & 0xf) as u8,
            offset: ptr as u16,
        });
        let next = ((header >> 20) & 0xffc) as usize;
        if next == 0 {
            return Walk { caps, error: None };
        }
        if next < PCI_EXT_CAP_START {
            return Walk {
                caps,
                error: Some(format!("bad extended capability pointer 0x{next:03x}")),
            };
        }
        ptr = next;
    }
}

/// One line of the sysfs `resource` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
}

impl Resource {
    /// Size in bytes (0 for an unused slot).
    pub fn size(&self) -> u64 {
        if self.start == 0 && self.end == 0 {
            0
        } else {
            self.end.wrapping_sub(self.start).wrapping_add(1)
        }
    }
}

fn parse_hex_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(digits, 16).map_err(|e| format!("bad hex number {t:?}: {e}"))
}

/// Parses the sysfs `resource` file: one `start end flags` line (hex) per
/// resource, BARs 0-5 first, then the ROM and (for bridges) windows.
pub fn parse_resource_file(text: &str) -> Result<Vec<Resource>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 3 {
            return Err(format!(
                "resource line {}: expected 3 fields, got {:?}",
                n + 1,
                line
            ));
        }
        out.push(Resource {
            start: parse_hex_u64(fields[0])?,
            end: parse_hex_u64(fields[1])?,
            flags: parse_hex_u64(fields[2])?,
        });
    }
    Ok(out)
}

/// The memory and I/O BARs (indices 0-5) that have a size.
pub fn bars_from_resources(res: &[Resource]) -> Vec<Bar> {
    res.iter()
        .take(6)
        .enumerate()
        .filter(|(_, r)| r.size() > 0 && r.flags & (IORESOURCE_MEM | IORESOURCE_IO) != 0)
        .map(|(i, r)| Bar {
            index: i as u32,
            size: r.size(),
            mem64: r.flags & IORESOURCE_MEM_64 != 0,
            prefetchable: r.flags & IORESOURCE_PREFETCH != 0,
        })
        .collect()
}

/// Decodes the fields E1 compares. Capability-walk errors are returned beside
/// the view (the view holds what was found before the error).
pub fn decode(
    cfg: &[u8],
    resources: &[Resource],
) -> Result<(DeviceView, Option<String>, Option<String>), String> {
    let need = |what: &str, v: Option<u32>| {
        v.ok_or_else(|| format!("config space too short for {what} ({} bytes)", cfg.len()))
    };
    let vendor_id = need("vendor", rd16(cfg, 0x00).map(u32::from))? as u16;
    let device_id = need("device", rd16(cfg, 0x02).map(u32::from))? as u16;
    let class_rev = need("class", rd32(cfg, 0x08))?;
    let subsystem_vendor_id = need("subsystem vendor", rd16(cfg, 0x2c).map(u32::from))? as u16;
    let subsystem_id = need("subsystem", rd16(cfg, 0x2e).map(u32::from))? as u16;
    let caps = walk_capabilities(cfg);
    let ext = walk_ext_capabilities(cfg);
    Ok((
        DeviceView {
            vendor_id,
            device_id,
            class_code: class_rev >> 8,
            revision: (class_rev & 0xff) as u8,
            subsystem_vendor_id,
            subsystem_id,
            bars: bars_from_resources(resources),
            capabilities: caps.caps,
            ext_capabilities: ext.caps,
        },
        caps.error,
        ext.error,
    ))
}

/// Parses a number written as `0x...` hex or decimal.
pub fn parse_number(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).map_err(|e| format!("bad number {t:?}: {e}"))
    } else {
        t.parse::<u64>()
            .map_err(|e| format!("bad number {t:?}: {e}"))
    }
}

/// A PCI function in sysfs.
#[derive(Debug, Clone)]
pub struct Function {
    pub bdf: String,
    pub path: PathBuf,
}

impl Function {
    pub fn attr(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn read_attr(&self, name: &str) -> Result<String, String> {
        let p = self.attr(name);
        std::fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()))
    }

    pub fn write_attr(&self, name: &str, value: &str) -> Result<(), String> {
        let p = self.attr(name);
        write_sysfs(&p, value)
    }

    pub fn resources(&self) -> Result<Vec<Resource>, String> {
        parse_resource_file(&self.read_attr("resource")?)
    }

    /// The name of the bound driver, if any.
    pub fn driver(&self) -> Option<String> {
        let link = std::fs::read_link(self.attr("driver")).ok()?;
        link.file_name().map(|n| n.to_string_lossy().into_owned())
    }
}

/// Writes a sysfs attribute in one `write` (sysfs needs the value in one go).
pub fn write_sysfs(path: &Path, value: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    f.write_all(value.as_bytes())
        .map_err(|e| format!("write {:?} to {}: {e}", value, path.display()))
}

/// The functions in `root` (normally /sys/bus/pci/devices) with these IDs,
/// sorted by address.
pub fn find_functions_in(root: &Path, vendor: u16, device: u16) -> Result<Vec<Function>, String> {
    let rd = std::fs::read_dir(root).map_err(|e| format!("read {}: {e}", root.display()))?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        let id = |name: &str| -> Option<u64> {
            let t = std::fs::read_to_string(path.join(name)).ok()?;
            parse_number(&t).ok()
        };
        if id("vendor") == Some(u64::from(vendor)) && id("device") == Some(u64::from(device)) {
            out.push(Function {
                bdf: entry.file_name().to_string_lossy().into_owned(),
                path,
            });
        }
    }
    out.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(out)
}

/// Finds the function to test: the one named by `bdf` if given (it must have the
/// IDs), else the first with the IDs. Returns it and a note for the log.
pub fn select_function(
    vendor: u16,
    device: u16,
    bdf: Option<&str>,
) -> Result<(Function, Option<String>), String> {
    let all = find_functions_in(Path::new(SYSFS_PCI_DEVICES), vendor, device)?;
    if all.is_empty() {
        return Err(format!(
            "no PCI function with vendor 0x{vendor:04x} device 0x{device:04x} in {SYSFS_PCI_DEVICES}"
        ));
    }
    let names: Vec<&str> = all.iter().map(|f| f.bdf.as_str()).collect();
    let note = if all.len() > 1 {
        Some(format!(
            "{} functions match: {}",
            all.len(),
            names.join(" ")
        ))
    } else {
        None
    };
    match bdf {
        Some(want) => all
            .iter()
            .find(|f| f.bdf == want)
            .cloned()
            .map(|f| (f, note))
            .ok_or_else(|| format!("{want} is not among the matching functions ({names:?})")),
        None => all
            .first()
            .cloned()
            .map(|f| (f, note))
            .ok_or_else(|| "no function".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 KiB config space with the capability list bit set.
    fn cfg_with_caps() -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        c[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x0b10u16.to_le_bytes());
        c[6..8].copy_from_slice(&0x0010u16.to_le_bytes());
        c[8..12].copy_from_slice(&0x0302_0001u32.to_le_bytes());
        c[0x2c..0x2e].copy_from_slice(&0x1234u16.to_le_bytes());
        c[0x2e..0x30].copy_from_slice(&0x0001u16.to_le_bytes());
        c[0x34] = 0x40;
        c
    }

    fn set_cap(c: &mut [u8], off: usize, id: u8, next: u8) {
        c[off] = id;
        c[off + 1] = next;
    }

    fn set_ext(c: &mut [u8], off: usize, id: u16, ver: u32, next: u32) {
        let h = u32::from(id) | (ver << 16) | (next << 20);
        c[off..off + 4].copy_from_slice(&h.to_le_bytes());
    }

    #[test]
    fn walks_standard_list() {
        let mut c = cfg_with_caps();
        set_cap(&mut c, 0x40, 0x01, 0x48);
        set_cap(&mut c, 0x48, 0x11, 0x60);
        set_cap(&mut c, 0x60, 0x10, 0x00);
        let w = walk_capabilities(&c);
        assert_eq!(w.error, None);
        assert_eq!(
            w.caps,
            vec![
                Cap { id: 1, offset: 64 },
                Cap { id: 17, offset: 72 },
                Cap { id: 16, offset: 96 }
            ]
        );
    }

    #[test]
    fn standard_list_low_bits_of_pointers_are_ignored() {
        let mut c = cfg_with_caps();
        c[0x34] = 0x43;
        set_cap(&mut c, 0x40, 0x05, 0x53);
        set_cap(&mut c, 0x50, 0x09, 0x00);
        let w = walk_capabilities(&c);
        assert_eq!(w.error, None);
        assert_eq!(w.caps.len(), 2);
        assert_eq!(w.caps[1].offset, 0x50);
    }

    #[test]
    fn standard_list_detects_loop() {
        let mut c = cfg_with_caps();
        set_cap(&mut c, 0x40, 0x01, 0x48);
        set_cap(&mut c, 0x48, 0x11, 0x40);
        let w = walk_capabilities(&c);
        assert_eq!(w.caps.len(), 2);
        assert!(w.error.unwrap().contains("loops"));
    }

    #[test]
    fn standard_list_self_loop() {
        let mut c = cfg_with_caps();
        set_cap(&mut c, 0x40, 0x01, 0x40);
        let w = walk_capabilities(&c);
        assert_eq!(w.caps.len(), 1);
        assert!(w.error.is_some());
    }

    #[test]
    fn standard_list_detects_bad_pointer() {
        let mut c = cfg_with_caps();
        set_cap(&mut c, 0x40, 0x01, 0x10); // into the header
        let w = walk_capabilities(&c);
        assert_eq!(
            w.caps,
            vec![Cap {
                id: 1,
                offset: 0x40
            }]
        );
        assert!(w.error.unwrap().contains("bad capability pointer 0x10"));
        // First pointer bad.
        let mut c = cfg_with_caps();
        c[0x34] = 0x3c;
        let w = walk_capabilities(&c);
        assert!(w.caps.is_empty());
        assert!(w.error.is_some());
    }

    #[test]
    fn standard_list_short_data() {
        // Only the legacy 64-byte header plus a cap pointing past the data.
        let mut c = cfg_with_caps();
        c.truncate(0x44);
        set_cap(&mut c, 0x40, 0x01, 0x80);
        let w = walk_capabilities(&c);
        assert_eq!(w.caps.len(), 1);
        assert!(w.error.unwrap().contains("past end"));
        assert!(walk_capabilities(&[0u8; 4]).error.is_some());
    }

    #[test]
    fn no_capability_list_bit_means_empty() {
        let mut c = cfg_with_caps();
        c[6] = 0;
        set_cap(&mut c, 0x40, 0x01, 0x00);
        let w = walk_capabilities(&c);
        assert!(w.caps.is_empty());
        assert!(w.error.is_none());
    }

    #[test]
    fn walks_extended_list() {
        let mut c = cfg_with_caps();
        set_ext(&mut c, 0x100, 0x0001, 2, 0x148);
        set_ext(&mut c, 0x148, 0x000f, 1, 0x150);
        set_ext(&mut c, 0x150, 0x001b, 1, 0x000);
        let w = walk_ext_capabilities(&c);
        assert_eq!(w.error, None);
        assert_eq!(
            w.caps,
            vec![
                ExtCap {
                    id: 1,
                    offset: 256,
                    version: 2
                },
                ExtCap {
                    id: 15,
                    offset: 0x148,
                    version: 1
                },
                ExtCap {
                    id: 0x1b,
                    offset: 0x150,
                    version: 1
                },
            ]
        );
    }

    #[test]
    fn extended_list_empty_cases() {
        let c = cfg_with_caps();
        assert_eq!(walk_ext_capabilities(&c).caps, vec![]);
        let mut c = cfg_with_caps();
        c[0x100..0x104].copy_from_slice(&[0xff; 4]);
        let w = walk_ext_capabilities(&c);
        assert!(w.caps.is_empty() && w.error.is_none());
        // 256-byte (conventional) config space.
        assert!(walk_ext_capabilities(&c[..256]).caps.is_empty());
    }

    #[test]
    fn extended_list_detects_loop_and_bad_pointer() {
        let mut c = cfg_with_caps();
        set_ext(&mut c, 0x100, 0x0001, 2, 0x140);
        set_ext(&mut c, 0x140, 0x000f, 1, 0x100);
        let w = walk_ext_capabilities(&c);
        assert_eq!(w.caps.len(), 2);
        assert!(w.error.unwrap().contains("loops"));

        let mut c = cfg_with_caps();
        set_ext(&mut c, 0x100, 0x0001, 2, 0x040);
        let w = walk_ext_capabilities(&c);
        assert_eq!(w.caps.len(), 1);
        assert!(w.error.unwrap().contains("bad extended capability pointer"));

        // Pointer past the data we have.
        let mut c = cfg_with_caps();
        c.truncate(0x200);
        set_ext(&mut c, 0x100, 0x0001, 2, 0x400);
        let w = walk_ext_capabilities(&c);
        assert_eq!(w.caps.len(), 1);
        assert!(w.error.unwrap().contains("past end"));

        // All-ones in the middle of the list.
        let mut c = cfg_with_caps();
        set_ext(&mut c, 0x100, 0x0001, 2, 0x140);
        c[0x140..0x144].copy_from_slice(&[0xff; 4]);
        let w = walk_ext_capabilities(&c);
        assert_eq!(w.caps.len(), 1);
        assert!(w.error.unwrap().contains("all-ones"));
    }

    const RESOURCE: &str = "\
0x00000000fe000000 0x00000000fe00ffff 0x0000000000140204
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000800000000 0x000000080fffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn parses_resource_file() {
        let r = parse_resource_file(RESOURCE).unwrap();
        assert_eq!(r.len(), 7);
        assert_eq!(r[0].start, 0xfe00_0000);
        assert_eq!(r[0].size(), 65536);
        assert_eq!(r[1].size(), 0);
        assert_eq!(r[2].size(), 256 << 20);
        let bars = bars_from_resources(&r);
        assert_eq!(
            bars,
            vec![
                Bar {
                    index: 0,
                    size: 65536,
                    mem64: true,
                    prefetchable: false
                },
                Bar {
                    index: 2,
                    size: 268435456,
                    mem64: true,
                    prefetchable: true
                },
            ]
        );
    }

    #[test]
    fn resource_file_errors() {
        assert!(parse_resource_file("0x1 0x2\n").is_err());
        assert!(parse_resource_file("0x1 0xzz 0x0\n").is_err());
        assert_eq!(parse_resource_file("\n").unwrap(), vec![]);
        // An I/O BAR counts; the ROM line (index 6) never does.
        let text = "0x0000000000001000 0x000000000000101f 0x0000000000040101\n\
                    0 0 0\n0 0 0\n0 0 0\n0 0 0\n0 0 0\n\
                    0x00000000fe100000 0x00000000fe13ffff 0x0000000000046200\n";
        let bars = bars_from_resources(&parse_resource_file(text).unwrap());
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].size, 32);
        assert!(!bars[0].mem64);
    }

    #[test]
    fn decodes_identity() {
        let mut c = cfg_with_caps();
        set_cap(&mut c, 0x40, 0x01, 0x00);
        let (v, ce, ee) = decode(&c, &parse_resource_file(RESOURCE).unwrap()).unwrap();
        assert_eq!(v.vendor_id, 0x1234);
        assert_eq!(v.device_id, 0x0b10);
        assert_eq!(v.class_code, 0x030200);
        assert_eq!(v.revision, 1);
        assert_eq!(v.subsystem_vendor_id, 0x1234);
        assert_eq!(v.subsystem_id, 1);
        assert_eq!(v.bars.len(), 2);
        assert_eq!(v.capabilities.len(), 1);
        assert!(ce.is_none() && ee.is_none());
        assert!(decode(&c[..8], &[]).is_err());
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_number("0x1234\n").unwrap(), 0x1234);
        assert_eq!(parse_number("42").unwrap(), 42);
        assert!(parse_number("0xg").is_err());
    }

    #[test]
    fn finds_functions_in_fake_sysfs() {
        let dir = std::env::temp_dir().join(format!("pcisim-guest-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (bdf, v, d) in [
            ("0000:00:02.0", "0x1234", "0x0b10"),
            ("0000:00:01.0", "0x1234", "0x0b10"),
            ("0000:00:03.0", "0x8086", "0x0b10"),
        ] {
            let p = dir.join(bdf);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("vendor"), format!("{v}\n")).unwrap();
            std::fs::write(p.join("device"), format!("{d}\n")).unwrap();
        }
        let f = find_functions_in(&dir, 0x1234, 0x0b10).unwrap();
        let names: Vec<_> = f.iter().map(|f| f.bdf.as_str()).collect();
        assert_eq!(names, vec!["0000:00:01.0", "0000:00:02.0"]);
        assert!(find_functions_in(&dir, 0x1, 0x2).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
