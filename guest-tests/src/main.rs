//! `pcisim-guest`: the programs pcisim's lab runs inside the Linux guest.
//!
//! A multi-call binary: `pcisim-guest <subcommand> [options]`. Scenario
//! subcommands print KTAP v1 on stdout and exit with kselftest codes (0 pass,
//! 1 fail, 4 skip). See README.md.

mod agent;
mod bario;
mod dmamap;
mod dmastream;
mod e1;
mod e2;
mod e3;
mod e4;
mod e5;
#[allow(dead_code)] // the register interface is kept complete
mod gpu;
mod ktap;
mod mmio;
mod mmtear;
mod npu;
mod pci;
mod reset;
mod resetdma;
mod resethot;
mod resetvfio;
mod ringdrv;
mod sva;
mod sys;
mod userptr;
mod vdev;
#[allow(dead_code)] // the uapi subset is kept complete for the next scenarios
mod vfio;
mod vfiouser;

use pcisim_guest_wire::{DeviceIds, GuestProgram, Options, Program};

const USAGE: &str = "\
usage: pcisim-guest <subcommand> [options]

  agent [--port /dev/ttyS1]
      JSON-lines control channel on a serial port (see README.md)
  e1 --vendor V --device D (--expect JSON | --expect-file PATH) [--bdf BDF]
      E1: IDs, class, BARs and capability lists vs the device's description
  e2 --vendor V --device D [--bdf BDF]
      E2: BAR0 registers and BAR2 VRAM through sysfs resource mappings
  e3 --vendor V --device D [--vectors 0,1,5] [--irq msix|msi] [--bdf BDF]
      E3: MSI-X (or MSI) delivery through a guest vfio-pci userspace driver
  e4 --vendor V --device D [--bdf BDF]
      E4: GPU command ring (fill, copies, fence + MSI-X, malformed command)
  e5 --vendor V --device D [--bdf BDF]
      E5: Bus Master Enable off => the ring's DMA is refused, no MSI-X
  reset --vendor V --device D --method flr|pm|bus|pm-cycle|sbr [--bdf BDF]
        [--dirty on|off] [--expect cleared|kept|dead] [--offered M,..] [--absent M,..]
        [--min-ms N] [--errno N] [--kmsg TEXT|TEXT]
      R1/R3/R4/R8: one reset of an unbound function through sysfs (or by hand)
  reset-vfio --vendor V --device D --op sysfs-flr|ioctl [--ring on|off] [--bdf BDF]
      R1/R6: a reset while a guest vfio driver owns the function with MSI-X live
  reset-dma --vendor V --device D --mode correct|buggy [--len BYTES] [--bdf BDF]
      R2/R2b: FLR with the command ring's DMA in flight (kernel path, or a raw FLR)
  reset-hot --vendor V --device D --bdf F0 --peer F1 [--peer-vendor V --peer-device D]
      R7: VFIO_DEVICE_PCI_HOT_RESET on a two-function slot, refused then allowed
  npu-peer --vendor V --device D --present yes|no [--bdf BDF]
      R0: the NPU's PEER_STATUS (peer configured, present or not)
  bar-io --bdf BDF [--bar N] --off OFF[,OFF..] [--write VALUE]
      H5: 32-bit BAR reads (and one write) through sysfs resourceN
  dma-stream --vendor V --device D [--bdf BDF] [--irq msi|msix] [--ready-file PATH]
             [--down-file PATH] [--stream-s N] [--down-wait-s N]
      H5: a guest vfio user keeps the command ring streaming FILLs into its own memory
      until the device goes away (all-ones), waits for it to come back, checks the ring
  sva --bdf BDF --case basic|exit|kill|fork|scm|mmap|m7 [--lenient on]
      M6/M7: process memory worked on by the NPU through the guest NPU driver (pcisim_npu.ko)
  userptr --bdf BDF --mode tracked|pinned [--unmap munmap|dontneed] [--mib N] [--repeat N]
          [--lenient on]
      M8: the GPU ring fills process memory through the guest GPU driver (pcisim_gpu.ko)
      while the process unmaps it: mmu-notifier fence wait (tracked) or pinned pages
  vfio-user --vendor V --device D [--bdf BDF] [--dma-kib N] [--req off|release|ignore]
            [--ready-file PATH] [--wait-s N]
      H3/H4: a guest vfio user that maps a DMA buffer; optionally holds the device and
      watches the device request (REQ) eventfd
  mm-teardown --vendor V --device D --case exit|kill|fork|pass|bar-mmap [--bdf BDF]
              [--iova BASE] [--buf-kib N]
      M1-M5: a vfio user streams DMA into its own buffer and goes away (exit, SIGKILL,
      fork, fds passed over SCM_RIGHTS, BAR mmap outliving the fds)
  dma-map-pages --vendor V --device D [--bdf BDF] [--mib N]
      M9: a vfio user maps N MiB (default 1024) in 4 KiB pages through the vIOMMU, has the
      GPU write into the last page, and unmaps it
";

/// Runs the invocation with its typed options ([`pcisim_guest_wire::Options`], shared with the
/// lab, which builds them; the match is exhaustive, so a program the lab can name is always
/// dispatched, and each program receives its own options struct).
fn run(inv: GuestProgram) -> i32 {
    let ids = inv.device;
    match inv.options {
        Options::Agent(o) => agent::run(o),
        Options::E1(o) => with_ids(ids, |i| e1::run(i, o)),
        Options::E2(o) => with_ids(ids, |i| e2::run(i, o)),
        Options::E3(o) => with_ids(ids, |i| e3::run(i, o)),
        Options::E4(o) => with_ids(ids, |i| e4::run(i, o)),
        Options::E5(o) => with_ids(ids, |i| e5::run(i, o)),
        Options::Reset(o) => with_ids(ids, |i| reset::run(i, o)),
        Options::ResetVfio(o) => with_ids(ids, |i| resetvfio::run(i, o)),
        Options::ResetDma(o) => with_ids(ids, |i| resetdma::run(i, o)),
        Options::ResetHot(o) => with_ids(ids, |i| resethot::run(i, o)),
        Options::NpuPeer(o) => with_ids(ids, |i| npu::run(i, o)),
        Options::VfioUser(o) => with_ids(ids, |i| vfiouser::run(i, o)),
        Options::BarIo(o) => bario::run(o),
        Options::DmaStream(o) => with_ids(ids, |i| dmastream::run(i, o)),
        Options::MmTeardown(o) => with_ids(ids, |i| mmtear::run(i, o)),
        Options::MmTeardownWorker(o) => mmtear::worker(o),
        Options::DmaMapPages(o) => with_ids(ids, |i| dmamap::run(i, o)),
        Options::Sva(o) => sva::run(o),
        Options::Userptr(o) => userptr::run(o),
    }
}

/// Runs `f` with the ids (`GuestProgram::parse` requires them for the programs that take
/// them, so a missing pair here is a usage error, never reached from a parsed command line).
fn with_ids(ids: Option<DeviceIds>, f: impl FnOnce(DeviceIds) -> i32) -> i32 {
    match ids {
        Some(i) => f(i),
        None => {
            eprintln!("pcisim-guest: this program needs --vendor V --device D");
            2
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let Some(sub) = argv.get(1) else {
        eprint!("{USAGE}");
        std::process::exit(2);
    };
    let rest = &argv[2..];
    let code = match sub.as_str() {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            0
        }
        name => match Program::from_name(name) {
            Some(program) => match GuestProgram::parse_program(program, rest) {
                Ok(inv) => run(inv),
                Err(e) => {
                    eprintln!("pcisim-guest: {e}");
                    2
                }
            },
            None => {
                eprintln!("pcisim-guest: unknown subcommand {name:?}\n{USAGE}");
                2
            }
        },
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program the lab can name is in the usage text.
    #[test]
    fn usage_lists_every_program() {
        for p in Program::ALL {
            if *p == Program::MmTeardownWorker {
                continue; // internal: mm-teardown starts it
            }
            assert!(
                USAGE.contains(&format!("\n  {} ", p.name())),
                "{} missing from USAGE",
                p.name()
            );
        }
    }

    /// Each program's usage lists exactly the options its typed struct takes (and the ids
    /// where it takes them): the text cannot drift from guest-wire's options.
    #[test]
    fn usage_lists_each_programs_options() {
        for p in Program::ALL {
            if *p == Program::MmTeardownWorker {
                continue;
            }
            // Its section: its line (two spaces, then the name) and the indented lines after it.
            let mut lines = USAGE
                .lines()
                .skip_while(|l| !l.starts_with(&format!("  {} ", p.name())));
            let first = lines
                .next()
                .unwrap_or_else(|| panic!("{p} missing from USAGE"));
            let usage_of: String = std::iter::once(first)
                .chain(lines.take_while(|l| l.starts_with("   ")))
                .collect::<Vec<_>>()
                .join("\n");
            let mut flags: Vec<&str> = usage_of
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .filter_map(|w| w.strip_prefix("--"))
                .filter(|f| !f.is_empty())
                .collect();
            flags.sort_unstable();
            flags.dedup();
            let mut want: Vec<&str> = Options::flags(*p).to_vec();
            if p.takes_device() {
                want.extend(["vendor", "device"]);
            }
            want.sort_unstable();
            assert_eq!(flags, want, "{p}: {usage_of}");
        }
    }

    /// E1's expectation and the decoded view are the shared description type's shape: what the
    /// lab checks before boot (`pcisim_guest_wire::DeviceDescription`) is what E1 parses.
    #[test]
    fn e1_parses_the_shared_description_and_views_serialize_as_it() {
        let d = pcisim_guest_wire::DeviceDescription {
            vendor_id: 0x1234,
            device_id: 0x0b10,
            class_code: 0x030200,
            revision: 1,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
            bars: vec![pcisim_guest_wire::Bar {
                index: 0,
                size: 0x1000,
                mem64: false,
                prefetchable: false,
            }],
            capabilities: vec![pcisim_guest_wire::Cap {
                id: 0x10,
                offset: 0x40,
            }],
            ext_capabilities: vec![pcisim_guest_wire::ExtCap {
                id: 1,
                offset: 0x100,
                version: 2,
            }],
        };
        let json = serde_json::to_string(&d).unwrap();
        let e = e1::parse_expect(&json).unwrap();
        assert_eq!(
            (e.vendor_id, e.device_id, e.class_code, e.revision),
            (0x1234, 0x0b10, 0x030200, 1)
        );
        assert_eq!(
            (e.bars.len(), e.capabilities.len(), e.ext_capabilities.len()),
            (1, 1, 1)
        );
        let view = pci::DeviceView {
            vendor_id: e.vendor_id,
            device_id: e.device_id,
            class_code: e.class_code,
            revision: e.revision,
            subsystem_vendor_id: e.subsystem_vendor_id,
            subsystem_id: e.subsystem_id,
            bars: e.bars.clone(),
            capabilities: e.capabilities.clone(),
            ext_capabilities: e.ext_capabilities.clone(),
        };
        let back: pcisim_guest_wire::DeviceDescription =
            serde_json::from_value(serde_json::to_value(&view).unwrap()).unwrap();
        assert_eq!(back, d);
        let v = serde_json::to_value(&view).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = pcisim_guest_wire::DeviceDescription::FIELDS.to_vec();
        keys.sort_unstable();
        want.sort_unstable();
        assert_eq!(keys, want);
    }
}
