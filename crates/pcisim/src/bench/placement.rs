//! Where the bench's threads run: the CPUs this process may use, pinning a thread, and the
//! [`Placement`]s of a round-trip figure (same core, cross core) with the reason a placement
//! is skipped on a machine that cannot give it.

use anyhow::{anyhow, Context, Result};

/// The CPUs this process may run on (its affinity mask when the bench started), in order.
pub(super) fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it for
    // the calling thread (pid 0); CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Restrict the calling thread to `cpus`. A failure is an error: a figure that says where it
/// ran must have run there.
pub(super) fn set_affinity(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it (CPU_SET ignores
    // numbers past CPU_SETSIZE); sched_setaffinity reads it for the calling thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning a bench thread to CPUs {cpus:?}"));
    }
    Ok(())
}

/// Where the threads of a round-trip figure run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// Client, server and echo threads on one CPU (a vCPU thread and the server sharing a
    /// core): every round trip is two context switches on that CPU.
    SameCore(usize),
    /// The client on one CPU, the server (and the floor's echo thread) on another: every
    /// round trip is two cross-CPU wake-ups.
    CrossCore { client: usize, server: usize },
}

impl Placement {
    pub(super) fn client(self) -> usize {
        match self {
            Placement::SameCore(c) => c,
            Placement::CrossCore { client, .. } => client,
        }
    }

    pub(super) fn server(self) -> usize {
        match self {
            Placement::SameCore(c) => c,
            Placement::CrossCore { server, .. } => server,
        }
    }

    /// The figure names' suffix.
    pub(super) fn tag(self) -> &'static str {
        match self {
            Placement::SameCore(_) => "pinned",
            Placement::CrossCore { .. } => "cross_core",
        }
    }
}

/// The placements of the round-trip figures given the CPUs the bench may use: same-core on
/// the first, cross-core on the first two — or, with one CPU, why there is no cross-core
/// figure.
pub(super) fn placements(cpus: &[usize]) -> (Vec<Placement>, Option<String>) {
    match cpus {
        [] => (
            Vec::new(),
            Some("no CPU in the affinity mask: no round-trip figure".into()),
        ),
        [only] => (
            vec![Placement::SameCore(*only)],
            Some(format!(
                "cross-core figures skipped: the bench may run on one CPU only ({only}); \
                 run it where two are allowed"
            )),
        ),
        [a, b, ..] => (
            vec![
                Placement::SameCore(*a),
                Placement::CrossCore {
                    client: *a,
                    server: *b,
                },
            ],
            None,
        ),
    }
}

/// Spawn `body` on a thread restricted to `cpu` (if given) and wait until it is: a thread
/// that could not be pinned is an error, not a silently unpinned figure.
pub(super) fn spawn_on(cpu: Option<usize>, body: impl FnOnce() + Send + 'static) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let pinned = cpu.map_or(Ok(()), |c| set_affinity(&[c]));
        let ok = pinned.is_ok();
        let _ = tx.send(pinned);
        if ok {
            body();
        }
    });
    rx.recv()
        .map_err(|_| anyhow!("a bench thread died before it started"))?
}
