//! The lab's top-level error.

use std::io;
use std::path::PathBuf;

use crate::kernel::KernelError;
use crate::vm::agent::AgentError;
use crate::vm::guest_build::GuestError;
use crate::vm::initramfs::InitramfsError;
use crate::vm::kmod::KmodError;
use crate::vm::process::ProcessError;
use crate::vm::profile::ProfileError;
use crate::vm::provision::ProvisionError;
use crate::vm::qemu::QemuError;
use crate::vm::qmp::QmpError;
use crate::vm::server::ServerError;

/// Why a lab run could not be carried out (a scenario that fails is not an error: it is a
/// `not ok` line and `run_suite` returns `Ok(false)`).
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The agent link failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The guest did not come up: no agent greeting.
    #[error("The guest did not boot (console log: {console})")]
    Boot {
        /// What went wrong while waiting.
        #[source]
        source: AgentError,
        /// The guest console log.
        console: PathBuf,
    },
    /// Building the guest programs failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Building the initramfs failed.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// The guest kernel cannot be used (unsupported, misses options, cannot be cached).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Building the guest kernel modules failed.
    #[error(transparent)]
    Kmod(#[from] KmodError),
    /// SIGINT or SIGTERM arrived.
    #[error("Interrupted by signal {0}")]
    Interrupted(i32),
    /// The filter selects nothing.
    #[error("No scenario name contains {0:?}")]
    NoScenario(String),
    /// Writing the KTAP report or progress failed.
    #[error("Cannot write the report")]
    Output(#[source] io::Error),
    /// `--junit`'s file could not be written.
    #[error("Cannot write the JUnit report {path}")]
    Junit {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A child process could not be managed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Provisioning failed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A VM profile is invalid.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// QEMU could not be started.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// QMP could not be reached or failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The run directory could not be created.
    #[error("Cannot create a run directory under {path}")]
    RunDir {
        /// The parent directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("Cannot install signal handlers")]
    Signals(#[source] io::Error),
}

/// `err` and its sources, joined with `: ` (for one-line reasons).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl LabError {
    /// The signal, if this error means the lab was interrupted.
    pub fn interrupt_signal(&self) -> Option<i32> {
        match self {
            LabError::Interrupted(s)
            | LabError::Agent(AgentError::Interrupted(s))
            | LabError::Boot {
                source: AgentError::Interrupted(s),
                ..
            }
            | LabError::Process(ProcessError::Interrupted(s))
            | LabError::Provision(ProvisionError::Process(ProcessError::Interrupted(s)))
            | LabError::Guest(GuestError::Process(ProcessError::Interrupted(s)))
            | LabError::Kmod(KmodError::Process(ProcessError::Interrupted(s)))
            | LabError::Qemu(QemuError::Process(ProcessError::Interrupted(s)))
            | LabError::Qmp(QmpError::Interrupted(s))
            | LabError::Server(ServerError::Process(ProcessError::Interrupted(s))) => Some(*s),
            _ => None,
        }
    }
}
