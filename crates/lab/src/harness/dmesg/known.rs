//! Known kernel findings: reports a guest kernel makes on its own, through a bug of the kernel
//! (not of our devices, drivers or scenarios), that the lab has traced to the kernel's source and
//! documented. Such a report does not fail the scenario it appears in; it is named on the result
//! line (`# XFAIL known kernel finding ...`, and so in JUnit) and in the diagnostics with its
//! headline and the saved `dmesg`, so it is never silent. Anything else of the same kind in the
//! same scenario still fails it.
//!
//! An entry matches a report only if the report is of its kind and every one of its `all_of`
//! substrings appears in the report's kept lines (its first lines: for a lockdep splat the title,
//! the lock being acquired and where). Entries are deliberately narrow: a different lock, a
//! different function or a different kind is a new report. Mirrored in docs/lab.md ("Known
//! kernel findings").

use super::{Found, KernelReport};

/// A report a guest kernel is known to make by a bug of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownFinding {
    /// A short stable name (`pciehp-reset-lock-order`), shown on the result line.
    pub id: &'static str,
    /// The report's kind.
    pub kind: KernelReport,
    /// Substrings that must all appear in the report's kept lines.
    pub all_of: &'static [&'static str],
    /// What the kernel does wrong, where (source path of the kernel that showed it), and why it
    /// is not ours.
    pub why: &'static str,
    /// Where the lab documents it.
    pub doc: &'static str,
}

impl KnownFinding {
    /// Whether `report` is this finding.
    pub fn matches(&self, report: &Found) -> bool {
        report.kind == self.kind
            && self
                .all_of
                .iter()
                .all(|s| report.lines.iter().any(|l| l.contains(s)))
    }
}

/// The known kernel findings (mirrored in docs/lab.md).
pub const KNOWN_FINDINGS: &[KnownFinding] = &[KnownFinding {
    id: "pciehp-reset-lock-order",
    kind: KernelReport::Lockdep,
    all_of: &[
        "possible circular locking dependency detected",
        "(&ctrl->reset_lock)",
        "at: pciehp_configure_device",
    ],
    why: "the first native-hotplug add on a lockdep kernel (seen on 6.12.117, the lab's \
          6.12-debug): pciehp_ist holds ctrl->reset_lock (read) and pciehp_configure_device \
          takes pci_rescan_remove_lock, then drops and re-takes reset_lock (down_read_nested) \
          under it (drivers/pci/hotplug/pciehp_pci.c); one lock class for every slot's \
          reset_lock makes lockdep report the inversion. A kernel finding, not caused by our \
          device or scenario (H7 provokes no more than a hot-add)",
    doc: "docs/lab.md#known-kernel-findings",
}];

/// The known finding `report` is, if any.
pub fn known(report: &Found) -> Option<&'static KnownFinding> {
    KNOWN_FINDINGS.iter().find(|k| k.matches(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::dmesg::scan;
    use crate::harness::dmesg::tests::PCIEHP_LOCKDEP as PCIEHP;

    #[test]
    fn test_h7_pciehp_splat_is_the_known_finding() {
        let found = scan(&PCIEHP.lines().collect::<Vec<_>>());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, KernelReport::Lockdep);
        assert_eq!(
            known(&found[0]).map(|k| k.id),
            Some("pciehp-reset-lock-order")
        );
    }

    #[test]
    fn test_another_lock_or_kind_is_not_the_known_finding() {
        // The same splat about another lock is a new report.
        let other_lock = PCIEHP.replace("(&ctrl->reset_lock)", "(&dev->mutex)");
        let found = scan(&other_lock.lines().collect::<Vec<_>>());
        assert_eq!(found.len(), 1);
        assert_eq!(known(&found[0]), None);
        // As is another kind of lockdep report at the same place.
        let recursive = PCIEHP.replace(
            "possible circular locking dependency detected",
            "possible recursive locking detected",
        );
        let found = scan(&recursive.lines().collect::<Vec<_>>());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, KernelReport::Lockdep);
        assert_eq!(known(&found[0]), None);
    }

    #[test]
    fn test_every_known_finding_is_narrow() {
        for k in KNOWN_FINDINGS {
            assert!(k.all_of.len() >= 2, "{}: one substring is too broad", k.id);
            assert!(k.doc.starts_with("docs/"), "{}", k.id);
        }
    }
}
