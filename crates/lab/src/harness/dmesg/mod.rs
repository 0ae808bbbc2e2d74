//! The guest kernel as a second oracle: each scenario's slice of the guest kernel log, the
//! reports in it (WARNING, BUG, Oops, KASAN/UBSAN/KFENCE, lockdep, hung task, refcount_t, list
//! corruption, a taint change) and the verdict they give.
//!
//! The suite reads the guest's `/dev/kmsg` through the agent (the `kmsg` request): every record
//! carries a sequence number, so consecutive reads are back to back — what a scenario's slice
//! holds is exactly what the kernel logged after the previous read ended, nothing is counted
//! twice, and a record the ring overwrote before it was read shows up as a gap (`lost`). kmsg
//! holds every level whatever the console's `loglevel`. Each slice is saved as
//! `RUN/<ID>.dmesg` (`dmesg -r` format: `<level>[seconds] text`, after a few `# ` header lines),
//! and `RUN/<profile>/boot.dmesg` holds the boot's.
//!
//! [`scan`] finds the reports in the kernel's own lines (records of facility 0: a user program
//! writing to /dev/kmsg cannot fake or hide one). Lines of one splat are one report: a report
//! absorbs the trigger lines that follow it within [`ABSORB_LINES`] lines (a `cut here` line,
//! the `refcount_t: underflow` message and the `WARNING: CPU:` line of one WARN are one
//! `Refcount` report; the `BUG: kernel NULL pointer dereference` and `Oops:` lines of one fault
//! are one `Oops`), and the report's kind is its most specific line's. A taint bit set during the
//! slice is a [`KernelReport::Taint`] report unless a report in the slice explains it (a WARN
//! sets W, an Oops D, a KASAN/KFENCE report or a bad page B, a soft lockup L) or it is in
//! [`ALLOWED_TAINT`]; lines matching [`ALLOWED_LINES`] are known to be benign. Both tables are
//! mirrored in docs/lab.md ("The guest kernel's verdict").
//!
//! [`judge`] then amends the scenario's verdict the way the device journal does: any report
//! fails the scenario, unless the scenario declares its kind expected
//! ([`crate::harness::scenario::Scenario::kernel_reports`]); then every declared kind must appear and
//! nothing else may, and the result line says `# XFAIL`.

use std::fmt;
use std::path::Path;

use log::warn;

use crate::harness::verdict::Verdict;
use crate::vm::agent::{Agent, AgentError, KmsgMark};

mod known;
mod scan;
mod taint;
pub use self::known::*;
pub use self::scan::*;
pub use self::taint::*;

/// A kind of guest kernel report. A scenario that provokes one on purpose declares its kind
/// ([`crate::harness::scenario::Scenario::kernel_reports`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelReport {
    /// A `WARN*()`: `------------[ cut here ]------------`, `WARNING: CPU: n PID: m at ...`.
    Warning,
    /// A `BUG: ...` report (sleeping in atomic context, bad page state, soft lockup, ...).
    Bug,
    /// The kernel killed a task: `Oops: ...` (a NULL pointer dereference, a general protection
    /// fault, a `BUG()` — `kernel BUG at`), or a panic.
    Oops,
    /// `BUG: KASAN: ...`.
    Kasan,
    /// `UBSAN: ...`.
    Ubsan,
    /// `BUG: KFENCE: ...`.
    Kfence,
    /// A lockdep or RCU-lockdep splat (`WARNING: possible circular locking dependency
    /// detected`, `WARNING: suspicious RCU usage`, `[ BUG: Invalid wait context ]`, ...).
    Lockdep,
    /// `INFO: task NAME:PID blocked for more than N seconds.` (khungtaskd).
    HungTask,
    /// `refcount_t: underflow; use-after-free.` and the other refcount_t saturations.
    Refcount,
    /// `list_add corruption`, `list_del corruption`, `list_add double add` (CONFIG_DEBUG_LIST).
    ListCorruption,
    /// Taint bits (`/proc/sys/kernel/tainted`) set during the scenario and explained by no
    /// other report: the exact new bits.
    Taint(u64),
}

impl KernelReport {
    /// Whether this is a generic splat kind that a more specific line of the same splat refines
    /// (the `WARNING: CPU:` line of a refcount_t warning is the refcount report's).
    fn is_generic(self) -> bool {
        matches!(
            self,
            KernelReport::Warning | KernelReport::Bug | KernelReport::Oops
        )
    }

    /// Among generic kinds: which one names a splat that has several (Oops > Bug > Warning).
    fn generic_rank(self) -> u8 {
        match self {
            KernelReport::Oops => 3,
            KernelReport::Bug => 2,
            KernelReport::Warning => 1,
            _ => 0,
        }
    }

    /// The taint bits a line of this kind sets itself (they are not a separate taint report).
    fn sets_taint(self) -> u64 {
        match self {
            KernelReport::Warning | KernelReport::Refcount | KernelReport::ListCorruption => {
                1 << TAINT_WARN
            }
            KernelReport::Oops => 1 << TAINT_DIE,
            KernelReport::Bug => (1 << TAINT_BAD_PAGE) | (1 << TAINT_SOFTLOCKUP),
            KernelReport::Kasan | KernelReport::Kfence => 1 << TAINT_BAD_PAGE,
            _ => 0,
        }
    }
}

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelReport::Warning => f.write_str("warning"),
            KernelReport::Bug => f.write_str("bug"),
            KernelReport::Oops => f.write_str("oops"),
            KernelReport::Kasan => f.write_str("kasan"),
            KernelReport::Ubsan => f.write_str("ubsan"),
            KernelReport::Kfence => f.write_str("kfence"),
            KernelReport::Lockdep => f.write_str("lockdep"),
            KernelReport::HungTask => f.write_str("hung_task"),
            KernelReport::Refcount => f.write_str("refcount"),
            KernelReport::ListCorruption => f.write_str("list_corruption"),
            KernelReport::Taint(bits) => write!(f, "taint({})", taint_letters(*bits)),
        }
    }
}

/// A kernel line that matches a report pattern but is known to be benign here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedLine {
    /// A substring of the trigger line.
    pub pattern: &'static str,
    /// Why it is not a bug of the kernel, of our devices or of our scenarios.
    pub reason: &'static str,
    /// Taint bits a line with the pattern explains (0: none).
    pub taint: u64,
}

/// Known-benign lines: a report whose trigger lines include one of these substrings is allowed
/// (saved in the .dmesg file, listed as `allowed` in the diagnostics, never judged), and a line
/// with one explains the entry's taint bits. Mirrored in docs/lab.md.
pub const ALLOWED_LINES: &[AllowedLine] = &[
    AllowedLine {
        pattern: "mtrr: your CPUs had inconsistent",
        reason: "at boot, QEMU's firmware (SeaBIOS) leaves the MTRRs of the CPUs other than the \
                 boot CPU unset under TCG; the kernel copies the boot CPU's settings \
                 (`mtrr: corrected configuration.`) and taints I: a property of the virtual \
                 machine's firmware, logged before any device is used",
        taint: 1 << TAINT_FIRMWARE_WORKAROUND,
    },
    AllowedLine {
        pattern: "Command line: console=ttyS0 intel_iommu=on panic=-1 loglevel=4 pci=no_e820",
        reason: "the lab's own kernel command line (qemu::DEFAULT_APPEND) has pci=no_e820, which \
                 the kernel counts as a firmware workaround and taints I without a message \
                 (arch/x86/pci/common.c, pcibios_setup); seen on a kernel without CONFIG_MTRR, \
                 where the MTRR line does not explain it",
        taint: 1 << TAINT_FIRMWARE_WORKAROUND,
    },
];

/// A taint bit that is set on purpose in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedTaint {
    /// The bit.
    pub bit: u32,
    /// Why it is expected.
    pub reason: &'static str,
}

/// Taint bits our scenarios set on purpose (mirrored in docs/lab.md).
pub const ALLOWED_TAINT: &[AllowedTaint] = &[
    AllowedTaint {
        bit: TAINT_OOT_MODULE,
        reason: "the scenarios insmod our own modules (guest-tests/kmod: pcisim_npu, \
                 pcisim_oops), which are built out of tree",
    },
    AllowedTaint {
        bit: TAINT_UNSIGNED_MODULE,
        reason: "those modules are not signed with the Debian kernel's key \
                 (CONFIG_MODULE_SIG=y without MODULE_SIG_FORCE: loading them taints E)",
    },
];

/// The bits of [`ALLOWED_TAINT`].
pub fn allowed_taint_mask() -> u64 {
    ALLOWED_TAINT.iter().fold(0, |m, a| m | (1u64 << a.bit))
}

// ---------------------------------------------------------------------------------------------
// kmsg records

/// One `/dev/kmsg` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgRecord {
    /// Its sequence number (per boot, from 0).
    pub seq: u64,
    /// Its level (0 emerg .. 7 debug).
    pub level: u8,
    /// Its facility (0: the kernel; 1: user, e.g. a write to /dev/kmsg).
    pub facility: u32,
    /// When it was logged, µs since boot.
    pub ts_usec: u64,
    /// Its text (escapes undone; it may hold several lines).
    pub text: String,
}

impl KmsgRecord {
    /// Parses a record as `/dev/kmsg` prints it: `PRIO,SEQ,TS_USEC,FLAGS[,...];TEXT`, possibly
    /// followed by `\n KEY=VALUE` dictionary lines (ignored). `\xNN` escapes are undone.
    pub fn parse(raw: &str) -> Option<KmsgRecord> {
        let first = raw.split('\n').next()?;
        let (head, text) = first.split_once(';')?;
        let mut f = head.split(',');
        let prio: u32 = f.next()?.parse().ok()?;
        let seq = f.next()?.parse().ok()?;
        let ts_usec = f.next()?.parse().ok()?;
        Some(KmsgRecord {
            seq,
            level: (prio & 7) as u8,
            facility: prio >> 3,
            ts_usec,
            text: unescape(text),
        })
    }

    /// The record in `dmesg -r` form, one line per line of its text.
    pub fn dmesg_lines(&self) -> String {
        let ts = format!(
            "[{:5}.{:06}]",
            self.ts_usec / 1_000_000,
            self.ts_usec % 1_000_000
        );
        let prio = (self.facility << 3) | u32::from(self.level);
        self.text
            .split('\n')
            .map(|l| format!("<{prio}>{ts} {l}\n"))
            .collect()
    }
}

/// Undoes kmsg's `\xNN` escapes (the kernel escapes control characters, including the newlines
/// of a multi-line record, and backslashes).
fn unescape(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            if let Some(v) = b
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A scenario's slice of the guest kernel log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slice {
    /// The records, in order.
    pub records: Vec<KmsgRecord>,
    /// Records logged in the slice but overwritten in the ring before they were read.
    pub lost: u64,
    /// The guest rebooted during the slice: it holds the new boot's log from its start (what
    /// the kernel logged before the reboot, after the previous read, is gone with it).
    pub rebooted: bool,
    /// `/proc/sys/kernel/tainted` at the start (0 after a reboot: a new kernel).
    pub taint_before: u64,
    /// ... and at the end.
    pub taint_after: u64,
}

/// Sequence numbers missing from `seqs` (in order) given that the slice starts after `after`
/// (`None`: at the boot's first record, seq 0).
pub fn count_lost(after: Option<u64>, seqs: impl IntoIterator<Item = u64>) -> u64 {
    let mut expected = after.map_or(0, |a| a + 1);
    let mut lost = 0;
    for s in seqs {
        if s > expected {
            lost += s - expected;
        }
        expected = expected.max(s + 1);
    }
    lost
}

impl Slice {
    /// The slice as the `RUN/<ID>.dmesg` file: `# ` header lines, then the records.
    pub fn render(&self, title: &str) -> String {
        let mut s = format!("# pcisim lab: guest kernel log of {title}\n");
        match (self.records.first(), self.records.last()) {
            (Some(a), Some(b)) => s.push_str(&format!(
                "# kmsg records seq {}..={} ({} records, {} lost)\n",
                a.seq,
                b.seq,
                self.records.len(),
                self.lost
            )),
            _ => s.push_str(&format!("# no kmsg record ({} lost)\n", self.lost)),
        }
        if self.rebooted {
            s.push_str("# the guest rebooted during this slice: it starts at the new boot\n");
        }
        s.push_str(&format!(
            "# tainted before {} ({}), after {} ({})\n",
            self.taint_before,
            taint_letters(self.taint_before),
            self.taint_after,
            taint_letters(self.taint_after)
        ));
        for r in &self.records {
            s.push_str(&r.dmesg_lines());
        }
        s
    }
}

/// Reads the guest kernel log after `mark` through the agent (from the boot's start without
/// one) and moves `mark` to its end. The slice's taint baseline is the mark's (0 without one, or
/// when the guest rebooted since).
pub fn read(agent: &mut Agent, mark: &mut Option<KmsgMark>) -> Result<Slice, AgentError> {
    let from = mark.take();
    let reply = agent.kmsg(from.as_ref(), true)?;
    let mut records = Vec::with_capacity(reply.records.len());
    for raw in &reply.records {
        match KmsgRecord::parse(raw) {
            Some(r) => records.push(r),
            None => warn!("kmsg: ignoring a record that does not parse: {raw:?}"),
        }
    }
    let from = from.filter(|_| !reply.rebooted);
    let after = from.as_ref().and_then(|m| m.next_seq.checked_sub(1));
    *mark = Some(KmsgMark::of(&reply));
    Ok(Slice {
        lost: count_lost(after, records.iter().map(|r| r.seq)),
        records,
        rebooted: reply.rebooted,
        taint_before: from.map_or(0, |m| m.tainted),
        taint_after: reply.tainted,
    })
}

/// The current end of the guest kernel log (where the next slice starts).
pub fn mark(agent: &mut Agent) -> Result<KmsgMark, AgentError> {
    Ok(KmsgMark::of(&agent.kmsg(None, false)?))
}

fn kinds_text(kinds: impl IntoIterator<Item = KernelReport>) -> String {
    let mut v: Vec<String> = Vec::new();
    for k in kinds {
        let s = k.to_string();
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v.join(", ")
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn fail_with(verdict: Verdict, why: String) -> Verdict {
    match verdict {
        Verdict::Fail(r) => Verdict::Fail(format!("{r}; {why}")),
        Verdict::Pass | Verdict::Skip(_) => Verdict::Fail(why),
    }
}

/// How many reports of a kind the diagnostics show in full.
const SHOWN_REPORTS: usize = 3;

/// The scenario's verdict amended by its kernel log slice (`slice`, or why it could not be
/// read), with `expected` the kinds it declares: a report of an undeclared kind fails it, a
/// declared kind that did not appear fails it (the oracle missed it), lost records or an
/// unreadable log fail it (no evidence is not evidence of no report). Diagnostics name the
/// offending lines and `dmesg` (the saved slice). Returns the verdict and, when it passes with
/// declared reports, the note for its result line (`XFAIL kernel warning reported as
/// expected (1 report)`).
pub fn judge(
    verdict: Verdict,
    slice: Result<&Slice, &str>,
    expected: &[KernelReport],
    dmesg: &Path,
    diagnostics: &mut Vec<String>,
) -> (Verdict, Option<String>) {
    let slice = match slice {
        Ok(s) => s,
        Err(why) => {
            let why = format!("guest kernel log unreadable: {why}");
            diagnostics.push(why.clone());
            return (fail_with(verdict, why), None);
        }
    };
    let found = analyze(slice);
    let (allowed, judged): (Vec<&Found>, Vec<&Found>) =
        found.iter().partition(|f| f.allowed.is_some());
    for a in &allowed {
        diagnostics.push(format!(
            "kernel: allowed {} ({}): {}",
            a.kind,
            a.allowed.unwrap_or(""),
            a.headline()
        ));
    }
    let (wanted, other): (Vec<&Found>, Vec<&Found>) =
        judged.into_iter().partition(|f| expected.contains(&f.kind));
    // A known kernel finding does not fail the scenario, but it is named (never silent).
    let (known_findings, other): (Vec<(&Found, &KnownFinding)>, Vec<&Found>) = {
        let mut k = Vec::new();
        let mut o = Vec::new();
        for f in other {
            match known(f) {
                Some(finding) => k.push((f, finding)),
                None => o.push(f),
            }
        }
        (k, o)
    };
    for (f, k) in &known_findings {
        diagnostics.push(format!(
            "XFAIL (known kernel finding {}, {}) kernel {}: {}",
            k.id,
            k.doc,
            f.kind,
            f.headline()
        ));
    }
    let missing: Vec<KernelReport> = expected
        .iter()
        .copied()
        .filter(|k| !wanted.iter().any(|f| f.kind == *k))
        .collect();
    let mut verdict = verdict;
    for f in wanted.iter().take(SHOWN_REPORTS) {
        diagnostics.push(format!(
            "XFAIL (expected) kernel {}: {}",
            f.kind,
            f.headline()
        ));
    }
    if wanted.len() > SHOWN_REPORTS {
        diagnostics.push(format!(
            "XFAIL (expected) ... and {} more",
            wanted.len() - SHOWN_REPORTS
        ));
    }
    if slice.rebooted {
        diagnostics.push(
            "kernel: the guest rebooted during the scenario: its log is judged from the new \
             boot's start"
                .into(),
        );
    }
    let mut problems = Vec::new();
    if slice.lost > 0 {
        problems.push(format!(
            "guest kernel log incomplete: {} overwritten before they were read",
            plural(slice.lost as usize, "record")
        ));
    }
    if !other.is_empty() {
        problems.push(format!(
            "guest kernel: {} ({})",
            plural(other.len(), "unexpected report"),
            kinds_text(other.iter().map(|f| f.kind))
        ));
        for f in other.iter().take(SHOWN_REPORTS) {
            diagnostics.push(format!("KERNEL {}: {}", f.kind, f.headline()));
            for l in f.lines.iter().filter(|l| l.as_str() != f.headline()) {
                diagnostics.push(format!("  | {l}"));
            }
        }
        if other.len() > SHOWN_REPORTS {
            diagnostics.push(format!(
                "KERNEL ... and {} more",
                other.len() - SHOWN_REPORTS
            ));
        }
    }
    // A scenario that skipped itself (it cannot run on this kernel) provoked nothing.
    if !missing.is_empty() && !matches!(verdict, Verdict::Skip(_)) {
        problems.push(format!(
            "expected kernel report not seen: {} (the oracle missed it)",
            kinds_text(missing)
        ));
    }
    if !problems.is_empty()
        || !wanted.is_empty()
        || !allowed.is_empty()
        || !known_findings.is_empty()
    {
        diagnostics.push(format!("kernel log: {}", dmesg.display()));
    }
    for p in problems {
        verdict = fail_with(verdict, p);
    }
    let mut notes = Vec::new();
    if !expected.is_empty() {
        notes.push(format!(
            "XFAIL kernel {} reported as expected ({})",
            kinds_text(wanted.iter().map(|f| f.kind)),
            plural(wanted.len(), "report")
        ));
    }
    let mut ids: Vec<&str> = known_findings.iter().map(|(_, k)| k.id).collect();
    ids.dedup();
    if !ids.is_empty() {
        notes.push(format!(
            "XFAIL known kernel finding {} ({})",
            ids.join(", "),
            kinds_text(known_findings.iter().map(|(f, _)| f.kind))
        ));
    }
    let note = (verdict == Verdict::Pass && !notes.is_empty()).then(|| notes.join("; "));
    (verdict, note)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<KernelReport> {
        scan(&text.lines().collect::<Vec<_>>())
            .iter()
            .map(|f| f.kind)
            .collect()
    }

    /// A WARN_ON from a module, as `dmesg` prints it (6.12).
    const WARN: &str = "\
[   52.118042] ------------[ cut here ]------------
[   52.118530] pcisim_oops: WARN requested through the warn parameter
[   52.119210] WARNING: CPU: 1 PID: 176 at /tmp/pcisim-kmod/build.1/pcisim_oops.c:31 pcisim_oops_warn_set+0x3c/0x50 [pcisim_oops]
[   52.120001] Modules linked in: pcisim_oops(OE) vfio_pci vfio_pci_core vfio_iommu_type1 vfio iommufd
[   52.121003] CPU: 1 UID: 0 PID: 176 Comm: sh Tainted: G           OE      6.12.117+deb13-amd64 #1  Debian 6.12.117-1
[   52.122000] RIP: 0010:pcisim_oops_warn_set+0x3c/0x50 [pcisim_oops]
[   52.130000] Call Trace:
[   52.130100]  <TASK>
[   52.130200]  ? __warn+0x89/0x130
[   52.130300]  param_attr_store+0x9a/0x100
[   52.130400]  </TASK>
[   52.130500] ---[ end trace 0000000000000000 ]---
";

    #[test]
    fn test_warn_is_one_warning_report() {
        let f = scan(&WARN.lines().collect::<Vec<_>>());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].kind, KernelReport::Warning);
        assert!(f[0].headline().starts_with("WARNING: CPU: 1 PID: 176 at "));
        assert_eq!(f[0].lines[0], "------------[ cut here ]------------");
        assert!(f[0].lines[1].starts_with("pcisim_oops: WARN requested"));
        assert_eq!(f[0].lines.len(), REPORT_LINES + 1);
        assert_eq!(f[0].lines[REPORT_LINES], "  param_attr_store+0x9a/0x100");
        assert_eq!(f[0].taints, 1 << TAINT_WARN);
        // `dmesg -r` prefixes and bare text give the same.
        let raw = "<4>[   52.118042] ------------[ cut here ]------------\n<4>[   52.119210] WARNING: CPU: 1 PID: 176 at x.c:31 f+0x3c/0x50\n";
        assert_eq!(kinds(raw), [KernelReport::Warning]);
        assert_eq!(
            kinds("WARNING: CPU: 0 PID: 1 at kernel/x.c:1 f+0x1/0x2\n"),
            [KernelReport::Warning]
        );
        // Ordinary lines are not reports.
        assert!(kinds(
            "[    0.000000] Linux version 6.12.117+deb13-amd64\n\
             [    1.2] pcieport 0000:00:01.0: pciehp: Slot #0 AttnBtn+ PwrCtrl+\n\
             [    3.1] vfio-pci 0000:01:00.0: not ready 1023ms after FLR; waiting\n\
             [    3.9] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks, data leaks possible!\n\
             [    4.0] #PF: supervisor read access in kernel mode\n"
        )
        .is_empty());
    }

    /// A refcount_t underflow (lib/refcount.c), a WARN with its message line.
    const REFCOUNT: &str = "\
[  118.402211] ------------[ cut here ]------------
[  118.402515] refcount_t: underflow; use-after-free.
[  118.402939] WARNING: CPU: 0 PID: 1203 at lib/refcount.c:28 refcount_warn_saturate+0xba/0x110
[  118.403512] Modules linked in: vfio_pci vfio_pci_core
[  118.404000] Call Trace:
[  118.404100]  <TASK>
[  118.404200]  vfio_device_put_registration+0x20/0x30 [vfio]
[  118.404300]  </TASK>
[  118.404400] ---[ end trace 0000000000000000 ]---
";

    /// A CONFIG_DEBUG_LIST corruption with CONFIG_BUG_ON_DATA_CORRUPTION (Debian): the message,
    /// then BUG() and the oops.
    const LIST: &str = "\
[  301.110101] list_add corruption. prev->next should be next (ffff8881045a6d28), but was ffff888104f3b000. (prev=ffff888104f3b000).
[  301.110899] ------------[ cut here ]------------
[  301.111202] kernel BUG at lib/list_debug.c:32!
[  301.111690] Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
[  301.112300] CPU: 1 UID: 0 PID: 88 Comm: kworker/1:2 Not tainted 6.12.117+deb13-amd64 #1
[  301.113000] RIP: 0010:__list_add_valid_or_report+0x7a/0xa0
[  301.113100] Call Trace:
[  301.113200]  <TASK>
[  301.113300]  vfio_device_open+0x1a/0x90 [vfio]
[  301.113400]  </TASK>
[  301.113500] ---[ end trace 0000000000000000 ]---
";

    /// A NULL pointer dereference (6.12 x86).
    const NULL_DEREF: &str = "\
[   77.310001] BUG: kernel NULL pointer dereference, address: 0000000000000008
[   77.310500] #PF: supervisor read access in kernel mode
[   77.310900] #PF: error_code(0x0000) - not-present page
[   77.311200] PGD 0 P4D 0
[   77.311500] Oops: Oops: 0000 [#1] PREEMPT SMP NOPTI
[   77.312000] CPU: 0 UID: 0 PID: 201 Comm: pcisim-guest Tainted: G           OE      6.12.117+deb13-amd64 #1
[   77.312100] RIP: 0010:vfio_pci_core_ioctl+0x2b/0x9a0 [vfio_pci_core]
[   77.312200] Call Trace:
[   77.312300]  <TASK>
[   77.312400]  __x64_sys_ioctl+0x94/0xd0
[   77.312500]  </TASK>
[   77.312600] ---[ end trace 0000000000000000 ]---
";

    /// khungtaskd (6.12).
    const HUNG: &str = "\
[  245.663412] INFO: task sh:187 blocked for more than 10 seconds.
[  245.664391]       Tainted: G        W  OE      6.12.117+deb13-amd64 #1 Debian 6.12.117-1
[  245.665318] \"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.
[  245.666132] task:sh              state:D stack:0     pid:187   tgid:187   ppid:1      flags:0x00004002
[  245.667000] Call Trace:
[  245.667100]  <TASK>
[  245.667200]  __schedule+0x403/0xbf0
[  245.667300]  schedule_timeout+0x9d/0x160
[  245.667400]  pcisim_oops_hang_set+0x4b/0x80 [pcisim_oops]
[  245.667500]  </TASK>
";

    /// lockdep (circular dependency) and RCU-lockdep splats.
    const LOCKDEP: &str = "\
[   12.000001] ======================================================
[   12.000002] WARNING: possible circular locking dependency detected
[   12.000003] 6.12.0-rc1 #1 Not tainted
[   12.000004] ------------------------------------------------------
[   12.000005] kworker/0:1/10 is trying to acquire lock:
[   12.000006] ffff888100a1b0c8 (&vdev->memory_lock){++++}-{4:4}, at: vfio_pci_mmap_fault+0x3c/0x120
[   12.000007] 
[   12.000008] but task is already holding lock:
[   12.000009] ffff888100a1b000 (&mm->mmap_lock){++++}-{4:4}, at: do_user_addr_fault+0x1a2/0x8c0
[   12.000010] 
[   12.000011] which lock already depends on the new lock.
[   13.000001] =============================
[   13.000002] WARNING: suspicious RCU usage
[   13.000003] 6.12.0-rc1 #1 Not tainted
[   13.000004] -----------------------------
[   13.000005] drivers/iommu/intel/iommu.c:1234 suspicious rcu_dereference_check() usage!
";

    /// KASAN, UBSAN and KFENCE reports.
    const SANITIZERS: &str = "\
[   20.100000] ==================================================================
[   20.100001] BUG: KASAN: slab-use-after-free in vfio_pci_core_close_device+0x1f/0x90 [vfio_pci_core]
[   20.100002] Read of size 8 at addr ffff88810a3c6e08 by task pcisim-guest/230
[   20.100003] 
[   20.100004] CPU: 0 UID: 0 PID: 230 Comm: pcisim-guest Not tainted 6.12.0 #1
[   20.100005] Call Trace:
[   20.100006]  <TASK>
[   20.100007]  dump_stack_lvl+0x5d/0x80
[   20.100008]  print_report+0xcf/0x610
[   20.100009]  kasan_report+0xb5/0xf0
[   20.100010]  </TASK>
[   20.100011] ==================================================================
[   21.000000] ================================================================================
[   21.000001] UBSAN: array-index-out-of-bounds in drivers/pci/quirks.c:1234:17
[   21.000002] index 6 is out of range for type 'u32 [6]'
[   21.000003] CPU: 1 UID: 0 PID: 1 Comm: swapper/0 Not tainted 6.12.0 #1
[   21.000004] Call Trace:
[   21.000005]  <TASK>
[   21.000006]  dump_stack_lvl+0x5d/0x80
[   21.000007]  ubsan_epilogue+0x5/0x30
[   21.000008]  __ubsan_handle_out_of_bounds+0x8c/0xb0
[   21.000009]  </TASK>
[   21.000010] ================================================================================
[   22.000000] ==================================================================
[   22.000001] BUG: KFENCE: use-after-free read in test_use_after_free_read+0xb3/0x143
[   22.000002] 
[   22.000003] Use-after-free read at 0xffffffffb673dfe0 (in kfence-#24):
";

    #[test]
    fn test_real_world_samples_give_their_kinds() {
        assert_eq!(kinds(REFCOUNT), [KernelReport::Refcount]);
        assert_eq!(kinds(LIST), [KernelReport::ListCorruption]);
        assert_eq!(kinds(NULL_DEREF), [KernelReport::Oops]);
        assert_eq!(kinds(HUNG), [KernelReport::HungTask]);
        // A report keeps its first lines and the first frames of its call trace.
        let f = scan(&HUNG.lines().collect::<Vec<_>>());
        assert_eq!(
            f[0].lines[REPORT_LINES..],
            [
                "  __schedule+0x403/0xbf0",
                "  schedule_timeout+0x9d/0x160",
                "  pcisim_oops_hang_set+0x4b/0x80 [pcisim_oops]"
            ]
        );
        assert_eq!(
            kinds(LOCKDEP),
            [KernelReport::Lockdep, KernelReport::Lockdep]
        );
        assert_eq!(
            kinds(SANITIZERS),
            [
                KernelReport::Kasan,
                KernelReport::Ubsan,
                KernelReport::Kfence
            ]
        );
        let bug = "[ 9.1] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:585\n\
                   [ 9.2] in_atomic(): 1, irqs_disabled(): 0, non_block: 0, pid: 9, name: kworker/0:1\n";
        assert_eq!(kinds(bug), [KernelReport::Bug]);
        let gpf = "[ 9.1] Oops: general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI\n";
        assert_eq!(kinds(gpf), [KernelReport::Oops]);
        let soft = "[ 9.1] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [pcisim-guest:231]\n";
        assert_eq!(kinds(soft), [KernelReport::Bug]);
        let wait = "[ 9.1] =============================\n[ 9.2] [ BUG: Invalid wait context ]\n";
        assert_eq!(kinds(wait), [KernelReport::Lockdep]);
        let panic =
            "[ 9.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n";
        assert_eq!(kinds(panic), [KernelReport::Oops]);
        // All of them in one log, in order, each once.
        let all = [WARN, REFCOUNT, LIST, NULL_DEREF, HUNG, LOCKDEP, SANITIZERS].concat();
        assert_eq!(
            kinds(&all),
            [
                KernelReport::Warning,
                KernelReport::Refcount,
                KernelReport::ListCorruption,
                KernelReport::Oops,
                KernelReport::HungTask,
                KernelReport::Lockdep,
                KernelReport::Lockdep,
                KernelReport::Kasan,
                KernelReport::Ubsan,
                KernelReport::Kfence
            ]
        );
        // The list corruption's BUG and oops set D and W, and they are its own.
        let f = scan(&LIST.lines().collect::<Vec<_>>());
        assert_eq!(f[0].taints & (1 << TAINT_DIE), 1 << TAINT_DIE);
        assert!(f[0].headline().starts_with("list_add corruption."));
    }

    #[test]
    fn test_two_warnings_far_apart_are_two_reports() {
        let mut text = String::from(WARN);
        for i in 0..20 {
            text.push_str(&format!("[   60.{i:06}]  stack line {i}\n"));
        }
        text.push_str(WARN);
        assert_eq!(kinds(&text), [KernelReport::Warning, KernelReport::Warning]);
    }

    #[test]
    fn test_kmsg_records_parse_and_render() {
        let r =
            KmsgRecord::parse("4,1234,52118042,-;------------[ cut here ]------------").unwrap();
        assert_eq!(
            (r.seq, r.level, r.facility, r.ts_usec),
            (1234, 4, 0, 52_118_042)
        );
        assert_eq!(r.text, "------------[ cut here ]------------");
        assert_eq!(
            r.dmesg_lines(),
            "<4>[   52.118042] ------------[ cut here ]------------\n"
        );
        // Continuation (dictionary) lines are dropped; escapes undone, multi-line text split.
        let r = KmsgRecord::parse(
            "6,7,100,c;a\\x0ab \\x5c done\n SUBSYSTEM=pci\n DEVICE=+pci:0000:01:00.0",
        )
        .unwrap();
        assert_eq!(r.text, "a\nb \\ done");
        assert_eq!(
            r.dmesg_lines(),
            "<6>[    0.000100] a\n<6>[    0.000100] b \\ done\n"
        );
        // A user write (facility 1).
        let r = KmsgRecord::parse("12,8,5,-;WARNING: CPU: 0 PID: 1 at fake").unwrap();
        assert_eq!((r.facility, r.level), (1, 4));
        assert_eq!(KmsgRecord::parse("not a record"), None);
        assert_eq!(KmsgRecord::parse("x,1,2,-;t"), None);
        // The rendered file scans like the records.
        let slice = Slice {
            records: WARN
                .lines()
                .enumerate()
                .map(|(i, l)| KmsgRecord {
                    seq: 10 + i as u64,
                    level: 4,
                    facility: 0,
                    ts_usec: 1,
                    text: strip_dmesg_prefix(l).to_string(),
                })
                .collect(),
            ..Slice::default()
        };
        let text = slice.render("K1 kernel-warn");
        assert!(text.starts_with("# pcisim lab: guest kernel log of K1 kernel-warn\n# kmsg records seq 10..=21 (12 records, 0 lost)\n"), "{text}");
        assert_eq!(kinds(&text), [KernelReport::Warning]);
    }

    /// An agent whose guest answers each `kmsg` request with the next of `replies` (the request's
    /// fields are sent back through the returned handle).
    fn canned_agent(
        replies: Vec<serde_json::Value>,
    ) -> (Agent, std::thread::JoinHandle<Vec<serde_json::Value>>) {
        use std::io::{BufRead, BufReader, Write};
        let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut w = guest.try_clone().unwrap();
            let mut seen = Vec::new();
            let mut lines = BufReader::new(guest).lines();
            for mut reply in replies {
                let req: serde_json::Value =
                    serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
                reply["id"] = req["id"].clone();
                w.write_all(format!("{reply}\n").as_bytes()).unwrap();
                seen.push(req);
            }
            seen
        });
        (Agent::new(host), t)
    }

    #[test]
    fn test_read_back_to_back_slices_gaps_and_reboot() {
        let reply = |records: &[&str], next: u64, boot: &str, tainted: u64, rebooted: bool| {
            serde_json::json!({"ok": true, "records": records, "next_seq": next,
                "boot_id": boot, "tainted": tainted, "rebooted": rebooted})
        };
        let (mut agent, guest) = canned_agent(vec![
            // The boot: records 0..=2.
            reply(
                &["6,0,1,-;Linux version", "6,1,2,-;a", "6,2,3,-;b"],
                3,
                "B1",
                2048,
                false,
            ),
            // A scenario: 3 and 4 were overwritten before the read.
            reply(&["4,5,9,-;c"], 6, "B1", 6144, false),
            // The guest rebooted: the new boot's log, its record 0 already overwritten.
            reply(&["6,1,2,-;x"], 2, "B2", 0, true),
        ]);
        let mut mark = None;
        let boot = read(&mut agent, &mut mark).unwrap();
        assert_eq!(
            (boot.records.len(), boot.lost, boot.rebooted),
            (3, 0, false)
        );
        assert_eq!((boot.taint_before, boot.taint_after), (0, 2048));
        assert_eq!(mark.as_ref().map(|m| m.next_seq), Some(3));
        let s = read(&mut agent, &mut mark).unwrap();
        assert_eq!(s.records[0].seq, 5);
        assert_eq!(s.lost, 2);
        assert_eq!((s.taint_before, s.taint_after), (2048, 6144));
        let r = read(&mut agent, &mut mark).unwrap();
        assert!(r.rebooted);
        assert_eq!((r.lost, r.taint_before), (1, 0));
        assert_eq!(
            mark,
            Some(KmsgMark {
                next_seq: 2,
                boot_id: "B2".into(),
                tainted: 0
            })
        );
        drop(agent);
        let seen = guest.join().unwrap();
        assert_eq!(seen[0]["after"], serde_json::Value::Null);
        assert_eq!(
            (seen[1]["after"].as_u64(), seen[1]["boot_id"].as_str()),
            (Some(2), Some("B1"))
        );
        assert_eq!(seen[2]["after"].as_u64(), Some(5));
    }

    #[test]
    fn test_count_lost_gaps() {
        assert_eq!(count_lost(Some(9), [10, 11, 12]), 0);
        assert_eq!(count_lost(Some(9), [13, 14]), 3);
        assert_eq!(count_lost(Some(9), [10, 12, 15]), 3);
        assert_eq!(count_lost(None, [0, 1]), 0);
        assert_eq!(count_lost(None, [5]), 5);
        assert_eq!(count_lost(Some(9), []), 0);
    }

    #[test]
    fn test_taint_parsing_and_letters() {
        assert_eq!(parse_taint("4096\n"), Ok(4096));
        assert_eq!(parse_taint("0"), Ok(0));
        assert!(parse_taint("x").unwrap_err().contains("not a number"));
        assert_eq!(taint_letters(4096 | 8192), "OE");
        assert_eq!(taint_letters(512 | 4096 | 8192), "WOE");
        assert_eq!(taint_letters(1 << 40), "?40");
        assert_eq!(taint_letters(0), "");
        assert_eq!(describe_taint(512), "W (512: kernel issued a warning)");
        assert_eq!(describe_taint(0), "none");
        assert_eq!(allowed_taint_mask(), 4096 | 8192);
        for (i, f) in TAINT_FLAGS.iter().enumerate() {
            assert_eq!(f.bit as usize, i);
        }
        assert_eq!(KernelReport::Taint(1 << 7).to_string(), "taint(D)");
    }

    fn record(seq: u64, text: &str) -> KmsgRecord {
        KmsgRecord {
            seq,
            level: 4,
            facility: 0,
            ts_usec: seq * 1000,
            text: text.into(),
        }
    }

    fn slice(text: &str, before: u64, after: u64) -> Slice {
        Slice {
            records: text
                .lines()
                .enumerate()
                .map(|(i, l)| record(100 + i as u64, strip_dmesg_prefix(l)))
                .collect(),
            lost: 0,
            rebooted: false,
            taint_before: before,
            taint_after: after,
        }
    }

    #[test]
    fn test_taint_change_is_a_report_unless_explained_or_allowed() {
        // Loading our modules (O, E) is allowed.
        assert!(analyze(&slice("", 0, 4096 | 8192)).is_empty());
        // A WARN explains its W.
        let f = analyze(&slice(WARN, 4096, 4096 | 512));
        assert_eq!(
            f.iter().map(|f| f.kind).collect::<Vec<_>>(),
            [KernelReport::Warning]
        );
        // W without a WARNING line in the slice (e.g. a WARN_ONCE whose text was lost) is a taint.
        let f = analyze(&slice("", 4096, 4096 | 512));
        assert_eq!(f[0].kind, KernelReport::Taint(512));
        assert!(
            f[0].lines[0].contains("new W (512: kernel issued a warning)"),
            "{:?}",
            f[0].lines
        );
        // I at boot, with QEMU's firmware MTRR line, is allowed; without it, it is a report.
        let mtrr = "[    1.200152] mtrr: your CPUs had inconsistent fixed MTRR settings\n";
        assert!(analyze(&slice(mtrr, 0, 2048)).is_empty());
        assert_eq!(
            analyze(&slice("", 0, 2048))[0].kind,
            KernelReport::Taint(2048)
        );
        // I at boot from the lab's own pci=no_e820 (no MTRR line: a kernel without CONFIG_MTRR).
        let cmdline = format!(
            "[    0.000000] Command line: {}\n",
            crate::vm::qemu::DEFAULT_APPEND
        );
        assert!(analyze(&slice(&cmdline, 0, 2048)).is_empty());
        // A bit already set before is not a change.
        assert!(analyze(&slice("", 512, 512)).is_empty());
        // A user-space record never counts as a kernel report.
        let mut s = slice("", 0, 0);
        s.records.push(KmsgRecord {
            facility: 1,
            ..record(7, "WARNING: CPU: 0 PID: 1 at fake")
        });
        assert!(analyze(&s).is_empty());
    }

    fn judged(
        s: Result<&Slice, &str>,
        expected: &[KernelReport],
    ) -> (Verdict, Option<String>, Vec<String>) {
        let mut d = Vec::new();
        let (v, n) = judge(
            Verdict::Pass,
            s,
            expected,
            Path::new("/run/K1.dmesg"),
            &mut d,
        );
        (v, n, d)
    }

    #[test]
    fn test_judge_unexpected_warning_fails_with_lines_and_path() {
        let s = slice(WARN, 4096, 4096 | 512);
        let (v, note, d) = judged(Ok(&s), &[]);
        assert_eq!(
            v,
            Verdict::Fail("guest kernel: 1 unexpected report (warning)".into())
        );
        assert_eq!(note, None);
        assert!(
            d[0].starts_with("KERNEL warning: WARNING: CPU: 1 PID: 176 at "),
            "{d:?}"
        );
        assert!(d
            .iter()
            .any(|l| l == "  | ------------[ cut here ]------------"));
        assert_eq!(d.last().unwrap(), "kernel log: /run/K1.dmesg");
        // A clean slice changes nothing and says nothing.
        let (v, note, d) = judged(Ok(&slice("[ 1.0] all fine\n", 0, 4096)), &[]);
        assert_eq!((v, note), (Verdict::Pass, None));
        assert!(d.is_empty(), "{d:?}");
        // A failed guest keeps its reason first.
        let mut d = Vec::new();
        let (v, _) = judge(
            Verdict::Fail("exit 1".into()),
            Ok(&s),
            &[],
            Path::new("/x"),
            &mut d,
        );
        assert_eq!(
            v,
            Verdict::Fail("exit 1; guest kernel: 1 unexpected report (warning)".into())
        );
    }

    #[test]
    fn test_judge_expected_report_is_xfail_only_if_seen_and_alone() {
        let s = slice(WARN, 4096, 4096 | 512);
        let (v, note, d) = judged(Ok(&s), &[KernelReport::Warning]);
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            note.as_deref(),
            Some("XFAIL kernel warning reported as expected (1 report)")
        );
        assert!(
            d[0].starts_with("XFAIL (expected) kernel warning: WARNING: CPU:"),
            "{d:?}"
        );
        // Declared but not seen: the oracle missed it.
        let (v, note, _) = judged(Ok(&slice("", 0, 0)), &[KernelReport::Warning]);
        assert_eq!(
            v,
            Verdict::Fail("expected kernel report not seen: warning (the oracle missed it)".into())
        );
        assert_eq!(note, None);
        // A scenario that skipped itself (M8c without lockdep) provoked nothing: its declared
        // report is not required, and the skip stands; an unexpected report still fails it.
        let mut d = Vec::new();
        let skip = Verdict::Skip("needs lockdep".into());
        let (v, note) = judge(
            skip.clone(),
            Ok(&slice("", 0, 0)),
            &[KernelReport::Lockdep],
            Path::new("/x"),
            &mut d,
        );
        assert_eq!((v, note), (skip.clone(), None));
        let (v, _) = judge(
            skip,
            Ok(&s),
            &[KernelReport::Lockdep],
            Path::new("/x"),
            &mut d,
        );
        assert_eq!(
            v,
            Verdict::Fail("guest kernel: 1 unexpected report (warning)".into())
        );
        // Declared one kind, another appeared as well.
        let both = slice(&[WARN, HUNG].concat(), 0, 512);
        let (v, _, _) = judged(Ok(&both), &[KernelReport::Warning]);
        assert_eq!(
            v,
            Verdict::Fail("guest kernel: 1 unexpected report (hung_task)".into())
        );
        let (v, note, _) = judged(Ok(&both), &[KernelReport::Warning, KernelReport::HungTask]);
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            note.as_deref(),
            Some("XFAIL kernel warning, hung_task reported as expected (2 reports)")
        );
        // A declared taint must be the exact new bits.
        let t = slice("", 0, 1 << 6);
        assert_eq!(
            judged(Ok(&t), &[KernelReport::Taint(1 << 6)]).0,
            Verdict::Pass
        );
        assert!(matches!(
            judged(Ok(&t), &[KernelReport::Taint(1 << 5)]).0,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn test_judge_lost_records_or_unreadable_log_fail() {
        let mut s = slice("", 0, 0);
        s.lost = 3;
        let (v, _, d) = judged(Ok(&s), &[]);
        assert_eq!(
            v,
            Verdict::Fail(
                "guest kernel log incomplete: 3 records overwritten before they were read".into()
            )
        );
        assert_eq!(d, ["kernel log: /run/K1.dmesg"]);
        let (v, _, d) = judged(Err("agent: timed out"), &[]);
        assert_eq!(
            v,
            Verdict::Fail("guest kernel log unreadable: agent: timed out".into())
        );
        assert_eq!(d.len(), 1);
        // A skip with a report is a failure.
        let mut d = Vec::new();
        let (v, _) = judge(
            Verdict::Skip("no vfio".into()),
            Ok(&slice(HUNG, 0, 0)),
            &[],
            Path::new("/x"),
            &mut d,
        );
        assert!(matches!(v, Verdict::Fail(_)));
    }

    /// H7's lockdep splat on the 6.12-debug kernel (its first lines and the end of its trace),
    /// as `RUN/H7.dmesg` saved it. Also known.rs's fixture.
    pub(super) const PCIEHP_LOCKDEP: &str = "\
[    8.332730] ======================================================
[    8.333373] WARNING: possible circular locking dependency detected
[    8.333741] 6.12.117-pcisim-debug #1 Tainted: G          I       
[    8.333923] ------------------------------------------------------
[    8.334046] irq/26-pciehp/40 is trying to acquire lock:
[    8.334181] ff276a4f82951700 (&ctrl->reset_lock){.+.+}-{3:3}, at: pciehp_configure_device+0xb9/0x160
[    8.335183] 
[    8.335183] but task is already holding lock:
[    8.349719] Call Trace:
[    8.349720]  <TASK>
[    8.349721]  dump_stack_lvl+0x68/0x90
[    8.349722]  pciehp_configure_device+0xb9/0x160
[    8.349723]  </TASK>
";

    #[test]
    fn test_judge_known_kernel_finding_passes_named_and_nothing_else_does() {
        let s = slice(PCIEHP_LOCKDEP, 0, 0);
        let (v, note, d) = judged(Ok(&s), &[]);
        assert_eq!(v, Verdict::Pass, "{d:?}");
        assert_eq!(
            note.as_deref(),
            Some("XFAIL known kernel finding pciehp-reset-lock-order (lockdep)")
        );
        assert!(
            d[0].starts_with("XFAIL (known kernel finding pciehp-reset-lock-order, docs/lab.md"),
            "{d:?}"
        );
        assert_eq!(d.last().unwrap(), "kernel log: /run/K1.dmesg");
        // With an unknown report beside it, the scenario fails on that one only.
        let both = format!("{PCIEHP_LOCKDEP}{WARN}");
        let (v, note, _) = judged(Ok(&slice(&both, 4096, 4096 | 512)), &[]);
        assert_eq!(
            v,
            Verdict::Fail("guest kernel: 1 unexpected report (warning)".into())
        );
        assert_eq!(note, None);
        // Another lock in the same kind of splat is not known: it fails.
        let other = PCIEHP_LOCKDEP.replace("(&ctrl->reset_lock)", "(&dev->mutex)");
        let (v, _, _) = judged(Ok(&slice(&other, 0, 0)), &[]);
        assert_eq!(
            v,
            Verdict::Fail("guest kernel: 1 unexpected report (lockdep)".into())
        );
        // A scenario expecting a warning that also meets the known finding says both.
        let (v, note, _) = judged(
            Ok(&slice(&both, 4096, 4096 | 512)),
            &[KernelReport::Warning],
        );
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            note.as_deref(),
            Some(
                "XFAIL kernel warning reported as expected (1 report); \
                 XFAIL known kernel finding pciehp-reset-lock-order (lockdep)"
            )
        );
    }

    #[test]
    fn test_known_findings_are_documented() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/lab.md"),
        )
        .unwrap();
        assert!(doc.contains("## Known kernel findings"));
        for k in KNOWN_FINDINGS {
            assert!(
                doc.contains(&format!("`{}`", k.id)),
                "docs/lab.md must list {}",
                k.id
            );
        }
    }

    #[test]
    fn test_allowlist_entries_are_documented_and_match() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/lab.md"),
        )
        .unwrap();
        for a in ALLOWED_LINES {
            assert!(!a.reason.is_empty() && !a.pattern.is_empty());
            // Each entry does something: it allows a report line or explains a taint.
            assert!(classify(a.pattern).is_some() || a.taint != 0, "{a:?}");
            assert!(
                doc.contains(a.pattern),
                "docs/lab.md must list {:?}",
                a.pattern
            );
        }
        for a in ALLOWED_TAINT {
            let letter = TAINT_FLAGS[a.bit as usize].letter;
            assert!(
                doc.contains(&format!("`{letter}` ({})", 1u64 << a.bit)),
                "docs/lab.md must list the allowed taint {letter}"
            );
        }
    }
}
