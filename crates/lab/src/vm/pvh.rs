//! Booting the guest kernel through its PVH entry under TCG: QEMU loads an uncompressed
//! `vmlinux` that carries a `XEN_ELFNOTE_PHYS32_ENTRY` note (`CONFIG_PVH=y`, as in Debian's
//! kernels) straight into guest memory and jumps to that entry, so the bzImage's decompressor,
//! which TCG emulates instruction by instruction (~1 s of QEMU's CPU time per boot for Debian's
//! 12 MB zstd image, docs/perf.md), never runs.
//!
//! [`pvh_kernel`] extracts the payload of a bzImage (the setup header's `payload_offset` and
//! `payload_length`, boot protocol 2.08+) with the host's decompressor, checks that the result is
//! an x86-64 ELF with the PVH note, and keeps it in the lab's cache
//! (`<cache>/pvh/<key>/vmlinux`, the key from the image's path, size and modification time), so
//! the extraction runs once per kernel. Anything else (no PVH note, no tool, a vmlinux already)
//! is `None` and the lab boots the image as given. Under KVM the image is always used as given
//! (issue 15: a PVH boot printed nothing there).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use log::{debug, info};

use crate::kernel::image::decompress;

/// `XEN_ELFNOTE_PHYS32_ENTRY` (include/xen/interface/elfnote.h): the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The uncompressed, PVH-bootable vmlinux of the bzImage at `image`, from the cache under
/// `cache` or extracted into it now; `None` if the image cannot be booted that way.
pub fn pvh_kernel(image: &Path, cache: &Path) -> Option<PathBuf> {
    let meta = fs::metadata(image).ok()?;
    let key = format!(
        "{:016x}",
        fnv(format!(
            "{}\0{}\0{}\0{}",
            image.display(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        )
        .as_bytes())
    );
    let dir = cache.join("pvh").join(key);
    let out = dir.join("vmlinux");
    if out.is_file() {
        return Some(out);
    }
    let bytes = fs::read(image).ok()?;
    let vmlinux = extract(&bytes)?;
    if !has_pvh_entry(&vmlinux) {
        debug!(
            "{}: no PVH entry note: booted as a bzImage",
            image.display()
        );
        return None;
    }
    fs::create_dir_all(&dir).ok()?;
    let tmp = dir.join(format!("vmlinux.{}", std::process::id()));
    fs::write(&tmp, &vmlinux).ok()?;
    fs::rename(&tmp, &out).ok()?;
    info!(
        "{}: PVH vmlinux extracted to {} ({} bytes)",
        image.display(),
        out.display(),
        vmlinux.len()
    );
    Some(out)
}

/// The decompressed payload of a bzImage, or `None` (not a bzImage, too old a boot protocol, an
/// unknown compression or no host tool for it).
pub fn extract(image: &[u8]) -> Option<Vec<u8>> {
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(o..o + 4)?.try_into().ok()?))
    };
    // "HdrS" and protocol >= 2.08 (payload fields).
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let version = u16::from_le_bytes(image.get(0x206..0x208)?.try_into().ok()?);
    if version < 0x0208 {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + usize::try_from(u32_at(0x248)?).ok()?;
    let len = usize::try_from(u32_at(0x24c)?).ok()?;
    let payload = image.get(start..start.checked_add(len)?)?;
    let (tool, args): (&str, &[&str]) = match payload {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", &["-dcq"]),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", &["-dcq"]),
        [0x1f, 0x8b, ..] => ("gzip", &["-dcq"]),
        [0x5d, 0, 0, ..] => ("xz", &["-dcq", "--format=lzma"]),
        [0x02, 0x21, 0x4c, 0x18, ..] => ("lz4", &["-dcq", "-"]),
        [b'B', b'Z', b'h', ..] => ("bzip2", &["-dcq"]),
        _ => return None,
    };
    let out = decompress(tool, args, payload)?;
    out.starts_with(b"\x7fELF").then_some(out)
}

/// Whether `elf` (an x86-64 ELF64 executable) has a PT_NOTE with the Xen PVH entry note.
pub fn has_pvh_entry(elf: &[u8]) -> bool {
    pvh_entry(elf).is_some()
}

fn pvh_entry(elf: &[u8]) -> Option<u64> {
    let u16_at =
        |o: usize| -> Option<u16> { Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?)) };
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?)) };
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?)) };
    // ELF64, little-endian, x86-64.
    if elf.get(..6)? != b"\x7fELF\x02\x01" || u16_at(18)? != 62 {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != 4 {
            continue; // not PT_NOTE
        }
        let off = usize::try_from(u64_at(ph + 8)?).ok()?;
        let size = usize::try_from(u64_at(ph + 32)?).ok()?;
        let mut p = off;
        let end = off.checked_add(size)?;
        while p + 12 <= end {
            let namesz = usize::try_from(u32_at(p)?).ok()?;
            let descsz = usize::try_from(u32_at(p + 4)?).ok()?;
            let kind = u32_at(p + 8)?;
            let name = p + 12;
            let desc = name + namesz.div_ceil(4) * 4;
            if elf.get(name..name + namesz)? == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                return match descsz {
                    4 => u32_at(desc).map(u64::from),
                    8 => u64_at(desc),
                    _ => None,
                };
            }
            p = desc + descsz.div_ceil(4) * 4;
        }
    }
    None
}

/// FNV-1a, 64 bits (a cache key, stable across Rust releases).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 x86-64 executable with one PT_NOTE holding `notes` (name, type, desc).
    fn elf_with_notes(notes: &[(&[u8], u32, &[u8])]) -> Vec<u8> {
        let mut note = Vec::new();
        for (name, kind, desc) in notes {
            note.extend((name.len() as u32).to_le_bytes());
            note.extend((desc.len() as u32).to_le_bytes());
            note.extend(kind.to_le_bytes());
            note.extend(*name);
            note.resize(note.len().div_ceil(4) * 4, 0);
            note.extend(*desc);
            note.resize(note.len().div_ceil(4) * 4, 0);
        }
        let mut e = vec![0u8; 64 + 56];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // offset
        e[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes()); // filesz
        e.extend(note);
        e
    }

    #[test]
    fn test_pvh_note_found_among_others_and_absent_when_missing() {
        let with = elf_with_notes(&[
            (b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8]),
            (b"Xen\0", 6, b"linux\0"),
            (b"Xen\0", 18, &0x0100_0b20u32.to_le_bytes()),
        ]);
        assert_eq!(pvh_entry(&with), Some(0x0100_0b20));
        let without = elf_with_notes(&[(b"Xen\0", 6, b"linux\0"), (b"GNU\0", 18, &[0; 4])]);
        assert!(!has_pvh_entry(&without));
        // Not x86-64, or truncated: no entry, no panic.
        let mut arm = with.clone();
        arm[18] = 183;
        assert!(!has_pvh_entry(&arm));
        for n in [0, 10, 64, 100, with.len() - 3] {
            assert!(!has_pvh_entry(&with[..n]), "{n}");
        }
    }

    /// A bzImage-shaped file: setup sectors, then the payload where the header says.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 2 * 512];
        b[0x1f1] = 1; // one setup sector after the boot sector
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend(vec![0xaa; 16]);
        b.extend(payload);
        b.extend(b"trailing");
        b
    }

    #[test]
    fn test_extract_decompresses_the_payload_and_the_cache_keeps_it() {
        let elf = elf_with_notes(&[(b"Xen\0", 18, &0x1000u32.to_le_bytes())]);
        let gz = crate::kernel::testutil::gzip(&elf);
        let image = bzimage(&gz);
        assert_eq!(extract(&image).as_deref(), Some(&elf[..]));
        // Not a bzImage, an old protocol, an unknown compression.
        assert!(extract(&elf).is_none());
        let mut old = image.clone();
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(extract(&old).is_none());
        assert!(extract(&bzimage(b"plain bytes")).is_none());

        let dir = std::env::temp_dir().join(format!("pcisim-pvh-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmlinuz");
        fs::write(&path, &image).unwrap();
        let got = pvh_kernel(&path, &dir.join("cache")).unwrap();
        assert!(got.starts_with(dir.join("cache/pvh")));
        assert_eq!(fs::read(&got).unwrap(), elf);
        // The second call takes the cached file.
        assert_eq!(pvh_kernel(&path, &dir.join("cache")).unwrap(), got);
        // A kernel without the PVH note is booted as given.
        let plain = dir.join("plain");
        let no_note = elf_with_notes(&[(b"Xen\0", 6, b"linux\0")]);
        fs::write(&plain, bzimage(&crate::kernel::testutil::gzip(&no_note))).unwrap();
        assert!(pvh_kernel(&plain, &dir.join("cache")).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
