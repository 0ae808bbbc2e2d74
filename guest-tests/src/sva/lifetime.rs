//! The lifetime cases (M6): a worker binds, queues work, and exits, is killed, forks,
//! passes its fd on or keeps it mmapped.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::dev::{now_ns, stamp_at, strerror, Npu, StatusMap};
use super::dev::{Work, INFO_BOUND, OP_FILL, STATUS_MAGIC, WAIT};
use super::proc::{fork_run, pipe, read_line, say, socketpair, waitpid, Ended, Kmsg, Lines};
use super::target::{
    expect, start_stream, stream_buffers, Checks, Target, STREAM_ITEMS, STREAM_LEN,
};
use super::{NO_LEAK, UNBOUND_ON_RELEASE};

/// A worker's report: `started <pasid>`.
/// A worker's report: `started <pasid> <t_open> <t_bound> <t_queued>`.
pub(super) fn parse_started(line: &str) -> Result<(u32, [u64; 3]), String> {
    let bad = || format!("worker said {line:?}");
    let mut w = line
        .strip_prefix("started ")
        .ok_or_else(bad)?
        .split_whitespace();
    let pasid = w.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let mut t = [0u64; 3];
    for v in &mut t {
        *v = w.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    }
    Ok((pasid, t))
}

/// The lifetime cases: a worker binds, queues work, and leaves in one of several ways.
pub(super) fn case_lifetime(c: &mut Checks<'_>, t: &Target, how: &str) -> Result<(), String> {
    let mut kmsg = Kmsg::open()?;
    let before = t.contexts()?;
    let (rd, wr) = pipe()?;
    let (go_rd, mut go_wr) = pipe()?;
    let (sock_a, sock_b) = socketpair()?;
    let dev = t.dev.clone();

    // The receiver of a passed fd (scm), started before the opener.
    let receiver = if how == "scm" {
        let mut wr2 = wr.try_clone().map_err(|e| e.to_string())?;
        let sock = sock_b.as_fd();
        let mut go = go_rd.try_clone().map_err(|e| e.to_string())?;
        Some(fork_run(move || {
            let fd = match crate::sys::recv_fds(sock, 1, Duration::from_secs(60)).and_then(|v| {
                v.into_iter()
                    .next()
                    .ok_or_else(|| "no fd received".to_string())
            }) {
                Ok(fd) => fd,
                Err(e) => {
                    say(&mut wr2, &format!("receiver: {e}"));
                    return 1;
                }
            };
            let npu = Npu::from_fd(fd);
            let _ = read_line(&mut go, Duration::from_secs(60));
            report_foreign(&npu, &mut wr2, "receiver");
            0
        })?)
    } else {
        None
    };

    let start = Instant::now();
    let sock = sock_a.as_fd();
    let mut wr_w = wr.try_clone().map_err(|e| e.to_string())?;
    let go_w = go_rd.try_clone().map_err(|e| e.to_string())?;
    let how_w = how.to_string();
    let worker = fork_run(move || {
        let r = (|| -> Result<i32, String> {
            let t_open = now_ns();
            let npu = Npu::open(&dev)?;
            let t_bound = now_ns();
            let info = npu.info().map_err(strerror)?;
            let (src, dst) = stream_buffers()?;
            let status = if how_w == "mmap" {
                Some(StatusMap::map(&npu)?)
            } else {
                None
            };
            let tickets = start_stream(&npu, &src, &dst)?;
            // The buffers stay mapped until the address space dies (exit_mmap), not unmapped
            // on the way out: the binding must end before that teardown.
            std::mem::forget(src);
            std::mem::forget(dst);
            match how_w.as_str() {
                "fork" => {
                    let mut wr3 = wr_w.try_clone().map_err(|e| e.to_string())?;
                    let mut go = go_w.try_clone().map_err(|e| e.to_string())?;
                    let npu_fd = npu.fd();
                    fork_run(move || {
                        let npu = Npu::borrowed(npu_fd);
                        let e = probe_submit(&npu);
                        say(&mut wr3, &format!("child-submit {e}"));
                        let _ = read_line(&mut go, Duration::from_secs(60));
                        report_foreign(&npu, &mut wr3, "child");
                        0
                    })?;
                    // fork() flushed the whole mm from the device's ATC (dup_mmap's TLB
                    // flush reaches the notifier): let the device cache the buffers again
                    // (an item takes ~10 ms) so that the exit races translations in use.
                    std::thread::sleep(Duration::from_millis(40));
                }
                "scm" => crate::sys::send_fds(sock, &[npu.fd()])?,
                _ => {}
            }
            let t_queued = now_ns();
            say(
                &mut wr_w,
                &format!("started {} {t_open} {t_bound} {t_queued}", info.pasid),
            );
            match how_w.as_str() {
                "kill" => {
                    // Block in WAIT on the last item until the parent kills us.
                    let mut w = Work {
                        ticket: tickets[tickets.len() - 1],
                        ..Work::default()
                    };
                    let _ = npu.wait(&mut w);
                    Ok(3)
                }
                "mmap" => {
                    drop(npu); // the mapping keeps the file open
                    let s = status.as_ref().map(StatusMap::read).unwrap_or_default();
                    say(
                        &mut wr_w,
                        &format!(
                            "status {} {} {} {}",
                            s.magic == STATUS_MAGIC,
                            s.pasid,
                            s.bound,
                            s.submitted
                        ),
                    );
                    Ok(0)
                }
                _ => Ok(0),
            }
        })();
        match r {
            Ok(code) => code,
            Err(e) => {
                say(&mut wr_w, &format!("error {e}"));
                1
            }
        }
    })?;
    drop(sock_a);
    drop(sock_b);
    drop(go_rd);

    let mut lines = Lines {
        file: rd,
        stash: Vec::new(),
    };
    let line = lines.expect("started ", Duration::from_secs(30))?;
    let (pasid, [t_open, t_bound, t_queued]) = parse_started(&line)?;
    stamp_at(
        t_open,
        &format!("worker {worker}: open /dev/pcisim-npu (bind)"),
    );
    stamp_at(
        t_bound,
        &format!("worker {worker}: open returned, pasid {pasid} bound"),
    );
    stamp_at(
        t_queued,
        &format!("worker {worker}: {STREAM_ITEMS} compares queued"),
    );
    println!("# pasid {pasid}");
    c.k.diag(&format!(
        "worker {worker} bound pasid {pasid} and queued {STREAM_ITEMS} compares of {} KiB",
        STREAM_LEN / 1024
    ));
    let mut mmap_status = None;
    if how == "mmap" {
        mmap_status = Some(lines.expect("status ", Duration::from_secs(30))?);
    }
    if how == "kill" {
        std::thread::sleep(Duration::from_millis(50));
        stamp_at(now_ns(), &format!("SIGKILL sent to worker {worker}"));
        // SAFETY: signals our own child.
        unsafe { libc::kill(worker, libc::SIGKILL) };
    }
    let ended = waitpid(worker)?;
    stamp_at(now_ns(), &format!("worker {worker} reaped ({ended:?})"));
    let exit_ms = start.elapsed().as_secs_f64() * 1000.0;
    c.k.diag(&format!(
        "worker ended ({ended:?}) {exit_ms:.1} ms after it started"
    ));
    println!("# exit_done pasid {pasid}");
    let want = if how == "kill" {
        Ended::Signaled(libc::SIGKILL)
    } else {
        Ended::Exited(0)
    };
    c.check(
        &format!(
            "the worker {}",
            if how == "kill" {
                "was killed by SIGKILL with work in flight"
            } else {
                "exited with work in flight"
            }
        ),
        expect(ended == want, || format!("{ended:?}")),
    );
    if let Some(s) = mmap_status {
        c.check(
            "with the fd closed, the status page mapping still shows the bound context",
            expect(s == format!("status true {pasid} 1 {STREAM_ITEMS}"), || {
                s.clone()
            }),
        );
    }

    // The process that still holds the fd (fork: the child, scm: the receiver).
    if how == "fork" {
        let l = lines.expect("child-submit ", Duration::from_secs(30))?;
        c.check(
            "a forked child cannot submit on the parent's binding (EPERM)",
            expect(l == format!("child-submit {}", libc::EPERM), || l.clone()),
        );
    }
    let holder = match how {
        "fork" | "scm" => {
            // Give the device time on its own before the holder acts (and, with a driver that
            // keeps the binding past the opener's exit, before the holder's close unbinds).
            std::thread::sleep(Duration::from_millis(100));
            let _ = go_wr.write_all(b"go\n");
            let who = if how == "fork" { "child " } else { "receiver " };
            let line = lines.expect(who, Duration::from_secs(30))?;
            c.strict(
                &format!("after the opener's exit the {} holds an unbound file: INFO not bound, SUBMIT EPERM", if how == "fork" { "child" } else { "receiver" }),
                expect(line.ends_with(&format!("bound=0 submit={}", libc::EPERM)), || line.clone()),
            );
            true
        }
        _ => false,
    };
    drop(go_wr);
    if let Some(pid) = receiver {
        waitpid(pid)?;
        stamp_at(now_ns(), &format!("receiver {pid} reaped"));
    }
    if holder {
        // The fork case's grandchild was reparented; wait for the count to settle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.contexts()? > before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let after = t.contexts()?;
    stamp_at(now_ns(), &format!("{after} context(s) left on the device"));
    c.check(
        NO_LEAK,
        expect(after == before, || {
            format!("{before} context(s) before, {after} after")
        }),
    );
    let logs = kmsg.drain();
    let unbound: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains(&format!("pasid {pasid} unbound on")))
        .collect();
    for l in &unbound {
        c.k.diag(&format!("kernel: {l}"));
    }
    c.strict(
        UNBOUND_ON_RELEASE,
        expect(
            unbound.iter().any(|l| l.contains("unbound on mm release")),
            || {
                format!(
                    "kernel log: {:?}",
                    logs.iter()
                        .filter(|l| l.contains(&format!("pasid {pasid}")))
                        .collect::<Vec<_>>()
                )
            },
        ),
    );
    Ok(())
}

/// What a process holding someone else's binding sees: `<who> bound=B submit=ERRNO`.
pub(super) fn report_foreign(npu: &Npu, out: &mut File, who: &str) {
    let bound = npu
        .info()
        .map(|i| u32::from(i.flags & INFO_BOUND != 0))
        .unwrap_or(9);
    let e = probe_submit(npu);
    say(out, &format!("{who} bound={bound} submit={e}"));
}

/// Submits a small FILL (8 bytes at VA 0x1000, waited for) and returns its errno, 0 if it was
/// accepted: how a process tells whether it may use the binding behind `npu`.
fn probe_submit(npu: &Npu) -> i32 {
    let mut w = Work {
        op: OP_FILL,
        flags: WAIT,
        src: 1,
        dst: 0x1000,
        len: 8,
        ..Work::default()
    };
    npu.submit(&mut w).err().unwrap_or(0)
}
