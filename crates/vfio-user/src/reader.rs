//! Buffered frame reading: one `recvmsg` per frame in the common case (none at all for frames
//! that arrived together), with every SCM_RIGHTS fd attributed to the frame it was sent with.
//!
//! The reader keeps one buffer per connection. A read takes whatever the socket holds, up to the
//! room in the buffer, so a synchronous client's request arrives with one `recvmsg` (header and
//! payload together; the server used to read them with two) and a burst of posted writes with a
//! few. Frames are handed out as slices of the buffer: nothing is copied.
//!
//! Fds: the kernel delivers the fds of a `sendmsg` with the first read that takes a byte of the
//! skb they came with, and that read always ends inside or at the end of that skb (it may start
//! with bytes of earlier fd-less skbs: see [`crate::sys::recv_with_fds`]). A client sends each
//! message with its own `sendmsg` (QEMU, libvfio-user and the rust-vmm client all do), so the fds
//! of a read belong to the frame that holds the read's **last byte**. The reader records, for
//! each read that brought fds, the stream offset of its last byte, and gives the fds to the frame
//! that covers that offset.
//!
//! ```text
//!  stream:  ... | frame A (no fds) | frame B (sent with fds) | frame C ...
//!  read k:        [================================]          ends in B, carries B's fds
//! ```
//!
//! Non-blocking: the reader never waits. The event loop ([`crate::evloop`]) calls
//! [`FrameReader::set_readable`] when epoll says the socket is readable and then takes frames
//! until [`Event::Pending`]. A read that leaves room in the buffer has taken everything the
//! socket held, so the reader does not try again (that would be a `recvmsg` returning EAGAIN on
//! every request) and says `Pending`; level-triggered epoll reports the socket again if more
//! came. Deadlines live in the loop too: the reader only says since when an incomplete frame has
//! been waiting ([`FrameReader::partial_since`]).

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::proto::{Header, HEADER_SIZE};
use crate::sys::{self, CmsgBuf};

/// Buffer size a reader starts with and shrinks back to after a large frame.
const DEFAULT_BUF: usize = 32 * 1024;

/// One complete frame, borrowed from the reader's buffer.
pub(crate) struct Frame<'a> {
    /// The header.
    pub header: Header,
    /// The `size - 16` payload bytes.
    pub payload: &'a [u8],
    /// The fds sent with the frame.
    pub fds: Vec<OwnedFd>,
    /// Fds of this frame were dropped, and why (`None`: every fd sent arrived).
    pub fds_truncated: Option<FdLoss>,
    /// When the frame was complete: the read that brought its last byte returned (for the
    /// reply latency, [`crate::latency`]).
    pub received: Instant,
}

/// Why fds sent with a frame did not all arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdLoss {
    /// MSG_CTRUNC with room left in the fd table: the client sent more fds than the control
    /// buffer holds (more than `max_msg_fds`).
    TooMany,
    /// MSG_CTRUNC because the server's fd table is full (RLIMIT_NOFILE): the kernel installed
    /// what fit and dropped the rest (EMFILE).
    TableFull,
    /// The client trickled fds with the bytes of an incomplete frame beyond what we hold.
    Trickled,
}

/// What the next read produced.
pub(crate) enum Event<'a> {
    /// A complete frame.
    Frame(Frame<'a>),
    /// A header whose `size` exceeds the limit. Its payload (and fds) are dropped as they
    /// arrive; the caller answers at once, so a client that lied about the size is not left
    /// waiting for a reply that would only come after `size` more bytes.
    Oversize(Header),
    /// The peer closed the socket (a partial frame at that point is dropped).
    Eof,
    /// No complete frame is buffered and the socket has nothing more to read now: wait until
    /// the loop reports it readable again.
    Pending,
}

/// Why reading stopped.
pub(crate) enum ReadError {
    /// The socket failed.
    Io(io::Error),
    /// A header's `size` is smaller than the header: the next frame cannot be found.
    Desync(Header, String),
}

/// Fds that came with one read.
struct PendingFds {
    /// Stream offset of the last byte of the read that carried them.
    last: u64,
    fds: Vec<OwnedFd>,
    truncated: Option<FdLoss>,
}

/// Reads frames from one client socket.
pub(crate) struct FrameReader {
    /// Received bytes live in `buf[head..tail]`; the rest is room for the next read.
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// Fds of reads whose last byte is not consumed yet, oldest first.
    pending: VecDeque<PendingFds>,
    /// Number of fds in `pending`.
    pending_fds: usize,
    /// Most fds one frame may carry.
    max_fds: usize,
    cmsg: CmsgBuf,
    /// Stream offset up to which an oversized frame is being dropped.
    discard_to: u64,
    max_msg_size: usize,
    /// When the bytes of the incomplete frame at `head` (or of a frame being discarded) started
    /// to wait for the rest; `None` when no frame is incomplete.
    partial_since: Option<Instant>,
    /// The socket may have bytes for us: set by the loop on readiness, cleared by a read that
    /// drained the socket (less than the room offered, or EAGAIN).
    readable: bool,
    /// The next read may wait for data ([`FrameReader::wait_once`]).
    wait_once: bool,
    /// When the last read that brought bytes returned: every complete frame in the buffer was
    /// completed by that read (the reader reads only when the frame at `head` is incomplete).
    last_read: Instant,
}

impl FrameReader {
    /// A reader accepting frames of up to `max_msg_size` bytes with up to `max_fds` fds.
    pub(crate) fn new(max_msg_size: usize, max_fds: usize) -> Self {
        FrameReader {
            buf: vec![0; DEFAULT_BUF.min(max_msg_size.max(HEADER_SIZE))],
            head: 0,
            tail: 0,
            base: 0,
            pending: VecDeque::new(),
            pending_fds: 0,
            max_fds,
            cmsg: CmsgBuf::new(max_fds),
            discard_to: 0,
            max_msg_size,
            partial_since: None,
            readable: false,
            wait_once: false,
            last_read: Instant::now(),
        }
    }

    /// Stream offset of the first unconsumed byte.
    fn consumed(&self) -> u64 {
        self.base + self.head as u64
    }

    /// The socket was reported readable.
    pub(crate) fn set_readable(&mut self) {
        self.readable = true;
    }

    /// Let the next read wait for data instead of returning `Pending` (the device loop's direct
    /// wait: only when nothing is buffered and no deadline runs, see [`crate::evloop`]).
    pub(crate) fn wait_once(&mut self) {
        self.wait_once = true;
    }

    /// Nothing is buffered: no complete frame, no part of one, nothing being discarded.
    pub(crate) fn is_empty(&self) -> bool {
        self.head == self.tail && self.discard_to <= self.consumed()
    }

    /// When the last read that brought bytes returned (a header answered before its frame is
    /// whole, [`Event::Oversize`], arrived then).
    pub(crate) fn last_read(&self) -> Instant {
        self.last_read
    }

    /// Since when an incomplete frame (or the rest of a frame being discarded) has been waiting
    /// for bytes; `None` when the buffer holds only complete frames or nothing. The loop's frame
    /// deadline runs from here.
    pub(crate) fn partial_since(&self) -> Option<Instant> {
        self.partial_since
    }

    /// The next frame (or event). Never blocks: [`Event::Pending`] when more bytes are needed
    /// and the socket has none now.
    pub(crate) fn next(&mut self, sock: &UnixStream) -> Result<Event<'_>, ReadError> {
        let (header, start, size) = loop {
            if self.discard_to > self.consumed() {
                let n = (self.discard_to - self.consumed()).min((self.tail - self.head) as u64);
                self.head += n as usize;
                let done = self.consumed();
                // Fds whose read ended inside the dropped bytes belonged to the dropped frame.
                while self.pending.front().is_some_and(|p| p.last < done) {
                    if let Some(p) = self.pending.pop_front() {
                        self.pending_fds -= p.fds.len();
                    }
                }
                if self.discard_to > done {
                    match self.fill(sock, 1)? {
                        Fill::Read => continue,
                        Fill::Eof => return Ok(Event::Eof),
                        Fill::Pending => return Ok(self.pending_event()),
                    }
                }
            }
            let avail = self.tail - self.head;
            let mut need = HEADER_SIZE;
            // (The buffer is initialised beyond `tail`: only `avail` bytes are received data.)
            if let Some(hb) = self
                .buf
                .get(self.head..self.head + HEADER_SIZE)
                .filter(|_| avail >= HEADER_SIZE)
                .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
            {
                let header = Header::parse(hb);
                let size = header.size as usize;
                if size < HEADER_SIZE {
                    return Err(ReadError::Desync(
                        header,
                        format!("message size {size} is smaller than the header"),
                    ));
                }
                if size > self.max_msg_size {
                    self.discard_to = self.consumed() + size as u64;
                    return Ok(Event::Oversize(header));
                }
                if avail >= size {
                    break (header, self.head, size);
                }
                need = size;
            }
            match self.fill(sock, need)? {
                Fill::Read => {}
                Fill::Eof => return Ok(Event::Eof),
                Fill::Pending => return Ok(self.pending_event()),
            }
        };
        self.head += size;
        let end = self.consumed();
        let mut fds = Vec::new();
        self.partial_since = None;
        let mut fds_truncated = None;
        while let Some(p) = self.pending.front() {
            if p.last >= end {
                break;
            }
            if let Some(mut p) = self.pending.pop_front() {
                self.pending_fds -= p.fds.len();
                fds.append(&mut p.fds);
                fds_truncated = fds_truncated.or(p.truncated);
            }
        }
        let payload = self
            .buf
            .get(start + HEADER_SIZE..start + size)
            .unwrap_or(&[]);
        Ok(Event::Frame(Frame {
            header,
            payload,
            fds,
            fds_truncated,
            received: self.last_read,
        }))
    }

    /// `Pending`, noting when an incomplete frame started waiting (the clock is read only when
    /// one is: the common case, a drained buffer, costs nothing).
    fn pending_event(&mut self) -> Event<'static> {
        let partial = self.head < self.tail || self.discard_to > self.consumed();
        if !partial {
            self.partial_since = None;
        } else if self.partial_since.is_none() {
            self.partial_since = Some(Instant::now());
        }
        Event::Pending
    }

    /// Make room for a frame of `need` bytes starting at `head`, then read once if the socket
    /// may have bytes.
    fn fill(&mut self, sock: &UnixStream, need: usize) -> Result<Fill, ReadError> {
        let wait = std::mem::take(&mut self.wait_once);
        if !self.readable && !wait {
            return Ok(Fill::Pending);
        }
        if self.head == self.tail {
            self.base += self.head as u64;
            self.head = 0;
            self.tail = 0;
            if self.buf.len() > DEFAULT_BUF && need <= DEFAULT_BUF {
                // A large frame passed: give its memory back.
                self.buf = vec![0; DEFAULT_BUF];
            }
        }
        if self.head + need > self.buf.len() || self.tail == self.buf.len() {
            self.buf.copy_within(self.head..self.tail, 0);
            self.base += self.head as u64;
            self.tail -= self.head;
            self.head = 0;
        }
        if need > self.buf.len() {
            self.buf.resize(need, 0);
        }
        let mut fds = Vec::new();
        let room = self.buf.get_mut(self.tail..).unwrap_or(&mut []);
        let offered = room.len();
        let r = match sys::recv_with_fds(sock, room, &mut self.cmsg, &mut fds, wait) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                return Ok(Fill::Pending);
            }
            Err(e) => return Err(ReadError::Io(e)),
        };
        if r.bytes == 0 {
            return Ok(Fill::Eof);
        }
        // The one clock read per request of the reply latency (crate::latency).
        self.last_read = Instant::now();
        if r.bytes < offered {
            // The socket had no more than this: do not ask again until epoll says so.
            self.readable = false;
        }
        if !fds.is_empty() || r.truncated {
            // The fds that arrived are still open here, so a table that was full is still full.
            let mut truncated = r.truncated.then(|| {
                if sys::fd_table_full(sock) {
                    FdLoss::TableFull
                } else {
                    FdLoss::TooMany
                }
            });
            // Before a read, `pending` holds only fds of the incomplete current frame (complete
            // frames were handed out), and one read brings the fds of at most one sendmsg (the
            // kernel stops after them): so a well-behaved client never has more than two frames'
            // worth pending. A client that sends its frame a byte at a time, each with fds,
            // would otherwise fill our fd table: beyond that, fds are closed and the frame they
            // belong to fails as if the kernel had truncated them.
            if self.pending_fds + fds.len() > 2 * self.max_fds {
                fds.clear();
                truncated = Some(FdLoss::Trickled);
            }
            self.pending_fds += fds.len();
            self.pending.push_back(PendingFds {
                last: self.base + (self.tail + r.bytes - 1) as u64,
                fds,
                truncated,
            });
        }
        self.tail += r.bytes;
        Ok(Fill::Read)
    }
}

/// What [`FrameReader::fill`] did.
enum Fill {
    /// Bytes arrived.
    Read,
    /// The peer closed the socket.
    Eof,
    /// Nothing to read now.
    Pending,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    fn frame(id: u16, payload_len: usize) -> Vec<u8> {
        let h = Header {
            id,
            command: 9,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: 0,
            error: 0,
        };
        let mut v = h.encode().to_vec();
        v.extend((0..payload_len).map(|i| (i as u8) ^ (id as u8)));
        v
    }

    /// What the reader produced, owned (so that a helper can wait and retry).
    #[derive(Debug)]
    enum Got {
        Frame {
            id: u16,
            payload: Vec<u8>,
            nfds: usize,
            truncated: Option<FdLoss>,
        },
        Oversize(Header),
        Eof,
        Desync,
    }

    /// The next event, waiting for the socket on `Pending` (the event loop's job in the server).
    fn got(r: &mut FrameReader, s: &UnixStream) -> Got {
        loop {
            let g = match r.next(s) {
                Ok(Event::Frame(f)) => Some(Got::Frame {
                    id: f.header.id,
                    payload: f.payload.to_vec(),
                    nfds: f.fds.len(),
                    truncated: f.fds_truncated,
                }),
                Ok(Event::Oversize(h)) => Some(Got::Oversize(h)),
                Ok(Event::Eof) => Some(Got::Eof),
                Ok(Event::Pending) => None,
                Err(ReadError::Io(e)) => panic!("io error {e}"),
                Err(ReadError::Desync(..)) => Some(Got::Desync),
            };
            if let Some(g) = g {
                return g;
            }
            assert!(sys::wait_readable(s, Duration::from_secs(10)).unwrap());
            r.set_readable();
        }
    }

    fn next_frame(r: &mut FrameReader, s: &UnixStream) -> (u16, Vec<u8>, usize) {
        match got(r, s) {
            Got::Frame {
                id, payload, nfds, ..
            } => (id, payload, nfds),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    fn eventfd() -> vmm_sys_util::eventfd::EventFd {
        vmm_sys_util::eventfd::EventFd::new(0).unwrap()
    }

    #[test]
    fn test_frames_sent_together_are_split_exactly() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut all = Vec::new();
        for id in 0..50u16 {
            all.extend(frame(id, (id as usize * 7) % 40));
        }
        a.write_all(&all).unwrap();
        let mut r = FrameReader::new(1 << 20, 4);
        for id in 0..50u16 {
            let (got, payload, nfds) = next_frame(&mut r, &b);
            assert_eq!(got, id);
            assert_eq!(
                payload,
                frame(id, (id as usize * 7) % 40)[HEADER_SIZE..].to_vec()
            );
            assert_eq!(nfds, 0);
        }
        drop(a);
        assert!(matches!(got(&mut r, &b), Got::Eof));
    }

    #[test]
    fn test_fds_go_to_the_frame_they_were_sent_with() {
        // Plain, plain, with fds, plain, with fds: one read can take the first three frames
        // together (the kernel glues fd-less skbs to the fd skb that follows them).
        let (a, b) = UnixStream::pair().unwrap();
        let (e1, e2, e3) = (eventfd(), eventfd(), eventfd());
        a.send_with_fds(&[&frame(1, 8)[..]], &[]).unwrap();
        (&a).write_all(&frame(2, 3)).unwrap();
        a.send_with_fds(&[&frame(3, 16)[..]], &[e1.as_raw_fd(), e2.as_raw_fd()])
            .unwrap();
        (&a).write_all(&frame(4, 0)).unwrap();
        a.send_with_fds(&[&frame(5, 4)[..]], &[e3.as_raw_fd()])
            .unwrap();
        let mut r = FrameReader::new(1 << 20, 4);
        let got: Vec<(u16, usize)> = (0..5)
            .map(|_| {
                let (id, _, n) = next_frame(&mut r, &b);
                (id, n)
            })
            .collect();
        assert_eq!(got, vec![(1, 0), (2, 0), (3, 2), (4, 0), (5, 1)]);
    }

    #[test]
    fn test_frame_split_across_writes_is_reassembled() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let f = frame(7, 100);
        let t = std::thread::spawn(move || {
            for c in f.chunks(5) {
                a.write_all(c).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            a
        });
        let mut r = FrameReader::new(1 << 20, 4);
        let (id, payload, _) = next_frame(&mut r, &b);
        assert_eq!(id, 7);
        assert_eq!(payload.len(), 100);
        drop(t.join().unwrap());
    }

    #[test]
    fn test_large_frame_grows_the_buffer_then_it_shrinks_back() {
        let (a, b) = UnixStream::pair().unwrap();
        let big = frame(1, 200_000);
        let t = std::thread::spawn(move || {
            (&a).write_all(&big).unwrap();
            (&a).write_all(&frame(2, 4)).unwrap();
            a
        });
        let mut r = FrameReader::new(1 << 20, 4);
        let (id, payload, _) = next_frame(&mut r, &b);
        assert_eq!((id, payload.len()), (1, 200_000));
        let (id, _, _) = next_frame(&mut r, &b);
        assert_eq!(id, 2);
        drop(t.join().unwrap());
        // The buffer is empty again: the next fill gives the large allocation back.
        let (c, d) = UnixStream::pair().unwrap();
        (&c).write_all(&frame(3, 1)).unwrap();
        let (id, _, _) = next_frame(&mut r, &d);
        assert_eq!(id, 3);
        assert_eq!(r.buf.len(), DEFAULT_BUF);
    }

    #[test]
    fn test_oversized_frame_and_its_fds_are_dropped_then_the_next_frame_is_read() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = eventfd();
        let big = frame(1, 5000);
        a.send_with_fds(&[&big[..]], &[e.as_raw_fd()]).unwrap();
        (&a).write_all(&frame(2, 4)).unwrap();
        let mut r = FrameReader::new(1024, 4);
        match got(&mut r, &b) {
            Got::Oversize(h) => assert_eq!(h.id, 1),
            other => panic!("expected oversize, got {other:?}"),
        }
        let (id, _, nfds) = next_frame(&mut r, &b);
        assert_eq!((id, nfds), (2, 0));
    }

    #[test]
    fn test_fds_trickled_with_every_byte_are_capped_and_the_frame_marked_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = eventfd();
        let f = frame(1, 24);
        let t = std::thread::spawn(move || {
            for byte in &f {
                a.send_with_fds(&[std::slice::from_ref(byte)], &[e.as_raw_fd()])
                    .unwrap();
            }
            (&a).write_all(&frame(2, 0)).unwrap();
            a
        });
        let mut r = FrameReader::new(1 << 20, 4);
        match got(&mut r, &b) {
            Got::Frame {
                id,
                nfds,
                truncated,
                ..
            } => {
                assert_eq!(id, 1);
                assert!(nfds <= 8, "{nfds} fds kept");
                assert_eq!(truncated, Some(FdLoss::Trickled));
            }
            other => panic!("expected frame 1, got {other:?}"),
        }
        let (id, _, nfds) = next_frame(&mut r, &b);
        assert_eq!((id, nfds), (2, 0));
        assert_eq!(r.pending_fds, 0);
        drop(t.join().unwrap());
    }

    #[test]
    fn test_partial_since_marks_an_incomplete_frame_only() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut r = FrameReader::new(1 << 20, 4);
        // A whole frame and half of the next: the first is served, the second waits.
        (&a).write_all(&frame(1, 8)).unwrap();
        (&a).write_all(&frame(2, 8)[..10]).unwrap();
        let (id, _, _) = next_frame(&mut r, &b);
        assert_eq!(id, 1);
        assert!(r.partial_since().is_none(), "nothing incomplete seen yet");
        r.set_readable();
        assert!(matches!(r.next(&b), Ok(Event::Pending)));
        let since = r.partial_since().expect("half a frame is waiting");
        // Still pending later: the mark does not move (the deadline runs from the first byte).
        std::thread::sleep(Duration::from_millis(5));
        r.set_readable();
        assert!(matches!(r.next(&b), Ok(Event::Pending)));
        assert_eq!(r.partial_since(), Some(since));
        // The rest arrives: the frame is served and the mark cleared.
        (&a).write_all(&frame(2, 8)[10..]).unwrap();
        let (id, _, _) = next_frame(&mut r, &b);
        assert_eq!(id, 2);
        r.set_readable();
        assert!(matches!(r.next(&b), Ok(Event::Pending)));
        assert!(r.partial_since().is_none());
    }

    #[test]
    fn test_a_read_that_drains_the_socket_does_not_read_again() {
        // One request: one recvmsg, then Pending without a second (EAGAIN) syscall: the reader
        // does not look again until the loop says the socket is readable (then it does).
        let (a, b) = UnixStream::pair().unwrap();
        let mut r = FrameReader::new(1 << 20, 4);
        (&a).write_all(&frame(1, 8)).unwrap();
        r.set_readable();
        assert!(matches!(r.next(&b), Ok(Event::Frame(_))));
        assert!(!r.readable, "a short read drained the socket");
        (&a).write_all(&frame(2, 8)).unwrap();
        // Not readable as far as the reader knows: it does not look (the loop would tell it).
        assert!(matches!(r.next(&b), Ok(Event::Pending)));
        r.set_readable();
        assert!(matches!(r.next(&b), Ok(Event::Frame(_))));
    }

    #[test]
    fn test_size_below_header_is_desync() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = frame(1, 0);
        f[4] = 8;
        (&a).write_all(&f).unwrap();
        let mut r = FrameReader::new(1024, 4);
        assert!(matches!(got(&mut r, &b), Got::Desync));
    }
}
