//! The requests whose replies take more than a line: VERSION (negotiation and the capabilities
//! we answer with), region bounds, DEVICE_GET_REGION_INFO (with its sparse-mmap capability and
//! the region's fd) and DEVICE_SET_IRQS (eventfds and their triggers).

use std::os::fd::OwnedFd;

use super::{Failure, ReplyFds, Session};
use crate::device::{lock, ClientLink};
use crate::proto::{self, Writer};
use crate::server::options::MIN_DATA_XFER_SIZE;
use crate::sys;

impl Session {
    pub(super) fn version(
        &mut self,
        major: u16,
        minor: u16,
        caps: &serde_json::Value,
        w: &mut Writer,
    ) -> Result<ReplyFds, Failure> {
        if self.negotiated {
            // The spec has VERSION as the first message only; renegotiating limits under a
            // live session (a smaller max_data_xfer_size with replies in flight) is refused.
            return Err(Failure::new(
                libc::EINVAL,
                "VERSION already negotiated on this connection; nothing renegotiated",
            ));
        }
        if major != proto::VERSION_MAJOR {
            return Err(Failure::new(
                libc::ENOTSUP,
                format!("protocol major {major} unsupported"),
            ));
        }
        let c = &caps["capabilities"];
        let mut client_max_xfer = self.opts.max_data_xfer_size;
        match &c["max_data_xfer_size"] {
            serde_json::Value::Null => {}
            v => match v.as_u64() {
                Some(x) if x >= MIN_DATA_XFER_SIZE => {
                    client_max_xfer = usize::try_from(x)
                        .unwrap_or(usize::MAX)
                        .min(self.opts.max_data_xfer_size);
                }
                _ => {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!(
                            "client max_data_xfer_size {v} is not a number of at least \
                             {MIN_DATA_XFER_SIZE}"
                        ),
                    ))
                }
            },
        }
        if let Some(p) = c["pgsizes"].as_u64() {
            if p & 4096 == 0 {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!("client page sizes {p:#x} exclude 4 KiB"),
                ));
            }
        }
        log::info!(
            "{}: client speaks {major}.{minor}, caps {caps}",
            self.opts.name
        );
        let ours = serde_json::json!({
            "capabilities": {
                "max_msg_fds": self.opts.max_msg_fds,
                "max_data_xfer_size": self.opts.max_data_xfer_size,
                "pgsizes": 4096,
                "max_dma_maps": crate::dma::advertised_max_dma_maps(c["max_dma_maps"].as_u64()),
                "write_multiple": true,
            }
        });
        w.u16(proto::VERSION_MAJOR)
            .u16(proto::VERSION_MINOR)
            .bytes(ours.to_string().as_bytes())
            .bytes(&[0]);
        self.client_max_xfer = client_max_xfer;
        self.negotiated = true;
        lock(&self.device).attach(ClientLink {
            irqs: self.irqs.clone(),
            dma: self.dma.clone(),
        });
        Ok(Vec::new())
    }

    pub(super) fn check_region(&self, index: u32, offset: u64, len: usize) -> Result<(), Failure> {
        let size = *usize::try_from(index)
            .ok()
            .and_then(|i| self.region_sizes.get(i))
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no region {index}")))?;
        let end = offset.checked_add(len as u64);
        if len == 0 || end.is_none_or(|e| e > size) {
            return Err(Failure::new(
                libc::EINVAL,
                format!("region {index} access {offset:#x}+{len} outside its {size:#x} bytes"),
            ));
        }
        Ok(())
    }

    pub(super) fn region_info(
        &self,
        argsz: u32,
        index: u32,
        w: &mut Writer,
    ) -> Result<ReplyFds, Failure> {
        let info = lock(&self.device)
            .region_info(index)
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no region {index}")))?;
        let mut flags = 0;
        if info.flags.read {
            flags |= proto::REGION_INFO_FLAG_READ;
        }
        if info.flags.write {
            flags |= proto::REGION_INFO_FLAG_WRITE;
        }
        // The sparse-mmap capability: header (id, version, next) + nr_areas, reserved + areas.
        let mut cap = Writer::new();
        let mut file_offset = 0;
        let mut fds = Vec::new();
        if let (true, Some(m)) = (info.flags.mmap, info.mmap.as_ref()) {
            flags |= proto::REGION_INFO_FLAG_MMAP | proto::REGION_INFO_FLAG_CAPS;
            cap.u16(proto::REGION_INFO_CAP_SPARSE_MMAP).u16(1).u32(0);
            cap.u32(m.areas.len() as u32).u32(0);
            for a in &m.areas {
                cap.u64(a.offset).u64(a.size);
            }
            file_offset = m.file_offset;
            fds.push(m.fd.clone());
        }
        let cap = cap.finish();
        let full = 32 + cap.len() as u32;
        // cap_offset must point inside the structure the client will read (QEMU checks it even
        // on the short reply that only tells it how much room to allocate).
        let cap_offset = if cap.is_empty() { 0 } else { 32 };
        w.u32(full)
            .u32(flags)
            .u32(index)
            .u32(cap_offset)
            .u64(info.size)
            .u64(file_offset);
        if argsz >= full {
            w.bytes(&cap);
        } else {
            // Short reply: the client retries with argsz = full; the fd comes with that reply.
            fds.clear();
        }
        Ok(fds)
    }

    pub(super) fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        bools: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Failure> {
        let info = lock(&self.device)
            .irq_info(index)
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no interrupt index {index}")))?;
        let data = flags
            & (proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_DATA_EVENTFD);
        let action = flags
            & (proto::IRQ_SET_ACTION_MASK
                | proto::IRQ_SET_ACTION_UNMASK
                | proto::IRQ_SET_ACTION_TRIGGER);
        log::debug!(
            "{}: SET_IRQS index={index} start={start} count={count} flags={flags:#x} fds={}",
            self.opts.name,
            fds.len()
        );
        // Disable the whole index (VFIO: DATA_NONE | ACTION_TRIGGER with count 0).
        if data == proto::IRQ_SET_DATA_NONE
            && action == proto::IRQ_SET_ACTION_TRIGGER
            && count == 0
            && start == 0
        {
            self.irqs.disable(index)?;
            return Ok(());
        }
        if start.checked_add(count).is_none_or(|end| end > info.count) || count == 0 {
            // (count 0 is only the disable form above; like libvfio-user, with start 0.)
            return Err(Failure::new(
                libc::EINVAL,
                format!("vectors {start}+{count} outside 0..{}", info.count),
            ));
        }
        let maskable = info.flags & proto::IRQ_INFO_MASKABLE != 0;
        match (data, action) {
            (proto::IRQ_SET_DATA_EVENTFD, proto::IRQ_SET_ACTION_TRIGGER) => {
                let set: Vec<Option<OwnedFd>> = if fds.is_empty() {
                    // QEMU de-assigns a run of vectors by sending it without fds.
                    (0..count).map(|_| None).collect()
                } else if fds.len() == count as usize {
                    if let Some(bad) = fds.iter().position(|f| !sys::is_eventfd(f)) {
                        return Err(Failure::new(
                            libc::EINVAL,
                            format!("fd {bad} is not an eventfd"),
                        ));
                    }
                    fds.into_iter().map(Some).collect()
                } else {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!("{} fds for {count} vectors", fds.len()),
                    ));
                };
                self.irqs.set_triggers(index, start, set)?;
            }
            (proto::IRQ_SET_DATA_EVENTFD, proto::IRQ_SET_ACTION_UNMASK) => {
                if !maskable || count != 1 || fds.len() > 1 {
                    return Err(Failure::new(
                        libc::EINVAL,
                        "unmask eventfd needs a maskable index, one vector, at most one fd",
                    ));
                }
                let fd = fds.into_iter().next();
                if fd.as_ref().is_some_and(|f| !sys::is_eventfd(f)) {
                    return Err(Failure::new(libc::EINVAL, "unmask fd is not an eventfd"));
                }
                self.irqs.set_unmask_fd(index, fd)?;
            }
            (proto::IRQ_SET_DATA_EVENTFD, _) => {
                return Err(Failure::new(
                    libc::ENOTSUP,
                    "mask eventfds are not supported",
                ));
            }
            (_, proto::IRQ_SET_ACTION_TRIGGER) => {
                // Loopback trigger from the client.
                for v in 0..count {
                    if data == proto::IRQ_SET_DATA_BOOL
                        && bools.get(v as usize).copied().unwrap_or(0) == 0
                    {
                        continue;
                    }
                    self.irqs.signal(index, start + v)?;
                }
            }
            (_, act) => {
                if !maskable {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!("interrupt index {index} is not maskable"),
                    ));
                }
                let which: Option<Vec<bool>> = (data == proto::IRQ_SET_DATA_BOOL)
                    .then(|| bools.iter().map(|&b| b != 0).collect());
                self.irqs.set_masked(
                    index,
                    start,
                    count,
                    which.as_deref(),
                    act == proto::IRQ_SET_ACTION_MASK,
                )?;
            }
        }
        Ok(())
    }
}
