//! Checking a built module: its `.modinfo` (read from the ELF, like `modinfo`), a `vermagic`
//! that starts with the guest kernel's release, and no build warning about our own files.

use std::fs;
use std::path::Path;

use super::{io_err, BuiltModule, KmodError};

/// The `key=value` entries of an x86-64 ELF relocatable's `.modinfo` section (what `modinfo`
/// prints), in order.
pub fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>, String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |o: usize| -> Result<u16, String> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("truncated at {o:#x}"))
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("truncated at {o:#x}"))
    };
    let u64_at = |o: usize| -> Result<usize, String> {
        let b = elf
            .get(o..o + 8)
            .ok_or_else(|| format!("truncated at {o:#x}"))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| "offset too large".to_string())
    };
    if u16_at(0x10)? != 1 {
        return Err(format!("ELF type {} is not ET_REL", u16_at(0x10)?));
    }
    if u16_at(0x12)? != 62 {
        return Err(format!("machine {} is not x86-64", u16_at(0x12)?));
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    if shentsize < 64 || shstrndx >= shnum {
        return Err("bad section header table".into());
    }
    // (offset, size) of section i.
    let section = |i: usize| -> Result<(usize, usize), String> {
        let h = shoff
            .checked_add(i.checked_mul(shentsize).ok_or("overflow")?)
            .ok_or("overflow")?;
        let (off, size) = (u64_at(h + 24)?, u64_at(h + 32)?);
        let end = off.checked_add(size).ok_or("overflow")?;
        if end > elf.len() {
            return Err(format!("section {i} past the end of the file"));
        }
        Ok((off, size))
    };
    let (stroff, strsize) = section(shstrndx)?;
    let strtab = &elf[stroff..stroff + strsize];
    let name_of = |i: usize| -> Result<&[u8], String> {
        let h = shoff + i * shentsize;
        let n = u32_at(h)? as usize;
        let rest = strtab.get(n..).ok_or("section name past .shstrtab")?;
        Ok(&rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())])
    };
    for i in 0..shnum {
        if name_of(i)? == b".modinfo" {
            let (off, size) = section(i)?;
            return Ok(elf[off..off + size]
                .split(|&b| b == 0)
                .filter(|e| !e.is_empty())
                .filter_map(|e| {
                    let e = String::from_utf8_lossy(e);
                    e.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    Err("no .modinfo section".into())
}

/// The `vermagic=` value of a module file's `.modinfo` (e.g. `6.12.107+deb13-amd64 SMP
/// preempt mod_unload modversions `).
pub fn vermagic(elf: &[u8]) -> Result<String, String> {
    modinfo(elf)?
        .into_iter()
        .find(|(k, _)| k == "vermagic")
        .map(|(_, v)| v)
        .ok_or_else(|| "no vermagic= in .modinfo".into())
}

/// Whether `vermagic` is for kernel release `kver`: its first word is exactly `kver` (the kernel
/// refuses a module whose vermagic differs, "disagrees about version of symbol module_layout"
/// aside).
pub fn vermagic_matches(vermagic: &str, kver: &str) -> bool {
    !kver.is_empty() && vermagic.split(' ').next() == Some(kver)
}

/// The build log lines that warn about our sources: any line with `warning:` (any case: gcc's
/// `warning:`, kernel-doc's `warning:`, modpost's `WARNING:`) naming a file in `build_dir` (the
/// build directory as the compiler sees it) or one of `sources` by relative path.
pub fn our_warnings(log: &str, build_dir: &str, sources: &[String]) -> Vec<String> {
    let dir = format!("{}/", build_dir.trim_end_matches('/'));
    log.lines()
        .filter(|l| l.to_ascii_lowercase().contains("warning:"))
        .filter(|l| {
            l.contains(&dir)
                || sources
                    .iter()
                    .any(|s| l.starts_with(&format!("{s}:")) || l.contains(&format!(" {s}:")))
        })
        .map(str::to_string)
        .collect()
}

/// Reads a `.ko` and checks it is an x86-64 module for `kver`.
pub fn check_module(name: &str, path: &Path, kver: &str) -> Result<BuiltModule, KmodError> {
    let data = fs::read(path).map_err(io_err("Cannot read", path))?;
    let vermagic = vermagic(&data).map_err(|reason| KmodError::BadModule {
        path: path.to_path_buf(),
        reason,
    })?;
    if !vermagic_matches(&vermagic, kver) {
        return Err(KmodError::Vermagic {
            path: path.to_path_buf(),
            vermagic,
            kver: kver.to_string(),
        });
    }
    Ok(BuiltModule {
        name: name.to_string(),
        path: path.to_path_buf(),
        vermagic,
        size: data.len() as u64,
    })
}
