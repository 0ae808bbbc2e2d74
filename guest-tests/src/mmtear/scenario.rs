//! The supervisor's run of one case: starts the workers, steps them through the case and
//! checks each end and the release of the device.

use crate::gpu;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::time::Instant;

use super::ring::write_fd;
use super::supervisor::{group_busy, waited_marker, Ended, Steps, Super};
use super::worker::seqpacket_pair;
use super::Case;
use super::{HOLD, STEP_TIMEOUT};
use crate::sys::last_err as os_err;

/// Runs the case; a failed step returns `Err(())` (already reported).
pub(super) fn drive(sup: &mut Super<'_>, steps: &mut Steps) -> Result<(), ()> {
    let case = sup.case;
    // M4's receiver first: it waits on its end of the socket pair for the opener's fds.
    let mut to_receiver: Option<OwnedFd> = None;
    let mut receiver_pid = 0;
    let opener_stdin = if case == Case::Pass {
        let (a, b) = seqpacket_pair().map_err(|e| fail(steps, "opener-streams", e))?;
        let (pid, _) = sup
            .spawn("receiver", Stdio::from(b))
            .map_err(|e| fail(steps, "opener-streams", e))?;
        receiver_pid = pid;
        let dup = a
            .try_clone()
            .map_err(|e| fail(steps, "opener-streams", format!("dup: {e}")))?;
        to_receiver = Some(a);
        Stdio::from(dup)
    } else {
        Stdio::piped()
    };
    let (opener, mut opener_in) = sup
        .spawn("opener", opener_stdin)
        .map_err(|e| fail(steps, "opener-streams", e))?;
    let ready = sup
        .reports
        .expect("opener", "ready", STEP_TIMEOUT, &mut steps.k)
        .map_err(|e| fail(steps, "opener-streams", e))?;
    steps.k.diag(&format!(
        "opener pid {opener}: the ring's FILLs land in its buffer ({} commands, word {})",
        ready.get("completed").unwrap_or("?"),
        ready.get("word").unwrap_or("?")
    ));
    steps.ok("opener-streams")?;

    match case {
        Case::Exit => {
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "exiting", STEP_TIMEOUT, &mut steps.k)?;
                let out = l.num("outstanding")?;
                let t0 = Instant::now();
                let e = sup.wait(opener)?;
                steps.k.diag(&format!(
                    "waitpid(opener) returned {e} {} ms after its last report",
                    t0.elapsed().as_millis()
                ));
                check_ended(e, Ended::Code(0), "the opener")?;
                if out == 0 {
                    return Err("the ring was idle when the process exited".into());
                }
                Ok(())
            })();
            steps.done("exit-with-dma-running", r)?;
        }
        Case::Kill => {
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "burst", STEP_TIMEOUT, &mut steps.k)?;
                let out = l.num("outstanding")?;
                // SAFETY: kill takes no pointers.
                if unsafe { libc::kill(opener, libc::SIGKILL) } < 0 {
                    return Err(os_err("kill(SIGKILL)"));
                }
                let e = sup.wait(opener)?;
                steps
                    .k
                    .diag(&format!("SIGKILL with {out} commands queued; waitpid: {e}"));
                check_ended(e, Ended::Signal(libc::SIGKILL), "the opener")?;
                if out == 0 {
                    return Err("the ring was idle when the process was killed".into());
                }
                Ok(())
            })();
            steps.done("sigkill-with-dma-running", r)?;
        }
        Case::Fork | Case::Pass => {
            let (holder_role, took_test, exit_test, cont_test, holder_exits) = if case == Case::Fork
            {
                (
                    "child",
                    "child-takes-over",
                    "parent-exits-device-kept",
                    "dma-continues-for-child",
                    "child-exits",
                )
            } else {
                (
                    "receiver",
                    "fds-passed",
                    "opener-exits-device-kept",
                    "dma-continues-for-receiver",
                    "receiver-exits",
                )
            };
            // Who holds the device after the opener: the forked child (its pid reported), or
            // the receiver (started above).
            let r = (|| {
                let holder = if case == Case::Fork {
                    let l = sup
                        .reports
                        .expect("child", "started", STEP_TIMEOUT, &mut steps.k)?;
                    let pid = l.num("pid")? as i32;
                    sup.procs.add(pid);
                    pid
                } else {
                    sup.reports
                        .expect("receiver", "got-fds", STEP_TIMEOUT, &mut steps.k)?;
                    receiver_pid
                };
                sup.reports
                    .expect(holder_role, "took-over", STEP_TIMEOUT, &mut steps.k)?;
                Ok(holder)
            })();
            let holder = r.clone().unwrap_or(0);
            steps.done(took_test, r.map(|_| ()))?;

            let r = (|| {
                sup.reports
                    .expect("opener", "handed-over", STEP_TIMEOUT, &mut steps.k)?;
                let e = sup.wait(opener)?;
                check_ended(e, Ended::Code(0), "the opener")?;
                let busy = group_busy(&sup.group)?;
                steps.k.diag(&format!(
                    "waitpid(opener) returned {e}; group {} {}",
                    sup.group,
                    if busy { "still held (EBUSY)" } else { "free" }
                ));
                if !busy {
                    return Err(format!(
                        "group {} is free after the opener's exit: nothing holds the device",
                        sup.group
                    ));
                }
                Ok(())
            })();
            steps.done(exit_test, r)?;

            let r = (|| {
                let msg = b"opener-exited\n";
                match (to_receiver.as_ref(), opener_in.as_mut()) {
                    (Some(sock), _) => write_fd(sock.as_fd(), msg)?,
                    (None, Some(pipe)) => pipe
                        .write_all(msg)
                        .map_err(|e| format!("write to the child: {e}"))?,
                    (None, None) => return Err("no way to reach the holder".into()),
                }
                let l = sup
                    .reports
                    .expect(holder_role, "progress", STEP_TIMEOUT, &mut steps.k)?;
                let (c0, c1) = (l.num("c0")?, l.num("c1")?);
                let done = (c1 as u32).wrapping_sub(c0 as u32);
                steps.k.diag(&format!(
                    "{holder_role}: {done} commands completed in {} ms after the opener's exit",
                    HOLD.as_millis()
                ));
                if let (Some(a), Some(b)) = (l.get("copy0"), l.get("copy1")) {
                    steps.k.diag(&format!(
                        "the child's copy of the buffer's first word: {a} -> {b} ({})",
                        if a == b {
                            "unchanged: the device writes the parent's pinned pages, the child got copies at fork"
                        } else {
                            "changed: the child shares the device's pages"
                        }
                    ));
                }
                if done == 0 {
                    return Err(format!("CMDS_COMPLETED did not advance ({c0} -> {c1})"));
                }
                Ok(())
            })();
            steps.done(cont_test, r)?;

            let r = (|| {
                sup.reports
                    .expect(holder_role, "exiting", STEP_TIMEOUT, &mut steps.k)?;
                let e = sup.wait(holder)?;
                steps
                    .k
                    .diag(&format!("waitpid({holder_role}) returned {e}"));
                check_ended(e, Ended::Code(0), holder_role)
            })();
            steps.done(holder_exits, r)?;
        }
        Case::BarMmap => {
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "fds-closed", STEP_TIMEOUT, &mut steps.k)?;
                let left = l.num("vfio-fds")?;
                if left != 0 {
                    return Err(format!("{left} vfio fds still open"));
                }
                if l.num("id")? != u64::from(gpu::ID_MAGIC) {
                    return Err("ID through the mapping is wrong".into());
                }
                Ok(())
            })();
            steps.done("bar-mmap-outlives-fds", r)?;
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "progress", STEP_TIMEOUT, &mut steps.k)?;
                let (c0, c1) = (l.num("c0")?, l.num("c1")?);
                if (c1 as u32).wrapping_sub(c0 as u32) == 0 {
                    return Err(format!("CMDS_COMPLETED did not advance ({c0} -> {c1})"));
                }
                Ok(())
            })();
            steps.done("dma-continues-through-mapping", r)?;
            let r = (|| {
                sup.reports
                    .expect("opener", "exiting", STEP_TIMEOUT, &mut steps.k)?;
                let e = sup.wait(opener)?;
                steps.k.diag(&format!("waitpid(opener) returned {e}"));
                check_ended(e, Ended::Code(0), "the opener")
            })();
            steps.done("exit-with-mapping", r)?;
        }
    }
    let r = waited_marker(&sup.group, &sup.layout).map(|m| steps.k.diag(&m));
    steps.done("released-before-waitpid", r)?;
    drop(to_receiver);
    Ok(())
}

pub(super) fn fail(steps: &mut Steps, name: &'static str, why: String) {
    let _ = steps.done(name, Err(why));
}

pub(super) fn check_ended(e: Ended, want: Ended, who: &str) -> Result<(), String> {
    if e == want {
        Ok(())
    } else {
        Err(format!("{who} ended with {e}, expected {want}"))
    }
}
