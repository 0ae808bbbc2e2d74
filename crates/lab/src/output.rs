//! Terminal output that never panics and never stops a command because its reader went away.
//!
//! `println!`/`eprintln!` panic when the write fails, and Rust ignores SIGPIPE, so `pcisim lab
//! up | head` (or `2>&1 | head`) used to panic (exit 101) on the first write after `head` left.
//! The manual commands change things (a VM started, a device plugged, a VM brought down): what
//! they do must not depend on whether anybody still reads what they say. So:
//!
//! - [`PipeSafe`] wraps stdout for the manual commands: a broken pipe (EPIPE) makes it discard
//!   everything from then on and report success, so the command completes; other write errors
//!   are returned as they are.
//! - [`note`] writes one line to stderr and ignores any failure (a diagnostic that cannot be
//!   shown is not a reason to stop).
//! - [`is_broken_pipe`] recognises the error for commands that rather stop on it (the suite).

use std::fmt;
use std::io::{self, Write};

/// A writer that swallows a broken pipe: after the first EPIPE it discards everything and
/// reports success. Other errors are passed on.
#[derive(Debug)]
pub struct PipeSafe<W: Write> {
    inner: W,
    closed: bool,
}

impl<W: Write> PipeSafe<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> PipeSafe<W> {
        PipeSafe {
            inner,
            closed: false,
        }
    }

    /// Whether the reader went away (output since then was discarded).
    pub fn closed(&self) -> bool {
        self.closed
    }

    fn absorb<T>(&mut self, r: io::Result<T>, ok: T) -> io::Result<T> {
        match r {
            Err(e) if is_broken_pipe(&e) => {
                log::debug!("the output's reader went away: discarding the rest");
                self.closed = true;
                Ok(ok)
            }
            r => r,
        }
    }
}

impl PipeSafe<io::Stdout> {
    /// The process's stdout.
    pub fn stdout() -> PipeSafe<io::Stdout> {
        PipeSafe::new(io::stdout())
    }
}

impl<W: Write> Write for PipeSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let r = self.inner.write(buf);
        self.absorb(r, buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let r = self.inner.write_all(buf);
        self.absorb(r, ())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let r = self.inner.flush();
        self.absorb(r, ())
    }
}

/// Whether `e` says the reader of a pipe (or socket) went away.
pub fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// Writes `args` and a newline to stderr; a failure is ignored (never a panic).
pub fn note(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// `note!("...", args)`: [`note`] with `format!` syntax, the panic-free `eprintln!`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::output::note(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A writer whose reader is gone.
    fn broken() -> UnixStream {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        a
    }

    #[test]
    fn test_pipe_safe_swallows_a_broken_pipe_and_discards_the_rest() {
        let mut raw = broken();
        // The bare stream fails with EPIPE (Rust ignores SIGPIPE: no signal kills the test).
        let e = raw.write_all(b"x").unwrap_err();
        assert!(is_broken_pipe(&e), "{e}");
        let mut w = PipeSafe::new(broken());
        assert!(!w.closed());
        writeln!(w, "line 1").unwrap();
        assert!(w.closed());
        writeln!(w, "line 2").unwrap();
        w.flush().unwrap();
        assert_eq!(w.write(b"abc").unwrap(), 3);
    }

    #[test]
    fn test_pipe_safe_passes_data_and_other_errors() {
        let mut w = PipeSafe::new(Vec::new());
        writeln!(w, "hello").unwrap();
        assert!(!w.closed());
        assert_eq!(w.inner, b"hello\n");

        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = PipeSafe::new(Full);
        let e = writeln!(w, "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(!w.closed());
    }
}
