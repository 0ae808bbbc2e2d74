//! What the control socket can do to a function: read its journal and status, inject faults.

use serde::{Deserialize, Serialize};

use pcisim_journal::Journal;

/// A fault to inject (`pcisim ctl inject FAULT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    /// Surprise removal modelled in the device: config and BAR reads return all-ones, writes
    /// are dropped, DMA and interrupts stop.
    LinkDown,
    /// The link comes back (config space as before the link went down).
    LinkUp,
    /// The next `count` DMA accesses fail (refused and journaled, nothing touched).
    DmaError {
        /// How many accesses fail.
        count: u32,
    },
    /// After each following reset, config space reads all-ones for `ms` milliseconds (the
    /// guest's `pci_dev_wait` polls); `ms = 0` turns it off, `u32::MAX` means never ready.
    SlowReset {
        /// Milliseconds of not-ready after a reset.
        ms: u32,
    },
    /// Device Status.Transactions Pending stays set (`on`) or follows real DMA (`off`).
    StuckTransactionsPending {
        /// Stuck or not.
        on: bool,
    },
    /// Signal an AER correctable error (Receiver Error): AER status and Device Status bits.
    AerCorrectable,
    /// Signal an AER uncorrectable error (Completion Timeout); `fatal` picks the severity bit in
    /// Device Status (fatal vs non-fatal) regardless of the severity register.
    AerUncorrectable {
        /// Fatal (else non-fatal).
        fatal: bool,
    },
}

impl Fault {
    /// Parse the command-line form: `link-down`, `link-up`, `dma-error[=N]`, `slow-reset=MS`
    /// (`never` for a reset that never completes), `stuck-tp=on|off`, `aer-correctable`,
    /// `aer-uncorrectable[=fatal|nonfatal]`.
    pub fn parse(s: &str) -> Result<Fault, String> {
        let (name, arg) = match s.split_once('=') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |a: Option<&str>, default: u32| -> Result<u32, String> {
            match a {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("fault {name}: {v:?} is not a number")),
            }
        };
        // A fault without a parameter refuses one rather than ignoring it.
        let none = |f: Fault| match arg {
            None => Ok(f),
            Some(v) => Err(format!("fault {name} takes no argument; got {v:?}")),
        };
        Ok(match name {
            "link-down" => none(Fault::LinkDown)?,
            "link-up" => none(Fault::LinkUp)?,
            "dma-error" => Fault::DmaError {
                count: num(arg, 1)?,
            },
            "slow-reset" => match arg {
                Some("never") => Fault::SlowReset { ms: u32::MAX },
                _ => Fault::SlowReset {
                    ms: num(arg, 1000)?,
                },
            },
            "stuck-tp" => Fault::StuckTransactionsPending {
                on: match arg {
                    None | Some("on" | "1" | "true") => true,
                    Some("off" | "0" | "false") => false,
                    Some(v) => return Err(format!("fault stuck-tp: {v:?} is not on or off")),
                },
            },
            "aer-correctable" => none(Fault::AerCorrectable)?,
            "aer-uncorrectable" => Fault::AerUncorrectable {
                fatal: match arg {
                    None | Some("nonfatal") => false,
                    Some("fatal") => true,
                    Some(v) => {
                        return Err(format!(
                            "fault aer-uncorrectable: {v:?} is not fatal or nonfatal"
                        ))
                    }
                },
            },
            other => {
                return Err(format!(
                    "unknown fault {other:?} (known: link-down, link-up, dma-error[=N], \
                     slow-reset=MS|never, stuck-tp=on|off, aer-correctable, \
                     aer-uncorrectable[=fatal|nonfatal])"
                ))
            }
        })
    }
}

/// The control-socket view of a function. Implemented by [`crate::Endpoint`].
pub trait Controllable: Send {
    /// The function's journal (a shared handle).
    fn journal(&self) -> Journal;
    /// A JSON snapshot of the function's state: command, power state, link, client attached,
    /// DMA mappings, pending MSI-X vectors, active faults, device-specific registers.
    fn status(&self) -> serde_json::Value;
    /// Inject a fault; it is journaled as `FaultInjected`.
    fn inject(&mut self, fault: &Fault) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fault_parse_forms() {
        assert_eq!(Fault::parse("link-down"), Ok(Fault::LinkDown));
        assert_eq!(
            Fault::parse("dma-error=3"),
            Ok(Fault::DmaError { count: 3 })
        );
        assert_eq!(
            Fault::parse("slow-reset=1500"),
            Ok(Fault::SlowReset { ms: 1500 })
        );
        assert_eq!(
            Fault::parse("slow-reset=never"),
            Ok(Fault::SlowReset { ms: u32::MAX })
        );
        assert_eq!(
            Fault::parse("stuck-tp=off"),
            Ok(Fault::StuckTransactionsPending { on: false })
        );
        assert_eq!(
            Fault::parse("aer-uncorrectable=fatal"),
            Ok(Fault::AerUncorrectable { fatal: true })
        );
        assert!(Fault::parse("melt").unwrap_err().contains("unknown fault"));
        assert!(Fault::parse("dma-error=x").is_err());
        assert_eq!(
            Fault::parse("stuck-tp"),
            Ok(Fault::StuckTransactionsPending { on: true })
        );
        assert_eq!(
            Fault::parse("aer-uncorrectable=nonfatal"),
            Ok(Fault::AerUncorrectable { fatal: false })
        );
    }

    #[test]
    fn test_fault_parse_refuses_bad_arguments() {
        for bad in [
            "aer-uncorrectable=bogus",
            "stuck-tp=bogus",
            "dma-error=x",
            "slow-reset=abc",
            "link-down=now",
            "aer-correctable=1",
        ] {
            let e = Fault::parse(bad).unwrap_err();
            let name = bad.split('=').next().unwrap();
            assert!(e.contains(name), "{bad}: {e}");
        }
    }
}
