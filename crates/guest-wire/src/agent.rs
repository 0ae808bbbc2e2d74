//! The agent's JSON-lines wire (guest-tests/README.md has the protocol): the replies both sides
//! read and write, and the base64 both use for exact bytes. A reply is one of these objects with
//! the request's `id` added (and `"ok": true` where the protocol says so).

use serde::{Deserialize, Serialize};

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
