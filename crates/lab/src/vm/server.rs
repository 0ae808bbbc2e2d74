//! The device server (`pcisim serve`) as a lab child (with its control socket), and
//! `pcisim describe`.

use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use log::debug;
use serde_json::Value;

use crate::vm::process::{self, describe_status, ChildGuard, Group, ProcessError, POLL};

/// How long the server has to create its sockets.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server has to exit after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Errors around the device server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Starting or waiting failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The log file could not be created.
    #[error("Cannot create {path}")]
    Log {
        /// The log.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server exited while starting.
    #[error("The device server exited while starting ({status}); see {log}")]
    Exited {
        /// How it ended.
        status: String,
        /// Its log.
        log: PathBuf,
    },
    /// A socket did not appear in time.
    #[error("The device server did not create {socket} within {timeout:?}; see {log}")]
    NoSocket {
        /// The socket.
        socket: PathBuf,
        /// The time it had.
        timeout: Duration,
        /// Its log.
        log: PathBuf,
    },
    /// `pcisim describe` failed.
    #[error("`pcisim describe` failed ({status}); see {log}")]
    Describe {
        /// How it ended.
        status: String,
        /// Its stderr.
        log: PathBuf,
    },
    /// `pcisim describe` printed something else than the documented JSON.
    #[error("`pcisim describe` printed unexpected output: {0}")]
    BadDescription(String),
    /// The control socket failed.
    #[error("The device server's control socket failed")]
    Control(#[from] crate::vm::control::ControlError),
}

/// A `gpu:socket=PATH,id=ID,extra...` device spec for `pcisim serve`/`describe`. Each `extra`
/// is a `k=v` option (a leading comma is tolerated).
pub fn device_spec(kind: &str, socket: &Path, id: &str, extra: &[String]) -> String {
    let mut spec = format!("{kind}:socket={},id={id}", socket.display());
    for opt in extra {
        let opt = opt.trim().trim_start_matches(',');
        if !opt.is_empty() {
            spec.push(',');
            spec.push_str(opt);
        }
    }
    spec
}

/// The identity of a device as the server describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDescription {
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// 24-bit class code.
    pub class_code: u32,
    /// The full `description` object (BARs, capabilities, ...), passed to E1 as `--expect`.
    pub raw: Value,
}

/// One element of `pcisim describe`'s output.
#[derive(Debug, Clone, PartialEq)]
pub struct DescribedDevice {
    /// The device id (`gpu0`).
    pub id: String,
    /// Its kind (`gpu`).
    pub kind: String,
    /// What it looks like.
    pub description: DeviceDescription,
}

/// The fields of a description that E1 compares (`pcisim-guest e1 --expect`): every one must be
/// there, since E1 treats a missing one as an error rather than skip its check. They are those of
/// the one type both sides parse, [`pcisim_guest_wire::DeviceDescription`].
pub const E1_FIELDS: &[&str] = pcisim_guest_wire::DeviceDescription::FIELDS;

/// Parses `pcisim describe`'s JSON array. Every description must carry the [`E1_FIELDS`].
pub fn parse_description(text: &str) -> Result<Vec<DescribedDevice>, ServerError> {
    let bad = |what: &str| ServerError::BadDescription(what.to_string());
    let v: Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let items = v.as_array().ok_or_else(|| bad("not a JSON array"))?;
    let mut out = Vec::new();
    for item in items {
        let s = |k: &str| {
            item.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("element without string {k:?}: {item}")))
        };
        let d = item
            .get("description")
            .filter(|d| d.is_object())
            .ok_or_else(|| bad(&format!("element without description object: {item}")))?;
        let n = |k: &str| {
            d.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(&format!("description without integer {k:?}")))
        };
        if let Some(missing) = E1_FIELDS
            .iter()
            .find(|k| d.get(**k).is_none_or(Value::is_null))
        {
            return Err(bad(&format!(
                "description without {missing:?} (E1 compares every one of {}): {d}",
                E1_FIELDS.join(", ")
            )));
        }
        // The guest parses the same type: what it cannot parse fails here, before any boot.
        serde_json::from_value::<pcisim_guest_wire::DeviceDescription>(d.clone())
            .map_err(|e| bad(&format!("description E1 cannot compare ({e}): {d}")))?;
        let narrow = |k: &str| -> Result<u16, ServerError> {
            u16::try_from(n(k)?).map_err(|_| bad(&format!("{k} out of range")))
        };
        out.push(DescribedDevice {
            id: s("id")?,
            kind: s("kind")?,
            description: DeviceDescription {
                vendor_id: narrow("vendor_id")?,
                device_id: narrow("device_id")?,
                class_code: u32::try_from(n("class_code")?)
                    .map_err(|_| bad("class_code out of range"))?,
                raw: d.clone(),
            },
        });
    }
    Ok(out)
}

/// Runs `pcisim describe --device SPEC...` and parses its output (one element per spec, in
/// order).
pub fn describe(
    pcisim: &Path,
    specs: &[String],
    log: &Path,
) -> Result<Vec<DescribedDevice>, ServerError> {
    let mut cmd = Command::new(pcisim);
    cmd.arg("describe");
    for spec in specs {
        cmd.args(["--device", spec]);
    }
    let out = process::run_captured("pcisim describe", &mut cmd, Duration::from_secs(60), log)?;
    if !out.status.success() {
        return Err(ServerError::Describe {
            status: describe_status(out.status),
            log: log.to_path_buf(),
        });
    }
    parse_description(&String::from_utf8_lossy(&out.stdout))
}

/// How the server ended.
#[derive(Debug, Clone)]
pub struct ServerExit {
    /// "exit 0", "signal 9", ...
    pub status: String,
    /// Whether it exited with status 0.
    pub clean: bool,
    /// Lines of its log that mention a panic.
    pub panics: Vec<String>,
}

impl ServerExit {
    /// Clean exit and no panic in the log.
    pub fn ok(&self) -> bool {
        self.clean && self.panics.is_empty()
    }
}

/// A running `pcisim serve`.
pub struct Server {
    guard: ChildGuard,
    log: PathBuf,
    control: Option<PathBuf>,
}

impl Server {
    /// Starts `pcisim serve --device SPEC... [--control PATH]` with stdout+stderr into `log`
    /// (RUST_LOG=info unless set) and waits until every socket in `sockets` (and the control
    /// socket) exists. It dies with the lab ([`Group::Own`]).
    pub fn start(
        pcisim: &Path,
        specs: &[String],
        sockets: &[PathBuf],
        control: Option<&Path>,
        log: &Path,
    ) -> Result<Server, ServerError> {
        Self::start_in(pcisim, specs, sockets, control, log, Group::Own)
    }

    /// [`Server::start`] with the child placed in `group` ([`Group::Session`]: a server that
    /// outlives the lab once [`Server::release`]d).
    pub fn start_in(
        pcisim: &Path,
        specs: &[String],
        sockets: &[PathBuf],
        control: Option<&Path>,
        log: &Path,
        group: Group,
    ) -> Result<Server, ServerError> {
        let mut cmd = Command::new(pcisim);
        cmd.arg("serve");
        for spec in specs {
            cmd.args(["--device", spec]);
        }
        if let Some(c) = control {
            cmd.arg("--control").arg(c);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let err = |source| ServerError::Log {
            path: log.to_path_buf(),
            source,
        };
        let file = File::create(log).map_err(err)?;
        let file2 = file.try_clone().map_err(err)?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
        debug!("starting the device server: {cmd:?}");
        let guard = ChildGuard::spawn("device server", &mut cmd, group)?;
        let mut server = Server {
            guard,
            log: log.to_path_buf(),
            control: control.map(Path::to_path_buf),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        for socket in sockets.iter().map(PathBuf::as_path).chain(control) {
            loop {
                if let Some(status) = server.guard.try_wait()? {
                    return Err(ServerError::Exited {
                        status: describe_status(status),
                        log: server.log.clone(),
                    });
                }
                process::check_interrupted()?;
                if fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ServerError::NoSocket {
                        socket: socket.to_path_buf(),
                        timeout: START_TIMEOUT,
                        log: server.log.clone(),
                    });
                }
                thread::sleep(POLL);
            }
        }
        Ok(server)
    }

    /// The control socket, if the server was started with one.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// A new connection to the control socket.
    pub fn control(&self) -> Result<crate::vm::control::ControlClient, ServerError> {
        let path = self.control.as_deref().ok_or_else(|| {
            crate::vm::control::ControlError::Refused(
                "the device server was started without --control".into(),
            )
        })?;
        Ok(crate::vm::control::ControlClient::connect(path)?)
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Lets the server run on after this handle is dropped; returns its pid
    /// ([`ChildGuard::release`]).
    pub fn release(self) -> u32 {
        self.guard.release()
    }

    /// `None` while running, else how it ended.
    pub fn exited(&mut self) -> Option<String> {
        match self.guard.try_wait() {
            Ok(Some(status)) => Some(describe_status(status)),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// SIGTERM (then SIGKILL after [`STOP_GRACE`]) and a look at the log.
    pub fn stop(mut self) -> Result<ServerExit, ServerError> {
        let status = self.guard.terminate(STOP_GRACE)?;
        let panics = fs::read(&self.log)
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .lines()
                    .filter(|l| l.contains("panicked"))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok(ServerExit {
            status: describe_status(status),
            clean: status.success(),
            panics,
        })
    }
}

/// What the lab measures of the server process (leak checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fds, {} threads, RSS {} KiB",
            self.fds, self.threads, self.rss_kib
        )
    }
}

/// A `/proc/<pid>/status` field's first number (`VmRSS:  1234 kB` → 1234).
pub fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The open fds, threads and RSS of process `pid` (from `/proc`), or what could not be read.
pub fn usage(pid: u32) -> Result<Usage, String> {
    let err = |what: &str, e: std::io::Error| format!("reading /proc/{pid}/{what}: {e}");
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| err("fd", e))?
        .count();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| err("status", e))?;
    let field =
        |k: &str| status_field(&status, k).ok_or_else(|| format!("/proc/{pid}/status has no {k}"));
    Ok(Usage {
        fds,
        threads: usize::try_from(field("Threads")?).unwrap_or(usize::MAX),
        rss_kib: field("VmRSS")?,
    })
}

/// The pid of the `pcisim serve` whose control socket is `control`.
pub fn server_pid(control: &Path) -> Option<u32> {
    let want = control.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serving = args.iter().any(|a| *a == b"serve");
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"--control" && w[1] == want);
        (serving && ours).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_status_field() {
        let s = "Name:\tpcisim\nThreads:\t7\nVmRSS:\t   12345 kB\n";
        assert_eq!(status_field(s, "VmRSS"), Some(12345));
        assert_eq!(status_field(s, "Threads"), Some(7));
        assert_eq!(status_field(s, "VmSwap"), None);
    }

    #[test]
    fn test_server_pid_of_this_process_is_none() {
        assert_eq!(server_pid(Path::new("/nonexistent/control.sock")), None);
    }

    #[test]
    fn test_device_spec_appends_options() {
        let spec = device_spec(
            "gpu",
            Path::new("/run/l/gpu0.sock"),
            "gpu0",
            &["x-corrupt-class=1".into(), ",vram=1M".into(), "".into()],
        );
        assert_eq!(
            spec,
            "gpu:socket=/run/l/gpu0.sock,id=gpu0,x-corrupt-class=1,vram=1M"
        );
    }

    #[test]
    fn test_parse_description_sample() {
        let text = r#"[{"id":"gpu0","kind":"gpu","description":{"vendor_id":4660,"device_id":2832,"class_code":197120,"revision":1,"subsystem_vendor_id":4660,"subsystem_id":1,"bars":[],"capabilities":[],"ext_capabilities":[]}}]"#;
        let d = parse_description(text).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, "gpu0");
        assert_eq!(d[0].kind, "gpu");
        assert_eq!(d[0].description.vendor_id, 0x1234);
        assert_eq!(d[0].description.device_id, 0x0b10);
        assert_eq!(d[0].description.class_code, 0x030200);
        assert_eq!(d[0].description.raw["subsystem_id"], 1);
    }

    #[test]
    fn test_parse_description_rejects_bad_shapes() {
        assert!(parse_description("{}").is_err());
        assert!(parse_description("[{\"id\":\"g\",\"kind\":\"gpu\"}]").is_err());
        assert!(parse_description(
            "[{\"id\":\"g\",\"kind\":\"gpu\",\"description\":{\"vendor_id\":70000,\"device_id\":1,\"class_code\":1}}]"
        )
        .is_err());
        assert!(parse_description("not json").is_err());
        assert_eq!(parse_description("[]").unwrap(), vec![]);
    }

    #[test]
    fn test_parse_description_requires_every_e1_field() {
        let full: Value = serde_json::from_str(
            r#"{"vendor_id":4660,"device_id":2832,"class_code":197120,"revision":1,"subsystem_vendor_id":4660,"subsystem_id":1,"bars":[],"capabilities":[],"ext_capabilities":[]}"#,
        )
        .unwrap();
        let doc = |d: &Value| format!(r#"[{{"id":"gpu0","kind":"gpu","description":{d}}}]"#);
        assert!(parse_description(&doc(&full)).is_ok());
        for field in E1_FIELDS {
            let mut d = full.clone();
            d.as_object_mut().unwrap().remove(*field);
            let e = parse_description(&doc(&d)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("description without \"{field}\"")),
                "{e}"
            );
            d[*field] = Value::Null;
            assert!(parse_description(&doc(&d)).is_err(), "{field}: null");
        }
    }
}
