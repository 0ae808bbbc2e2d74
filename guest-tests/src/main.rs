//! `pcisim-guest`: the programs pcisim's lab runs inside the Linux guest.
//!
//! A multi-call binary: `pcisim-guest <subcommand> [options]`. Scenario
//! subcommands print KTAP v1 on stdout and exit with kselftest codes (0 pass,
//! 1 fail, 4 skip). See README.md.

mod agent;
mod args;
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
mod vdev;
#[allow(dead_code)] // the uapi subset is kept complete for the next scenarios
mod vfio;
mod vfiouser;

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

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let Some(sub) = argv.get(1) else {
        eprint!("{USAGE}");
        std::process::exit(2);
    };
    let rest = &argv[2..];
    let code = match sub.as_str() {
        "agent" => agent::run(rest),
        "e1" => e1::run(rest),
        "e2" => e2::run(rest),
        "e3" => e3::run(rest),
        "e4" => e4::run(rest),
        "e5" => e5::run(rest),
        "reset" => reset::run(rest),
        "reset-vfio" => resetvfio::run(rest),
        "reset-dma" => resetdma::run(rest),
        "reset-hot" => resethot::run(rest),
        "npu-peer" => npu::run(rest),
        "vfio-user" => vfiouser::run(rest),
        "bar-io" => bario::run(rest),
        "dma-stream" => dmastream::run(rest),
        "mm-teardown" => mmtear::run(rest),
        "mm-teardown-worker" => mmtear::worker(rest),
        "dma-map-pages" => dmamap::run(rest),
        "sva" => sva::run(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            0
        }
        other => {
            eprintln!("pcisim-guest: unknown subcommand {other:?}\n{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
