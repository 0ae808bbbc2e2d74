//! `pcisim serve` with a GPU and an NPU naming it as peer (`peer=gpu0`): the NPU's PEER_STATUS
//! says "configured" always and "present" exactly while a client (QEMU) is attached to the GPU —
//! the GPU/NPU pairing of design.md §5, through the real binary and the rust-vmm client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const PEER_STATUS: u64 = 0x018;

struct Serve(Child);
impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn peer_status(npu: &mut vfio_user::Client) -> u32 {
    let mut b = [0u8; 4];
    npu.region_read(0, PEER_STATUS, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn test_npu_reports_gpu_peer_present_while_gpu_client_attached() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/pcisim-peer").unwrap();
    let gpu = dir.as_path().join("gpu.sock");
    let npu = dir.as_path().join("npu.sock");
    let _serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_pcisim"))
            .arg("serve")
            .arg("--device")
            .arg(format!("gpu:socket={},id=gpu0,vram=1M", gpu.display()))
            .arg("--device")
            .arg(format!("npu:socket={},id=npu0,peer=gpu0", npu.display()))
            .spawn()
            .unwrap(),
    );
    wait_for(&gpu);
    wait_for(&npu);
    let mut n = vfio_user::Client::new(&npu).unwrap();
    n.region_write(7, 4, &0x0006u16.to_le_bytes()).unwrap();
    assert_eq!(
        peer_status(&mut n) & 3,
        1,
        "configured, not present: no client on the GPU"
    );
    let g = vfio_user::Client::new(&gpu).unwrap();
    assert_eq!(
        peer_status(&mut n) & 3,
        3,
        "present while QEMU is attached to the GPU"
    );
    g.shutdown().unwrap();
    drop(g);
    let t = Instant::now();
    while peer_status(&mut n) & 2 != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "peer still present after the GPU client left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(peer_status(&mut n) & 3, 1, "gone again, still configured");
}

#[test]
fn test_describe_npu_names_peer_in_vendor_capability() {
    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args([
            "describe",
            "--device",
            "gpu:socket=/tmp/x-gpu.sock,id=gpu0",
            "--device",
            "npu:socket=/tmp/x-npu.sock,id=npu0,peer=gpu0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let npu = &v[1]["description"];
    assert_eq!(npu["device_id"], 0x0b20);
    assert_eq!(npu["class_code"], 0x12_0000);
    let caps = npu["capabilities"].as_array().unwrap();
    assert!(
        caps.iter().any(|c| c["id"] == 9),
        "vendor-specific capability present: {caps:?}"
    );
}

#[test]
fn test_npu_peer_naming_unknown_gpu_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args([
            "describe",
            "--device",
            "npu:socket=/tmp/x-npu.sock,peer=gpu7",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peer=gpu7 names no GPU"), "{err}");
}
