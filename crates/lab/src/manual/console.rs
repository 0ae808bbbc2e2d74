//! `pcisim lab console`: the guest's shell on this terminal.

use super::*;

/// Restores the terminal's mode when dropped.
pub(super) struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: isatty/tcgetattr/tcsetattr on a descriptor, with a termios we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The terminal size of `fd` (rows, cols), if it is a terminal.
pub fn window_size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize we own; a non-terminal fd gets an error.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

/// Holds `console.lock` (flock) while a console is attached, so a second attach is refused.
pub(super) struct ConsoleLock {
    _file: File,
}

impl ConsoleLock {
    fn take(dir: &Path) -> Result<ConsoleLock> {
        let path = dir.join("console.lock");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| msg(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor we own; no memory effects.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut who = String::new();
            let _ = f.read_to_string(&mut who);
            return Err(msg(format!(
                "the console of this VM is already attached (pcisim pid {}): one attach at a \
                 time; leave that one with Ctrl-] (or use `pcisim lab exec`)",
                who.trim()
            )));
        }
        let _ = f.set_len(0);
        let _ = write!(f, "{}", std::process::id());
        Ok(ConsoleLock { _file: f })
    }
}

/// How long piped input's output is still read once the session's output has gone quiet.
pub(super) const CONSOLE_IDLE: Duration = Duration::from_millis(1500);
/// The longest a piped session keeps reading after its input ended.
pub(super) const CONSOLE_DRAIN_MAX: Duration = Duration::from_secs(60);

/// `pcisim lab console`: attaches stdin/stdout to the guest shell on ttyS2, its controlling
/// terminal (job control: Ctrl-C, Ctrl-Z reach the guest's foreground process). On a terminal:
/// raw mode, the guest terminal gets this one's size, Ctrl-] leaves. Piped input is sent as is;
/// the session ends once the input has ended and the output has been quiet for a moment. One
/// attach at a time.
pub fn console(dir: &Path) -> Result<()> {
    let state = load_state(dir)?;
    if !alive(state.qemu_pid, &state.dir) {
        return Err(msg(format!(
            "the lab VM in {} is not running any more: `pcisim lab down` cleans up",
            dir.display()
        )));
    }
    let _attached = ConsoleLock::take(dir)?;
    // The guest terminal's size: this terminal's (stty rows/cols on ttyS2 through the agent).
    if let Some((rows, cols)) = window_size(0).or_else(|| window_size(1)) {
        let _lock = Lock::take(dir)?;
        let set = agent(&state).and_then(|mut a| {
            guest_sh(
                &mut a,
                &format!("stty -F /dev/{CONSOLE_PORT} rows {rows} cols {cols}"),
                Duration::from_secs(10),
            )
        });
        match set {
            Ok(o) if o.exit == Some(0) => {}
            Ok(o) => crate::note!(
                "warning: setting the guest terminal size: {}",
                o.stderr.trim()
            ),
            Err(e) => crate::note!("warning: setting the guest terminal size: {e}"),
        }
    }
    let sock = UnixStream::connect(&state.console).map_err(|e| {
        msg(format!(
            "cannot connect to the console {}: {e}",
            state.console.display()
        ))
    })?;
    let raw = RawMode::enter(0);
    if raw.is_some() {
        crate::note!("attached to the guest shell ({CONSOLE_PORT}); Ctrl-] leaves\r");
    }
    let mut reader = sock.try_clone().map_err(|e| msg(e.to_string()))?;
    let last_output = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let seen = std::sync::Arc::clone(&last_output);
    let pump = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdout = io::stdout();
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = stdout.flush();
            if let Ok(mut t) = seen.lock() {
                *t = Instant::now();
            }
        }
    });
    let mut writer = sock;
    let interactive = raw.is_some();
    // A newline gets a fresh prompt on a terminal; piped input is sent exactly.
    if interactive {
        let _ = writer.write_all(b"\n");
    }
    let mut stdin = io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if interactive {
            if let Some(i) = chunk.iter().position(|&b| b == CONSOLE_ESCAPE) {
                let _ = writer.write_all(&chunk[..i]);
                break;
            }
        }
        if writer.write_all(chunk).is_err() {
            break;
        }
    }
    if !interactive {
        // Let the shell answer what was sent: until its output has been quiet for a moment.
        let ended = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(100));
            let quiet = last_output
                .lock()
                .map(|t| t.elapsed() >= CONSOLE_IDLE)
                .unwrap_or(true);
            if (quiet && ended.elapsed() >= CONSOLE_IDLE) || ended.elapsed() >= CONSOLE_DRAIN_MAX {
                break;
            }
        }
    }
    let _ = writer.shutdown(std::net::Shutdown::Both);
    let _ = pump.join();
    drop(raw);
    if interactive {
        crate::note!("\ndetached from the guest shell");
    } else {
        // The reader may be gone: nothing to say then.
        let _ = writeln!(io::stdout());
    }
    Ok(())
}
