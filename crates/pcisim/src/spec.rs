//! Device specifications on the command line: `KIND:key=value[,key=value...]`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

/// The kinds of function pcisim can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The GPU function.
    Gpu,
    /// The NPU function.
    Npu,
}

impl Kind {
    /// The name used in specs and ids.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gpu => "gpu",
            Kind::Npu => "npu",
        }
    }
}

/// One `--device` argument, parsed.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Kind of function.
    pub kind: Kind,
    /// Name in logs and tooling (`id=`, default `<kind><n>`).
    pub id: String,
    /// Socket the server listens on (`socket=`, required).
    pub socket: PathBuf,
    /// Remaining options, validated by the device's builder.
    pub opts: Vec<(String, String)>,
}

/// Parse `gpu:socket=/run/gpu0.sock,vram=1G,id=gpu0`. `index` numbers default ids.
pub fn parse(spec: &str, index: usize) -> Result<DeviceSpec> {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let kind = match kind {
        "gpu" => Kind::Gpu,
        "npu" => Kind::Npu,
        other => bail!("unknown device kind {other:?} in {spec:?} (known: gpu, npu)"),
    };
    let mut socket = None;
    let mut id = None;
    let mut opts = Vec::new();
    for item in rest.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| anyhow!("option {item:?} in {spec:?} is not key=value"))?;
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "id" => id = Some(v.to_string()),
            _ => opts.push((k.to_string(), v.to_string())),
        }
    }
    let socket = socket.ok_or_else(|| anyhow!("device {spec:?} needs socket=PATH"))?;
    Ok(DeviceSpec {
        kind,
        id: id.unwrap_or_else(|| format!("{}{index}", kind.name())),
        socket,
        opts,
    })
}

/// Parse a size: `4096`, `0x1000`, `64K`, `256M`, `2G` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n = parse_u64(num).with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("size {s:?} overflows"))
}

/// Parse a decimal or `0x` hexadecimal integer.
pub fn parse_u64(s: &str) -> Result<u64> {
    let s = s.trim();
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.with_context(|| format!("{s:?} is not a number"))
}

/// Parse a boolean option value.
pub fn parse_bool(s: &str) -> Result<bool> {
    match s {
        "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        _ => bail!("{s:?} is not a boolean (use on/off)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_gpu_spec_with_options() {
        let d = parse("gpu:socket=/tmp/a.sock,vram=1G,id=g", 0).unwrap();
        assert_eq!(d.kind, Kind::Gpu);
        assert_eq!(d.id, "g");
        assert_eq!(d.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(d.opts, vec![("vram".to_string(), "1G".to_string())]);
    }

    #[test]
    fn test_parse_spec_errors_are_clear() {
        assert!(parse("tpu:socket=/x", 0)
            .unwrap_err()
            .to_string()
            .contains("unknown device kind"));
        assert!(parse("gpu:vram=1G", 0)
            .unwrap_err()
            .to_string()
            .contains("socket=PATH"));
        assert!(parse("gpu:socket", 0)
            .unwrap_err()
            .to_string()
            .contains("key=value"));
    }

    #[test]
    fn test_parse_size_units() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
