//! What a stalled VM was doing: a snapshot of QEMU's and the device server's threads, taken
//! twice a moment apart, for the error a boot or command timeout reports.
//!
//! A guest that never prints its first console line can be (a) spinning — a vCPU thread burns
//! CPU in guest code (an early-boot loop, a TCG slowdown) — or (b) blocked — every vCPU thread
//! sleeps, e.g. in a `futex` while QEMU waits for a vfio-user reply from our server, whose
//! device thread then shows what it waits in. The two look the same from the console; they do
//! not from `/proc`: per thread its name, state, the CPU time it used between the two
//! snapshots, the kernel function it sleeps in (`wchan`) and the system call it is in
//! (`syscall`, see proc(5)). That is enough to tell whose bug a stall is without a debugger,
//! and it is cheap (a few files per thread), so the lab takes it on every boot timeout.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::thread;
use std::time::Duration;

/// How far apart the two snapshots are: long enough for a spinning thread to use a few ticks
/// (USER_HZ is 100), short enough not to delay the error much.
pub const SAMPLE: Duration = Duration::from_millis(500);

/// One thread of a process, as `/proc/<pid>/task/<tid>/` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadState {
    /// The thread id.
    pub tid: u32,
    /// Its name (`comm`: QEMU names its threads `CPU 0/TCG`, `qemu-system-x86`, ...; ours are
    /// named after the device).
    pub comm: String,
    /// The scheduler state letter (`R` running, `S` sleeping, `D` uninterruptible, ...).
    pub state: char,
    /// utime + stime in clock ticks.
    pub cpu_ticks: u64,
    /// The kernel function it sleeps in (`0` when running or unknown).
    pub wchan: String,
    /// The system call it is blocked in: its name when known (`futex`, `recvmsg`, ...), else
    /// the number; `running` while on a CPU in user space.
    pub syscall: String,
}

/// A process's threads at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    /// Its pid.
    pub pid: u32,
    /// What the lab calls it (`QEMU`, `device server`).
    pub role: String,
    /// Its threads, by tid.
    pub threads: Vec<ThreadState>,
}

/// Two snapshots of a process, [`SAMPLE`] apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The first snapshot.
    pub before: ProcessState,
    /// The second one.
    pub after: ProcessState,
}

impl Stall {
    /// The CPU ticks each thread of `after` used since `before` (0 for a thread that appeared in
    /// between).
    pub fn busy(&self) -> Vec<(&ThreadState, u64)> {
        self.after
            .threads
            .iter()
            .map(|t| {
                let was = self
                    .before
                    .threads
                    .iter()
                    .find(|b| b.tid == t.tid)
                    .map_or(t.cpu_ticks, |b| b.cpu_ticks);
                (t, t.cpu_ticks.saturating_sub(was))
            })
            .collect()
    }
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = SAMPLE.as_millis();
        writeln!(
            f,
            "{} (pid {}): {} thread(s), CPU ticks used in {ms} ms:",
            self.after.role,
            self.after.pid,
            self.after.threads.len()
        )?;
        for (t, ticks) in self.busy() {
            writeln!(
                f,
                "  tid {} {:?}: {} +{ticks} tick(s), syscall {}, wchan {}",
                t.tid, t.comm, t.state, t.syscall, t.wchan
            )?;
        }
        Ok(())
    }
}

/// Sample each `(pid, role)` at once (one [`SAMPLE`] for all) and write the text to `file`:
/// what the lab reports when a VM did not come up in time. A process that is gone (or whose
/// `/proc` cannot be read) is said so in the text, not skipped.
pub fn describe_to(file: &Path, procs: &[(u32, &str)]) -> String {
    let mut text = String::new();
    for ((pid, role), s) in procs.iter().zip(sample(procs)) {
        match s {
            Ok(stall) => text.push_str(&stall.to_string()),
            Err(e) => text.push_str(&format!(
                "{role} (pid {pid}): cannot read its threads: {e}\n"
            )),
        }
    }
    if let Err(e) = fs::write(file, &text) {
        log::warn!("cannot write {}: {e}", file.display());
    }
    text
}

/// Snapshot each `(pid, role)` twice, one [`SAMPLE`] apart for all of them. `role` names it in
/// the text.
pub fn sample(procs: &[(u32, &str)]) -> Vec<io::Result<Stall>> {
    let before: Vec<io::Result<ProcessState>> = procs
        .iter()
        .map(|(pid, role)| snapshot(*pid, role))
        .collect();
    thread::sleep(SAMPLE);
    procs
        .iter()
        .zip(before)
        .map(|((pid, role), before)| {
            Ok(Stall {
                before: before?,
                after: snapshot(*pid, role)?,
            })
        })
        .collect()
}

/// The threads of `pid` now.
pub fn snapshot(pid: u32, role: &str) -> io::Result<ProcessState> {
    let task = Path::new("/proc").join(pid.to_string()).join("task");
    let mut threads = Vec::new();
    for entry in fs::read_dir(&task)? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread may exit between read_dir and the reads: skip it, the others still tell.
        if let Ok(t) = thread_state(&task.join(tid.to_string()), tid) {
            threads.push(t);
        }
    }
    threads.sort_by_key(|t| t.tid);
    Ok(ProcessState {
        pid,
        role: role.to_string(),
        threads,
    })
}

fn thread_state(dir: &Path, tid: u32) -> io::Result<ThreadState> {
    let stat = fs::read_to_string(dir.join("stat"))?;
    let (comm, state, cpu_ticks) = parse_stat(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("stat: {stat:?}")))?;
    // wchan and syscall need ptrace-read access: as root (the lab's usual case) or the same
    // uid without Yama restrictions. Unreadable is said, not guessed.
    let wchan = fs::read_to_string(dir.join("wchan"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable ({e})"));
    let syscall = fs::read_to_string(dir.join("syscall"))
        .map(|s| syscall_name(&s))
        .unwrap_or_else(|e| format!("unreadable ({e})"));
    Ok(ThreadState {
        tid,
        comm,
        state,
        cpu_ticks,
        wchan,
        syscall,
    })
}

/// `comm`, state and utime+stime from a `/proc/.../stat` line. `comm` is in parentheses and
/// may itself contain spaces and `)`: the fields after it start at the last `)`.
fn parse_stat(stat: &str) -> Option<(String, char, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let state = rest.first()?.chars().next()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, state, utime + stime))
}

/// `/proc/.../syscall`: "running", "-1 ..." (blocked, not in a syscall) or "NR args...".
fn syscall_name(text: &str) -> String {
    let first = text.split_whitespace().next().unwrap_or("");
    match first {
        "running" => "running".to_string(),
        "-1" => "none (blocked outside a system call)".to_string(),
        n => match n.parse::<i64>().ok().and_then(x86_64_syscall) {
            Some(name) => name.to_string(),
            None => format!("#{n}"),
        },
    }
}

/// The x86-64 system calls a stalled QEMU or server thread is likely to sit in.
fn x86_64_syscall(nr: i64) -> Option<&'static str> {
    Some(match nr {
        0 => "read",
        1 => "write",
        7 => "poll",
        16 => "ioctl",
        23 => "select",
        35 => "nanosleep",
        44 => "sendto",
        45 => "recvfrom",
        46 => "sendmsg",
        47 => "recvmsg",
        61 => "wait4",
        202 => "futex",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        426 => "io_uring_enter",
        441 => "epoll_pwait2",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn stat_with_a_parenthesised_comm() {
        let line = "4242 (CPU 0/TCG) S 1 2 3 4 5 6 7 8 9 10 120 7 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat(line), Some(("CPU 0/TCG".to_string(), 'S', 127)));
        let odd = "7 (a) b) R 1 2 3 4 5 6 7 8 9 10 3 4 0 0";
        assert_eq!(parse_stat(odd), Some(("a) b".to_string(), 'R', 7)));
        assert_eq!(parse_stat("7 (x) R 1 2"), None);
    }

    #[test]
    fn syscall_lines() {
        assert_eq!(syscall_name("running\n"), "running");
        assert_eq!(
            syscall_name("202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f\n"),
            "futex"
        );
        assert_eq!(syscall_name("999 0x0\n"), "#999");
        assert!(syscall_name("-1 0x7ffd 0x7f\n").starts_with("none"));
    }

    /// A sleeping thread and a spinning one of this very process: the sample tells them apart
    /// (the spinner used ticks, the sleeper none and sits in a blocking call).
    #[test]
    fn a_spinning_thread_and_a_blocked_one_are_told_apart() {
        let (tx, rx) = mpsc::channel::<()>();
        let blocked = thread::Builder::new()
            .name("stall-blocked".into())
            .spawn(move || rx.recv())
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = std::sync::Arc::clone(&stop);
        let spinner = thread::Builder::new()
            .name("stall-spinner".into())
            .spawn(move || {
                let mut x = 0u64;
                while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                x
            })
            .unwrap();
        thread::sleep(Duration::from_millis(50));
        let s = sample(&[(std::process::id(), "test")])
            .pop()
            .unwrap()
            .unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tx.send(()).unwrap();
        blocked.join().unwrap().unwrap();
        spinner.join().unwrap();

        let busy = s.busy();
        let find = |name: &str| {
            busy.iter()
                .find(|(t, _)| t.comm == name)
                .unwrap_or_else(|| panic!("no thread {name}: {s}"))
        };
        let (spin, spin_ticks) = find("stall-spinner");
        let (block, block_ticks) = find("stall-blocked");
        assert!(*spin_ticks > 0, "{s}");
        assert_eq!(*block_ticks, 0, "{s}");
        assert_eq!(block.state, 'S', "{s}");
        assert_eq!(block.syscall, "futex", "{s}");
        assert!(matches!(spin.state, 'R' | 'S'), "{s}");
        let text = s.to_string();
        assert!(
            text.contains("\"stall-blocked\": S +0 tick(s), syscall futex"),
            "{text}"
        );
    }
}
