//! H4: removal while a guest vfio user holds the device (REQ, cooperative and not).

use super::*;

/// Plugs `id` if it is not plugged and leaves it without a driver bound; returns its BDF.
pub(super) fn ensure_plugged_unbound(ctx: &mut HostCtx<'_>, id: &str) -> Result<String, HostError> {
    let bdf = match locate(ctx, id)? {
        Some(info) => info.bdf(),
        None => plug(ctx, id)?.0.bdf(),
    };
    sh_output(
        ctx,
        &format!(
            "d=/sys/bus/pci/devices/{bdf}; [ -e $d/driver ] && echo {bdf} > $d/driver/unbind; \
             echo > $d/driver_override; true"
        ),
    )?;
    Ok(bdf)
}

/// Starts `pcisim-guest vfio-user ... --req MODE` in the background in the guest and waits
/// until it holds the device (its ready file); returns its pid.
pub(super) fn start_holder(
    ctx: &mut HostCtx<'_>,
    id: &str,
    bdf: &str,
    mode: ReqMode,
    tag: &str,
) -> Result<u32, HostError> {
    let argv = ctx.guest_argv(
        id,
        VfioUserOptions {
            bdf: Some(bdf.to_string()),
            req: Some(mode),
            ready_file: Some(format!("/tmp/{tag}.ready")),
            wait_s: Some(300),
            ..VfioUserOptions::default()
        },
    )?;
    let out = sh_output(
        ctx,
        &format!(
            "rm -f /tmp/{tag}.ready; {} > /tmp/{tag}.out 2>&1 < /dev/null & echo $!",
            argv.iter()
                .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )?;
    let pid: u32 = out.stdout.trim().parse().map_err(|_| {
        HostError::Step(format!(
            "no pid from the background start: {:?}",
            out.stdout
        ))
    })?;
    let ready = sh_output(
        ctx,
        &format!(
            "n=0; while [ ! -e /tmp/{tag}.ready ]; do kill -0 {pid} 2>/dev/null || exit 2; \
             n=$((n+1)); [ $n -ge 3000 ] && exit 1; usleep 10000; done"
        ),
    )?;
    if ready.exit != Some(0) {
        let log = sh_output(ctx, &format!("cat /tmp/{tag}.out"))?.stdout;
        for l in log.lines() {
            ctx.diag(l);
        }
        return Err(HostError::Step(format!(
            "the guest vfio user ({mode}) did not get ready (exit {:?})",
            ready.exit
        )));
    }
    Ok(pid)
}

/// Waits (up to 30 s) for guest process `pid` to end; returns its output file.
pub(super) fn wait_holder(
    ctx: &mut HostCtx<'_>,
    pid: u32,
    tag: &str,
) -> Result<(bool, String), HostError> {
    let out = sh_output(
        ctx,
        &format!(
            "n=0; while kill -0 {pid} 2>/dev/null; do n=$((n+1)); [ $n -ge 3000 ] && exit 1; \
             usleep 10000; done"
        ),
    )?;
    let log = sh_output(ctx, &format!("cat /tmp/{tag}.out"))?.stdout;
    Ok((out.exit == Some(0), log))
}

pub(super) fn h4_remove_while_held(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    // Cooperative: the holder releases on REQ.
    let bdf = ensure_plugged_unbound(ctx, &id)?;
    let pid = start_holder(ctx, &id, &bdf, ReqMode::Release, "h4a")?;
    ctx.pass(&format!(
        "a guest vfio user (pid {pid}) holds {id} at {bdf} with a DMA buffer mapped and watches REQ"
    ));
    let took = unplug(ctx, &id)?;
    ctx.progress(&format!(
        "cooperative holder: device_del → DEVICE_DELETED {}",
        ms(took)
    ));
    ctx.pass(&format!(
        "device_del {id} → DEVICE_DELETED in {} (the holder released)",
        ms(took)
    ));
    let (ended, log) = wait_holder(ctx, pid, "h4a")?;
    let got_req = log.contains("REQ fired") && log.contains("released the device");
    for l in log
        .lines()
        .filter(|l| l.contains("REQ") || l.starts_with("not ok"))
    {
        ctx.diag(l.trim_start_matches("# "));
    }
    ctx.check(
        "the holder received the device request (REQ eventfd), released and exited",
        ended && got_req,
        format!("ended: {ended}; output: {}", log.replace('\n', " | ")),
    );
    let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
    let detached = wait_detached(ctx, &id)?;
    ctx.check(
        "the guest's sysfs entry is gone and the server saw the client go",
        gone && detached,
        format!("sysfs gone: {gone}; server detached: {detached}"),
    );

    // Uncooperative: the holder ignores REQ until it is killed.
    let bdf = ensure_plugged_unbound(ctx, &id)?;
    let pid = start_holder(ctx, &id, &bdf, ReqMode::Ignore, "h4b")?;
    sh_output(ctx, "dmesg -c > /dev/null; true")?;
    ctx.pass(&format!(
        "an uncooperative guest vfio user (pid {pid}) holds {id} at {bdf} and ignores REQ"
    ));
    let mark = ctx.qmp().event_mark();
    ctx.qmp()
        .execute("device_del", Some(serde_json::json!({ "id": id })))?;
    let t = Instant::now();
    let is_ours = |e: &crate::vm::qmp::QmpEvent| {
        e.data.get("device").and_then(Value::as_str) == Some(id.as_str())
    };
    let early = match ctx
        .qmp()
        .wait_event_since(mark, "DEVICE_DELETED", is_ours, H4_PENDING)
    {
        Ok(_) => true,
        Err(QmpError::Timeout { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    ctx.check(
        &format!(
            "the removal stays pending while the program holds the device ({} s, no DEVICE_DELETED)",
            H4_PENDING.as_secs()
        ),
        !early,
        format!("DEVICE_DELETED after {}", ms(t.elapsed())),
    );
    if early {
        return Ok(());
    }
    // vfio-pci signals the REQ eventfd every 10 s but logs only every 10th relay (#0, #10..).
    let kmsg = sh_output(ctx, "dmesg | grep -i 'device request'; true")?.stdout;
    let logged = kmsg
        .lines()
        .filter(|l| l.contains("Relaying device request"))
        .count();
    for l in kmsg.lines().take(4) {
        ctx.diag(&format!("kmsg: {}", l.trim()));
    }
    let held = sh_output(ctx, "cat /tmp/h4b.out")?.stdout;
    let reqs = held.lines().filter(|l| l.contains("REQ fired")).count();
    for l in held.lines().filter(|l| l.contains("REQ fired")) {
        ctx.diag(&format!("holder: {}", l.trim_start_matches("# ")));
    }
    ctx.check(
        &format!(
            "the guest kernel relays the request to the holder every 10 s ({reqs} REQs received, \
             relay logged in dmesg)"
        ),
        logged >= 1 && reqs >= 2,
        format!("{reqs} REQs received; {logged} 'Relaying device request' lines in dmesg"),
    );
    ctx.check_qemu()?;
    let listed = locate(ctx, &id)?.is_some();
    ctx.check(
        &format!("QEMU still lists {id} while the removal is pending"),
        listed,
        "gone from query-pci",
    );
    let t = Instant::now();
    sh_output(ctx, &format!("kill -9 {pid}"))?;
    let r = ctx
        .qmp()
        .wait_event_since(mark, "DEVICE_DELETED", is_ours, DELETE_TIMEOUT);
    let done = match r {
        Ok(_) => true,
        Err(QmpError::Timeout { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    let took = t.elapsed();
    ctx.progress(&format!(
        "uncooperative holder: kill → DEVICE_DELETED {}",
        ms(took)
    ));
    ctx.check(
        &format!(
            "the agent kills the holder: the removal completes (DEVICE_DELETED {} after the kill)",
            ms(took)
        ),
        done,
        format!(
            "no DEVICE_DELETED within {} s of the kill",
            DELETE_TIMEOUT.as_secs()
        ),
    );
    let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
    let detached = wait_detached(ctx, &id)?;
    ctx.check(
        "the guest's sysfs entry is gone and the server saw the client go",
        gone && detached,
        format!("sysfs gone: {gone}; server detached: {detached}"),
    );
    let records = ctx.journal(&id)?;
    let disc = count_records(&records, |e| *e == Event::ClientDisconnected);
    ctx.check(
        &format!("{id} journaled client_disconnected for both removals"),
        disc >= 2,
        format!("{disc} client_disconnected"),
    );
    Ok(())
}
