//! Interrupt eventfds the client registered with DEVICE_SET_IRQS, and the handle devices use to
//! signal them.
//!
//! Semantics follow `VFIO_DEVICE_SET_IRQS` (linux/vfio.h): per index, ACTION_TRIGGER with
//! DATA_EVENTFD binds (fd) or unbinds (-1) a vector's eventfd; DATA_NONE/DATA_BOOL trigger from the
//! client side ("loopback"); ACTION_MASK/ACTION_UNMASK mask and unmask maskable indices;
//! ACTION_TRIGGER|DATA_NONE with count 0 disables the whole index.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

/// What happened to a signal a device raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The eventfd was written: the client will see the interrupt.
    Delivered,
    /// No eventfd is bound to the vector (or no client is attached): the device should keep it
    /// pending.
    NotBound,
    /// The vector is masked through SET_IRQS: the device should keep it pending.
    Masked,
}

/// Errors of interrupt handling, each with the errno the client receives.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The interrupt index does not exist.
    #[error("Interrupt index {0} does not exist")]
    BadIndex(u32),
    /// start/count select vectors past the index's count.
    #[error("Vectors {start}..{start}+{count} exceed the {max} vectors of index {index}")]
    BadRange {
        /// Interrupt index.
        index: u32,
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
        /// Vectors the index has.
        max: u32,
    },
    /// The action or data type is not valid for this index.
    #[error("Invalid SET_IRQS request: {0}")]
    Invalid(&'static str),
    /// Writing the eventfd failed.
    #[error("Signalling eventfd of index {index} vector {vector} failed")]
    Write {
        /// Interrupt index.
        index: u32,
        /// Vector.
        vector: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl IrqError {
    /// The errno for an error reply.
    pub fn errno(&self) -> i32 {
        match self {
            IrqError::Write { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EINVAL,
        }
    }
}

#[derive(Debug, Default)]
struct Vector {
    trigger: Option<File>,
    masked: bool,
}

#[derive(Debug, Default)]
struct Index {
    vectors: Vec<Vector>,
    /// INTx only: the client's unmask (resample) eventfd.
    unmask: Option<File>,
}

#[derive(Debug, Default)]
struct Table {
    indices: Vec<Index>,
}

/// Shared handle to one client's interrupt eventfds. Cloning is cheap; device threads may signal
/// concurrently with the server updating bindings.
#[derive(Debug, Clone, Default)]
pub struct Interrupts {
    inner: Arc<Mutex<Table>>,
}

impl Interrupts {
    /// A table with `counts[i]` vectors for index `i`, nothing bound.
    pub fn new(counts: &[u32]) -> Self {
        let indices = counts
            .iter()
            .map(|&n| Index {
                vectors: (0..n).map(|_| Vector::default()).collect(),
                unmask: None,
            })
            .collect();
        Interrupts {
            inner: Arc::new(Mutex::new(Table { indices })),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table inconsistent (every update is a
        // single assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Raise `vector` of `index` towards the client.
    pub fn signal(&self, index: u32, vector: u32) -> Result<Signal, IrqError> {
        let mut t = self.table();
        let idx = t
            .indices
            .get_mut(index as usize)
            .ok_or(IrqError::BadIndex(index))?;
        let max = idx.vectors.len() as u32;
        let v = idx
            .vectors
            .get_mut(vector as usize)
            .ok_or(IrqError::BadRange {
                index,
                start: vector,
                count: 1,
                max,
            })?;
        if v.masked {
            return Ok(Signal::Masked);
        }
        match v.trigger.as_mut() {
            None => Ok(Signal::NotBound),
            Some(f) => {
                f.write_all(&1u64.to_ne_bytes())
                    .map_err(|source| IrqError::Write {
                        index,
                        vector,
                        source,
                    })?;
                Ok(Signal::Delivered)
            }
        }
    }

    /// Raise an automasked interrupt (INTx, `VFIO_IRQ_INFO_AUTOMASKED`): if the vector is not
    /// masked, signal it and mask it; the client unmasks it (SET_IRQS ACTION_UNMASK) once it
    /// has serviced the interrupt, and a line still asserted then is signalled again.
    pub fn signal_automasked(&self, index: u32, vector: u32) -> Result<Signal, IrqError> {
        let r = self.signal(index, vector)?;
        if r == Signal::Delivered {
            let mut t = self.table();
            if let Some(v) = t
                .indices
                .get_mut(index as usize)
                .and_then(|i| i.vectors.get_mut(vector as usize))
            {
                v.masked = true;
            }
        }
        Ok(r)
    }

    /// Whether `vector` of `index` has an eventfd bound.
    pub fn is_bound(&self, index: u32, vector: u32) -> bool {
        let t = self.table();
        t.indices
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.trigger.is_some())
    }

    /// Whether `vector` of `index` is masked through SET_IRQS.
    pub fn is_masked(&self, index: u32, vector: u32) -> bool {
        let t = self.table();
        t.indices
            .get(index as usize)
            .and_then(|i| i.vectors.get(vector as usize))
            .is_some_and(|v| v.masked)
    }

    fn check_range(&self, index: u32, start: u32, count: u32) -> Result<(), IrqError> {
        let t = self.table();
        let idx = t
            .indices
            .get(index as usize)
            .ok_or(IrqError::BadIndex(index))?;
        let max = idx.vectors.len() as u32;
        if start.checked_add(count).is_none_or(|end| end > max) {
            return Err(IrqError::BadRange {
                index,
                start,
                count,
                max,
            });
        }
        Ok(())
    }

    /// Bind (Some) or unbind (None) the trigger eventfds of vectors `start..start+fds.len()`.
    pub(crate) fn set_triggers(
        &self,
        index: u32,
        start: u32,
        fds: Vec<Option<OwnedFd>>,
    ) -> Result<(), IrqError> {
        self.check_range(index, start, fds.len() as u32)?;
        let mut t = self.table();
        if let Some(idx) = t.indices.get_mut(index as usize) {
            for (i, fd) in fds.into_iter().enumerate() {
                if let Some(v) = idx.vectors.get_mut(start as usize + i) {
                    v.trigger = fd.map(File::from);
                }
            }
        }
        Ok(())
    }

    /// Set the unmask eventfd of an index (INTx resampling).
    pub(crate) fn set_unmask_fd(&self, index: u32, fd: Option<OwnedFd>) -> Result<(), IrqError> {
        self.check_range(index, 0, 1)?;
        let mut t = self.table();
        if let Some(idx) = t.indices.get_mut(index as usize) {
            idx.unmask = fd.map(File::from);
        }
        Ok(())
    }

    /// Mask or unmask vectors `start..start+count` (or those whose flag in `which` is set).
    pub(crate) fn set_masked(
        &self,
        index: u32,
        start: u32,
        count: u32,
        which: Option<&[bool]>,
        masked: bool,
    ) -> Result<(), IrqError> {
        self.check_range(index, start, count)?;
        let mut t = self.table();
        if let Some(idx) = t.indices.get_mut(index as usize) {
            for i in 0..count {
                if which.is_none_or(|w| w.get(i as usize).copied().unwrap_or(false)) {
                    if let Some(v) = idx.vectors.get_mut((start + i) as usize) {
                        v.masked = masked;
                    }
                }
            }
        }
        Ok(())
    }

    /// Disable a whole index: unbind every eventfd and clear masks.
    pub(crate) fn disable(&self, index: u32) -> Result<(), IrqError> {
        let mut t = self.table();
        let idx = t
            .indices
            .get_mut(index as usize)
            .ok_or(IrqError::BadIndex(index))?;
        for v in &mut idx.vectors {
            *v = Vector::default();
        }
        idx.unmask = None;
        Ok(())
    }

    /// Drop every eventfd (the client went away).
    pub(crate) fn clear(&self) {
        let mut t = self.table();
        for idx in &mut t.indices {
            for v in &mut idx.vectors {
                *v = Vector::default();
            }
            idx.unmask = None;
        }
    }

    /// Number of vectors of `index` that have an eventfd bound (for diagnostics and tests).
    pub fn bound_count(&self, index: u32) -> usize {
        let t = self.table();
        t.indices.get(index as usize).map_or(0, |i| {
            i.vectors.iter().filter(|v| v.trigger.is_some()).count()
        })
    }
}
