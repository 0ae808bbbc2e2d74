//! The server RSS figure: a `pcisim serve` with 64 GPUs against one with a single GPU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// VmRSS (KiB) of a `pcisim serve` with `n` GPUs once all sockets are up.
pub(super) fn server_rss(dir: &Path, n: usize) -> Result<u64> {
    // This very binary, even if a rebuild replaced the file meanwhile.
    let exe = PathBuf::from("/proc/self/exe");
    let sub = dir.join(format!("rss-{n}"));
    std::fs::create_dir_all(&sub)?;
    let socks: Vec<PathBuf> = (0..n).map(|i| sub.join(format!("g{i}.sock"))).collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve");
    for (i, s) in socks.iter().enumerate() {
        cmd.arg("--device")
            .arg(format!("gpu:socket={},id=gpu{i}", s.display()));
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting pcisim serve")?;
    let result = (|| -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socks.iter().all(|s| s.exists()) {
            if let Some(st) = child.try_wait()? {
                bail!("pcisim serve with {n} devices exited: {st}");
            }
            if Instant::now() > deadline {
                bail!("pcisim serve with {n} devices did not bind its sockets in 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the threads settle, then read.
        std::thread::sleep(Duration::from_millis(200));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{}/status", child.id()))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&sub);
    result
}
