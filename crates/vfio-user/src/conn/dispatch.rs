//! Executing one decoded request: [`Session::dispatch`], one match over [`Request`] that calls
//! the device, the DMA map or the interrupts and appends the reply payload.

use super::{Failure, ReplyFds, Session};
use crate::device::lock;
use crate::proto::{self, Request, Writer};
use crate::reader::{FdLoss, Frame};
use crate::server::options::PAGE_SIZE;

impl Session {
    /// Execute one request; its reply payload is appended to `w`, and the fds it carries are
    /// returned.
    pub(super) fn dispatch(
        &mut self,
        frame: Frame<'_>,
        w: &mut Writer,
    ) -> Result<ReplyFds, Failure> {
        let Frame {
            header,
            payload,
            mut fds,
            fds_truncated,
            received: _,
        } = frame;
        // Whatever fds did arrive are dropped (closed) with `fds` on every error path.
        match fds_truncated {
            None => {}
            Some(FdLoss::TableFull) => {
                return Err(Failure::new(
                    libc::EMFILE,
                    "fd table full (RLIMIT_NOFILE): control data truncated (MSG_CTRUNC), the \
                     fds sent with this message did not all arrive; those that did were closed",
                ))
            }
            Some(FdLoss::TooMany) => {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!(
                        "control data truncated (MSG_CTRUNC): more than {} fds in one message; \
                         those that arrived were closed",
                        self.opts.max_msg_fds
                    ),
                ))
            }
            Some(FdLoss::Trickled) => {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!(
                        "fds trickled with an incomplete frame beyond {} held; they were closed",
                        2 * self.opts.max_msg_fds
                    ),
                ))
            }
        }
        let req = proto::decode(&header, payload, &self.limits())?;
        if !self.negotiated && !matches!(req, Request::Version { .. }) {
            return Err(Failure::new(
                libc::EINVAL,
                "VERSION must be negotiated first",
            ));
        }
        // Commands that carry no fds must not come with any (they would be closed silently).
        let fd_ok = match &req {
            Request::DmaMap { .. } => fds.len() <= 1,
            Request::SetIrqs { flags, .. } => {
                fds.is_empty() || flags & proto::IRQ_SET_DATA_EVENTFD != 0
            }
            _ => fds.is_empty(),
        };
        if !fd_ok {
            return Err(Failure::new(
                libc::EINVAL,
                format!("unexpected {} fds", fds.len()),
            ));
        }
        match req {
            Request::Version { major, minor, caps } => self.version(major, minor, &caps, w),
            Request::DmaMap {
                flags,
                offset,
                iova,
                size,
            } => {
                let fd = fds.pop().map(|f| (f, offset));
                let backed = fd.is_some();
                self.dma.map(iova, size, flags, fd)?;
                lock(&self.device).dma_mapped(&crate::dma::MappingInfo {
                    iova,
                    size,
                    prot: flags,
                    backed,
                });
                log::debug!(
                    "{}: DMA map {iova:#x}+{size:#x} prot={flags} fd={backed}",
                    self.opts.name
                );
                Ok(Vec::new())
            }
            Request::DmaUnmap {
                argsz,
                flags,
                iova,
                size,
            } => {
                let removed = if flags & proto::DMA_UNMAP_FLAG_ALL != 0 {
                    self.dma.unmap_all()
                } else {
                    // As the kernel (vfio_dma_do_unmap): a page-aligned, non-empty range.
                    if size == 0 || iova % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
                        return Err(Failure::new(
                            libc::EINVAL,
                            format!("DMA unmap {iova:#x}+{size:#x} is empty or not page aligned"),
                        ));
                    }
                    self.dma.unmap(iova, size)?
                };
                lock(&self.device).dma_unmapped(&removed);
                log::debug!(
                    "{}: DMA unmap {iova:#x}+{size:#x}: {} mappings",
                    self.opts.name,
                    removed.len()
                );
                w.u32(argsz.min(24)).u32(flags).u64(iova).u64(size);
                Ok(Vec::new())
            }
            Request::GetInfo { .. } => {
                let dev = lock(&self.device);
                let nregions = (0..64)
                    .take_while(|&i| dev.region_info(i).is_some())
                    .count() as u32;
                let nirqs = (0..64).take_while(|&i| dev.irq_info(i).is_some()).count() as u32;
                w.u32(16).u32(dev.device_flags()).u32(nregions).u32(nirqs);
                Ok(Vec::new())
            }
            Request::GetRegionInfo { argsz, index } => self.region_info(argsz, index, w),
            Request::GetIrqInfo { index, .. } => {
                let info = lock(&self.device).irq_info(index).ok_or_else(|| {
                    Failure::new(libc::EINVAL, format!("no interrupt index {index}"))
                })?;
                w.u32(16).u32(info.flags).u32(index).u32(info.count);
                Ok(Vec::new())
            }
            Request::SetIrqs {
                flags,
                index,
                start,
                count,
                bools,
            } => {
                self.set_irqs(flags, index, start, count, &bools, fds)?;
                lock(&self.device).irqs_changed(index);
                Ok(Vec::new())
            }
            Request::RegionRead {
                offset,
                region,
                count,
            } => {
                if count as usize > self.client_max_xfer {
                    return Err(Failure::new(
                        libc::E2BIG,
                        "read larger than the client accepts",
                    ));
                }
                self.check_region(region, offset, count as usize)?;
                // The device reads straight into the reply.
                w.u64(offset).u32(region).u32(count);
                lock(&self.device).region_read(region, offset, w.zeroed(count as usize))?;
                Ok(Vec::new())
            }
            Request::RegionWrite {
                offset,
                region,
                data,
            } => {
                self.check_region(region, offset, data.len())?;
                lock(&self.device).region_write(region, offset, &data)?;
                w.u64(offset).u32(region).u32(data.len() as u32);
                Ok(Vec::new())
            }
            Request::RegionWriteMulti { writes } => {
                // Every entry is checked before any is applied: a bad entry fails the whole
                // message and leaves the device untouched.
                for wr in &writes {
                    self.check_region(wr.region, wr.offset, wr.data.len())?;
                }
                let mut done = 0u64;
                for wr in &writes {
                    lock(&self.device).region_write(wr.region, wr.offset, &wr.data)?;
                    done += 1;
                }
                w.u64(done);
                Ok(Vec::new())
            }
            Request::DeviceReset => {
                log::info!("{}: DEVICE_RESET from client", self.opts.name);
                lock(&self.device).reset()?;
                Ok(Vec::new())
            }
        }
    }
}
