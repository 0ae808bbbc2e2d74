//! The virtual machine layer: everything needed to bring up one VM with pcisim's devices and to
//! talk to it, and nothing about scenarios.
//!
//! [`provision`] (run `qemu-scripts/provision.sh`, parse its `PCISIM_*` lines, probe KVM with
//! [`kvmprobe`]), [`guest_build`] (the static guest binary), [`kmod`] (the guest kernel modules
//! of `guest-tests/kmod/`), [`initramfs`] (newc cpio writer, `modules.dep` resolution, `/init`),
//! [`server`] (`pcisim serve`/`describe`), [`control`] (the server's control socket: journal,
//! violations, fault injection), [`profile`] (VM profiles: devices, placement, hotplug mode),
//! [`qemu`] (command line and child), [`qmp`] (the QMP client), [`agent`] (the guest agent's
//! JSON-lines client), [`lines`] (the JSON-lines reader both share), [`pvh`] (the guest
//! kernel's uncompressed PVH image for TCG boots), [`process`] (children that die with the lab, signals), [`stall`] (what a
//! stalled VM's QEMU and server threads were doing, for a timeout's error) and [`boot`] (the one
//! boot sequence's shared steps: provisioning, builds and initramfs, the QEMU machine of a
//! profile; used by the suite and by `lab up`).

pub mod agent;
pub mod boot;
pub mod control;
pub mod guest_build;
pub mod initramfs;
pub mod kmod;
pub mod kvmprobe;
pub mod lines;
pub mod process;
pub mod profile;
pub mod provision;
pub mod pvh;
pub mod qemu;
pub mod qmp;
pub mod server;
pub mod stall;
