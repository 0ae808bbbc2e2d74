//! VERSION: the protocol version we speak and the decoding of the client's version and
//! capabilities JSON.

use super::error::short;
use super::{Command, ProtoError, Reader, Request};

/// Protocol major version we speak.
pub const VERSION_MAJOR: u16 = 0;
/// Protocol minor version we speak (QEMU 11.1 offers 0.0 and refuses a reply with minor > 0).
pub const VERSION_MINOR: u16 = 0;

/// VERSION: the client's major/minor and its capabilities JSON.
#[inline]
pub(super) fn decode_version(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    let (major, minor) = match (r.u16(), r.u16()) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(short(cmd, len, "at least 4 bytes")),
    };
    let caps = parse_caps(r.rest())?;
    Ok(Request::Version { major, minor, caps })
}

fn parse_caps(rest: &[u8]) -> Result<serde_json::Value, ProtoError> {
    // The JSON string is NUL-terminated; tolerate a missing terminator and trailing padding.
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    let text = rest.get(..end).unwrap_or(&[]);
    if text.iter().all(|c| c.is_ascii_whitespace()) {
        return Ok(serde_json::Value::Null);
    }
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| ProtoError::BadJson(e.to_string()))?;
    if !v.is_object() {
        return Err(ProtoError::BadJson("not a JSON object".into()));
    }
    Ok(v)
}
