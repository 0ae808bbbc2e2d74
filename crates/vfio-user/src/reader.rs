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

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

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
}

/// Why reading stopped.
pub(crate) enum ReadError {
    /// The socket failed.
    Io(io::Error),
    /// A header's `size` is smaller than the header: the next frame cannot be found.
    Desync(Header, String),
    /// A deadline passed (see [`Deadlines`]): the handshake or a started frame did not complete.
    TimedOut(String),
}

/// How long a client may take. Only two waits have deadlines: the handshake (connect to a
/// completed VERSION) and a frame that has started to arrive; an idle client between frames
/// (QEMU idles for as long as the guest leaves the device alone) waits forever.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Deadlines {
    /// Until when the handshake may run (`None`: no deadline, or VERSION is done).
    pub handshake: Option<Instant>,
    /// How long a started frame may take to complete (`None`: forever).
    pub frame: Option<Duration>,
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
    /// The deadlines in force.
    pub(crate) deadlines: Deadlines,
    /// When the bytes of the incomplete frame at `head` started to wait for the rest.
    partial_since: Option<Instant>,
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
            deadlines: Deadlines::default(),
            partial_since: None,
        }
    }

    /// Stream offset of the first unconsumed byte.
    fn consumed(&self) -> u64 {
        self.base + self.head as u64
    }

    /// The next frame (or event). Blocks until one is complete.
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
                    if !self.fill(sock, 1)? {
                        return Ok(Event::Eof);
                    }
                    continue;
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
            if !self.fill(sock, need)? {
                return Ok(Event::Eof);
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
        }))
    }

    /// Wait until the socket is readable, within the deadlines in force: the handshake's, and
    /// the started frame's when part of one (or of a frame being discarded) is buffered.
    fn wait(&mut self, sock: &UnixStream) -> Result<(), ReadError> {
        let partial = self.head < self.tail || self.discard_to > self.consumed();
        if !partial {
            self.partial_since = None;
        }
        if self.deadlines.handshake.is_none() && (!partial || self.deadlines.frame.is_none()) {
            return Ok(()); // The common case: no clock, no poll, just the blocking read.
        }
        let now = Instant::now();
        let frame = match (partial, self.deadlines.frame) {
            (true, Some(limit)) => Some(*self.partial_since.get_or_insert(now) + limit),
            _ => None,
        };
        loop {
            let now = Instant::now();
            let (deadline, what) = match (self.deadlines.handshake, frame) {
                (Some(h), Some(f)) if f < h => (f, "frame"),
                (Some(h), _) => (h, "handshake"),
                (None, Some(f)) => (f, "frame"),
                (None, None) => return Ok(()),
            };
            if now >= deadline {
                return Err(ReadError::TimedOut(if what == "frame" {
                    format!(
                        "a frame started {} ms ago is still incomplete ({} bytes buffered)",
                        self.partial_since
                            .map_or(0, |t| now.duration_since(t).as_millis()),
                        self.tail - self.head
                    )
                } else {
                    "no VERSION completed within the handshake deadline".to_string()
                }));
            }
            if sys::wait_readable(sock, deadline - now).map_err(ReadError::Io)? {
                return Ok(());
            }
        }
    }

    /// Make room for a frame of `need` bytes starting at `head`, then read once (within the
    /// deadlines). Returns false at EOF.
    fn fill(&mut self, sock: &UnixStream, need: usize) -> Result<bool, ReadError> {
        self.wait(sock)?;
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
        let r = sys::recv_with_fds(sock, room, &mut self.cmsg, &mut fds).map_err(ReadError::Io)?;
        if r.bytes == 0 {
            return Ok(false);
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
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
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

    fn next_frame(r: &mut FrameReader, s: &UnixStream) -> (u16, Vec<u8>, usize) {
        match r.next(s) {
            Ok(Event::Frame(f)) => (f.header.id, f.payload.to_vec(), f.fds.len()),
            Ok(Event::Oversize(h)) => panic!("oversize {h:?}"),
            Ok(Event::Eof) => panic!("eof"),
            Err(ReadError::Io(e)) => panic!("io error {e}"),
            Err(ReadError::Desync(h, w)) => panic!("desync {h:?} {w}"),
            Err(ReadError::TimedOut(w)) => panic!("timed out: {w}"),
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
        assert!(matches!(r.next(&b), Ok(Event::Eof)));
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
        match r.next(&b) {
            Ok(Event::Oversize(h)) => assert_eq!(h.id, 1),
            _ => panic!("expected oversize"),
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
        match r.next(&b) {
            Ok(Event::Frame(f)) => {
                assert_eq!(f.header.id, 1);
                assert!(f.fds.len() <= 8, "{} fds kept", f.fds.len());
                assert_eq!(f.fds_truncated, Some(FdLoss::Trickled));
            }
            _ => panic!("expected frame 1"),
        }
        let (id, _, nfds) = next_frame(&mut r, &b);
        assert_eq!((id, nfds), (2, 0));
        assert_eq!(r.pending_fds, 0);
        drop(t.join().unwrap());
    }

    #[test]
    fn test_stalled_frame_times_out_but_an_idle_reader_waits() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut r = FrameReader::new(1 << 20, 4);
        r.deadlines.frame = Some(Duration::from_millis(100));
        // Idle (nothing buffered): no deadline, the read blocks until the frame arrives 300 ms
        // later, well past the frame timeout.
        let f = frame(1, 8);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            (&a).write_all(&f).unwrap();
            // Then half a frame, and nothing more.
            (&a).write_all(&frame(2, 8)[..10]).unwrap();
            a
        });
        let (id, _, _) = next_frame(&mut r, &b);
        assert_eq!(id, 1);
        let start = Instant::now();
        assert!(matches!(r.next(&b), Err(ReadError::TimedOut(_))));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(90) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        drop(t.join().unwrap());
    }

    #[test]
    fn test_handshake_deadline_holds_even_against_a_stream_of_frames() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut r = FrameReader::new(1 << 20, 4);
        r.deadlines.handshake = Some(Instant::now() + Duration::from_millis(150));
        let t = std::thread::spawn(move || {
            // A frame every 20 ms: each read succeeds at once, yet the deadline must hold.
            for id in 0..100u16 {
                if (&a).write_all(&frame(id, 4)).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let start = Instant::now();
        let end = loop {
            match r.next(&b) {
                Ok(Event::Frame(_)) => continue,
                Err(ReadError::TimedOut(w)) => break w,
                _ => panic!("unexpected event"),
            }
        };
        assert!(end.contains("handshake"), "{end}");
        assert!(start.elapsed() < Duration::from_secs(1));
        drop(b);
        t.join().unwrap();
    }

    #[test]
    fn test_size_below_header_is_desync() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = frame(1, 0);
        f[4] = 8;
        (&a).write_all(&f).unwrap();
        let mut r = FrameReader::new(1024, 4);
        assert!(matches!(r.next(&b), Err(ReadError::Desync(..))));
    }
}
