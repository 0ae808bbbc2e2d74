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

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::device::{irq_index, lock, ClientLink, Device};
use crate::dma::DmaSpace;
use crate::irq::Interrupts;
use crate::proto::{self, Limits, Request, Writer, HEADER_SIZE};
use crate::reader::{Event, FdLoss, Frame, FrameReader, ReadError};
use crate::server::options::{
    suppressed_note, ConnectionEnd, LogLimiter, ServerOptions, KEEP_REPLY_BUF, MIN_DATA_XFER_SIZE,
    PAGE_SIZE,
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

    /// Execute one request; its reply payload is appended to `w`, and the fds it carries are
    /// returned.
    fn dispatch(&mut self, frame: Frame<'_>, w: &mut Writer) -> Result<ReplyFds, Failure> {
        let Frame {
            header,
            payload,
            mut fds,
            fds_truncated,
            received: _,
        } = frame;
        // Whatever fds did arrive are dropped (closed) with `fds` on every error path.
        match fds_truncated {
            None => {}
            Some(FdLoss::TableFull) => {
                return Err(Failure::new(
                    libc::EMFILE,
                    "fd table full (RLIMIT_NOFILE): control data truncated (MSG_CTRUNC), the \
                     fds sent with this message did not all arrive; those that did were closed",
                ))
            }
            Some(FdLoss::TooMany) => {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!(
                        "control data truncated (MSG_CTRUNC): more than {} fds in one message; \
                         those that arrived were closed",
                        self.opts.max_msg_fds
                    ),
                ))
            }
            Some(FdLoss::Trickled) => {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!(
                        "fds trickled with an incomplete frame beyond {} held; they were closed",
                        2 * self.opts.max_msg_fds
                    ),
                ))
            }
        }
        let req = proto::decode(&header, payload, &self.limits())?;
        if !self.negotiated && !matches!(req, Request::Version { .. }) {
            return Err(Failure::new(
                libc::EINVAL,
                "VERSION must be negotiated first",
            ));
        }
        // Commands that carry no fds must not come with any (they would be closed silently).
        let fd_ok = match &req {
            Request::DmaMap { .. } => fds.len() <= 1,
            Request::SetIrqs { flags, .. } => {
                fds.is_empty() || flags & proto::IRQ_SET_DATA_EVENTFD != 0
            }
            _ => fds.is_empty(),
        };
        if !fd_ok {
            return Err(Failure::new(
                libc::EINVAL,
                format!("unexpected {} fds", fds.len()),
            ));
        }
        match req {
            Request::Version { major, minor, caps } => self.version(major, minor, &caps, w),
            Request::DmaMap {
                flags,
                offset,
                iova,
                size,
            } => {
                let fd = fds.pop().map(|f| (f, offset));
                let backed = fd.is_some();
                self.dma.map(iova, size, flags, fd)?;
                lock(&self.device).dma_mapped(&crate::dma::MappingInfo {
                    iova,
                    size,
                    prot: flags,
                    backed,
                });
                log::debug!(
                    "{}: DMA map {iova:#x}+{size:#x} prot={flags} fd={backed}",
                    self.opts.name
                );
                Ok(Vec::new())
            }
            Request::DmaUnmap {
                argsz,
                flags,
                iova,
                size,
            } => {
                let removed = if flags & proto::DMA_UNMAP_FLAG_ALL != 0 {
                    self.dma.unmap_all()
                } else {
                    // As the kernel (vfio_dma_do_unmap): a page-aligned, non-empty range.
                    if size == 0 || iova % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
                        return Err(Failure::new(
                            libc::EINVAL,
                            format!("DMA unmap {iova:#x}+{size:#x} is empty or not page aligned"),
                        ));
                    }
                    self.dma.unmap(iova, size)?
                };
                lock(&self.device).dma_unmapped(&removed);
                log::debug!(
                    "{}: DMA unmap {iova:#x}+{size:#x}: {} mappings",
                    self.opts.name,
                    removed.len()
                );
                w.u32(argsz.min(24)).u32(flags).u64(iova).u64(size);
                Ok(Vec::new())
            }
            Request::GetInfo { .. } => {
                let dev = lock(&self.device);
                let nregions = (0..64)
                    .take_while(|&i| dev.region_info(i).is_some())
                    .count() as u32;
                let nirqs = (0..64).take_while(|&i| dev.irq_info(i).is_some()).count() as u32;
                w.u32(16).u32(dev.device_flags()).u32(nregions).u32(nirqs);
                Ok(Vec::new())
            }
            Request::GetRegionInfo { argsz, index } => self.region_info(argsz, index, w),
            Request::GetIrqInfo { index, .. } => {
                let info = lock(&self.device).irq_info(index).ok_or_else(|| {
                    Failure::new(libc::EINVAL, format!("no interrupt index {index}"))
                })?;
                w.u32(16).u32(info.flags).u32(index).u32(info.count);
                Ok(Vec::new())
            }
            Request::SetIrqs {
                flags,
                index,
                start,
                count,
                bools,
            } => {
                self.set_irqs(flags, index, start, count, &bools, fds)?;
                lock(&self.device).irqs_changed(index);
                Ok(Vec::new())
            }
            Request::RegionRead {
                offset,
                region,
                count,
            } => {
                if count as usize > self.client_max_xfer {
                    return Err(Failure::new(
                        libc::E2BIG,
                        "read larger than the client accepts",
                    ));
                }
                self.check_region(region, offset, count as usize)?;
                // The device reads straight into the reply.
                w.u64(offset).u32(region).u32(count);
                lock(&self.device).region_read(region, offset, w.zeroed(count as usize))?;
                Ok(Vec::new())
            }
            Request::RegionWrite {
                offset,
                region,
                data,
            } => {
                self.check_region(region, offset, data.len())?;
                lock(&self.device).region_write(region, offset, &data)?;
                w.u64(offset).u32(region).u32(data.len() as u32);
                Ok(Vec::new())
            }
            Request::RegionWriteMulti { writes } => {
                // Every entry is checked before any is applied: a bad entry fails the whole
                // message and leaves the device untouched.
                for wr in &writes {
                    self.check_region(wr.region, wr.offset, wr.data.len())?;
                }
                let mut done = 0u64;
                for wr in &writes {
                    lock(&self.device).region_write(wr.region, wr.offset, &wr.data)?;
                    done += 1;
                }
                w.u64(done);
                Ok(Vec::new())
            }
            Request::DeviceReset => {
                log::info!("{}: DEVICE_RESET from client", self.opts.name);
                lock(&self.device).reset()?;
                Ok(Vec::new())
            }
        }
    }

    fn version(
        &mut self,
        major: u16,
        minor: u16,
        caps: &serde_json::Value,
        w: &mut Writer,
    ) -> Result<ReplyFds, Failure> {
        if self.negotiated {
            // The spec has VERSION as the first message only; renegotiating limits under a
            // live session (a smaller max_data_xfer_size with replies in flight) is refused.
            return Err(Failure::new(
                libc::EINVAL,
                "VERSION already negotiated on this connection; nothing renegotiated",
            ));
        }
        if major != proto::VERSION_MAJOR {
            return Err(Failure::new(
                libc::ENOTSUP,
                format!("protocol major {major} unsupported"),
            ));
        }
        let c = &caps["capabilities"];
        let mut client_max_xfer = self.opts.max_data_xfer_size;
        match &c["max_data_xfer_size"] {
            serde_json::Value::Null => {}
            v => match v.as_u64() {
                Some(x) if x >= MIN_DATA_XFER_SIZE => {
                    client_max_xfer = usize::try_from(x)
                        .unwrap_or(usize::MAX)
                        .min(self.opts.max_data_xfer_size);
                }
                _ => {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!(
                            "client max_data_xfer_size {v} is not a number of at least \
                             {MIN_DATA_XFER_SIZE}"
                        ),
                    ))
                }
            },
        }
        if let Some(p) = c["pgsizes"].as_u64() {
            if p & 4096 == 0 {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!("client page sizes {p:#x} exclude 4 KiB"),
                ));
            }
        }
        log::info!(
            "{}: client speaks {major}.{minor}, caps {caps}",
            self.opts.name
        );
        let ours = serde_json::json!({
            "capabilities": {
                "max_msg_fds": self.opts.max_msg_fds,
                "max_data_xfer_size": self.opts.max_data_xfer_size,
                "pgsizes": 4096,
                "max_dma_maps": crate::dma::advertised_max_dma_maps(c["max_dma_maps"].as_u64()),
                "write_multiple": true,
            }
        });
        w.u16(proto::VERSION_MAJOR)
            .u16(proto::VERSION_MINOR)
            .bytes(ours.to_string().as_bytes())
            .bytes(&[0]);
        self.client_max_xfer = client_max_xfer;
        self.negotiated = true;
        lock(&self.device).attach(ClientLink {
            irqs: self.irqs.clone(),
            dma: self.dma.clone(),
        });
        Ok(Vec::new())
    }

    fn check_region(&self, index: u32, offset: u64, len: usize) -> Result<(), Failure> {
        let size = *usize::try_from(index)
            .ok()
            .and_then(|i| self.region_sizes.get(i))
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no region {index}")))?;
        let end = offset.checked_add(len as u64);
        if len == 0 || end.is_none_or(|e| e > size) {
            return Err(Failure::new(
                libc::EINVAL,
                format!("region {index} access {offset:#x}+{len} outside its {size:#x} bytes"),
            ));
        }
        Ok(())
    }

    fn region_info(&self, argsz: u32, index: u32, w: &mut Writer) -> Result<ReplyFds, Failure> {
        let info = lock(&self.device)
            .region_info(index)
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no region {index}")))?;
        let mut flags = 0;
        if info.flags.read {
            flags |= proto::REGION_INFO_FLAG_READ;
        }
        if info.flags.write {
            flags |= proto::REGION_INFO_FLAG_WRITE;
        }
        // The sparse-mmap capability: header (id, version, next) + nr_areas, reserved + areas.
        let mut cap = Writer::new();
        let mut file_offset = 0;
        let mut fds = Vec::new();
        if let (true, Some(m)) = (info.flags.mmap, info.mmap.as_ref()) {
            flags |= proto::REGION_INFO_FLAG_MMAP | proto::REGION_INFO_FLAG_CAPS;
            cap.u16(proto::REGION_INFO_CAP_SPARSE_MMAP).u16(1).u32(0);
            cap.u32(m.areas.len() as u32).u32(0);
            for a in &m.areas {
                cap.u64(a.offset).u64(a.size);
            }
            file_offset = m.file_offset;
            fds.push(m.fd.clone());
        }
        let cap = cap.finish();
        let full = 32 + cap.len() as u32;
        // cap_offset must point inside the structure the client will read (QEMU checks it even
        // on the short reply that only tells it how much room to allocate).
        let cap_offset = if cap.is_empty() { 0 } else { 32 };
        w.u32(full)
            .u32(flags)
            .u32(index)
            .u32(cap_offset)
            .u64(info.size)
            .u64(file_offset);
        if argsz >= full {
            w.bytes(&cap);
        } else {
            // Short reply: the client retries with argsz = full; the fd comes with that reply.
            fds.clear();
        }
        Ok(fds)
    }

    fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        bools: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Failure> {
        let info = lock(&self.device)
            .irq_info(index)
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no interrupt index {index}")))?;
        let data = flags
            & (proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_DATA_EVENTFD);
        let action = flags
            & (proto::IRQ_SET_ACTION_MASK
                | proto::IRQ_SET_ACTION_UNMASK
                | proto::IRQ_SET_ACTION_TRIGGER);
        log::debug!(
            "{}: SET_IRQS index={index} start={start} count={count} flags={flags:#x} fds={}",
            self.opts.name,
            fds.len()
        );
        // Disable the whole index (VFIO: DATA_NONE | ACTION_TRIGGER with count 0).
        if data == proto::IRQ_SET_DATA_NONE
            && action == proto::IRQ_SET_ACTION_TRIGGER
            && count == 0
            && start == 0
        {
            self.irqs.disable(index)?;
            return Ok(());
        }
        if start.checked_add(count).is_none_or(|end| end > info.count) || count == 0 {
            // (count 0 is only the disable form above; like libvfio-user, with start 0.)
            return Err(Failure::new(
                libc::EINVAL,
                format!("vectors {start}+{count} outside 0..{}", info.count),
            ));
        }
        let maskable = info.flags & proto::IRQ_INFO_MASKABLE != 0;
        match (data, action) {
            (proto::IRQ_SET_DATA_EVENTFD, proto::IRQ_SET_ACTION_TRIGGER) => {
                let set: Vec<Option<OwnedFd>> = if fds.is_empty() {
                    // QEMU de-assigns a run of vectors by sending it without fds.
                    (0..count).map(|_| None).collect()
                } else if fds.len() == count as usize {
                    if let Some(bad) = fds.iter().position(|f| !sys::is_eventfd(f)) {
                        return Err(Failure::new(
                            libc::EINVAL,
                            format!("fd {bad} is not an eventfd"),
                        ));
                    }
                    fds.into_iter().map(Some).collect()
                } else {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!("{} fds for {count} vectors", fds.len()),
                    ));
                };
                self.irqs.set_triggers(index, start, set)?;
            }
            (proto::IRQ_SET_DATA_EVENTFD, proto::IRQ_SET_ACTION_UNMASK) => {
                if !maskable || count != 1 || fds.len() > 1 {
                    return Err(Failure::new(
                        libc::EINVAL,
                        "unmask eventfd needs a maskable index, one vector, at most one fd",
                    ));
                }
                let fd = fds.into_iter().next();
                if fd.as_ref().is_some_and(|f| !sys::is_eventfd(f)) {
                    return Err(Failure::new(libc::EINVAL, "unmask fd is not an eventfd"));
                }
                self.irqs.set_unmask_fd(index, fd)?;
            }
            (proto::IRQ_SET_DATA_EVENTFD, _) => {
                return Err(Failure::new(
                    libc::ENOTSUP,
                    "mask eventfds are not supported",
                ));
            }
            (_, proto::IRQ_SET_ACTION_TRIGGER) => {
                // Loopback trigger from the client.
                for v in 0..count {
                    if data == proto::IRQ_SET_DATA_BOOL
                        && bools.get(v as usize).copied().unwrap_or(0) == 0
                    {
                        continue;
                    }
                    self.irqs.signal(index, start + v)?;
                }
            }
            (_, act) => {
                if !maskable {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!("interrupt index {index} is not maskable"),
                    ));
                }
                let which: Option<Vec<bool>> = (data == proto::IRQ_SET_DATA_BOOL)
                    .then(|| bools.iter().map(|&b| b != 0).collect());
                self.irqs.set_masked(
                    index,
                    start,
                    count,
                    which.as_deref(),
                    act == proto::IRQ_SET_ACTION_MASK,
                )?;
            }
        }
        Ok(())
    }
}
