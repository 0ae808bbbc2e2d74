//! Scenario files: a scenario written as TOML instead of Rust (`pcisim lab run FILE|DIR...`,
//! docs/scenarios.md teaches the format).
//!
//! A file names its VM profile, a list of steps (host actions: plug, unplug, inject a fault,
//! QMP `system_reset`, wait for a guest condition; guest actions: a `pcisim-guest` KTAP program
//! or a shell command with its expected exit status and output; each step may count journal
//! records in its window) and the scenario's expectations (the journal violations and the
//! guest kernel reports it provokes on purpose, counts of records over the whole scenario).
//!
//! Loading ([`load_paths`]) parses and checks everything that can be checked without a VM —
//! unknown keys, a misspelt violation kind, kernel report kind, guest program or record type, a
//! step with no action or two — and refuses the file with an error naming it and the line.
//! Each file becomes an ordinary [`Scenario`] whose program is a [`HostProgram`]
//! ([`run::run_file`]), so the suite's runner runs and judges it exactly as a catalogue
//! scenario: its KTAP, its journal window (violations: none unless declared) and its kernel log
//! slice (reports: none unless declared).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use pcisim_guest_wire::{Options, Program as GuestProgram};
use pcisim_journal::{Event, ViolationKind};
use serde::Deserialize;

use crate::harness::dmesg::KernelReport;
use crate::harness::host::HostProgram;
use crate::harness::scenario::{Program, Scenario, Twin};
use crate::vm::profile::ProfileId;

pub mod run;

/// Why a scenario file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key/value the format does not have (toml's message names the line).
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// toml's message (with the line and column).
        message: String,
    },
    /// Valid TOML that is not a valid scenario.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line (1-based) of the offending table or key.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No `.toml` file among the paths given.
    #[error("no scenario file (*.toml) in {0}")]
    Empty(String),
}

/// Default time a guest command may run, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// A scenario file as written (the serde form; [`ScenarioFile`] is the checked form).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    id: String,
    name: String,
    profile: toml::Spanned<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default, rename = "step")]
    steps: Vec<toml::Spanned<RawStep>>,
    #[serde(default)]
    expect: Option<toml::Spanned<RawExpect>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Option<String>,
    // The actions: exactly one.
    guest: Option<String>,
    sh: Option<String>,
    plug: Option<String>,
    unplug: Option<String>,
    inject: Option<String>,
    reset: Option<String>,
    wait: Option<String>,
    #[serde(rename = "await")]
    await_record: Option<String>,
    // Their arguments.
    device: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    exit: Option<i32>,
    stdout: Option<String>,
    timeout: Option<u64>,
    #[serde(default, rename = "where")]
    fields: BTreeMap<String, toml::Value>,
    #[serde(default)]
    count: Vec<RawCount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    violations: Vec<RawViolation>,
    #[serde(default)]
    kernel: Vec<String>,
    #[serde(default)]
    count: Vec<RawCount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawViolation {
    device: String,
    // Typed: a misspelt kind is a parse error naming the line and the valid kinds.
    kind: ViolationKind,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCount {
    device: String,
    record: String,
    #[serde(default, rename = "where")]
    fields: BTreeMap<String, toml::Value>,
    count: Option<u64>,
    min: Option<u64>,
    max: Option<u64>,
}

/// A checked scenario file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioFile {
    /// Where it came from.
    pub path: PathBuf,
    /// The scenario id (`F-E2`): unique in a run, the start of the KTAP name.
    pub id: String,
    /// The KTAP name: `<id> <name>`.
    pub name: String,
    /// The VM profile.
    pub profile: ProfileId,
    /// How long each guest command may run.
    pub timeout: Duration,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The violations it provokes on purpose.
    pub violations: Vec<(String, ViolationKind)>,
    /// The guest kernel reports it provokes on purpose.
    pub kernel: Vec<KernelReport>,
    /// Record counts over the whole scenario's journal window.
    pub counts: Vec<Count>,
}

/// One step: a name (its subtest's), what it does, and counts over its journal window.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The subtest name.
    pub name: String,
    /// What it does.
    pub action: Action,
    /// Record counts over the records journaled during the step.
    pub counts: Vec<Count>,
    /// The line of its `[[step]]` table.
    pub line: usize,
}

impl Step {
    /// The devices the step names (its action's and its counts').
    pub fn devices(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = match &self.action {
            Action::Guest { device, .. } | Action::Inject { device, .. } => vec![device],
            Action::Plug(d) | Action::Unplug(d) => vec![d],
            Action::Await { record, .. } => vec![&record.device],
            Action::Sh { .. } | Action::SystemReset | Action::Wait { .. } => vec![],
        };
        ids.extend(self.counts.iter().map(|c| c.device.as_str()));
        ids
    }
}

/// What a step does. `{bdf:ID}` in a string argument becomes device `ID`'s guest BDF.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `pcisim-guest PROGRAM --vendor V --device D ARGS...` for `device`: its KTAP is nested
    /// and judged as a guest scenario's.
    Guest {
        /// The program.
        program: GuestProgram,
        /// The device whose ids (and, for e1, description) it gets.
        device: String,
        /// The program's options as words (`--bdf`, `{bdf:gpu0}`, ...): checked against its
        /// typed options at load ([`Options::parse`]), expanded and parsed again at the run.
        args: Vec<String>,
    },
    /// `sh -c SCRIPT` in the guest: its exit status must be `exit`, its stdout must contain
    /// `stdout` if given.
    Sh {
        /// The script.
        script: String,
        /// The expected exit status.
        exit: i32,
        /// A substring the stdout must contain.
        stdout: Option<String>,
    },
    /// QMP `device_add` of a profile device, then wait until the guest enumerates it.
    Plug(String),
    /// QMP `device_del`, wait for `DEVICE_DELETED`.
    Unplug(String),
    /// A fault through the control socket (`pcisim ctl inject`).
    Inject {
        /// The device.
        device: String,
        /// The fault, in `pcisim ctl inject`'s form (`slow-reset=1500`).
        fault: String,
    },
    /// QMP `system_reset`; waits for the guest agent to greet again.
    SystemReset,
    /// Polls `sh -c SCRIPT` in the guest until it exits 0, for at most `timeout`.
    Wait {
        /// The condition.
        script: String,
        /// How long to wait.
        timeout: Duration,
    },
    /// Waits for the device to journal a record (of a type, with field values) since the
    /// scenario started, for at most `timeout` (what the host sees after the guest is done:
    /// the server noticing a client go).
    Await {
        /// The record (its `min` is 1).
        record: Count,
        /// How long to wait.
        timeout: Duration,
    },
}

/// A count of journal records of one type (and field values) on one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Count {
    /// The device.
    pub device: String,
    /// The record type (`reset_begin`; a journal `Event`'s serde name).
    pub record: String,
    /// Field values the record must have (`kind = "flr"`), compared as JSON.
    pub fields: BTreeMap<String, serde_json::Value>,
    /// At least.
    pub min: u64,
    /// At most.
    pub max: u64,
}

impl Count {
    /// `reset_begin{kind=flr}`.
    pub fn describe(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                )
            })
            .collect();
        let what = if fields.is_empty() {
            self.record.clone()
        } else {
            format!("{}{{{}}}", self.record, fields.join(","))
        };
        let n = if self.min == self.max {
            format!("{}", self.min)
        } else if self.max == u64::MAX {
            format!("at least {}", self.min)
        } else {
            format!("{}..={}", self.min, self.max)
        };
        format!("{}: {n} {what}", self.device)
    }
}

/// The kernel report kinds a file may name (by their `Display` names); taint is judged from
/// the bits and has no name to declare here.
const KERNEL_KINDS: [KernelReport; 10] = [
    KernelReport::Warning,
    KernelReport::Bug,
    KernelReport::Oops,
    KernelReport::Kasan,
    KernelReport::Ubsan,
    KernelReport::Kfence,
    KernelReport::Lockdep,
    KernelReport::HungTask,
    KernelReport::Refcount,
    KernelReport::ListCorruption,
];

fn kernel_kind(name: &str) -> Result<KernelReport, String> {
    KERNEL_KINDS
        .iter()
        .find(|k| k.to_string() == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<String> = KERNEL_KINDS.iter().map(|k| k.to_string()).collect();
            format!(
                "unknown kernel report kind {name:?}: the kinds are {}",
                names.join(", ")
            )
        })
}

/// Whether `name` is a journal record type: asks the journal's own `Event` type (serde), so
/// the list cannot drift. A struct variant fails only for its missing fields.
fn check_record_type(name: &str) -> Result<(), String> {
    match serde_json::from_value::<Event>(serde_json::json!({ "type": name })) {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("unknown variant") => {
            Err(format!("unknown journal record type {name:?}: {e}"))
        }
        Err(_) => Ok(()),
    }
}

fn profile_by_name(name: &str) -> Result<ProfileId, String> {
    let all = ProfileId::SUITE
        .iter()
        .chain(std::iter::once(&ProfileId::GpuLarge));
    let mut names = Vec::new();
    for p in all {
        let n = p.profile().name;
        if n == name {
            return Ok(*p);
        }
        names.push(n);
    }
    Err(format!(
        "unknown profile {name:?}: the profiles are {}",
        names.join(", ")
    ))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |t| t.matches('\n').count() + 1)
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Value::from(*f),
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        other => serde_json::Value::String(other.to_string()),
    }
}

fn count(raw: RawCount) -> Result<Count, String> {
    check_record_type(&raw.record)?;
    let (min, max) = match (raw.count, raw.min, raw.max) {
        (Some(n), None, None) => (n, n),
        (None, min, max) if min.is_some() || max.is_some() => {
            (min.unwrap_or(0), max.unwrap_or(u64::MAX))
        }
        (None, _, _) => {
            return Err(format!(
                "count of {:?}: give count, or min and/or max",
                raw.record
            ))
        }
        (Some(_), _, _) => {
            return Err(format!(
                "count of {:?}: count excludes min and max",
                raw.record
            ))
        }
    };
    if min > max {
        return Err(format!("count of {:?}: min {min} > max {max}", raw.record));
    }
    Ok(Count {
        device: raw.device,
        record: raw.record,
        fields: raw
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_json(v)))
            .collect(),
        min,
        max,
    })
}

fn step(raw: RawStep, index: usize) -> Result<Step, String> {
    let actions: Vec<&str> = [
        ("guest", raw.guest.is_some()),
        ("sh", raw.sh.is_some()),
        ("plug", raw.plug.is_some()),
        ("unplug", raw.unplug.is_some()),
        ("inject", raw.inject.is_some()),
        ("reset", raw.reset.is_some()),
        ("wait", raw.wait.is_some()),
        ("await", raw.await_record.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    let action_key =
        match actions.as_slice() {
            [one] => *one,
            [] => return Err(
                "a step needs one action: guest, sh, plug, unplug, inject, reset, wait or await"
                    .into(),
            ),
            many => {
                return Err(format!(
                    "a step has one action, this one has {}",
                    many.join(" and ")
                ))
            }
        };
    let unused = |key: &str, set: bool| -> Result<(), String> {
        if set {
            Err(format!("`{key}` does not apply to a `{action_key}` step"))
        } else {
            Ok(())
        }
    };
    let needs_device = matches!(action_key, "guest" | "inject" | "await");
    unused("device", raw.device.is_some() && !needs_device)?;
    unused("args", !raw.args.is_empty() && action_key != "guest")?;
    unused("exit", raw.exit.is_some() && action_key != "sh")?;
    unused("stdout", raw.stdout.is_some() && action_key != "sh")?;
    unused(
        "timeout",
        raw.timeout.is_some() && !matches!(action_key, "wait" | "await"),
    )?;
    unused("where", !raw.fields.is_empty() && action_key != "await")?;
    let device = || {
        raw.device
            .clone()
            .ok_or_else(|| format!("a `{action_key}` step needs `device`"))
    };
    let action = if let Some(p) = &raw.guest {
        let program = GuestProgram::from_name(p).ok_or_else(|| {
            let names: Vec<&str> = GuestProgram::ALL.iter().map(|p| p.name()).collect();
            format!(
                "unknown guest program {p:?}: the programs are {}",
                names.join(", ")
            )
        })?;
        // The options are the program's typed ones ([`Options::parse`]): a misspelt option or
        // a value the program does not take is refused here, at load, naming the step's line.
        // `{bdf:ID}` stands in a value until the run; the run parses the expanded words again.
        Options::parse(program, &raw.args).map_err(|e| e.to_string())?;
        Action::Guest {
            program,
            device: device()?,
            args: raw.args.clone(),
        }
    } else if let Some(s) = &raw.sh {
        Action::Sh {
            script: s.clone(),
            exit: raw.exit.unwrap_or(0),
            stdout: raw.stdout.clone(),
        }
    } else if let Some(d) = &raw.plug {
        Action::Plug(d.clone())
    } else if let Some(d) = &raw.unplug {
        Action::Unplug(d.clone())
    } else if let Some(f) = &raw.inject {
        Action::Inject {
            device: device()?,
            fault: f.clone(),
        }
    } else if let Some(r) = &raw.reset {
        match r.as_str() {
            "system" => Action::SystemReset,
            other => {
                return Err(format!(
                    "unknown reset {other:?}: a file's QMP reset is \"system\" (system_reset); \
                     a function's resets are guest steps (`guest = \"reset\"`)"
                ))
            }
        }
    } else if let Some(w) = &raw.wait {
        Action::Wait {
            script: w.clone(),
            timeout: Duration::from_secs(raw.timeout.unwrap_or(30)),
        }
    } else if let Some(r) = &raw.await_record {
        Action::Await {
            record: count(RawCount {
                device: device()?,
                record: r.clone(),
                fields: raw.fields.clone(),
                count: None,
                min: Some(1),
                max: None,
            })?,
            timeout: Duration::from_secs(raw.timeout.unwrap_or(30)),
        }
    } else {
        return Err("a step needs one action".into());
    };
    let name = raw.name.clone().unwrap_or_else(|| match &action {
        Action::Guest {
            program, device, ..
        } => format!("step {}: {} on {device}", index + 1, program.name()),
        Action::Sh { script, .. } => format!("step {}: sh {script}", index + 1),
        Action::Plug(d) => format!("step {}: plug {d}", index + 1),
        Action::Unplug(d) => format!("step {}: unplug {d}", index + 1),
        Action::Inject { device, fault } => {
            format!("step {}: inject {fault} into {device}", index + 1)
        }
        Action::SystemReset => format!("step {}: system_reset", index + 1),
        Action::Wait { script, .. } => format!("step {}: wait for {script}", index + 1),
        Action::Await { record, .. } => format!("step {}: await {}", index + 1, record.describe()),
    });
    let counts = raw.count.into_iter().map(count).collect::<Result<_, _>>()?;
    Ok(Step {
        name,
        action,
        counts,
        line: 0,
    })
}

/// Parses and checks one scenario file's text (`path` names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<ScenarioFile, FileError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| FileError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let invalid = |offset: usize, message: String| FileError::Invalid {
        path: path.to_path_buf(),
        line: line_of(text, offset),
        message,
    };
    if raw.id.is_empty() || raw.id.contains(char::is_whitespace) {
        return Err(invalid(0, format!("id {:?} must be one word", raw.id)));
    }
    let profile =
        profile_by_name(raw.profile.get_ref()).map_err(|m| invalid(raw.profile.span().start, m))?;
    if raw.steps.is_empty() {
        return Err(invalid(text.len(), "the scenario has no [[step]]".into()));
    }
    let mut steps = Vec::new();
    for (i, s) in raw.steps.into_iter().enumerate() {
        let at = s.span().start;
        let mut st = step(s.into_inner(), i).map_err(|m| invalid(at, m))?;
        st.line = line_of(text, at);
        steps.push(st);
    }
    let devices: Vec<String> = profile
        .profile()
        .devices
        .into_iter()
        .map(|d| d.id)
        .collect();
    let known = |id: &str| -> Result<(), String> {
        if devices.iter().any(|d| d == id) {
            Ok(())
        } else {
            Err(format!(
                "no device {id:?} in profile {:?}: its devices are {}",
                raw.profile.get_ref(),
                devices.join(", ")
            ))
        }
    };
    for st in &steps {
        let at_step = |m: String| FileError::Invalid {
            path: path.to_path_buf(),
            line: st.line,
            message: m,
        };
        for id in st.devices() {
            known(id).map_err(at_step)?;
        }
    }
    let (violations, kernel, counts) = match raw.expect {
        None => (Vec::new(), Vec::new(), Vec::new()),
        Some(e) => {
            let at = e.span().start;
            let e = e.into_inner();
            let kernel = e
                .kernel
                .iter()
                .map(|k| kernel_kind(k))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| invalid(at, m))?;
            let counts = e
                .count
                .into_iter()
                .map(count)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| invalid(at, m))?;
            let violations: Vec<(String, ViolationKind)> = e
                .violations
                .into_iter()
                .map(|v| (v.device, v.kind))
                .collect();
            for id in violations
                .iter()
                .map(|(d, _)| d)
                .chain(counts.iter().map(|c: &Count| &c.device))
            {
                known(id).map_err(|m| invalid(at, m))?;
            }
            (violations, kernel, counts)
        }
    };
    Ok(ScenarioFile {
        path: path.to_path_buf(),
        name: format!("{} {}", raw.id, raw.name),
        id: raw.id,
        profile,
        timeout: Duration::from_secs(raw.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS)),
        steps,
        violations,
        kernel,
        counts,
    })
}

/// The `.toml` files among `paths`: a file as given, a directory's `*.toml` sorted by name.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FileError> {
    let mut files = Vec::new();
    for p in paths {
        let io = |source| FileError::Io {
            path: p.clone(),
            source,
        };
        if fs::metadata(p).map_err(io)?.is_dir() {
            let mut found: Vec<PathBuf> = fs::read_dir(p)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(FileError::Empty(list.join(" ")));
    }
    Ok(files)
}

/// The loaded files, by scenario id: what [`run::run_file`] looks its scenario up in. A
/// [`HostProgram`] is a plain function, so the file it interprets is found by the id of the
/// scenario being run ([`crate::harness::host::HostCtx::scenario`]).
static LOADED: Mutex<Vec<&'static ScenarioFile>> = Mutex::new(Vec::new());

/// The loaded file whose scenario id is `id`.
pub fn loaded(id: &str) -> Option<&'static ScenarioFile> {
    LOADED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|f| f.id == id)
        .copied()
}

/// Reads and checks every scenario file in `paths` ([`expand`]) and returns them as scenarios
/// the suite's runner runs (`run_scenarios`). Every file is checked before anything runs; two
/// files with one id are refused. The files stay loaded for the life of the process (they are
/// few and small; a scenario's strings must be `'static`).
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Scenario>, FileError> {
    let mut parsed: Vec<ScenarioFile> = Vec::new();
    for f in expand(paths)? {
        let text = fs::read_to_string(&f).map_err(|source| FileError::Io {
            path: f.clone(),
            source,
        })?;
        let file = parse(&f, &text)?;
        if let Some(other) = parsed.iter().find(|o| o.id == file.id) {
            return Err(FileError::Invalid {
                path: f.clone(),
                line: 1,
                message: format!("id {:?} is also {}'s", file.id, other.path.display()),
            });
        }
        parsed.push(file);
    }
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    for file in parsed {
        if loaded.iter().any(|f| f.id == file.id) {
            return Err(FileError::Invalid {
                path: file.path.clone(),
                line: 1,
                message: format!("id {:?} is already loaded", file.id),
            });
        }
        let file: &'static ScenarioFile = Box::leak(Box::new(file));
        loaded.push(file);
        out.push(scenario_of(file));
    }
    Ok(out)
}

fn scenario_of(file: &'static ScenarioFile) -> Scenario {
    let violations: Vec<(&'static str, ViolationKind)> = file
        .violations
        .iter()
        .map(|(d, k)| (d.as_str(), *k))
        .collect();
    Scenario {
        id: &file.id,
        name: &file.name,
        timeout: file.timeout,
        program: Program::Host(HostProgram {
            name: &file.id,
            profile: file.profile,
            run: run::run_file,
        }),
        profile: file.profile,
        kernel_reports: Box::leak(file.kernel.clone().into_boxed_slice()),
        violations: Box::leak(violations.into_boxed_slice()),
        twin: if file.violations.is_empty() && file.kernel.is_empty() {
            Twin::None
        } else {
            Twin::Unpaired("a scenario file declares its expected failures itself")
        },
        requires: None,
    }
}

#[cfg(test)]
mod tests;
