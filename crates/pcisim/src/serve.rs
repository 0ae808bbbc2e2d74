//! `pcisim serve`: bind the device sockets with their access rules ([`Access`]), run every
//! device and the control socket on one `event-manager` loop, stop on SIGINT/SIGTERM
//! ([`SignalWatch`]) and remove the socket files this process bound ([`BoundSockets`]).

use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context, Result};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::{control, devices, spec};

/// `0` → no deadline, otherwise that many milliseconds.
pub(crate) fn millis(ms: u64) -> Option<std::time::Duration> {
    (ms > 0).then(|| std::time::Duration::from_millis(ms))
}

/// Who may connect to the device sockets and how long they may take (`serve --socket-mode`,
/// `--allow-uid`, `--handshake-timeout`, `--frame-timeout`).
#[derive(Debug)]
pub(crate) struct Access {
    pub(crate) socket_mode: u32,
    pub(crate) allow_uids: Vec<u32>,
    pub(crate) handshake_timeout: Option<std::time::Duration>,
    pub(crate) frame_timeout: Option<std::time::Duration>,
    pub(crate) control_idle_timeout: std::time::Duration,
}

/// The socket files this process bound. Dropping it (at shutdown, or when startup fails after
/// some sockets were bound) removes each one that is still the socket we bound — compared by
/// st_dev/st_ino — and leaves alone whatever else now sits at its path.
#[derive(Debug, Default)]
pub(crate) struct BoundSockets(Vec<pcisim_vfio_user::server::SocketFile>);

impl Drop for BoundSockets {
    fn drop(&mut self) {
        for f in &self.0 {
            f.remove_if_ours();
        }
    }
}

/// SIGINT and SIGTERM as events of the main loop: each signal's handler (signal-hook's
/// async-signal-safe pipe writer) writes a byte to a socket pair whose other end is watched.
pub(crate) struct SignalWatch {
    /// The signal and the read end of its pair.
    pub(crate) pipes: Vec<(i32, UnixStream)>,
    /// Set to the signal that arrived: the loop then ends.
    pub(crate) stop: Rc<Cell<Option<i32>>>,
}

impl SignalWatch {
    pub(crate) fn new(stop: Rc<Cell<Option<i32>>>) -> std::io::Result<SignalWatch> {
        let mut pipes = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let (read, write) = UnixStream::pair()?;
            read.set_nonblocking(true)?;
            write.set_nonblocking(true)?;
            signal_hook::low_level::pipe::register(sig, write)?;
            pipes.push((sig, read));
        }
        Ok(SignalWatch { pipes, stop })
    }
}

impl MutEventSubscriber for SignalWatch {
    fn init(&mut self, ops: &mut EventOps) {
        for (sig, read) in &self.pipes {
            if let Err(e) = ops.add(Events::with_data(read, *sig as u32, EventSet::IN)) {
                log::error!("cannot watch signal {sig}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::io::Read;
        let sig = events.data() as i32;
        if let Some((_, read)) = self.pipes.iter().find(|(s, _)| *s == sig) {
            let mut buf = [0u8; 64];
            while matches!((&*read).read(&mut buf), Ok(n) if n > 0) {}
        }
        self.stop.set(Some(sig));
    }
}

pub(crate) fn serve(
    specs: &[spec::DeviceSpec],
    control_path: Option<&Path>,
    access: &Access,
) -> Result<i32> {
    // Build and bind everything first, so a bad option or a busy socket fails before any
    // device starts serving.
    let mut servers = Vec::new();
    // Declared before anything is bound: every early return below removes what was bound.
    let mut bound = BoundSockets::default();
    let mut controls = Vec::new();
    let mut built_all = devices::build_all(specs)?.into_iter();
    for s in specs {
        if let Some(other) = specs.iter().find(|o| o.id == s.id && !std::ptr::eq(*o, s)) {
            anyhow::bail!(
                "two devices are named {:?} ({} and {}): give each its own id=",
                s.id,
                s.socket.display(),
                other.socket.display()
            );
        }
        let built = built_all
            .next()
            .ok_or_else(|| anyhow::anyhow!("device {} was not built", s.id))?;
        controls.push(control::ControlDevice::new(
            &s.id,
            s.kind.name(),
            &s.socket,
            built.description.clone(),
            built.control,
        ));
        let opts = pcisim_vfio_user::ServerOptions {
            name: s.id.clone(),
            socket_mode: access.socket_mode,
            allowed_uids: access.allow_uids.clone(),
            handshake_timeout: access.handshake_timeout,
            frame_timeout: access.frame_timeout,
            ..Default::default()
        };
        let server = pcisim_vfio_user::Server::bind(&s.socket, built.device, opts)
            .with_context(|| format!("device {}", s.id))?;
        // The control socket's `stats` reports the device's reply latency (issue 15).
        if let Some(c) = controls.last_mut() {
            c.reply_latency = Some(server.reply_latency());
        }
        log::info!(
            "{}: {} serving on {} (mode {:04o})",
            s.id,
            s.kind.name(),
            s.socket.display(),
            access.socket_mode
        );
        bound.0.push(server.socket_file().clone());
        servers.push((s.id.clone(), server));
    }
    let control = match control_path {
        Some(path) => {
            // On failure `bound` leaves no device socket behind that nobody serves.
            let mut c = control::ControlServer::bind(path, controls)?;
            c.set_idle_timeout(access.control_idle_timeout);
            log::info!("control socket on {}", c.path().display());
            bound.0.push(c.socket_file().clone());
            Some(c)
        }
        None => None,
    };
    // The main thread's event loop: the signals and the control socket. Each device runs an
    // event loop of its own on its own thread (docs/architecture.md, "Threads and ownership":
    // a device handler may block for seconds, which must not stall the other devices).
    let stop = Rc::new(Cell::new(None));
    let signals = SignalWatch::new(Rc::clone(&stop)).context("installing signal handlers")?;
    let mut main_loop = EventManager::<Box<dyn MutEventSubscriber>>::new()
        .map_err(|e| anyhow::anyhow!("event loop: {e}"))?;
    main_loop.add_subscriber(Box::new(signals));
    if let Some(c) = &control {
        main_loop.add_subscriber(Box::new(
            c.subscriber().context("control socket event loop")?,
        ));
    }
    for (id, server) in servers {
        let server = Arc::new(server);
        std::thread::Builder::new()
            // The device's id names its thread (`ps -L`, the lab's stall report; Linux keeps
            // 15 bytes of it).
            .name(format!("{id}-vfio-user"))
            .spawn(move || {
                if let Err(e) = server.run() {
                    log::error!("{}: device loop ended: {e}", server.path().display());
                }
            })
            .context("spawning a server thread")?;
    }
    while stop.get().is_none() {
        main_loop
            .run()
            .map_err(|e| anyhow::anyhow!("event loop: {e}"))?;
    }
    if let Some(sig) = stop.get() {
        log::info!("signal {sig}: shutting down");
    }
    // Only what is still our socket is removed (see `BoundSockets`).
    drop(bound);
    Ok(0)
}
