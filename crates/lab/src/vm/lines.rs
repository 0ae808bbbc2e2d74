//! The one reader of newline-delimited JSON that the lab's two line protocols share: the guest
//! agent's link ([`crate::vm::agent`]) and QMP ([`crate::vm::qmp`]).
//!
//! A [`JsonLines`] owns the stream and a reassembly buffer: a message may arrive split over
//! several reads (a serial port delivers a few bytes at a time), several may arrive in one read,
//! and a line may end in `\r\n`. Lines that are not JSON objects (a tty's noise, blank lines)
//! are logged and skipped. Every wait has a deadline, stops early when the lab is interrupted
//! ([`crate::vm::process::interrupted`]) or when the caller's `watch` gives a reason (QEMU
//! exited), and reads in slices of at most [`READ_SLICE`] so those checks run while the peer is
//! silent. The optional transcript records every line received (`< `) and sent (`> `).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use log::warn;
use serde_json::Value;

use crate::vm::process;

/// The longest a single read waits before the interrupt and `watch` are checked again.
pub const READ_SLICE: Duration = Duration::from_millis(100);

/// Why no message was returned; the caller turns it into its protocol's error, naming what it
/// waited for.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The deadline passed (a partial line stays buffered).
    #[error("timed out")]
    Timeout,
    /// The peer closed the stream (end of file).
    #[error("the peer closed the stream")]
    Closed,
    /// The lab was interrupted by this signal.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    /// The caller's watch gave this reason to stop waiting.
    #[error("{0}")]
    Aborted(String),
    /// More than the reader's limit arrived without a newline.
    #[error("a line longer than {limit} bytes: {start}")]
    TooLong {
        /// The limit.
        limit: usize,
        /// The line's first 200 bytes (lossy UTF-8).
        start: String,
    },
    /// A socket call failed.
    #[error("{what}")]
    Io {
        /// The call.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A JSON-lines reader (and writer) over a connected unix stream.
pub struct JsonLines {
    stream: UnixStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    /// For log lines: `agent`, `qmp`.
    name: &'static str,
    max_line: usize,
    transcript: Option<File>,
}

impl JsonLines {
    /// Reads lines from `stream`; `name` prefixes the warnings about skipped lines; a line longer
    /// than `max_line` bytes is an error ([`LineError::TooLong`]).
    pub fn new(stream: UnixStream, name: &'static str, max_line: usize) -> JsonLines {
        JsonLines {
            stream,
            buf: Vec::new(),
            chunk: vec![0u8; 64 * 1024],
            name,
            max_line,
            transcript: None,
        }
    }

    /// Records every line sent (`> `) and received (`< `) in `file` (given up silently when
    /// writing it fails: a transcript must not stop the lab).
    pub fn set_transcript(&mut self, file: File) {
        self.transcript = Some(file);
    }

    fn record(&mut self, prefix: &str, line: &[u8]) {
        if let Some(f) = self.transcript.as_mut() {
            let ok = f
                .write_all(prefix.as_bytes())
                .and_then(|_| f.write_all(line))
                .and_then(|_| f.write_all(b"\n"));
            if ok.is_err() {
                self.transcript = None;
            }
        }
    }

    /// Sends `line` (without its newline, which is added) within `timeout`, and records it.
    pub fn send(&mut self, line: &[u8], timeout: Duration) -> io::Result<()> {
        self.record("> ", line);
        self.stream.set_write_timeout(Some(timeout))?;
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        self.stream.write_all(&bytes)
    }

    /// The next complete message already buffered, without reading.
    pub fn buffered(&mut self) -> Result<Option<Value>, LineError> {
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            self.record("< ", line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Value>(line) {
                Ok(v) if v.is_object() => return Ok(Some(v)),
                _ => warn!(
                    "{}: ignoring a line that is not a JSON object: {:?}",
                    self.name,
                    lossy_start(line, 200)
                ),
            }
        }
        if self.buf.len() > self.max_line {
            return Err(LineError::TooLong {
                limit: self.max_line,
                start: lossy_start(&self.buf, 200),
            });
        }
        Ok(None)
    }

    /// Reads what arrives within `wait` (at least 1 ms) into the buffer; returns whether anything
    /// did. End of file is [`LineError::Closed`].
    pub fn fill(&mut self, wait: Duration) -> Result<bool, LineError> {
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|source| LineError::Io {
                what: "set_read_timeout",
                source,
            })?;
        match self.stream.read(&mut self.chunk) {
            Ok(0) => Err(LineError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&self.chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(source) => Err(LineError::Io {
                what: "read",
                source,
            }),
        }
    }

    /// The next message, waiting until `deadline`; `watch` is asked between reads.
    pub fn next(
        &mut self,
        deadline: Instant,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Value, LineError> {
        loop {
            if let Some(v) = self.buffered()? {
                return Ok(v);
            }
            if let Some(s) = process::interrupted() {
                return Err(LineError::Interrupted(s));
            }
            if let Some(reason) = watch() {
                return Err(LineError::Aborted(reason));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LineError::Timeout);
            }
            self.fill((deadline - now).min(READ_SLICE))?;
        }
    }
}

/// The first `n` bytes of `bytes` as lossy UTF-8.
fn lossy_start(bytes: &[u8], n: usize) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(n)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn pair(max_line: usize) -> (JsonLines, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (JsonLines::new(a, "test", max_line), b)
    }

    #[test]
    fn test_a_line_split_over_several_reads_is_one_message() {
        let (mut r, mut w) = pair(1 << 20);
        let t = thread::spawn(move || {
            for part in [
                &b"{\"a\":"[..],
                b"1,\"b\"",
                b":\"x\"}\r",
                b"\nnoise\n\n{\"c\":2}\n",
            ] {
                w.write_all(part).unwrap();
                thread::sleep(Duration::from_millis(30));
            }
            w
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let v = r.next(deadline, &mut || None).unwrap();
        assert_eq!(v, serde_json::json!({"a": 1, "b": "x"}));
        // The noise and the blank line are skipped.
        let v = r.next(deadline, &mut || None).unwrap();
        assert_eq!(v, serde_json::json!({"c": 2}));
        drop(t.join().unwrap());
    }

    #[test]
    fn test_the_deadline_with_a_partial_line_keeps_it_buffered() {
        let (mut r, mut w) = pair(1 << 20);
        w.write_all(b"{\"half\":").unwrap();
        let t = Instant::now();
        let err = r
            .next(t + Duration::from_millis(250), &mut || None)
            .unwrap_err();
        assert!(matches!(err, LineError::Timeout), "{err}");
        assert!(t.elapsed() >= Duration::from_millis(250));
        // The rest of the line completes it: nothing was lost with the timeout.
        w.write_all(b"true}\n").unwrap();
        let v = r
            .next(Instant::now() + Duration::from_secs(10), &mut || None)
            .unwrap();
        assert_eq!(v, serde_json::json!({"half": true}));
    }

    #[test]
    fn test_eof_is_closed_after_the_complete_lines() {
        let (mut r, mut w) = pair(1 << 20);
        w.write_all(b"{\"last\":1}\n{\"cut").unwrap();
        drop(w);
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            r.next(deadline, &mut || None).unwrap(),
            serde_json::json!({"last": 1})
        );
        let err = r.next(deadline, &mut || None).unwrap_err();
        assert!(matches!(err, LineError::Closed), "{err}");
    }

    #[test]
    fn test_watch_aborts_and_an_overlong_line_is_an_error() {
        let (mut r, mut w) = pair(16);
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = r
            .next(deadline, &mut || Some("QEMU exited".into()))
            .unwrap_err();
        assert!(matches!(err, LineError::Aborted(ref s) if s == "QEMU exited"));
        w.write_all(b"{\"0123456789abcdef\":").unwrap();
        let err = r.next(deadline, &mut || None).unwrap_err();
        assert!(matches!(err, LineError::TooLong { limit: 16, .. }), "{err}");
    }

    #[test]
    fn test_send_adds_the_newline_and_records_both_ways() {
        let (mut r, w) = pair(1 << 20);
        let path = std::env::temp_dir().join(format!("pcisim-lines-{}.log", std::process::id()));
        r.set_transcript(File::create(&path).unwrap());
        r.send(b"{\"q\":1}", Duration::from_secs(5)).unwrap();
        let mut got = [0u8; 8];
        (&w).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"{\"q\":1}\n");
        (&w).write_all(b"{\"r\":2}\n").unwrap();
        r.next(Instant::now() + Duration::from_secs(10), &mut || None)
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "> {\"q\":1}\n< {\"r\":2}\n");
        std::fs::remove_file(path).unwrap();
    }
}
