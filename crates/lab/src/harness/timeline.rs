//! The lab's use of the journal timeline ([`pcisim_journal::timeline`]): the picture of one
//! SVA kill case, written next to the run's report.

use std::path::PathBuf;

use log::warn;
use pcisim_journal::timeline::{parse_guest_events, render_svg};
use pcisim_journal::Record;

use crate::harness::host::HostCtx;

/// Writes `RUN/<ID>.timeline.svg` for a host scenario's guest step: `records` are the device's
/// journal of the step, `guest_stdout` the step's output (its `# t` lines). The run directory
/// is the VM directory's parent (`RUN/<profile>/`). A failure to write is a diagnostic, not a
/// failed scenario: the picture is for people, the checks are elsewhere.
pub fn save_case_timeline(
    ctx: &mut HostCtx<'_>,
    case: &str,
    device: &str,
    records: &[Record],
    guest_stdout: &str,
) {
    let id = ctx.scenario().id;
    let name = ctx.scenario().name;
    let run = ctx
        .vm_dir()
        .parent()
        .map_or_else(|| ctx.vm_dir().to_path_buf(), PathBuf::from);
    let path = run.join(format!("{id}.timeline.svg"));
    let guest = parse_guest_events(guest_stdout);
    let svg = render_svg(&format!("{name}: case {case} on {device}"), records, &guest);
    match std::fs::write(&path, svg) {
        Ok(()) => ctx.diag(&format!(
            "{case}: timeline ({} journal records, {} guest events): {}",
            records.len(),
            guest.len(),
            path.display()
        )),
        Err(e) => {
            warn!("cannot write {}: {e}", path.display());
            ctx.diag(&format!("{case}: cannot write {}: {e}", path.display()));
        }
    }
}
