//! The worker processes (`mm-teardown-worker`): the opener, the forked child holder and the
//! `SCM_RIGHTS` receiver, each reporting one line per event to the supervisor.

use crate::gpu;
use crate::sys;
use pcisim_guest_wire::MmWorkerOptions;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::ring::{read_fd, ring_setup, verify_streaming, write_fd, BarMap, Regs, Stream};
use super::vfiofd::{map_dma, mark, Handles, Pages};
use super::Case;
use super::{
    Layout, DEFAULT_BUF_KIB, HOLD, MARK_FIRST_EXIT, MARK_HOLDER, PAGE, STEP_TIMEOUT, STREAM_BATCH,
    STREAM_FIRST,
};
use crate::sys::last_err as os_err;

/// One line to the supervisor.
pub(super) fn report(role: &str, text: &str) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // The supervisor notices a missing line; nothing else can be done about a broken pipe.
    let _ = writeln!(out, "{role} {text}");
    let _ = out.flush();
}

pub(super) fn pid() -> u32 {
    std::process::id()
}

/// Ends a worker: `exit(2)` without unwinding or destructors — no close, no unmap, no ring
/// stop: the kernel tears everything down, which is what is observed.
pub(super) fn exit_now(code: i32) -> ! {
    std::process::exit(code)
}

pub(super) struct WorkerCfg {
    pub(super) case: Case,
    pub(super) bdf: String,
    pub(super) group: String,
    pub(super) layout: Layout,
}

/// `pcisim-guest mm-teardown-worker --role opener|receiver ...` (started by the supervisor).
pub fn worker(o: MmWorkerOptions) -> i32 {
    let parsed = (|| -> Result<(String, WorkerCfg), String> {
        let layout = Layout {
            base: o.iova,
            buf_len: buf_len(o.buf_kib)?,
        };
        Ok((
            o.role.word().to_string(),
            WorkerCfg {
                case: o.case,
                bdf: o.bdf.unwrap_or_default(),
                group: o.group.unwrap_or_default(),
                layout,
            },
        ))
    })();
    let (role, cfg) = match parsed {
        Ok(p) => p,
        Err(e) => {
            report("worker", &format!("error {e}"));
            return 2;
        }
    };
    let r = match role.as_str() {
        "opener" => opener(&cfg),
        "receiver" => receiver(&cfg),
        other => Err(format!("unknown role {other:?}")),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            report(&role, &format!("error {e}"));
            1
        }
    }
}

pub(super) fn buf_len(kib: Option<u64>) -> Result<usize, String> {
    let kib = match kib {
        Some(k) => usize::try_from(k).map_err(|_| format!("--buf-kib {k}: too large"))?,
        None => DEFAULT_BUF_KIB,
    };
    if kib < 4 || kib % 4 != 0 || kib > 64 * 1024 {
        return Err(format!("--buf-kib {kib}: a multiple of 4 in 4..=65536"));
    }
    Ok(kib * 1024)
}

pub(super) fn opener(cfg: &WorkerCfg) -> Result<(), String> {
    let h = Handles::open(&cfg.bdf, &cfg.group)?;
    h.enable_command()?;
    let id = h.regs().rd(gpu::ID)?;
    if id != gpu::ID_MAGIC {
        return Err(format!("BAR0 ID 0x{id:08x}"));
    }
    let ring = Pages::new(PAGE)?;
    map_dma(h.container.as_fd(), &ring, cfg.layout.ring())?;
    let buf = if cfg.layout.buf_len % (2 << 20) == 0 {
        Pages::new_huge(cfg.layout.buf_len)?
    } else {
        Pages::new(cfg.layout.buf_len)?
    };
    map_dma(h.container.as_fd(), &buf, cfg.layout.buf())?;
    ring_setup(&h.regs(), &ring, &cfg.layout)?;
    let mut s = Stream { tail: 0 };
    let (advanced, word) = verify_streaming(&h.regs(), &mut s, &buf)?;
    report(
        "opener",
        &format!(
            "ready pid={} completed={advanced} word=0x{word:08x} ring=0x{:x} buf=0x{:x}+0x{:x}",
            pid(),
            cfg.layout.ring(),
            cfg.layout.buf(),
            cfg.layout.buf_len
        ),
    );
    s.run_for(&h.regs(), STREAM_FIRST)?;
    match cfg.case {
        Case::Exit => {
            mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
            let out = s.burst(&h.regs())?;
            let status = h.regs().rd(gpu::RING_STATUS)?;
            report(
                "opener",
                &format!("exiting outstanding={out} status={status}"),
            );
            exit_now(0)
        }
        Case::Kill => {
            mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
            let out = s.burst(&h.regs())?;
            report("opener", &format!("burst outstanding={out}"));
            // Keep it busy until the SIGKILL comes.
            s.run_for(&h.regs(), Duration::from_secs(60))?;
            Err("not killed within 60 s".into())
        }
        Case::Fork => fork_case(&h, &buf, cfg),
        Case::Pass => pass_case(&h, cfg),
        Case::BarMmap => bar_case(h, s, cfg),
    }
}

/// A pipe (read end, write end), close-on-exec.
pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live array of two ints for the kernel to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(os_err("pipe2"));
    }
    // SAFETY: both are new descriptors that we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits up to `timeout` for `fd` to be readable and reads what is there.
pub(super) fn read_within(fd: BorrowedFd<'_>, timeout: Duration) -> Result<Vec<u8>, String> {
    let rev = sys::poll(&[(fd.as_raw_fd(), libc::POLLIN)], Some(timeout))?;
    if rev.is_empty() {
        return Err(format!("nothing within {} s", timeout.as_secs()));
    }
    let mut b = [0u8; 256];
    let n = read_fd(fd, &mut b)?;
    Ok(b[..n].to_vec())
}

pub(super) fn fork_case(h: &Handles, buf: &Pages, cfg: &WorkerCfg) -> Result<(), String> {
    let (took_rd, took_wr) = pipe()?;
    // SAFETY: this process is single-threaded (the worker never starts threads), so the child
    // may run arbitrary code after fork.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(os_err("fork"));
    }
    if child == 0 {
        drop(took_rd);
        match child_holder(h, buf, took_wr, cfg) {
            Ok(()) => exit_now(0),
            Err(e) => {
                report("child", &format!("error {e}"));
                exit_now(1)
            }
        }
    }
    drop(took_wr);
    // The parent stops streaming here; the child takes over.
    let got = read_within(took_rd.as_fd(), STEP_TIMEOUT)?;
    if got.is_empty() {
        return Err("the child closed the takeover pipe without taking over".into());
    }
    mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
    report("opener", &format!("handed-over child={child}"));
    exit_now(0)
}

/// The M3 child / M4 receiver after it holds the fds: take the ring over, stream until the
/// supervisor says the first process's exit completed, mark, show progress, queue a full ring
/// and exit. `copy` is the child's copy of the buffer (M3), to see whether it still shares
/// pages with the device.
pub(super) fn hold(
    role: &str,
    h: &Handles,
    s: &mut Stream,
    input: BorrowedFd<'_>,
    copy: Option<&Pages>,
    layout: &Layout,
) -> Result<(), String> {
    let regs = h.regs();
    s.run_until(&regs, input, "opener-exited", STEP_TIMEOUT)?;
    mark(h.container.as_fd(), layout, MARK_HOLDER)?;
    let copy0 = copy.map(|b| b.read_u32(0)).transpose()?;
    let c0 = regs.rd(gpu::CMDS_COMPLETED)?;
    s.run_for(&regs, HOLD)?;
    let c1 = regs.rd(gpu::CMDS_COMPLETED)?;
    let copy1 = copy.map(|b| b.read_u32(0)).transpose()?;
    let copies = match (copy0, copy1) {
        (Some(a), Some(b)) => format!(" copy0=0x{a:08x} copy1=0x{b:08x}"),
        _ => String::new(),
    };
    report(role, &format!("progress c0={c0} c1={c1}{copies}"));
    let out = s.burst(&regs)?;
    report(role, &format!("exiting outstanding={out}"));
    exit_now(0)
}

pub(super) fn child_holder(
    h: &Handles,
    buf: &Pages,
    took: OwnedFd,
    cfg: &WorkerCfg,
) -> Result<(), String> {
    report("child", &format!("started pid={}", pid()));
    let mut s = Stream::resume(&h.regs())?;
    s.top_up(&h.regs(), STREAM_BATCH)?;
    write_fd(took.as_fd(), b"t")?;
    drop(took);
    report("child", &format!("took-over tail={}", s.tail));
    let stdin = std::io::stdin();
    hold("child", h, &mut s, stdin.as_fd(), Some(buf), &cfg.layout)
}

pub(super) fn pass_case(h: &Handles, cfg: &WorkerCfg) -> Result<(), String> {
    // fd 0 is our end of the SOCK_SEQPACKET pair with the receiver.
    let stdin = std::io::stdin();
    let sock = stdin.as_fd();
    sys::send_fds(
        sock,
        &[
            h.container.as_raw_fd(),
            h.group.as_raw_fd(),
            h.device.as_raw_fd(),
        ],
    )?;
    report("opener", "sent-fds n=3");
    let got = read_within(sock, STEP_TIMEOUT)?;
    if got != b"took-over" {
        return Err(format!(
            "expected the receiver's took-over, got {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
    report("opener", "handed-over");
    exit_now(0)
}

pub(super) fn receiver(cfg: &WorkerCfg) -> Result<(), String> {
    let stdin = std::io::stdin();
    let sock = stdin.as_fd();
    let mut fds = sys::recv_fds(sock, 3, STEP_TIMEOUT)?.into_iter();
    let (Some(container), Some(group), Some(device), None) =
        (fds.next(), fds.next(), fds.next(), fds.next())
    else {
        return Err("expected exactly 3 fds".into());
    };
    let h = Handles::from_parts(container, group, File::from(device))?;
    let id = h.regs().rd(gpu::ID)?;
    report(
        "receiver",
        &format!(
            "got-fds n=3 pid={} container={} group={} device={} id=0x{id:08x}",
            pid(),
            h.container.as_raw_fd(),
            h.group.as_raw_fd(),
            h.device.as_raw_fd()
        ),
    );
    let mut s = Stream::resume(&h.regs())?;
    s.top_up(&h.regs(), STREAM_BATCH)?;
    write_fd(sock, b"took-over")?;
    report("receiver", &format!("took-over tail={}", s.tail));
    hold("receiver", &h, &mut s, sock, None, &cfg.layout)
}

/// Counts this process's fds that are vfio objects (`/dev/vfio/*`, `anon_inode:[vfio-device]`).
pub(super) fn vfio_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| {
                    let t = t.to_string_lossy();
                    t.starts_with("/dev/vfio/") || t.contains("vfio-device")
                })
                .count()
        })
        .unwrap_or(usize::MAX)
}

pub(super) fn bar_case(h: Handles, mut s: Stream, cfg: &WorkerCfg) -> Result<(), String> {
    let map = BarMap::map(&h.device, &h.bar0)?;
    let id = map.rd(gpu::ID)?;
    if id != gpu::ID_MAGIC {
        return Err(format!("ID through the BAR0 mapping reads 0x{id:08x}"));
    }
    mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
    // Close the device, group and container fds: only the mapping is left.
    drop(h);
    let left = vfio_fds();
    report(
        "opener",
        &format!("fds-closed id=0x{id:08x} vfio-fds={left}"),
    );
    let c0 = map.rd(gpu::CMDS_COMPLETED)?;
    s.run_for(&map, HOLD)?;
    let c1 = map.rd(gpu::CMDS_COMPLETED)?;
    report("opener", &format!("progress c0={c0} c1={c1}"));
    let out = s.burst(&map)?;
    report("opener", &format!("exiting outstanding={out}"));
    exit_now(0)
}

// -- the supervisor ---------------------------------------------------------------------------

/// A close-on-exec AF_UNIX SOCK_SEQPACKET pair (message boundaries kept).
pub(super) fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live array of two ints for the kernel to fill.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(os_err("socketpair"));
    }
    // SAFETY: both are new descriptors that we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
