//! The agent's JSON-lines wire (guest-tests/README.md has the protocol): the requests the lab
//! sends and the agent parses, the replies both sides read and write, and the base64 both use
//! for exact bytes. A request is a [`Request`] with the sender's `id` added; a reply is one of
//! the reply objects with the request's `id` added (and `"ok": true` where the protocol says so).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A `run` request's timeout when it gives none.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// A request to the agent. On the wire an object whose `op` names the variant
/// (`{"op": "run", "argv": [...], ...}`) plus the sender's `id` ([`Request::to_value`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Run a program and reply with [`RunOutput`].
    Run(RunRequest),
    /// Write `data` to the guest file `path`; replies `ok`.
    WriteFile {
        /// The guest path.
        path: String,
        /// The file's new contents.
        data: String,
    },
    /// Read the guest file `path`; replies `ok` with `data` (lossy UTF-8).
    ReadFile {
        /// The guest path.
        path: String,
    },
    /// The guest kernel log; replies [`KmsgReply`].
    Kmsg(KmsgRequest),
    /// Replies `ok`.
    Ping,
    /// Sync and power the guest off; replies `ok` first.
    Poweroff,
}

/// A `run` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    /// The program and its arguments (not empty).
    pub argv: Vec<String>,
    /// The agent kills the program after this long ([`DEFAULT_TIMEOUT_MS`] when absent or null).
    #[serde(
        default = "default_timeout_ms",
        deserialize_with = "timeout_or_default"
    )]
    pub timeout_ms: u64,
    /// Standard input (`stdin_b64` on the wire); `None`: /dev/null.
    #[serde(
        default,
        rename = "stdin_b64",
        with = "b64_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub stdin: Option<Vec<u8>>,
    /// Standard input from this guest file instead (the host puts large input on a 9p share
    /// rather than through the serial link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_file: Option<String>,
    /// Reply with `stdout_b64` (exact bytes) besides the lossy text.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdout_b64: bool,
}

impl RunRequest {
    /// Runs `argv` with `timeout_ms`, no input, text output.
    pub fn new(argv: Vec<String>, timeout_ms: u64) -> Self {
        RunRequest {
            argv,
            timeout_ms,
            stdin: None,
            stdin_file: None,
            stdout_b64: false,
        }
    }
}

/// A `kmsg` request: the records from /dev/kmsg after sequence number `after` (everything when
/// absent, or when the guest's boot id is not `boot_id`: it rebooted since), or only the
/// current position when `records` is false.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsgRequest {
    /// The last sequence number already seen.
    #[serde(default)]
    pub after: Option<u64>,
    /// The boot `after` belongs to.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Whether to send the records (true when absent or null) or only the position.
    #[serde(default = "yes", deserialize_with = "records_or_default")]
    pub records: bool,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn timeout_or_default<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(DEFAULT_TIMEOUT_MS))
}

fn records_or_default<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}

/// Bytes as a base64 string on the wire (null or absent: `None`).
mod b64_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(base64_encode).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(t) => base64_decode(&t)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("stdin_b64 must be a base64 string")),
        }
    }
}

impl Request {
    /// Every `op` on the wire, in the order of the variants.
    pub const OPS: [&'static str; 6] =
        ["run", "write_file", "read_file", "kmsg", "ping", "poweroff"];

    /// Its `op` on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Run(_) => "run",
            Request::WriteFile { .. } => "write_file",
            Request::ReadFile { .. } => "read_file",
            Request::Kmsg(_) => "kmsg",
            Request::Ping => "ping",
            Request::Poweroff => "poweroff",
        }
    }

    /// The request as sent: its object with `id` added.
    pub fn to_value(&self, id: u64) -> Value {
        let mut v =
            serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({"op": self.op()}));
        if let Some(o) = v.as_object_mut() {
            o.insert("id".into(), Value::from(id));
        }
        v
    }

    /// What the protocol forbids beyond the types: an empty argv, two standard inputs.
    fn validate(self) -> Result<Self, String> {
        if let Request::Run(r) = &self {
            if r.argv.is_empty() {
                return Err("argv is empty".into());
            }
            if r.stdin.is_some() && r.stdin_file.is_some() {
                return Err("stdin_b64 and stdin_file exclude each other".into());
            }
        }
        Ok(self)
    }
}

/// Parses one request line. Returns the request's `id` (JSON null when absent or unreadable,
/// for the error reply) and the request or a one-line reason (malformed JSON, not an object, a
/// missing, non-string or unknown `op`, a field of the wrong type, an empty argv, ...).
pub fn parse_request(line: &str) -> (Value, Result<Request, String>) {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return (Value::Null, Err(format!("malformed JSON: {e}"))),
    };
    let Some(obj) = v.as_object() else {
        return (Value::Null, Err("request is not a JSON object".into()));
    };
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    let req = match obj.get("op").and_then(Value::as_str) {
        None => Err("missing or non-string field \"op\"".to_string()),
        Some(op) if !Request::OPS.contains(&op) => Err(format!("unknown op {op:?}")),
        Some(op) => serde_json::from_value::<Request>(v.clone())
            .map_err(|e| format!("bad {op} request: {e}"))
            .and_then(Request::validate),
    };
    (id, req)
}

/// The agent's greeting (`{"ready": true, ...}`), sent once it listens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Ready {
    /// The guest kernel release.
    #[serde(default)]
    pub kernel: String,
    /// Guest uptime when the agent started.
    #[serde(default)]
    pub uptime_ms: u64,
    /// The agent's version.
    #[serde(default)]
    pub agent_version: String,
}

/// The reply to a `run` request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RunOutput {
    /// The exit code, if the program exited.
    pub exit: Option<i32>,
    /// The signal, if the program was killed by one.
    pub signal: Option<i32>,
    /// Whether the agent killed it for exceeding `timeout_ms`.
    #[serde(default)]
    pub timed_out: bool,
    /// Its stdout (lossy UTF-8).
    #[serde(default)]
    pub stdout: String,
    /// Its stderr (lossy UTF-8).
    #[serde(default)]
    pub stderr: String,
    /// How long it ran, in the guest.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// Its stdout, exact (base64), when the request asked for it (`stdout_b64: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
}

impl RunOutput {
    /// Its stdout as bytes: exact if the agent sent them in base64, else the text.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        match self.stdout_b64.as_deref().and_then(base64_decode) {
            Some(b) => b,
            None => self.stdout.clone().into_bytes(),
        }
    }
}

/// The reply to a `kmsg` request: the guest kernel log after a position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct KmsgReply {
    /// Raw `/dev/kmsg` records (`PRIO,SEQ,TS_USEC,FLAGS;TEXT`), in order (none when only the
    /// position was asked for).
    #[serde(default)]
    pub records: Vec<String>,
    /// The sequence number the next record will have.
    pub next_seq: u64,
    /// The guest's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// `/proc/sys/kernel/tainted`.
    pub tainted: u64,
    /// The boot id differed from the one given: the records are the new boot's, from its start.
    #[serde(default)]
    pub rebooted: bool,
}

/// `value` (a reply object) with the request's `id` and, if `ok`, `"ok": true`.
pub fn reply<T: Serialize>(id: &serde_json::Value, value: &T, ok: bool) -> serde_json::Value {
    let mut v = serde_json::to_value(value).unwrap_or_else(
        |e| serde_json::json!({"ok": false, "error": format!("cannot encode the reply: {e}")}),
    );
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), id.clone());
        if ok {
            o.insert("ok".into(), serde_json::Value::Bool(true));
        }
    }
    v
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard padded base64.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64 (`None` if `text` is not that).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let t = text.as_bytes();
    if t.len() & 3 != 0 {
        return None;
    }
    let mut lut = [255u8; 256];
    for (i, &c) in B64.iter().enumerate() {
        lut[c as usize] = i as u8;
    }
    let mut out = Vec::with_capacity(t.len() / 4 * 3);
    for q in t.chunks(4) {
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            let v = lut[c as usize];
            if v == 255 {
                return None;
            }
            n = (n << 6) | u32::from(v);
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_requests_round_trip_as_today_s_wire() {
        let run = Request::Run(RunRequest::new(
            vec!["/bin/pcisim-guest".into(), "e2".into()],
            60000,
        ));
        let v = run.to_value(3);
        assert_eq!(
            v,
            json!({"op": "run", "id": 3, "argv": ["/bin/pcisim-guest", "e2"], "timeout_ms": 60000})
        );
        let exact = Request::Run(RunRequest {
            stdin: Some(b"hi\n".to_vec()),
            stdout_b64: true,
            ..RunRequest::new(vec!["cat".into()], 5)
        });
        assert_eq!(
            exact.to_value(4),
            json!({"op": "run", "id": 4, "argv": ["cat"], "timeout_ms": 5,
                "stdin_b64": "aGkK", "stdout_b64": true})
        );
        let kmsg = Request::Kmsg(KmsgRequest {
            after: None,
            boot_id: None,
            records: false,
        });
        assert_eq!(
            kmsg.to_value(5),
            json!({"op": "kmsg", "id": 5, "after": null, "boot_id": null, "records": false})
        );
        let all = [
            run,
            exact,
            kmsg,
            Request::Run(RunRequest {
                stdin_file: Some("/mnt/in".into()),
                ..RunRequest::new(vec!["x".into()], 1)
            }),
            Request::WriteFile {
                path: "/a".into(),
                data: "1".into(),
            },
            Request::ReadFile { path: "/p".into() },
            Request::Kmsg(KmsgRequest {
                after: Some(41),
                boot_id: Some("b".into()),
                records: true,
            }),
            Request::Ping,
            Request::Poweroff,
        ];
        for (i, r) in all.iter().enumerate() {
            let line = r.to_value(i as u64).to_string();
            assert_eq!(parse_request(&line), (json!(i), Ok(r.clone())), "{line}");
            assert!(Request::OPS.contains(&r.op()));
        }
    }

    #[test]
    fn test_request_defaults_and_nulls() {
        let (_, r) = parse_request(r#"{"id":4,"op":"run","argv":["x"]}"#);
        assert_eq!(
            r,
            Ok(Request::Run(RunRequest::new(
                vec!["x".into()],
                DEFAULT_TIMEOUT_MS
            )))
        );
        let (_, r) =
            parse_request(r#"{"id":4,"op":"run","argv":["x"],"timeout_ms":null,"stdin_b64":null}"#);
        assert_eq!(
            r,
            Ok(Request::Run(RunRequest::new(
                vec!["x".into()],
                DEFAULT_TIMEOUT_MS
            )))
        );
        let (_, r) = parse_request(r#"{"op":"kmsg","after":null}"#);
        assert_eq!(
            r,
            Ok(Request::Kmsg(KmsgRequest {
                after: None,
                boot_id: None,
                records: true
            }))
        );
    }

    #[test]
    fn test_bad_requests_get_a_clear_reason_and_keep_their_id() {
        let reason = |line: &str| parse_request(line).1.unwrap_err();
        assert_eq!(parse_request("{not json").0, Value::Null);
        assert!(reason("{not json").contains("malformed JSON"));
        assert_eq!(reason("[1,2]"), "request is not a JSON object");
        assert_eq!(reason(r#"{"id":1}"#), "missing or non-string field \"op\"");
        assert_eq!(
            reason(r#"{"id":1,"op":7}"#),
            "missing or non-string field \"op\""
        );
        let (id, r) = parse_request(r#"{"id":9,"op":"dance"}"#);
        assert_eq!((id, r), (json!(9), Err("unknown op \"dance\"".to_string())));
        assert_eq!(reason(r#"{"id":1,"op":"run","argv":[]}"#), "argv is empty");
        assert!(reason(r#"{"id":1,"op":"run","argv":[1]}"#).starts_with("bad run request: "));
        assert!(reason(r#"{"id":1,"op":"run","argv":"ls"}"#).starts_with("bad run request: "));
        assert!(reason(r#"{"id":1,"op":"run"}"#).contains("missing field `argv`"));
        assert!(
            reason(r#"{"id":1,"op":"run","argv":["ls"],"timeout_ms":-1}"#)
                .starts_with("bad run request")
        );
        assert!(
            reason(r#"{"id":4,"op":"run","argv":["cat"],"stdin_b64":"a!"}"#)
                .contains("stdin_b64 must be a base64 string")
        );
        assert_eq!(
            reason(r#"{"op":"run","argv":["cat"],"stdin_b64":"","stdin_file":"/f"}"#),
            "stdin_b64 and stdin_file exclude each other"
        );
        assert!(
            reason(r#"{"id":1,"op":"write_file","path":"/a"}"#).contains("missing field `data`")
        );
        assert!(reason(r#"{"id":9,"op":"kmsg","after":-1}"#).starts_with("bad kmsg request"));
        assert!(reason(r#"{"id":9,"op":"kmsg","records":"no"}"#).starts_with("bad kmsg request"));
    }

    #[test]
    fn test_base64_round_trip_and_rejects() {
        for n in 0..100usize {
            let d: Vec<u8> = (0..n).map(|i| (i * 13 + n) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&d)).unwrap(), d);
        }
        assert_eq!(base64_encode(b"hi"), "aGk=");
        assert_eq!(base64_decode("aGk"), None);
        assert_eq!(base64_decode("a*k="), None);
        assert_eq!(base64_decode("a==="), None);
    }

    #[test]
    fn test_run_reply_round_trips_with_id_and_without_unasked_b64() {
        let r = RunOutput {
            exit: Some(0),
            stdout: "x\n".into(),
            elapsed_ms: 3,
            ..RunOutput::default()
        };
        let v = reply(&json!(7), &r, false);
        assert_eq!(
            v,
            json!({"id": 7, "exit": 0, "signal": null, "timed_out": false, "stdout": "x\n",
                "stderr": "", "elapsed_ms": 3})
        );
        assert_eq!(serde_json::from_value::<RunOutput>(v).unwrap(), r);
        let b = RunOutput {
            stdout_b64: Some(base64_encode(&[0, 255])),
            ..r
        };
        assert_eq!(b.stdout_bytes(), [0, 255]);
        let back: RunOutput = serde_json::from_value(reply(&json!(1), &b, false)).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn test_kmsg_and_ready_replies_round_trip() {
        let k = KmsgReply {
            records: vec!["6,1,0,-;hello".into()],
            next_seq: 2,
            boot_id: "b".into(),
            tainted: 0,
            rebooted: false,
        };
        let v = reply(&json!(2), &k, true);
        assert_eq!((v["ok"].clone(), v["id"].clone()), (json!(true), json!(2)));
        assert_eq!(serde_json::from_value::<KmsgReply>(v).unwrap(), k);
        let r = Ready {
            kernel: "6.12".into(),
            uptime_ms: 5,
            agent_version: "0.1.0".into(),
        };
        assert_eq!(
            serde_json::from_value::<Ready>(serde_json::to_value(&r).unwrap()).unwrap(),
            r
        );
    }
}
