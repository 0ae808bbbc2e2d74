//! `pcisim lab exec` and `cp`.

use super::*;

/// `pcisim lab exec -- CMD...`: runs `argv` in the guest through the agent (`timeout`), with
/// `stdin` as its standard input (empty: end of file at once); its stdout comes back exactly
/// ([`RunOutput::stdout_bytes`]).
pub fn exec(dir: &Path, argv: &[String], stdin: &[u8], timeout: Duration) -> Result<RunOutput> {
    if argv.is_empty() {
        return Err(msg(
            "exec needs a command: pcisim lab exec -- CMD [ARGS...]",
        ));
    }
    let r = running(dir)?;
    let mut a = agent(&r.state)?;
    // Beyond a few KiB the input goes through the transfer share (the serial link carries
    // ~100 KB/s of base64).
    match &r.state.xfer {
        Some(xfer) if stdin.len() > EXEC_STDIN_INLINE => {
            let name = unique_name("stdin");
            let host = xfer.join(&name);
            fs::write(&host, stdin)
                .map_err(|e| msg(format!("cannot write {}: {e}", host.display())))?;
            let guest = format!("{XFER_GUEST}/{name}");
            let res = a.run_exact(argv, RunInput::GuestFile(&guest), timeout);
            let _ = fs::remove_file(&host);
            res.map_err(lab)
        }
        _ => a.run_binary(argv, stdin, timeout).map_err(lab),
    }
}

/// A file name in the transfer share never used before (pid and time).
pub(super) fn unique_name(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(".{what}-{}-{}", std::process::id(), t.as_nanos())
}

/// The most stdin `exec` sends inline through the agent link.
pub const EXEC_STDIN_INLINE: usize = 16 << 10;

/// One side of `lab cp`: a host path or a guest path (`vm:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpPath {
    /// On the host.
    Host(PathBuf),
    /// In the guest (`vm:PATH`).
    Guest(String),
}

impl CpPath {
    /// `vm:PATH` is the guest's; anything else the host's.
    pub fn parse(arg: &str) -> CpPath {
        match arg.strip_prefix("vm:") {
            Some(p) => CpPath::Guest(p.to_string()),
            None => CpPath::Host(PathBuf::from(arg)),
        }
    }
}

/// What `cp` did.
#[derive(Debug, Clone)]
pub struct Copied {
    /// Bytes copied.
    pub bytes: u64,
    /// How long it took (from the first byte read to the last written, both sides).
    pub took: Duration,
    /// Where it went (the final path).
    pub to: String,
}

/// How long the guest side of a copy may take.
pub const CP_TIMEOUT: Duration = Duration::from_secs(600);

/// `pcisim lab cp SRC DST`: copies one file between host and guest (exactly one side `vm:`),
/// through the VM's transfer share (9p, [`XFER_GUEST`]): the host writes or reads the state
/// directory's `xfer/`, the guest copies between it and the destination. A destination that is
/// a directory gets the source's file name.
pub fn cp(dir: &Path, src: &str, dst: &str, out: &mut dyn Write) -> Result<Copied> {
    let (src, dst) = (CpPath::parse(src), CpPath::parse(dst));
    let r = running(dir)?;
    let xfer = r.state.xfer.clone().ok_or_else(|| {
        msg("this VM was started without a transfer share (an older pcisim): `lab down` and `lab up` again")
    })?;
    // Unique names: the transfer share is mounted with the guest's cache (never a stale page).
    let tmp_name = unique_name("cp");
    let host_tmp = xfer.join(&tmp_name);
    let guest_tmp = format!("{XFER_GUEST}/{tmp_name}");
    let t = Instant::now();
    let res = match (&src, &dst) {
        (CpPath::Host(h), CpPath::Guest(g)) => {
            let name = h
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| msg(format!("{}: not a file name", h.display())))?;
            let bytes = fs::copy(h, &host_tmp)
                .map_err(|e| msg(format!("cannot read {}: {e}", h.display())))?;
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                fs::metadata(h)
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0o644)
            };
            let mut a = agent(&r.state)?;
            let o = a
                .run(
                    &[
                        "/bin/busybox".into(),
                        "sh".into(),
                        "-c".into(),
                        // dd with large blocks (busybox cp's 4 KiB reads would each be a 9p
                        // round trip), four at once on quarters of the file (about 1.5x the
                        // rate of one), then the size checked.
                        "d=$2; [ -d \"$d\" ] && d=${d%/}/$3; rm -f /tmp/.pcisim-cp.err; : >\"$d\" || exit 1; \
                         c=$((($5 + 4194303) / 4194304)); pids=; \
                         for k in 0 1 2 3; do dd if=\"$1\" of=\"$d\" bs=1M skip=$((k*c)) \
                         seek=$((k*c)) count=$c conv=notrunc 2>>/tmp/.pcisim-cp.err & pids=\"$pids $!\"; done; \
                         for p in $pids; do wait $p || { cat /tmp/.pcisim-cp.err >&2; exit 1; }; done; \
                         s=$(stat -c %s \"$d\"); [ \"$s\" = \"$5\" ] \
                         || { echo \"$d has $s bytes, not $5\" >&2; exit 1; }; \
                         rm -f /tmp/.pcisim-cp.err; chmod \"$4\" \"$d\" && echo \"$d\""
                            .into(),
                        "cp".into(),
                        guest_tmp.clone(),
                        g.clone(),
                        name,
                        format!("{:o}", mode & 0o7777),
                        bytes.to_string(),
                    ],
                    CP_TIMEOUT,
                )
                .map_err(lab);
            let _ = fs::remove_file(&host_tmp);
            let o = o?;
            if o.exit != Some(0) {
                return Err(msg(format!(
                    "copying into the guest's {g} failed: {}",
                    o.stderr.trim()
                )));
            }
            Ok((bytes, format!("vm:{}", o.stdout.trim())))
        }
        (CpPath::Guest(g), CpPath::Host(h)) => {
            let mut a = agent(&r.state)?;
            let o = a
                .run(
                    &[
                        "/bin/busybox".into(),
                        "sh".into(),
                        "-c".into(),
                        "dd if=\"$1\" of=\"$2\" bs=4M conv=fsync 2>/tmp/.pcisim-cp.err && stat -c %a \"$1\" \
                         || { cat /tmp/.pcisim-cp.err >&2; exit 1; }"
                            .into(),
                        "cp".into(),
                        g.clone(),
                        guest_tmp.clone(),
                    ],
                    CP_TIMEOUT,
                )
                .map_err(lab)?;
            if o.exit != Some(0) {
                let _ = fs::remove_file(&host_tmp);
                return Err(msg(format!(
                    "reading the guest's {g} failed: {}",
                    o.stderr.trim()
                )));
            }
            let mut to = h.clone();
            if to.is_dir() {
                let name = Path::new(g)
                    .file_name()
                    .ok_or_else(|| msg(format!("vm:{g}: not a file name")))?;
                to = to.join(name);
            }
            let bytes = fs::metadata(&host_tmp)
                .map_err(|e| msg(format!("{}: {e}", host_tmp.display())))?
                .len();
            if let Ok(mode) = u32::from_str_radix(o.stdout.trim(), 8) {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&host_tmp, fs::Permissions::from_mode(mode));
            }
            // A rename where it can, else a copy (another file system).
            let moved =
                fs::rename(&host_tmp, &to).or_else(|_| fs::copy(&host_tmp, &to).map(|_| ()));
            let _ = fs::remove_file(&host_tmp);
            moved.map_err(|e| msg(format!("cannot write {}: {e}", to.display())))?;
            Ok((bytes, to.display().to_string()))
        }
        _ => Err(msg(
            "cp copies between host and guest: exactly one of SRC and DST is `vm:PATH` \
             (e.g. pcisim lab cp ./a.out vm:/tmp/ or pcisim lab cp vm:/tmp/log .)",
        )),
    };
    let (bytes, to) = res?;
    let took = t.elapsed();
    writeln!(
        out,
        "copied {bytes} bytes to {to} in {:.2} s ({:.1} MB/s)",
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64().max(1e-6)
    )
    .map_err(io_out)?;
    Ok(Copied { bytes, took, to })
}
