//! One client connection of a device: its negotiated state, its DMA map and interrupt eventfds,
//! the frame reader, and the request handlers. The event loop ([`crate::evloop`]) owns it and
//! calls [`Connection::on_readable`] when the socket is readable; the connection reads what is
//! there, serves every complete frame (frame first: nothing is decoded before it is whole) and
//! answers each one synchronously before it returns.
//!
//! Replies are written with a blocking `send` bounded by SO_SNDTIMEO (the frame deadline): a
//! reply larger than the socket buffer (a 1 MiB REGION_READ) waits for the client to read it,
//! as QEMU does at once; a client that stops reading is disconnected when the deadline passes
//! instead of holding the device's loop. Posted writes (NO_REPLY) never get a reply.
//!
//! Here: the connection (reading, deadlines, teardown) and the session's framing (decode, send,
//! error replies, latency). The request match is in `dispatch`, the larger replies (VERSION,
//! region info, SET_IRQS) in `handlers`.

mod dispatch;
mod handlers;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::device::{irq_index, lock, Device};
use crate::dma::DmaSpace;
use crate::irq::Interrupts;
use crate::proto::{self, Limits, Writer, HEADER_SIZE};
use crate::reader::{Event, Frame, FrameReader, ReadError};
use crate::server::options::{
    suppressed_note, ConnectionEnd, LogLimiter, ServerOptions, KEEP_REPLY_BUF,
};
use crate::sys;

/// Why a request failed: the errno of the error reply plus a message for the log.
struct Failure {
    errno: i32,
    msg: String,
}

impl Failure {
    fn new(errno: i32, msg: impl Into<String>) -> Self {
        Failure {
            errno,
            msg: msg.into(),
        }
    }
}

impl From<proto::ProtoError> for Failure {
    fn from(e: proto::ProtoError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}
impl From<crate::device::DeviceError> for Failure {
    fn from(e: crate::device::DeviceError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}
impl From<crate::dma::DmaError> for Failure {
    fn from(e: crate::dma::DmaError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}
impl From<crate::irq::IrqError> for Failure {
    fn from(e: crate::irq::IrqError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}

/// Fds a reply carries (only DEVICE_GET_REGION_INFO of an mmap-able region has one).
type ReplyFds = Vec<Arc<OwnedFd>>;

/// A connected client: the socket's reader and the session it drives.
pub(crate) struct Connection {
    reader: FrameReader,
    session: Session,
    /// Until when VERSION must complete (`None`: done, or no deadline).
    handshake_deadline: Option<Instant>,
}

/// Which deadline a [`Connection::deadline`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// Connect to a completed VERSION ([`ServerOptions::handshake_timeout`]).
    Handshake,
    /// A started frame must complete ([`ServerOptions::frame_timeout`]).
    Frame,
}

impl Connection {
    /// Start serving `stream` (already admitted) for `device`.
    pub(crate) fn new(
        stream: UnixStream,
        device: Arc<Mutex<dyn Device>>,
        opts: Arc<ServerOptions>,
    ) -> Connection {
        // What the device looks like does not change while it exists (the `Device` contract):
        // read it once per client, not on every access.
        let (counts, region_sizes): (Vec<u32>, Vec<u64>) = {
            let dev = lock(&device);
            (
                (0..irq_index::COUNT)
                    .map(|i| dev.irq_info(i).map_or(0, |info| info.count))
                    .collect(),
                (0..)
                    .map_while(|i| dev.region_info(i).map(|info| info.size))
                    .collect(),
            )
        };
        // A reply the client does not read blocks the loop at most this long (see the module
        // documentation); then the send fails and the connection ends.
        if let Err(e) = stream.set_write_timeout(opts.frame_timeout) {
            log::warn!("{}: cannot set the reply deadline: {e}", opts.name);
        }
        Connection {
            reader: FrameReader::new(opts.max_msg_size(), opts.max_msg_fds),
            handshake_deadline: opts.handshake_timeout.map(|t| Instant::now() + t),
            session: Session {
                stream,
                client_max_xfer: opts.max_data_xfer_size,
                device,
                opts,
                dma: DmaSpace::new(),
                irqs: Interrupts::new(&counts),
                negotiated: false,
                region_sizes,
                out: Vec::new(),
                warns: LogLimiter::default(),
            },
        }
    }

    /// The client's socket (registered with the loop).
    pub(crate) fn stream(&self) -> &UnixStream {
        &self.session.stream
    }

    /// The socket is readable (or hung up): read what is there and serve every complete frame.
    /// `Err`: the connection is over (EOF, a socket error, a stream that cannot be resynced).
    ///
    /// `direct`: the caller's loop waits for nothing but this connection while it is
    /// negotiated and idle (the device loop: its listener is parked and no deadline runs), so
    /// between frames the connection waits in its own read instead of returning to epoll. It
    /// returns to the loop as soon as a deadline could matter: a frame arrived in part.
    pub(crate) fn on_readable(&mut self, direct: bool) -> Result<(), ConnectionEnd> {
        self.reader.set_readable();
        let s = &mut self.session;
        let mut pending = false;
        loop {
            if pending {
                if !(direct && s.negotiated && self.reader.is_empty()) {
                    break;
                }
                // Nothing buffered, no deadline (a negotiated client between frames has none):
                // the connection is the only thing this device's loop waits for, so wait in
                // its read, one syscall fewer than epoll_wait + recvmsg.
                self.reader.wait_once();
                pending = false;
            }
            let frame = match self.reader.next(&s.stream) {
                Ok(Event::Frame(f)) => f,
                Ok(Event::Pending) => {
                    pending = true;
                    continue;
                }
                Ok(Event::Eof) => return Err(ConnectionEnd::Eof),
                Ok(Event::Oversize(h)) => {
                    if let Some(n) = s.warns.admit() {
                        log::warn!(
                            "{}: message {} ({} bytes) exceeds {} bytes; discarded{}",
                            s.opts.name,
                            h.id,
                            h.size,
                            s.opts.max_msg_size(),
                            suppressed_note(n)
                        );
                    }
                    // Answered before the payload is drained: a client that lied about the size
                    // learns at once instead of waiting for bytes it will never send.
                    if !h.no_reply() {
                        s.send(&proto::error_frame(&h, libc::E2BIG), &[])
                            .map_err(ConnectionEnd::Io)?;
                        s.opts
                            .reply_latency
                            .record(h.command, self.reader.last_read());
                    }
                    continue;
                }
                Err(ReadError::Io(e)) => return Err(ConnectionEnd::Io(e)),
                Err(ReadError::Desync(h, why)) => {
                    // Reply so the client learns why, then close: we cannot find the next frame.
                    if s.send(&proto::error_frame(&h, libc::EINVAL), &[]).is_ok() {
                        s.opts
                            .reply_latency
                            .record(h.command, self.reader.last_read());
                    }
                    return Err(ConnectionEnd::ProtocolError(why));
                }
            };
            s.handle(frame).map_err(ConnectionEnd::Io)?;
            if s.negotiated {
                self.handshake_deadline = None;
            }
        }
        Ok(())
    }

    /// The earliest deadline in force, if any: the handshake's, or the started frame's. An
    /// idle negotiated client has none (QEMU idles for as long as the guest leaves the device
    /// alone).
    pub(crate) fn deadline(&self) -> Option<(Instant, Deadline)> {
        let frame = self
            .session
            .opts
            .frame_timeout
            .and_then(|t| Some((self.reader.partial_since()? + t, Deadline::Frame)));
        let handshake = self.handshake_deadline.map(|h| (h, Deadline::Handshake));
        match (handshake, frame) {
            (Some(h), Some(f)) => Some(if f.0 < h.0 { f } else { h }),
            (h, f) => h.or(f),
        }
    }

    /// `Err` with why, if a deadline has passed at `now`.
    pub(crate) fn check_deadline(&self, now: Instant) -> Result<(), ConnectionEnd> {
        match self.deadline() {
            Some((at, what)) if now >= at => Err(ConnectionEnd::TimedOut(match what {
                Deadline::Frame => format!(
                    "a frame started {} ms ago is still incomplete",
                    self.reader
                        .partial_since()
                        .map_or(0, |t| now.duration_since(t).as_millis()),
                ),
                Deadline::Handshake => {
                    "no VERSION completed within the handshake deadline".to_string()
                }
            })),
            _ => Ok(()),
        }
    }

    /// The connection is over: report suppressed log lines, detach the device and release
    /// everything the client gave us.
    pub(crate) fn finish(self) {
        let mut s = self.session;
        let suppressed = s.warns.take_suppressed();
        if suppressed > 0 {
            log::warn!(
                "{}: {suppressed} more messages about this client's bad input were suppressed",
                s.opts.name
            );
        }
        // Order matters: the device stops using the client's memory and eventfds first. A
        // connection that never negotiated (e.g. another server probing whether this socket is
        // live) never attached and leaves the device untouched.
        if s.negotiated {
            lock(&s.device).detach();
        }
        let n = s.dma.unmap_all().len();
        s.irqs.clear();
        log::info!(
            "{}: released {n} DMA mappings and all interrupt eventfds",
            s.opts.name
        );
    }
}

/// The state of one negotiated (or negotiating) client.
struct Session {
    stream: UnixStream,
    device: Arc<Mutex<dyn Device>>,
    opts: Arc<ServerOptions>,
    dma: DmaSpace,
    irqs: Interrupts,
    negotiated: bool,
    /// The client's `max_data_xfer_size`: bounds the data we return in one reply.
    client_max_xfer: usize,
    /// Size of each region, by index (read once per client; accesses are checked against it).
    region_sizes: Vec<u64>,
    /// The reply buffer, reused from one request to the next.
    out: Vec<u8>,
    /// Rate limit of this client's `warn!` lines.
    warns: LogLimiter,
}

impl Session {
    fn send(&self, frame: &[u8], fds: &[Arc<OwnedFd>]) -> io::Result<()> {
        if fds.is_empty() {
            return sys::send_with_fds(&self.stream, frame, &[]);
        }
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        sys::send_with_fds(&self.stream, frame, &borrowed)
    }

    /// Serve one frame: dispatch it, send its reply (unless it is posted) and record the
    /// reply's latency ([`crate::latency`]).
    fn handle(&mut self, frame: Frame<'_>) -> io::Result<()> {
        let header = frame.header;
        let received = frame.received;
        log::debug!(
            "{}: <- id={} cmd={} size={} flags={:#x} fds={}",
            self.opts.name,
            header.id,
            header.command,
            header.size,
            header.flags,
            frame.fds.len()
        );
        // The reply is built in place after room for its header: one buffer, one sendmsg.
        let mut w = Writer::with_buffer(std::mem::take(&mut self.out));
        w.bytes(&[0u8; HEADER_SIZE]);
        let result = self.dispatch(frame, &mut w);
        let mut out = w.finish();
        let sent = if header.no_reply() {
            // Never reply to NO_REPLY, not even with an error: the client is not waiting, and a
            // stray reply would be matched against a later request.
            if let Err(f) = result {
                if let Some(n) = self.warns.admit() {
                    log::warn!(
                        "{}: posted {}: {} (errno {}){}",
                        self.opts.name,
                        header.command,
                        f.msg,
                        f.errno,
                        suppressed_note(n)
                    );
                }
            }
            Ok(())
        } else {
            match result {
                Ok(fds) => {
                    let h = proto::reply_header(&header, out.len() - HEADER_SIZE);
                    if let Some(dst) = out.get_mut(..HEADER_SIZE) {
                        dst.copy_from_slice(&h.encode());
                    }
                    self.send(&out, &fds)
                }
                Err(f) => {
                    if let Some(n) = self.warns.admit() {
                        log::warn!(
                            "{}: command {} (id {}) failed: {} (errno {}){}",
                            self.opts.name,
                            header.command,
                            header.id,
                            f.msg,
                            f.errno,
                            suppressed_note(n)
                        );
                    }
                    self.send(&proto::error_frame(&header, f.errno), &[])
                }
            }
        };
        if out.capacity() <= KEEP_REPLY_BUF {
            self.out = out;
        }
        if sent.is_ok() && !header.no_reply() {
            let took = self.opts.reply_latency.record(header.command, received);
            if took >= crate::latency::SLOW_REPLY {
                log::warn!(
                    "{}: slow reply: {} (id {}) answered {} ms after its frame was complete",
                    self.opts.name,
                    crate::latency::command_name(header.command),
                    header.id,
                    took.as_millis()
                );
            }
        }
        sent
    }

    fn limits(&self) -> Limits {
        Limits {
            max_data_xfer_size: self.opts.max_data_xfer_size,
        }
    }
}
