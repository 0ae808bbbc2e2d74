//! A small `--name value` argument parser (no dependencies).

use std::collections::BTreeMap;

/// Parsed `--name value` / `--name=value` options.
#[derive(Debug, Default)]
pub struct Args {
    opts: BTreeMap<String, String>,
}

impl Args {
    /// Parses `argv` (without the program and subcommand names). Every option
    /// takes a value; `allowed` lists the accepted names (without `--`).
    pub fn parse(argv: &[String], allowed: &[&str]) -> Result<Self, String> {
        let mut opts = BTreeMap::new();
        let mut it = argv.iter();
        while let Some(a) = it.next() {
            let Some(rest) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            let (name, value) = match rest.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => {
                    let v = it
                        .next()
                        .ok_or_else(|| format!("option --{rest} needs a value"))?;
                    (rest.to_string(), v.clone())
                }
            };
            if !allowed.contains(&name.as_str()) {
                return Err(format!(
                    "unknown option --{name} (accepted: {})",
                    allowed
                        .iter()
                        .map(|a| format!("--{a}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            if opts.insert(name.clone(), value).is_some() {
                return Err(format!("option --{name} given twice"));
            }
        }
        Ok(Args { opts })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.opts.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> Result<&str, String> {
        self.get(name)
            .ok_or_else(|| format!("missing required option --{name}"))
    }

    /// A required 16-bit ID (`0x1234` or decimal).
    pub fn id16(&self, name: &str) -> Result<u16, String> {
        let v = crate::pci::parse_number(self.required(name)?)?;
        u16::try_from(v).map_err(|_| format!("--{name} {v:#x} does not fit in 16 bits"))
    }
}

/// Parses a vector list such as `0,1,5`.
pub fn parse_vectors(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let p = part.trim();
        if p.is_empty() {
            continue;
        }
        let v = crate::pci::parse_number(p)?;
        let v = u32::try_from(v).map_err(|_| format!("vector {v} too large"))?;
        if out.contains(&v) {
            return Err(format!("vector {v} listed twice"));
        }
        out.push(v);
    }
    if out.is_empty() {
        return Err("empty vector list".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_options() {
        let a = Args::parse(
            &v(&["--vendor", "0x1234", "--device=0x0b10"]),
            &["vendor", "device", "bdf"],
        )
        .unwrap();
        assert_eq!(a.id16("vendor").unwrap(), 0x1234);
        assert_eq!(a.id16("device").unwrap(), 0x0b10);
        assert_eq!(a.get("bdf"), None);
        assert!(a.required("bdf").is_err());
    }

    #[test]
    fn rejects_bad_options() {
        assert!(Args::parse(&v(&["--x", "1"]), &["y"]).is_err());
        assert!(Args::parse(&v(&["--y"]), &["y"]).is_err());
        assert!(Args::parse(&v(&["y"]), &["y"]).is_err());
        assert!(Args::parse(&v(&["--y", "1", "--y", "2"]), &["y"]).is_err());
        let a = Args::parse(&v(&["--vendor", "0x12345"]), &["vendor"]).unwrap();
        assert!(a.id16("vendor").is_err());
    }

    #[test]
    fn parses_vector_lists() {
        assert_eq!(parse_vectors("0,1,5").unwrap(), vec![0, 1, 5]);
        assert_eq!(parse_vectors(" 3 ").unwrap(), vec![3]);
        assert!(parse_vectors("").is_err());
        assert!(parse_vectors("1,1").is_err());
        assert!(parse_vectors("a").is_err());
    }
}
