//! Building the guest programs (`guest-tests/`, its own cargo workspace) into one static binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::vm::process::{self, describe_status, ProcessError};
use crate::vm::provision::repo_root;

/// How long building the guest programs may take (a cold build of serde on two cores).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The guest binary's name.
pub const GUEST_BIN: &str = "pcisim-guest";

/// Errors building or checking the guest binary.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Running cargo failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// cargo reported an error.
    #[error("Building the guest programs failed ({status}); see {log}")]
    Build {
        /// How cargo ended.
        status: String,
        /// Its output.
        log: PathBuf,
    },
    /// cargo succeeded but the binary is not where expected.
    #[error("No {GUEST_BIN} binary under {0} after the build")]
    NotFound(PathBuf),
    /// The binary cannot run in the guest (not a static x86-64 ELF).
    #[error("{path} cannot run in the guest: {reason}")]
    Unusable {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The guest programs' cargo manifest.
pub fn guest_manifest() -> PathBuf {
    repo_root().join("guest-tests/Cargo.toml")
}

/// Checks that `bytes` is an x86-64 ELF executable without a program interpreter (static).
pub fn check_static_elf(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    if u16_at(0x12) != 62 {
        return Err(format!("machine {} is not x86-64", u16_at(0x12)));
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&bytes[0x20..0x28]);
    let phoff = usize::try_from(u64::from_le_bytes(phoff)).map_err(|_| "bad e_phoff")?;
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    if phentsize < 4 {
        return Err("bad e_phentsize".into());
    }
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let p_type = bytes
            .get(o..o + 4)
            .ok_or("program headers past the end of the file")?;
        if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == 3 {
            return Err("dynamically linked (has PT_INTERP); the guest has no libc".into());
        }
    }
    Ok(())
}

fn check_binary(path: &Path) -> Result<PathBuf, GuestError> {
    let bytes = fs::read(path).map_err(|e| GuestError::Unusable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    check_static_elf(&bytes).map_err(|reason| GuestError::Unusable {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(path.to_path_buf())
}

/// Builds `guest-tests` in release mode (or takes `$PCISIM_GUEST_BIN` if set) and returns the
/// path of the static `pcisim-guest` binary. cargo's output goes to `log`.
pub fn build(log: &Path) -> Result<PathBuf, GuestError> {
    if let Some(path) = std::env::var_os("PCISIM_GUEST_BIN").filter(|p| !p.is_empty()) {
        log::info!("using PCISIM_GUEST_BIN={}", Path::new(&path).display());
        return check_binary(Path::new(&path));
    }
    let manifest = guest_manifest();
    let target_dir = repo_root().join("guest-tests/target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // The static link flags live in guest-tests/.cargo/config.toml; RUSTFLAGS from the
        // environment would replace them.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .current_dir(repo_root().join("guest-tests"));
    let out = process::run_captured("cargo build (guest)", &mut cmd, BUILD_TIMEOUT, log)?;
    if !out.status.success() {
        return Err(GuestError::Build {
            status: describe_status(out.status),
            log: log.to_path_buf(),
        });
    }
    // The newest of the two possible locations (with and without an explicit build target).
    let candidates = [
        target_dir
            .join("x86_64-unknown-linux-gnu/release")
            .join(GUEST_BIN),
        target_dir.join("release").join(GUEST_BIN),
    ];
    let newest = candidates
        .iter()
        .filter_map(|p| {
            let m = fs::metadata(p)
                .ok()?
                .modified()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Some((m, p))
        })
        .max_by_key(|(m, _)| *m)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| GuestError::NotFound(target_dir.clone()))?;
    check_binary(&newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(interp: bool) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 2 * 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x12] = 62;
        b[0x20] = 64; // e_phoff
        b[0x36] = 56; // e_phentsize
        b[0x38] = 2; // e_phnum
        b[64] = 6; // PT_PHDR
        b[64 + 56] = if interp { 3 } else { 1 };
        b
    }

    #[test]
    fn test_static_elf_accepted_dynamic_rejected() {
        assert_eq!(check_static_elf(&elf(false)), Ok(()));
        assert!(check_static_elf(&elf(true))
            .unwrap_err()
            .contains("dynamically"));
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        let mut arm = elf(false);
        arm[0x12] = 183;
        assert!(check_static_elf(&arm).unwrap_err().contains("x86-64"));
        let mut truncated = elf(false);
        truncated.truncate(100);
        assert!(check_static_elf(&truncated).is_err());
    }

    #[test]
    fn test_host_binary_is_checked() {
        // This test binary is a dynamically linked x86-64 executable (on the usual hosts).
        let me = std::env::current_exe().unwrap();
        let bytes = fs::read(me).unwrap();
        if cfg!(target_arch = "x86_64") && !cfg!(target_feature = "crt-static") {
            assert!(check_static_elf(&bytes).is_err());
        }
    }
}
