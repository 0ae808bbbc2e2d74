//! Protocol tests over a real Unix socket: the rust-vmm `vfio_user::Client` as an independent
//! peer, plus raw frames for malformed input. Each malformed case asserts the errno and that the
//! next valid request on the same connection still works.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcisim_vfio_user::dma::MappingInfo;
use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};
use pcisim_vfio_user::{
    irq_index, region, ClientLink, Device, DeviceError, IrqInfo, RegionFlags, RegionInfo,
    RegionMmap, Server, ServerOptions, SparseArea,
};
use vmm_sys_util::eventfd::EventFd;

/// A minimal device: BAR0 is 4 KiB of plain storage, BAR2 is a 64 KiB memfd offered for mmap,
/// BAR4 is 2 MiB of plain storage (room for maximum-length accesses), config space is 256 bytes
/// of storage; 4 MSI-X vectors. It records the DMA map it was told about.
struct FakeDevice {
    bar0: Vec<u8>,
    bar4: Vec<u8>,
    config: Vec<u8>,
    maps: Arc<Mutex<Vec<MappingInfo>>>,
    bar2: Arc<OwnedFd>,
    link: Option<ClientLink>,
    resets: Arc<AtomicU32>,
    detaches: Arc<AtomicU32>,
}

impl Device for FakeDevice {
    fn device_flags(&self) -> u32 {
        proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = RegionFlags {
            read: true,
            write: true,
            mmap: false,
        };
        match index {
            0 => Some(RegionInfo {
                size: 4096,
                flags: rw,
                mmap: None,
            }),
            2 => Some(RegionInfo {
                size: 65536,
                flags: RegionFlags { mmap: true, ..rw },
                mmap: Some(RegionMmap {
                    fd: self.bar2.clone(),
                    file_offset: 0,
                    areas: vec![SparseArea {
                        offset: 0,
                        size: 65536,
                    }],
                }),
            }),
            4 => Some(RegionInfo {
                size: BAR4_SIZE,
                flags: rw,
                mmap: None,
            }),
            7 => Some(RegionInfo {
                size: 256,
                flags: rw,
                mmap: None,
            }),
            i if i < region::COUNT => Some(RegionInfo::default()),
            _ => None,
        }
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        match index {
            irq_index::MSIX => Some(IrqInfo {
                count: 4,
                flags: proto::IRQ_INFO_EVENTFD | proto::IRQ_INFO_NORESIZE,
            }),
            irq_index::INTX => Some(IrqInfo {
                count: 1,
                flags: proto::IRQ_INFO_EVENTFD
                    | proto::IRQ_INFO_MASKABLE
                    | proto::IRQ_INFO_AUTOMASKED,
            }),
            i if i < irq_index::COUNT => Some(IrqInfo {
                count: 1,
                flags: proto::IRQ_INFO_EVENTFD,
            }),
            _ => None,
        }
    }
    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let store = match index {
            0 => &self.bar0,
            4 => &self.bar4,
            7 => &self.config,
            _ => {
                return Err(DeviceError::OutOfRange {
                    region: index,
                    offset,
                    len: buf.len(),
                })
            }
        };
        let s = store
            .get(offset as usize..offset as usize + buf.len())
            .ok_or(DeviceError::OutOfRange {
                region: index,
                offset,
                len: buf.len(),
            })?;
        buf.copy_from_slice(s);
        // Reading BAR0 offset 0x100 raises MSI-X vector 1: lets tests observe delivery.
        if index == 0 && offset == 0x100 {
            if let Some(l) = &self.link {
                let _ = l.irqs.signal(irq_index::MSIX, 1);
            }
        }
        Ok(())
    }
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let store = match index {
            0 => &mut self.bar0,
            4 => &mut self.bar4,
            7 => &mut self.config,
            _ => {
                return Err(DeviceError::OutOfRange {
                    region: index,
                    offset,
                    len: data.len(),
                })
            }
        };
        let s = store
            .get_mut(offset as usize..offset as usize + data.len())
            .ok_or(DeviceError::OutOfRange {
                region: index,
                offset,
                len: data.len(),
            })?;
        s.copy_from_slice(data);
        // Writing BAR0 offset 0x200 makes the device DMA the written bytes to IOVA 0x10000.
        if index == 0 && offset == 0x200 {
            if let Some(l) = &self.link {
                let _ = l.dma.write(0x10000, data);
            }
        }
        Ok(())
    }
    fn attach(&mut self, link: ClientLink) {
        self.link = Some(link);
    }
    fn detach(&mut self) {
        self.link = None;
        self.maps.lock().unwrap().clear();
        self.detaches.fetch_add(1, Ordering::SeqCst);
    }
    fn dma_mapped(&mut self, m: &MappingInfo) {
        self.maps.lock().unwrap().push(*m);
    }
    fn dma_unmapped(&mut self, removed: &[MappingInfo]) {
        self.maps.lock().unwrap().retain(|m| !removed.contains(m));
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.bar0.iter_mut().for_each(|b| *b = 0);
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Harness {
    path: PathBuf,
    _dir: vmm_sys_util::tempdir::TempDir,
    resets: Arc<AtomicU32>,
    detaches: Arc<AtomicU32>,
    /// The DMA map as the device was told about it (DMA_MAP / DMA_UNMAP hooks).
    maps: Arc<Mutex<Vec<MappingInfo>>>,
}

const BAR4_SIZE: u64 = 2 << 20;

fn memfd(len: u64) -> OwnedFd {
    let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    f.set_len(len).unwrap();
    OwnedFd::from(f)
}

fn start() -> Harness {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/pcisim-proto").unwrap();
    let path = dir.as_path().join("dev.sock");
    let resets = Arc::new(AtomicU32::new(0));
    let detaches = Arc::new(AtomicU32::new(0));
    let maps = Arc::new(Mutex::new(Vec::new()));
    let dev = FakeDevice {
        bar0: vec![0; 4096],
        bar4: vec![0; BAR4_SIZE as usize],
        config: (0..=255).collect(),
        maps: maps.clone(),
        bar2: Arc::new(memfd(65536)),
        link: None,
        resets: resets.clone(),
        detaches: detaches.clone(),
    };
    let server = Server::bind(&path, Arc::new(Mutex::new(dev)), ServerOptions::default()).unwrap();
    std::thread::spawn(move || server.run());
    Harness {
        path,
        _dir: dir,
        resets,
        detaches,
        maps,
    }
}

// ---- a raw client -----------------------------------------------------------------------

struct Raw {
    s: UnixStream,
    id: u16,
}

impl Raw {
    fn connect(h: &Harness) -> Raw {
        let s = UnixStream::connect(&h.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { s, id: 100 }
    }

    fn negotiated(h: &Harness) -> Raw {
        let mut r = Raw::connect(h);
        let mut p = proto::Writer::new();
        p.u16(0)
            .u16(0)
            .bytes(br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#)
            .bytes(&[0]);
        let (hdr, body) = r.call(Command::Version as u16, &p.finish(), &[]);
        assert_eq!(hdr.flags & proto::FLAG_ERROR, 0);
        assert_eq!(&body[0..4], &[0, 0, 0, 0]);
        let json: serde_json::Value = serde_json::from_slice(&body[4..body.len() - 1]).unwrap();
        assert_eq!(json["capabilities"]["write_multiple"], true);
        r
    }

    fn send_raw(&mut self, bytes: &[u8], fds: &[i32]) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        if fds.is_empty() {
            self.s.write_all(bytes).unwrap();
        } else {
            self.s.send_with_fds(&[bytes], fds).unwrap();
        }
    }

    fn frame(&mut self, cmd: u16, payload: &[u8], flags: u32) -> (Header, Vec<u8>) {
        self.id = self.id.wrapping_add(1);
        let h = Header {
            id: self.id,
            command: cmd,
            size: (HEADER_SIZE + payload.len()) as u32,
            flags,
            error: 0,
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        (h, v)
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        let mut hb = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut hb).unwrap();
        let h = Header::parse(&hb);
        let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
        self.s.read_exact(&mut body).unwrap();
        (h, body)
    }

    fn call(&mut self, cmd: u16, payload: &[u8], fds: &[i32]) -> (Header, Vec<u8>) {
        let (h, v) = self.frame(cmd, payload, 0);
        self.send_raw(&v, fds);
        let (rh, body) = self.recv();
        assert_eq!(rh.id, h.id, "reply id matches request id");
        assert_eq!(rh.flags & proto::FLAG_TYPE_MASK, proto::FLAG_TYPE_REPLY);
        (rh, body)
    }

    fn errno_of(&mut self, cmd: u16, payload: &[u8], fds: &[i32]) -> u32 {
        let (h, _) = self.call(cmd, payload, fds);
        assert_ne!(
            h.flags & proto::FLAG_ERROR,
            0,
            "expected an error reply for command {cmd}"
        );
        h.error
    }

    fn read(&mut self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, u32> {
        let mut p = proto::Writer::new();
        p.u64(offset).u32(region).u32(count);
        let (h, body) = self.call(Command::RegionRead as u16, &p.finish(), &[]);
        if h.flags & proto::FLAG_ERROR != 0 {
            return Err(h.error);
        }
        Ok(body[16..].to_vec())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), u32> {
        let mut p = proto::Writer::new();
        p.u64(offset).u32(region).u32(data.len() as u32).bytes(data);
        let (h, _) = self.call(Command::RegionWrite as u16, &p.finish(), &[]);
        if h.flags & proto::FLAG_ERROR != 0 {
            return Err(h.error);
        }
        Ok(())
    }

    /// The connection still serves: a config read returns the device's bytes.
    fn assert_alive(&mut self) {
        assert_eq!(self.read(region::CONFIG, 4, 4).unwrap(), vec![4, 5, 6, 7]);
    }
}

const EINVAL: u32 = libc::EINVAL as u32;

// ---- the independent client --------------------------------------------------------------

#[test]
fn test_rust_vmm_client_discovers_regions_and_accesses_them() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    let bar2 = c.region(2).unwrap();
    assert_eq!(bar2.size, 65536);
    assert!(
        bar2.file_offset.is_some(),
        "mmap-able region comes with an fd"
    );
    assert_eq!(bar2.sparse_areas.len(), 1);
    assert_eq!(bar2.sparse_areas[0].size, 65536);
    assert_eq!(c.region(7).unwrap().size, 256);

    c.region_write(0, 0x40, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 0x40, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    let info = c.get_irq_info(irq_index::MSIX).unwrap();
    assert_eq!(info.count, 4);
}

#[test]
fn test_rust_vmm_client_dma_map_reaches_device_and_unmap_removes_it() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    let mem = memfd(0x20000);
    c.dma_map(0, 0x10000, 0x10000, mem.as_raw_fd()).unwrap();
    // The device DMAs into client memory; the client sees it through its own fd.
    c.region_write(0, 0x200, b"dma!").unwrap();
    let f = std::fs::File::from(mem.try_clone().unwrap());
    let mut got = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0).unwrap();
    assert_eq!(&got, b"dma!");
    c.dma_unmap(0x10000, 0x10000).unwrap();
    // After the unmap the device's DMA fails and client memory stays untouched.
    c.region_write(0, 0x200, b"late").unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0).unwrap();
    assert_eq!(&got, b"dma!");
}

#[test]
fn test_rust_vmm_client_msix_eventfd_is_signalled() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    c.set_irqs(
        irq_index::MSIX,
        proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
        1,
        1,
        &[efd.as_raw_fd()],
    )
    .unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 0x100, &mut b).unwrap();
    assert_eq!(efd.read().unwrap(), 1);
}

#[test]
fn test_rust_vmm_client_reset_reaches_device() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    c.region_write(0, 0, &[9]).unwrap();
    c.reset().unwrap();
    let mut b = [0u8; 1];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [0]);
    assert_eq!(h.resets.load(Ordering::SeqCst), 1);
}

#[test]
fn test_disconnect_releases_client_state_and_next_client_is_served() {
    let h = start();
    {
        let mut c = vfio_user::Client::new(&h.path).unwrap();
        let mem = memfd(0x10000);
        c.dma_map(0, 0x10000, 0x10000, mem.as_raw_fd()).unwrap();
        c.region_write(0, 0x40, &[7]).unwrap();
        c.shutdown().unwrap();
    }
    // Device state survives the client; the next client is accepted on the same socket.
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    let mut b = [0u8; 1];
    c.region_read(0, 0x40, &mut b).unwrap();
    assert_eq!(b, [7]);
    assert_eq!(h.detaches.load(Ordering::SeqCst), 1);
}

// ---- raw frames and malformed input ------------------------------------------------------

#[test]
fn test_connection_without_version_leaves_device_untouched() {
    let h = start();
    drop(UnixStream::connect(&h.path).unwrap());
    let mut r = Raw::negotiated(&h);
    r.assert_alive();
    assert_eq!(
        h.detaches.load(Ordering::SeqCst),
        0,
        "a probe connection is not a client"
    );
}

#[test]
fn test_request_before_version_is_einval() {
    let h = start();
    let mut r = Raw::connect(&h);
    let mut p = proto::Writer::new();
    p.u32(16).u32(0).u32(0).u32(0);
    assert_eq!(
        r.errno_of(Command::DeviceGetInfo as u16, &p.finish(), &[]),
        EINVAL
    );
}

#[test]
fn test_get_info_reports_pci_reset_and_counts() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mut p = proto::Writer::new();
    p.u32(16).u32(0).u32(0).u32(0);
    let (hd, body) = r.call(Command::DeviceGetInfo as u16, &p.finish(), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    let flags = u32::from_le_bytes(body[4..8].try_into().unwrap());
    assert_eq!(flags, proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET);
    assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 9);
    assert_eq!(u32::from_le_bytes(body[12..16].try_into().unwrap()), 5);
}

#[test]
fn test_region_info_short_argsz_gets_size_then_caps_and_fd() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mut p = proto::Writer::new();
    p.u32(32).u32(0).u32(2).u32(0).u64(0).u64(0);
    let (_, body) = r.call(Command::DeviceGetRegionInfo as u16, &p.finish(), &[]);
    let argsz = u32::from_le_bytes(body[0..4].try_into().unwrap());
    assert_eq!(body.len(), 32, "short reply carries only the structure");
    assert_eq!(argsz, 32 + 8 + 8 + 16);
    let cap_offset = u32::from_le_bytes(body[12..16].try_into().unwrap());
    assert_eq!(cap_offset, 32, "cap_offset stays inside the structure");
}

// ---- argsz-sized requests (the kernel's convention, libvfio-user's client) ------------------

impl Raw {
    /// Like `call`, also receiving the fds that came with the reply.
    fn call_fds(
        &mut self,
        cmd: u16,
        payload: &[u8],
        fds: &[i32],
    ) -> (Header, Vec<u8>, Vec<OwnedFd>) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (h, v) = self.frame(cmd, payload, 0);
        self.send_raw(&v, fds);
        // The server sends a reply (header, payload, fds) with one sendmsg: at most one fd here.
        let mut hb = [0u8; HEADER_SIZE];
        let (n, file) = self.s.recv_with_fd(&mut hb).unwrap();
        assert_eq!(n, HEADER_SIZE, "header in one read");
        let rh = Header::parse(&hb);
        assert_eq!(rh.id, h.id);
        let mut body = vec![0u8; rh.size as usize - HEADER_SIZE];
        self.s.read_exact(&mut body).unwrap();
        (rh, body, file.into_iter().map(OwnedFd::from).collect())
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The request padded with zeros to `len` bytes, as a client that sends argsz bytes does.
fn padded(mut v: Vec<u8>, len: usize) -> Vec<u8> {
    v.resize(len, 0);
    v
}

#[test]
fn test_region_info_argsz_sized_request_gets_caps_and_fd_like_libvfio_user_client() {
    // libvfio-user's sample client: a 32-byte request with argsz 32, then, told argsz = 64, a
    // request of 64 bytes with argsz 64. Before the argsz rule the second one was EINVAL.
    let h = start();
    let mut r = Raw::negotiated(&h);
    let (hd, body, fds) = r.call_fds(5, &region_info(32, 2), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert!(fds.is_empty(), "no fd with the short reply");
    let full = le32(&body, 0);
    assert_eq!(full, 64);
    let (hd, body, fds) = r.call_fds(5, &padded(region_info(full, 2), full as usize), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0, "errno {}", hd.error);
    assert_eq!(body.len(), 64, "structure + sparse-mmap capability");
    assert_eq!(le32(&body, 8), 2, "index");
    assert_ne!(le32(&body, 4) & proto::REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(le32(&body, 12), 32, "cap_offset");
    assert_eq!(
        u16::from_le_bytes(body[32..34].try_into().unwrap()),
        proto::REGION_INFO_CAP_SPARSE_MMAP
    );
    assert_eq!(fds.len(), 1, "the region's fd comes with the full reply");
    // The tail is ignored whatever it holds: garbage after the structure changes nothing.
    let mut garbage = region_info(full, 2);
    garbage.extend([0xff; 32]);
    let (hd, body2, fds) = r.call_fds(5, &garbage, &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert_eq!((body2, fds.len()), (body, 1));
    // Shorter than the structure stays EINVAL.
    assert_eq!(r.errno_of(5, &region_info(64, 2)[..31], &[]), EINVAL);
    r.assert_alive();
}

#[test]
fn test_get_info_and_irq_info_argsz_sized_requests_are_answered() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let (hd, body) = r.call(4, &padded(get_info(64), 64), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert_eq!(body.len(), 16, "the reply is the 16-byte structure");
    assert_eq!(
        (le32(&body, 0), le32(&body, 8), le32(&body, 12)),
        (16, 9, 5)
    );
    let (hd, body) = r.call(7, &padded(irq_info(48, irq_index::MSIX), 48), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert_eq!(body.len(), 16);
    assert_eq!((le32(&body, 8), le32(&body, 12)), (irq_index::MSIX, 4));
    assert_eq!(r.errno_of(4, &get_info(16)[..15], &[]), EINVAL);
    assert_eq!(r.errno_of(7, &irq_info(16, 0)[..15], &[]), EINVAL);
}

#[test]
fn test_dma_map_and_unmap_argsz_sized_requests_map_and_unmap() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mem = memfd(0x10000);
    let (hd, _) = r.call(
        2,
        &padded(dma_map(48, 3, 0, 0x10000, 0x10000), 48),
        &[mem.as_raw_fd()],
    );
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0, "errno {}", hd.error);
    assert_eq!(
        *h.maps.lock().unwrap(),
        vec![MappingInfo {
            iova: 0x10000,
            size: 0x10000,
            prot: 3,
            backed: true
        }]
    );
    // The mapping works: the device's DMA lands in the client's memory.
    r.write(0, 0x200, b"tail").unwrap();
    let f = std::fs::File::from(mem.try_clone().unwrap());
    let mut got = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0).unwrap();
    assert_eq!(&got, b"tail");
    let (hd, body) = r.call(3, &padded(dma_unmap(40, 0, 0x10000, 0x10000), 40), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0, "errno {}", hd.error);
    assert_eq!(body.len(), 24, "the reply echoes the 24-byte structure");
    assert_eq!(&body[4..], &dma_unmap(24, 0, 0x10000, 0x10000)[4..]);
    assert!(h.maps.lock().unwrap().is_empty());
    assert_eq!(
        r.errno_of(2, &dma_map(32, 3, 0, 0x10000, 0x1000)[..31], &[]),
        EINVAL
    );
    assert_eq!(
        r.errno_of(3, &dma_unmap(24, 0, 0x10000, 0x1000)[..23], &[]),
        EINVAL
    );
}

#[test]
fn test_set_irqs_argsz_sized_requests_bind_and_trigger() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    // DATA_EVENTFD with the ioctl's argsz (20 + 4 * count) and that many bytes: the in-band
    // fd array is ignored, the SCM_RIGHTS fd is bound.
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let p = set_irqs(24, EV_TRIGGER, irq_index::MSIX, 1, 1, &[0xff; 4]);
    let (hd, _) = r.call(8, &p, &[efd.as_raw_fd()]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0, "errno {}", hd.error);
    r.read(0, 0x100, 4).unwrap(); // raises MSI-X vector 1
    assert_eq!(efd.read().unwrap(), 1, "the bound eventfd was signalled");
    // DATA_BOOL: `count` bools, then a tail that is ignored (a 0 tail byte after a true bool
    // would otherwise have been read as vector 2's bool).
    let p = set_irqs(24, BOOL_TRIGGER, irq_index::MSIX, 1, 1, &[1, 0, 0, 0]);
    let (hd, _) = r.call(8, &p, &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0, "errno {}", hd.error);
    assert_eq!(efd.read().unwrap(), 1, "loopback trigger of vector 1");
    // Too few bools is still EINVAL.
    let p = set_irqs(22, BOOL_TRIGGER, irq_index::MSIX, 0, 3, &[1, 1]);
    assert_eq!(r.errno_of(8, &p, &[]), EINVAL);
}

#[test]
fn test_region_read_and_reset_keep_exact_lengths() {
    // No argsz: REGION_READ is exactly 16 bytes, DEVICE_RESET has no payload.
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mut p = rd(7, 4, 4);
    p.push(0);
    assert_eq!(r.errno_of(9, &p, &[]), EINVAL);
    assert_eq!(r.errno_of(13, &[0; 4], &[]), EINVAL);
    r.assert_alive();
}

#[test]
fn test_unknown_command_is_enosys_and_stream_stays_in_sync() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    assert_eq!(r.errno_of(77, &[1, 2, 3, 4, 5], &[]), libc::ENOSYS as u32);
    r.assert_alive();
}

#[test]
fn test_server_to_client_commands_from_client_are_refused() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    assert_eq!(
        r.errno_of(Command::DmaRead as u16, &[0; 16], &[]),
        libc::ENOTSUP as u32
    );
    assert_eq!(
        r.errno_of(Command::DeviceFeature as u16, &[0; 8], &[]),
        libc::ENOTTY as u32
    );
    r.assert_alive();
}

#[test]
fn test_truncated_payloads_are_einval_and_stream_stays_in_sync() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    for cmd in [
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetRegionInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
    ] {
        assert_eq!(r.errno_of(cmd as u16, &[0xff; 7], &[]), EINVAL, "{cmd:?}");
    }
    r.assert_alive();
}

#[test]
fn test_oversized_message_is_discarded_with_e2big() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let big = vec![0u8; (1 << 20) + 4096];
    let mut p = proto::Writer::new();
    p.u64(0).u32(0).u32(big.len() as u32).bytes(&big);
    assert_eq!(
        r.errno_of(Command::RegionWrite as u16, &p.finish(), &[]),
        libc::E2BIG as u32
    );
    r.assert_alive();
}

#[test]
fn test_size_smaller_than_header_gets_einval_and_closes() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let hd = Header {
        id: 5,
        command: 9,
        size: 8,
        flags: 0,
        error: 0,
    };
    r.send_raw(&hd.encode(), &[]);
    let (rh, _) = r.recv();
    assert_eq!(rh.error, EINVAL);
    let mut b = [0u8; 1];
    assert_eq!(
        r.s.read(&mut b).unwrap(),
        0,
        "server closed the unsalvageable stream"
    );
    // ...and keeps serving the next client.
    let mut r2 = Raw::negotiated(&h);
    r2.assert_alive();
}

#[test]
fn test_truncated_header_then_eof_does_not_kill_the_server() {
    let h = start();
    {
        let mut r = Raw::negotiated(&h);
        r.send_raw(&[1, 0, 9, 0, 32], &[]);
    }
    let mut r2 = Raw::negotiated(&h);
    r2.assert_alive();
}

#[test]
fn test_region_index_and_offset_out_of_range_are_einval() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    assert_eq!(r.read(42, 0, 4), Err(EINVAL));
    assert_eq!(r.read(region::CONFIG, 254, 4), Err(EINVAL));
    assert_eq!(r.read(region::CONFIG, u64::MAX - 1, 4), Err(EINVAL));
    assert_eq!(r.write(region::CONFIG, 256, &[1]), Err(EINVAL));
    assert_eq!(
        r.read(region::CONFIG, 0, 0),
        Err(EINVAL),
        "zero-length access"
    );
    r.assert_alive();
}

#[test]
fn test_oversized_read_is_e2big() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    assert_eq!(r.read(0, 0, (1 << 20) + 1), Err(libc::E2BIG as u32));
    r.assert_alive();
}

#[test]
fn test_fds_on_a_command_without_fds_are_einval() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let e = EventFd::new(0).unwrap();
    let mut p = proto::Writer::new();
    p.u32(16).u32(0).u32(0).u32(0);
    assert_eq!(
        r.errno_of(Command::DeviceGetInfo as u16, &p.finish(), &[e.as_raw_fd()]),
        EINVAL
    );
    r.assert_alive();
}

fn set_irqs_payload(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u32(20).u32(flags).u32(index).u32(start).u32(count);
    p.finish()
}

#[test]
fn test_set_irqs_wrong_fd_count_and_range_are_einval() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let (a, b) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let f = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    let fds = [a.as_raw_fd(), b.as_raw_fd()];
    assert_eq!(
        r.errno_of(8, &set_irqs_payload(f, irq_index::MSIX, 0, 3), &fds),
        EINVAL,
        "2 fds for 3 vectors"
    );
    assert_eq!(
        r.errno_of(8, &set_irqs_payload(f, irq_index::MSIX, 3, 2), &fds),
        EINVAL,
        "past the last vector"
    );
    assert_eq!(
        r.errno_of(8, &set_irqs_payload(f, 9, 0, 1), &fds[..1]),
        EINVAL,
        "no such index"
    );
    assert_eq!(
        r.errno_of(8, &set_irqs_payload(f, irq_index::MSIX, u32::MAX, 2), &fds),
        EINVAL,
        "start + count overflows"
    );
    r.assert_alive();
}

#[test]
fn test_set_irqs_refuses_an_fd_that_is_not_an_eventfd() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let file = memfd(4096);
    let f = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    assert_eq!(
        r.errno_of(
            8,
            &set_irqs_payload(f, irq_index::MSIX, 0, 1),
            &[file.as_raw_fd()]
        ),
        EINVAL
    );
    r.assert_alive();
}

#[test]
fn test_set_irqs_deassign_run_without_fds_unbinds() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let f = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    let (hd, _) = r.call(
        8,
        &set_irqs_payload(f, irq_index::MSIX, 1, 1),
        &[e.as_raw_fd()],
    );
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    r.read(0, 0x100, 4).unwrap();
    assert_eq!(e.read().unwrap(), 1);
    let (hd, _) = r.call(8, &set_irqs_payload(f, irq_index::MSIX, 1, 1), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    r.read(0, 0x100, 4).unwrap();
    assert!(e.read().is_err(), "no signal after de-assign");
}

#[test]
fn test_msix_is_not_maskable_through_set_irqs() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let f = proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_MASK;
    assert_eq!(
        r.errno_of(8, &set_irqs_payload(f, irq_index::MSIX, 0, 1), &[]),
        EINVAL
    );
    let f = proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_MASK;
    let (hd, _) = r.call(8, &set_irqs_payload(f, irq_index::INTX, 0, 1), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0, "INTx is maskable");
}

#[test]
fn test_no_reply_write_gets_no_reply_even_on_error() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mut p = proto::Writer::new();
    p.u64(0x10).u32(0).u32(1).bytes(&[0x5a]);
    let (_, v) = r.frame(
        Command::RegionWrite as u16,
        &p.finish(),
        proto::FLAG_NO_REPLY,
    );
    r.send_raw(&v, &[]);
    let mut p = proto::Writer::new();
    p.u64(0x1_0000).u32(0).u32(1).bytes(&[0x5a]);
    let (_, v) = r.frame(
        Command::RegionWrite as u16,
        &p.finish(),
        proto::FLAG_NO_REPLY,
    );
    r.send_raw(&v, &[]);
    // The next reply is for the next request, and the posted write landed.
    assert_eq!(r.read(0, 0x10, 1).unwrap(), vec![0x5a]);
}

#[test]
fn test_write_multi_applies_all_writes() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mut p = proto::Writer::new();
    p.u64(2);
    p.u64(0x20).u32(0).u32(4).bytes(&[1, 2, 3, 4, 0, 0, 0, 0]);
    p.u64(0x24).u32(0).u32(2).bytes(&[5, 6, 0, 0, 0, 0, 0, 0]);
    let (hd, body) = r.call(Command::RegionWriteMulti as u16, &p.finish(), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert_eq!(u64::from_le_bytes(body[0..8].try_into().unwrap()), 2);
    assert_eq!(r.read(0, 0x20, 6).unwrap(), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn test_write_multi_with_a_bad_entry_applies_none() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mut p = proto::Writer::new();
    p.u64(2);
    p.u64(0x30).u32(0).u32(4).bytes(&[9, 9, 9, 9, 0, 0, 0, 0]);
    p.u64(0x1_0000)
        .u32(0)
        .u32(4)
        .bytes(&[9, 9, 9, 9, 0, 0, 0, 0]); // outside BAR0
    assert_eq!(
        r.errno_of(Command::RegionWriteMulti as u16, &p.finish(), &[]),
        EINVAL
    );
    assert_eq!(
        r.read(0, 0x30, 4).unwrap(),
        vec![0, 0, 0, 0],
        "first entry not applied"
    );
}

#[test]
fn test_dma_map_overlap_eexist_and_unmap_all() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mem = memfd(0x20000);
    let map = |iova: u64| {
        let mut p = proto::Writer::new();
        p.u32(32).u32(3).u64(0).u64(iova).u64(0x10000);
        p.finish()
    };
    let (hd, _) = r.call(2, &map(0x10000), &[mem.as_raw_fd()]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert_eq!(
        r.errno_of(2, &map(0x18000), &[mem.as_raw_fd()]),
        libc::EEXIST as u32
    );
    assert_eq!(
        r.errno_of(2, &map(0x30000), &[mem.as_raw_fd(), mem.as_raw_fd()]),
        EINVAL,
        "two fds"
    );
    let mut p = proto::Writer::new();
    p.u32(24).u32(proto::DMA_UNMAP_FLAG_ALL).u64(0).u64(0);
    let (hd, body) = r.call(3, &p.finish(), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert_eq!(body.len(), 24);
    // Now the range is free again.
    let (hd, _) = r.call(2, &map(0x18000), &[mem.as_raw_fd()]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
}

#[test]
fn test_dma_map_fd_shorter_than_range_is_refused() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mem = memfd(0x1000);
    let mut p = proto::Writer::new();
    p.u32(32).u32(3).u64(0).u64(0x10000).u64(0x10000);
    assert_eq!(r.errno_of(2, &p.finish(), &[mem.as_raw_fd()]), EINVAL);
    r.assert_alive();
}

#[test]
fn test_too_many_fds_in_one_message_are_einval() {
    let h = start();
    let mut r = Raw::negotiated(&h);
    let efds: Vec<EventFd> = (0..20).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    let f = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
    assert_eq!(
        r.errno_of(8, &set_irqs_payload(f, irq_index::MSIX, 0, 4), &raw),
        EINVAL
    );
    r.assert_alive();
}

// ---- the bad-input matrix ------------------------------------------------------------------
//
// Every row is one request on a fresh, negotiated connection that already holds one DMA mapping
// (BASE_IOVA, BASE_SIZE, fd-backed). Each row states the errno it must get (or success), and
// after it the connection must still serve a config read. A refused row must also leave the DMA
// map exactly as it was (checked through the device's DMA_MAP/DMA_UNMAP hooks). All failures are
// collected and reported together, so one run shows the whole matrix.

const BASE_IOVA: u64 = 0x10_0000;
const BASE_SIZE: u64 = 0x1_0000;
const MAX_XFER: u32 = 1 << 20;

/// Fds sent with a row's request.
#[derive(Clone, Copy, Debug)]
enum Fds {
    None,
    /// n eventfds.
    Eventfds(usize),
    /// n fds of one 1 MiB memfd.
    Memfd(usize),
}

/// What a row must get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Ok,
    Errno(i32),
}

struct Row {
    name: String,
    cmd: u16,
    flags: u32,
    payload: Vec<u8>,
    fds: Fds,
    expect: Expect,
}

fn row(name: impl Into<String>, cmd: Command, payload: Vec<u8>, expect: Expect) -> Row {
    Row {
        name: name.into(),
        cmd: cmd as u16,
        flags: 0,
        payload,
        fds: Fds::None,
        expect,
    }
}

impl Row {
    fn fds(mut self, fds: Fds) -> Row {
        self.fds = fds;
        self
    }
    fn flags(mut self, flags: u32) -> Row {
        self.flags = flags;
        self
    }
}

fn pl(f: impl FnOnce(&mut proto::Writer)) -> Vec<u8> {
    let mut w = proto::Writer::new();
    f(&mut w);
    w.finish()
}

fn version_payload(major: u16) -> Vec<u8> {
    pl(|w| {
        w.u16(major).u16(0).bytes(b"{}").bytes(&[0]);
    })
}
fn dma_map(argsz: u32, flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    pl(|w| {
        w.u32(argsz).u32(flags).u64(offset).u64(iova).u64(size);
    })
}
fn dma_unmap(argsz: u32, flags: u32, iova: u64, size: u64) -> Vec<u8> {
    pl(|w| {
        w.u32(argsz).u32(flags).u64(iova).u64(size);
    })
}
fn get_info(argsz: u32) -> Vec<u8> {
    pl(|w| {
        w.u32(argsz).u32(0).u32(0).u32(0);
    })
}
fn region_info(argsz: u32, index: u32) -> Vec<u8> {
    pl(|w| {
        w.u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0);
    })
}
fn irq_info(argsz: u32, index: u32) -> Vec<u8> {
    pl(|w| {
        w.u32(argsz).u32(0).u32(index).u32(0);
    })
}
fn set_irqs(argsz: u32, flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    pl(|w| {
        w.u32(argsz)
            .u32(flags)
            .u32(index)
            .u32(start)
            .u32(count)
            .bytes(data);
    })
}
fn rd(region: u32, offset: u64, count: u32) -> Vec<u8> {
    pl(|w| {
        w.u64(offset).u32(region).u32(count);
    })
}
fn wr(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    pl(|w| {
        w.u64(offset).u32(region).u32(data.len() as u32).bytes(data);
    })
}
fn multi(n: u64, entries: &[(u64, u32, u32)]) -> Vec<u8> {
    pl(|w| {
        w.u64(n);
        for &(offset, region, count) in entries {
            w.u64(offset).u32(region).u32(count).bytes(&[0xa5; 8]);
        }
    })
}

const EINVAL_E: Expect = Expect::Errno(libc::EINVAL);
const E2BIG_E: Expect = Expect::Errno(libc::E2BIG);
const EEXIST_E: Expect = Expect::Errno(libc::EEXIST);
const ENOTSUP_E: Expect = Expect::Errno(libc::ENOTSUP);
const EV_TRIGGER: u32 = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
const NONE_TRIGGER: u32 = proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER;
const BOOL_TRIGGER: u32 = proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_ACTION_TRIGGER;

fn matrix() -> Vec<Row> {
    use Command as C;
    let mut rows = Vec::new();

    // 1. Every command with a truncated body (and a few with one byte too many): EINVAL.
    let valid: Vec<(Command, Vec<u8>)> = vec![
        (C::Version, version_payload(0)),
        (C::DmaMap, dma_map(32, 3, 0, 0x40_0000, 0x1000)),
        (C::DmaUnmap, dma_unmap(24, 0, 0x40_0000, 0x1000)),
        (C::DeviceGetInfo, get_info(16)),
        (C::DeviceGetRegionInfo, region_info(32, 0)),
        (C::DeviceGetIrqInfo, irq_info(16, 0)),
        (
            C::DeviceSetIrqs,
            set_irqs(20, NONE_TRIGGER, irq_index::MSIX, 0, 1, &[]),
        ),
        (C::RegionRead, rd(0, 0, 4)),
        (C::RegionWrite, wr(0, 0, &[1, 2, 3, 4])),
        (C::RegionWriteMulti, multi(1, &[(0, 0, 4)])),
    ];
    for (cmd, full) in &valid {
        let min = if *cmd == C::Version { 4 } else { full.len() };
        let mut cuts = vec![0, min / 2, min - 1];
        cuts.dedup();
        for cut in cuts {
            rows.push(row(
                format!("{cmd:?} truncated to {cut} of {} bytes", full.len()),
                *cmd,
                full[..cut].to_vec(),
                EINVAL_E,
            ));
        }
        // The argsz convention: a request that is a VFIO ioctl structure may be longer than
        // the structure (a client sends as many bytes as the reply it expects); the tail is
        // ignored. REGION_READ has no argsz: one byte more is refused.
        match cmd {
            C::Version | C::RegionWrite | C::RegionWriteMulti => {}
            C::RegionRead => {
                let mut long = full.clone();
                long.push(0);
                rows.push(row(
                    format!("{cmd:?} one byte too long"),
                    *cmd,
                    long,
                    EINVAL_E,
                ));
            }
            _ => {
                for tail in [1, 32, 4096] {
                    let mut long = full.clone();
                    long.extend(std::iter::repeat_n(0xa5, tail));
                    rows.push(row(
                        format!("{cmd:?} with a {tail}-byte tail (argsz convention)"),
                        *cmd,
                        long,
                        Expect::Ok,
                    ));
                }
            }
        }
    }
    rows.push(row(
        "SetIrqs DATA_BOOL with bools and a tail after them",
        C::DeviceSetIrqs,
        set_irqs(22, BOOL_TRIGGER, irq_index::MSIX, 0, 2, &[1, 0, 0xa5, 0xa5]),
        Expect::Ok,
    ));
    rows.push(row(
        "DeviceReset with a body",
        C::DeviceReset,
        vec![0; 4],
        EINVAL_E,
    ));
    rows.push(row(
        "RegionWrite count says 4, 3 data bytes",
        C::RegionWrite,
        pl(|w| {
            w.u64(0).u32(0).u32(4).bytes(&[1, 2, 3]);
        }),
        EINVAL_E,
    ));
    rows.push(row(
        "RegionWriteMulti wr_cnt 2, one entry",
        C::RegionWriteMulti,
        multi(2, &[(0, 0, 4)]),
        EINVAL_E,
    ));

    // 2. Oversized size / counts.
    rows.push(row(
        "RegionWrite of max_data_xfer_size + 1 bytes (frame over the limit)",
        C::RegionWrite,
        wr(4, 0, &vec![0; MAX_XFER as usize + 1]),
        E2BIG_E,
    ));
    rows.push(row(
        "RegionRead count max_data_xfer_size + 1",
        C::RegionRead,
        rd(4, 0, MAX_XFER + 1),
        E2BIG_E,
    ));
    rows.push(row(
        "RegionRead count u32::MAX",
        C::RegionRead,
        rd(4, 0, u32::MAX),
        E2BIG_E,
    ));

    // 3. argsz lies.
    for argsz in [0, 31] {
        rows.push(row(
            format!("DmaMap argsz {argsz}"),
            C::DmaMap,
            dma_map(argsz, 3, 0, 0x40_0000, 0x1000),
            EINVAL_E,
        ));
    }
    rows.push(row(
        "DmaMap argsz larger than the structure (a capacity, as in the kernel)",
        C::DmaMap,
        dma_map(4096, 3, 0, 0x40_0000, 0x1000),
        Expect::Ok,
    ));
    rows.push(row(
        "DmaUnmap argsz 23",
        C::DmaUnmap,
        dma_unmap(23, 0, 0x40_0000, 0x1000),
        EINVAL_E,
    ));
    rows.push(row(
        "DeviceGetInfo argsz 15",
        C::DeviceGetInfo,
        get_info(15),
        EINVAL_E,
    ));
    rows.push(row(
        "DeviceGetRegionInfo argsz 31",
        C::DeviceGetRegionInfo,
        region_info(31, 0),
        EINVAL_E,
    ));
    rows.push(row(
        "DeviceGetRegionInfo argsz u32::MAX (room for anything)",
        C::DeviceGetRegionInfo,
        region_info(u32::MAX, 2),
        Expect::Ok,
    ));
    rows.push(row(
        "DeviceGetIrqInfo argsz 15",
        C::DeviceGetIrqInfo,
        irq_info(15, 0),
        EINVAL_E,
    ));
    rows.push(row(
        "SetIrqs argsz 19",
        C::DeviceSetIrqs,
        set_irqs(19, NONE_TRIGGER, irq_index::MSIX, 0, 1, &[]),
        EINVAL_E,
    ));
    rows.push(row(
        "SetIrqs DATA_BOOL argsz not covering the bools",
        C::DeviceSetIrqs,
        set_irqs(20, BOOL_TRIGGER, irq_index::MSIX, 0, 2, &[1, 1]),
        EINVAL_E,
    ));
    rows.push(row(
        "SetIrqs DATA_BOOL with fewer bools than count",
        C::DeviceSetIrqs,
        set_irqs(22, BOOL_TRIGGER, irq_index::MSIX, 0, 3, &[1, 1]),
        EINVAL_E,
    ));
    rows.push(
        row(
            "SetIrqs DATA_EVENTFD with argsz 20 + 4 * count (a copied ioctl argsz)",
            C::DeviceSetIrqs,
            set_irqs(24, EV_TRIGGER, irq_index::MSIX, 0, 1, &[]),
            Expect::Ok,
        )
        .fds(Fds::Eventfds(1)),
    );

    // 4. Wrong fd counts.
    for (what, cmd, payload) in [
        ("Version", C::Version, version_payload(0)),
        ("DeviceGetInfo", C::DeviceGetInfo, get_info(16)),
        (
            "DeviceGetRegionInfo",
            C::DeviceGetRegionInfo,
            region_info(32, 0),
        ),
        ("DeviceGetIrqInfo", C::DeviceGetIrqInfo, irq_info(16, 0)),
        ("RegionRead", C::RegionRead, rd(0, 0, 4)),
        ("RegionWrite", C::RegionWrite, wr(0, 0, &[1])),
        (
            "RegionWriteMulti",
            C::RegionWriteMulti,
            multi(1, &[(0, 0, 4)]),
        ),
        ("DmaUnmap", C::DmaUnmap, dma_unmap(24, 0, 0x40_0000, 0x1000)),
        ("DeviceReset", C::DeviceReset, vec![]),
    ] {
        rows.push(row(format!("{what} with an fd"), cmd, payload, EINVAL_E).fds(Fds::Eventfds(1)));
    }
    rows.push(
        row(
            "DmaMap with two fds",
            C::DmaMap,
            dma_map(32, 3, 0, 0x40_0000, 0x1000),
            EINVAL_E,
        )
        .fds(Fds::Memfd(2)),
    );
    rows.push(row(
        "DmaMap without an fd (recorded, unreachable for device DMA: QEMU's ROM/PAM windows)",
        C::DmaMap,
        dma_map(32, 3, 0, 0x40_0000, 0x1000),
        Expect::Ok,
    ));
    rows.push(
        row(
            "DmaMap with an fd that cannot be mapped (an eventfd)",
            C::DmaMap,
            dma_map(32, 3, 0, 0x40_0000, 0x1000),
            EINVAL_E,
        )
        .fds(Fds::Eventfds(1)),
    );
    rows.push(
        row(
            "SetIrqs eventfd trigger: 1 fd for 2 vectors",
            C::DeviceSetIrqs,
            set_irqs(20, EV_TRIGGER, irq_index::MSIX, 0, 2, &[]),
            EINVAL_E,
        )
        .fds(Fds::Eventfds(1)),
    );
    rows.push(
        row(
            "SetIrqs eventfd trigger: 2 fds for 1 vector",
            C::DeviceSetIrqs,
            set_irqs(20, EV_TRIGGER, irq_index::MSIX, 0, 1, &[]),
            EINVAL_E,
        )
        .fds(Fds::Eventfds(2)),
    );
    rows.push(row(
        "SetIrqs eventfd trigger with no fds (de-assign, as QEMU sends runs of -1)",
        C::DeviceSetIrqs,
        set_irqs(20, EV_TRIGGER, irq_index::MSIX, 0, 4, &[]),
        Expect::Ok,
    ));
    rows.push(
        row(
            "SetIrqs DATA_NONE trigger with an fd",
            C::DeviceSetIrqs,
            set_irqs(20, NONE_TRIGGER, irq_index::MSIX, 0, 1, &[]),
            EINVAL_E,
        )
        .fds(Fds::Eventfds(1)),
    );
    rows.push(
        row(
            "SetIrqs INTx unmask eventfd with two fds",
            C::DeviceSetIrqs,
            set_irqs(
                20,
                proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_UNMASK,
                irq_index::INTX,
                0,
                1,
                &[],
            ),
            EINVAL_E,
        )
        .fds(Fds::Eventfds(2)),
    );
    rows.push(
        row(
            "SetIrqs eventfd trigger: 20 fds (over max_msg_fds 16: MSG_CTRUNC)",
            C::DeviceSetIrqs,
            set_irqs(20, EV_TRIGGER, irq_index::MSIX, 0, 4, &[]),
            EINVAL_E,
        )
        .fds(Fds::Eventfds(20)),
    );
    rows.push(
        row(
            "SetIrqs eventfd trigger with a memfd instead of an eventfd",
            C::DeviceSetIrqs,
            set_irqs(20, EV_TRIGGER, irq_index::MSIX, 0, 1, &[]),
            EINVAL_E,
        )
        .fds(Fds::Memfd(1)),
    );

    // 5. Unknown flags.
    for (flags, why) in [
        (proto::FLAG_TYPE_REPLY, "a reply, not a command"),
        (0x7, "message type 7"),
        (proto::FLAG_ERROR, "the Error bit on a command"),
        (0x40, "reserved bit 6"),
        (0x8000_0000, "reserved bit 31"),
    ] {
        rows.push(
            row(
                format!("header flags {flags:#x}: {why}"),
                C::DeviceGetInfo,
                get_info(16),
                EINVAL_E,
            )
            .flags(flags),
        );
    }
    rows.push(row(
        "DmaMap flags bit 2",
        C::DmaMap,
        dma_map(32, 0x4 | 3, 0, 0x40_0000, 0x1000),
        EINVAL_E,
    ));
    rows.push(row(
        "DmaUnmap flags bit 2",
        C::DmaUnmap,
        dma_unmap(24, 0x4, 0x40_0000, 0x1000),
        EINVAL_E,
    ));
    rows.push(row(
        "DmaUnmap GET_DIRTY_BITMAP (no migration)",
        C::DmaUnmap,
        dma_unmap(
            24,
            proto::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            0x40_0000,
            0x1000,
        ),
        ENOTSUP_E,
    ));
    rows.push(row(
        "SetIrqs unknown flag bit 6",
        C::DeviceSetIrqs,
        set_irqs(20, NONE_TRIGGER | 0x40, irq_index::MSIX, 0, 1, &[]),
        EINVAL_E,
    ));
    rows.push(row(
        "SetIrqs two data types",
        C::DeviceSetIrqs,
        set_irqs(
            20,
            NONE_TRIGGER | proto::IRQ_SET_DATA_EVENTFD,
            irq_index::MSIX,
            0,
            1,
            &[],
        ),
        EINVAL_E,
    ));
    rows.push(row(
        "SetIrqs no action",
        C::DeviceSetIrqs,
        set_irqs(20, proto::IRQ_SET_DATA_NONE, irq_index::MSIX, 0, 1, &[]),
        EINVAL_E,
    ));
    rows.push(row(
        "SetIrqs eventfd MASK (not supported)",
        C::DeviceSetIrqs,
        set_irqs(
            20,
            proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_MASK,
            irq_index::INTX,
            0,
            1,
            &[],
        ),
        ENOTSUP_E,
    ));
    // (Every row runs on a negotiated connection: a VERSION there is a second one, refused
    // whatever it says; a first VERSION with major 1 is ENOTSUP, see
    // test_version_rules_on_a_fresh_connection.)
    rows.push(row(
        "Version major 1 (a second VERSION)",
        C::Version,
        version_payload(1),
        EINVAL_E,
    ));
    rows.push(row(
        "Version 0.0 again (a second VERSION)",
        C::Version,
        version_payload(0),
        EINVAL_E,
    ));

    // 6. Bad region index and offset.
    for index in [1, 8, 9, 255, u32::MAX] {
        rows.push(row(
            format!("RegionRead region {index} (absent or empty)"),
            C::RegionRead,
            rd(index, 0, 4),
            EINVAL_E,
        ));
        rows.push(row(
            format!("RegionWrite region {index} (absent or empty)"),
            C::RegionWrite,
            wr(index, 0, &[1, 2, 3, 4]),
            EINVAL_E,
        ));
    }
    for (offset, len, expect) in [
        (255, 1, Expect::Ok),
        (252, 4, Expect::Ok),
        (256, 1, EINVAL_E),
        (253, 4, EINVAL_E),
        (u64::MAX, 1, EINVAL_E),
        (u64::MAX - 1, 4, EINVAL_E),
    ] {
        rows.push(row(
            format!("RegionRead config {offset:#x}+{len}"),
            C::RegionRead,
            rd(region::CONFIG, offset, len),
            expect,
        ));
        rows.push(row(
            format!("RegionWrite config {offset:#x}+{len}"),
            C::RegionWrite,
            wr(region::CONFIG, offset, &vec![0; len as usize]),
            expect,
        ));
    }
    rows.push(row(
        "DeviceGetRegionInfo index 9",
        C::DeviceGetRegionInfo,
        region_info(32, 9),
        EINVAL_E,
    ));
    rows.push(row(
        "DeviceGetIrqInfo index 5",
        C::DeviceGetIrqInfo,
        irq_info(16, 5),
        EINVAL_E,
    ));
    rows.push(row(
        "RegionWriteMulti entry outside BAR0",
        C::RegionWriteMulti,
        multi(2, &[(0, 0, 4), (4096, 0, 4)]),
        EINVAL_E,
    ));

    // 7. Zero-length and maximum-length accesses.
    rows.push(row(
        "RegionRead of 0 bytes",
        C::RegionRead,
        rd(0, 0, 0),
        EINVAL_E,
    ));
    rows.push(row(
        "RegionWrite of 0 bytes",
        C::RegionWrite,
        wr(0, 0, &[]),
        EINVAL_E,
    ));
    rows.push(row(
        "RegionRead of max_data_xfer_size bytes",
        C::RegionRead,
        rd(4, 0, MAX_XFER),
        Expect::Ok,
    ));
    rows.push(row(
        "RegionWrite of max_data_xfer_size bytes (the largest frame)",
        C::RegionWrite,
        wr(
            4,
            BAR4_SIZE - u64::from(MAX_XFER),
            &vec![0x5a; MAX_XFER as usize],
        ),
        Expect::Ok,
    ));
    let full: Vec<(u64, u32, u32)> = (0..proto::MULTI_MAX).map(|i| (i * 8, 0, 8)).collect();
    rows.push(row(
        "RegionWriteMulti of 200 writes",
        C::RegionWriteMulti,
        multi(200, &full),
        Expect::Ok,
    ));
    let over: Vec<(u64, u32, u32)> = (0..201).map(|i| (i * 8, 0, 8)).collect();
    rows.push(row(
        "RegionWriteMulti of 201 writes",
        C::RegionWriteMulti,
        multi(201, &over),
        EINVAL_E,
    ));
    rows.push(row(
        "RegionWriteMulti of 0 writes",
        C::RegionWriteMulti,
        multi(0, &[]),
        EINVAL_E,
    ));
    rows.push(row(
        "RegionWriteMulti entry of 0 bytes",
        C::RegionWriteMulti,
        multi(1, &[(0, 0, 0)]),
        EINVAL_E,
    ));
    rows.push(row(
        "RegionWriteMulti entry of 9 bytes",
        C::RegionWriteMulti,
        multi(1, &[(0, 0, 9)]),
        EINVAL_E,
    ));

    // 8. Overlapping and unaligned DMA maps (the base mapping is BASE_IOVA..+BASE_SIZE).
    let m = |name: &str, offset: u64, iova: u64, size: u64, expect: Expect| {
        row(name, C::DmaMap, dma_map(32, 3, offset, iova, size), expect).fds(Fds::Memfd(1))
    };
    rows.push(m(
        "DmaMap exactly over the base mapping",
        0,
        BASE_IOVA,
        BASE_SIZE,
        EEXIST_E,
    ));
    rows.push(m(
        "DmaMap starting inside the base mapping",
        0,
        BASE_IOVA + 0x8000,
        BASE_SIZE,
        EEXIST_E,
    ));
    rows.push(m(
        "DmaMap ending inside the base mapping",
        0,
        BASE_IOVA - 0x8000,
        0x9000,
        EEXIST_E,
    ));
    rows.push(m(
        "DmaMap inside the base mapping",
        0,
        BASE_IOVA + 0x1000,
        0x1000,
        EEXIST_E,
    ));
    rows.push(m(
        "DmaMap containing the base mapping",
        0,
        0,
        0x100_0000,
        EEXIST_E,
    ));
    rows.push(m(
        "DmaMap adjacent below",
        0,
        BASE_IOVA - 0x1000,
        0x1000,
        Expect::Ok,
    ));
    rows.push(m(
        "DmaMap adjacent above",
        0,
        BASE_IOVA + BASE_SIZE,
        0x1000,
        Expect::Ok,
    ));
    rows.push(m("DmaMap unaligned IOVA", 0, 0x40_0800, 0x1000, EINVAL_E));
    rows.push(m("DmaMap unaligned size", 0, 0x40_0000, 0x800, EINVAL_E));
    rows.push(m("DmaMap of size 0", 0, 0x40_0000, 0, EINVAL_E));
    rows.push(m(
        "DmaMap wrapping past 2^64",
        0,
        u64::MAX - 0xfff,
        0x2000,
        EINVAL_E,
    ));
    rows.push(m(
        "DmaMap ending exactly at 2^64",
        0,
        u64::MAX - 0xfff,
        0x1000,
        Expect::Ok,
    ));
    rows.push(m(
        "DmaMap unaligned fd offset",
        0x800,
        0x40_0000,
        0x1000,
        EINVAL_E,
    ));
    rows.push(m(
        "DmaMap fd offset past the end of the file",
        1 << 20,
        0x40_0000,
        0x1000,
        EINVAL_E,
    ));

    // 9. Unmapping what was never mapped, and bad unmaps.
    let u = |name: &str, flags: u32, iova: u64, size: u64, expect: Expect| {
        row(name, C::DmaUnmap, dma_unmap(24, flags, iova, size), expect)
    };
    rows.push(u(
        "DmaUnmap of a range never mapped (kernel semantics: success, nothing removed)",
        0,
        0x4000_0000,
        0x1000,
        Expect::Ok,
    ));
    rows.push(u(
        "DmaUnmap splitting the base mapping",
        0,
        BASE_IOVA + 0x1000,
        0x1000,
        EINVAL_E,
    ));
    rows.push(u(
        "DmaUnmap overlapping the base mapping's start",
        0,
        BASE_IOVA - 0x1000,
        0x2000,
        EINVAL_E,
    ));
    rows.push(u("DmaUnmap of size 0", 0, BASE_IOVA, 0, EINVAL_E));
    rows.push(u(
        "DmaUnmap unaligned IOVA",
        0,
        BASE_IOVA + 1,
        BASE_SIZE,
        EINVAL_E,
    ));
    rows.push(u(
        "DmaUnmap unaligned size",
        0,
        BASE_IOVA,
        BASE_SIZE - 1,
        EINVAL_E,
    ));
    rows.push(u(
        "DmaUnmap wrapping past 2^64",
        0,
        u64::MAX - 0xfff,
        0x2000,
        EINVAL_E,
    ));
    rows.push(u(
        "DmaUnmap UNMAP_ALL with an address",
        proto::DMA_UNMAP_FLAG_ALL,
        BASE_IOVA,
        0,
        EINVAL_E,
    ));

    // 10. SET_IRQS with out-of-range start/count.
    let s = |name: &str, flags: u32, index: u32, start: u32, count: u32, expect: Expect| {
        row(
            name,
            C::DeviceSetIrqs,
            set_irqs(20, flags, index, start, count, &[]),
            expect,
        )
    };
    rows.push(s(
        "SetIrqs MSI-X start 4 (of 4)",
        EV_TRIGGER,
        irq_index::MSIX,
        4,
        1,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs MSI-X start 3 count 2",
        EV_TRIGGER,
        irq_index::MSIX,
        3,
        2,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs MSI-X start u32::MAX count 2 (overflow)",
        EV_TRIGGER,
        irq_index::MSIX,
        u32::MAX,
        2,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs MSI-X count u32::MAX",
        EV_TRIGGER,
        irq_index::MSIX,
        0,
        u32::MAX,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs MSI-X eventfd count 0",
        EV_TRIGGER,
        irq_index::MSIX,
        0,
        0,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs INTx start 1",
        NONE_TRIGGER,
        irq_index::INTX,
        1,
        1,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs index 5 (past the last)",
        NONE_TRIGGER,
        5,
        0,
        1,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs index u32::MAX",
        NONE_TRIGGER,
        u32::MAX,
        0,
        1,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs disable (DATA_NONE trigger count 0)",
        NONE_TRIGGER,
        irq_index::MSIX,
        0,
        0,
        Expect::Ok,
    ));
    rows.push(s(
        "SetIrqs disable form with start 1",
        NONE_TRIGGER,
        irq_index::MSIX,
        1,
        0,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs MASK on MSI-X (not maskable)",
        proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_MASK,
        irq_index::MSIX,
        0,
        1,
        EINVAL_E,
    ));
    rows.push(s(
        "SetIrqs MASK on ERR (trigger only)",
        proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_MASK,
        irq_index::ERR,
        0,
        1,
        EINVAL_E,
    ));
    rows
}

fn memfd_1m() -> OwnedFd {
    memfd(1 << 20)
}

/// A negotiated connection holding the base mapping.
fn matrix_connection(h: &Harness, base: &OwnedFd) -> Raw {
    let mut r = Raw::negotiated(h);
    let (hd, _) = r.call(
        Command::DmaMap as u16,
        &dma_map(32, 3, 0, BASE_IOVA, BASE_SIZE),
        &[base.as_raw_fd()],
    );
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0, "base mapping");
    r
}

#[test]
fn test_bad_input_matrix() {
    let h = start();
    let base = memfd_1m();
    let rows = matrix();
    eprintln!("bad-input matrix: {} rows", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let mut r = matrix_connection(&h, &base);
        let maps_before = h.maps.lock().unwrap().clone();
        let keep: Vec<Box<dyn AsRawFd>> = match row.fds {
            Fds::None => Vec::new(),
            Fds::Eventfds(n) => (0..n)
                .map(|_| Box::new(EventFd::new(0).unwrap()) as Box<dyn AsRawFd>)
                .collect(),
            Fds::Memfd(n) => {
                let m = memfd_1m();
                (0..n)
                    .map(|_| Box::new(m.try_clone().unwrap()) as Box<dyn AsRawFd>)
                    .collect()
            }
        };
        let fds: Vec<i32> = keep.iter().map(|f| f.as_raw_fd()).collect();
        let (want, payload) = (row.expect, &row.payload);
        let (hd, v) = r.frame(row.cmd, payload, row.flags);
        r.send_raw(&v, &fds);
        let (rh, _) = r.recv();
        let got = if rh.flags & proto::FLAG_ERROR != 0 {
            Expect::Errno(rh.error as i32)
        } else {
            Expect::Ok
        };
        if rh.id != hd.id {
            failures.push(format!(
                "{}: reply id {} for request {}",
                row.name, rh.id, hd.id
            ));
        }
        if got != want {
            failures.push(format!("{}: got {got:?}, want {want:?}", row.name));
        }
        if want != Expect::Ok && *h.maps.lock().unwrap() != maps_before {
            failures.push(format!(
                "{}: a refused request changed the DMA map",
                row.name
            ));
        }
        // The connection still serves, in sync.
        match r.read(region::CONFIG, 4, 4) {
            Ok(b) if b == vec![4, 5, 6, 7] => {}
            other => failures.push(format!(
                "{}: connection unusable after: {other:?}",
                row.name
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn test_unmap_of_nothing_keeps_the_base_mapping_and_a_covering_unmap_removes_it() {
    let h = start();
    let base = memfd_1m();
    let mut r = matrix_connection(&h, &base);
    let (hd, body) = r.call(3, &dma_unmap(24, 0, 0x4000_0000, 0x1000), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert_eq!(
        body,
        dma_unmap(24, 0, 0x4000_0000, 0x1000),
        "reply echoes the request"
    );
    assert_eq!(h.maps.lock().unwrap().len(), 1, "base mapping kept");
    let (hd, _) = r.call(3, &dma_unmap(24, 0, 0, 1 << 40), &[]);
    assert_eq!(hd.flags & proto::FLAG_ERROR, 0);
    assert!(
        h.maps.lock().unwrap().is_empty(),
        "a covering unmap removes it"
    );
    r.assert_alive();
}

#[test]
fn test_size_lie_gets_e2big_at_once_and_the_next_client_is_served() {
    // The header claims 1 GiB and nothing follows: the client is answered without the server
    // waiting for the payload; the stream is lost for this connection (the server drops what
    // follows as payload), so the client reconnects.
    let h = start();
    let mut r = Raw::negotiated(&h);
    let hd = Header {
        id: 9,
        command: Command::RegionWrite as u16,
        size: 1 << 30,
        flags: 0,
        error: 0,
    };
    r.send_raw(&hd.encode(), &[]);
    let (rh, _) = r.recv();
    assert_eq!((rh.id, rh.error), (9, libc::E2BIG as u32));
    drop(r);
    let mut r2 = Raw::negotiated(&h);
    r2.assert_alive();
}

#[test]
fn test_frames_pipelined_in_one_write_are_all_answered_in_order() {
    // Posted writes, a DMA_MAP with its fd and a read, sent back to back in one burst: the
    // buffered reader takes several frames per recvmsg and must give the fd to the DMA_MAP.
    let h = start();
    let mut r = Raw::negotiated(&h);
    let mem = memfd(0x10000);
    let mut burst = Vec::new();
    for i in 0..50u8 {
        let (_, v) = r.frame(
            Command::RegionWrite as u16,
            &wr(0, u64::from(i), &[i]),
            proto::FLAG_NO_REPLY,
        );
        burst.extend(v);
    }
    r.send_raw(&burst, &[]);
    let (map_hdr, map) = r.frame(
        Command::DmaMap as u16,
        &dma_map(32, 3, 0, 0x10000, 0x10000),
        0,
    );
    r.send_raw(&map, &[mem.as_raw_fd()]);
    let (read_hdr, read) = r.frame(Command::RegionRead as u16, &rd(0, 0, 50), 0);
    r.send_raw(&read, &[]);
    let (rh, _) = r.recv();
    assert_eq!((rh.id, rh.flags & proto::FLAG_ERROR), (map_hdr.id, 0));
    let (rh, body) = r.recv();
    assert_eq!(rh.id, read_hdr.id);
    assert_eq!(body[16..], (0..50u8).collect::<Vec<_>>()[..]);
    assert_eq!(
        *h.maps.lock().unwrap(),
        vec![MappingInfo {
            iova: 0x10000,
            size: 0x10000,
            prot: 3,
            backed: true
        }],
        "the fd reached the DMA_MAP it was sent with"
    );
}
