//! Round trips of every program's options, and the refusals.

use super::*;
use crate::{DeviceIds, GuestProgram};

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// Representative values of every program's options: each with every option given, and
/// each with only the required ones.
fn samples() -> Vec<Options> {
    vec![
        Options::Agent(AgentOptions {
            port: s("/dev/ttyS1"),
        }),
        Options::Agent(AgentOptions { port: None }),
        Options::E1(E1Options {
            expect: Some(serde_json::json!({"vendor_id": 4660, "bars": [{"index": 0}]})),
            expect_file: None,
            bdf: s("0000:01:00.0"),
        }),
        Options::E1(E1Options {
            expect: None,
            expect_file: s("/tmp/d.json"),
            bdf: None,
        }),
        Options::E2(SelectOptions::at("0000:02:00.0")),
        Options::E4(SelectOptions { bdf: None }),
        Options::E5(SelectOptions::at("0000:01:00.0")),
        Options::E3(E3Options {
            vectors: Some(vec![0, 1, 5]),
            irq: Some(IrqMode::Msi),
            bdf: s("0000:02:00.0"),
        }),
        Options::E3(E3Options {
            vectors: None,
            irq: None,
            bdf: None,
        }),
        Options::Reset(ResetOptions {
            bdf: s("0000:01:00.0"),
            method: ResetMethod::Bus,
            dirty: Some(OnOff::Off),
            expect: Some(ResetExpect::Dead),
            offered: Some(vec![ResetMethod::Flr, ResetMethod::Pm, ResetMethod::Bus]),
            absent: Some(vec![ResetMethod::Pm]),
            min_ms: Some(1500),
            errno: Some(25),
            kmsg: s("Data Link Layer Link Active not set|giving up"),
        }),
        Options::Reset(ResetOptions {
            bdf: None,
            method: ResetMethod::PmCycle,
            dirty: None,
            expect: None,
            offered: None,
            absent: None,
            min_ms: None,
            errno: None,
            kmsg: None,
        }),
        Options::ResetVfio(ResetVfioOptions {
            bdf: s("0000:01:00.0"),
            op: VfioResetOp::SysfsFlr,
            ring: Some(OnOff::On),
        }),
        Options::ResetDma(ResetDmaOptions {
            bdf: None,
            mode: ResetDmaMode::Buggy,
            len: Some(1 << 20),
        }),
        Options::ResetHot(ResetHotOptions {
            bdf: "0000:01:00.0".into(),
            peer: "0000:01:00.1".into(),
            peer_vendor: Some(0x1234),
            peer_device: Some(0x0c10),
        }),
        Options::NpuPeer(NpuPeerOptions {
            bdf: s("0000:01:00.1"),
            present: YesNo::Yes,
        }),
        Options::VfioUser(VfioUserOptions {
            bdf: s("0000:02:00.0"),
            dma_kib: Some(64),
            req: Some(ReqMode::Release),
            ready_file: s("/tmp/ready"),
            wait_s: Some(120),
        }),
        Options::BarIo(BarIoOptions {
            bdf: "0000:02:00.0".into(),
            bar: Some(2),
            off: vec![0, 4, 0x100],
            write: Some(0xdead_beef),
        }),
        Options::DmaStream(DmaStreamOptions {
            bdf: s("0000:02:00.0"),
            irq: Some(IrqMode::Msix),
            ready_file: s("/tmp/r"),
            down_file: s("/tmp/d"),
            stream_s: Some(60),
            down_wait_s: Some(30),
        }),
        Options::MmTeardown(MmTeardownOptions {
            case: MmCase::BarMmap,
            bdf: s("0000:01:00.0"),
            iova: Some(0x4000_0000),
            buf_kib: Some(2048),
        }),
        Options::MmTeardownWorker(MmWorkerOptions {
            role: MmRole::Receiver,
            case: MmCase::Pass,
            bdf: s("0000:01:00.0"),
            group: s("3"),
            iova: 0x4000_0000,
            buf_kib: Some(2048),
        }),
        Options::DmaMapPages(DmaMapOptions {
            bdf: None,
            mib: Some(1024),
        }),
        Options::Sva(SvaOptions {
            bdf: "0000:01:00.1".into(),
            case: "fork".into(),
            lenient: Some(OnOff::On),
        }),
        Options::Userptr(UserptrOptions {
            bdf: "0000:01:00.0".into(),
            mode: UserptrMode::Pinned,
            unmap: Some(UnmapCall::Dontneed),
            mib: Some(4),
            repeat: Some(256),
            lenient: None,
        }),
    ]
}

#[test]
fn test_every_programs_options_round_trip() {
    let samples = samples();
    for p in Program::ALL {
        assert!(
            samples.iter().any(|o| o.program() == *p),
            "no sample of {p}'s options"
        );
    }
    let ids = DeviceIds {
        vendor: 0x1234,
        device: 0x0b10,
    };
    for o in samples {
        let p = o.program();
        assert_eq!(Options::parse(p, &o.to_args()), Ok(o.clone()), "{o:?}");
        // Through a whole command line, with the ids where the program takes them.
        let mut g = GuestProgram::new(o.clone());
        if p.takes_device() {
            g = g.device(ids);
        }
        assert_eq!(GuestProgram::parse(&g.to_argv()), Ok(g.clone()), "{g:?}");
        // Every option the command line gives is one the program takes.
        for w in o.to_args().iter().filter(|w| w.starts_with("--")) {
            assert!(Options::flags(p).contains(&&w[2..]), "{p}: {w}");
        }
    }
}

#[test]
fn test_the_words_on_the_command_line() {
    let g = GuestProgram::new(ResetOptions {
        bdf: s("0000:01:00.0"),
        method: ResetMethod::Bus,
        dirty: None,
        expect: Some(ResetExpect::Kept),
        offered: Some(vec![ResetMethod::Flr, ResetMethod::Bus]),
        absent: None,
        min_ms: None,
        errno: Some(25),
        kmsg: None,
    })
    .device(DeviceIds {
        vendor: 0x1234,
        device: 0x0b10,
    });
    assert_eq!(
        g.to_argv(),
        [
            "/bin/pcisim-guest",
            "reset",
            "--vendor",
            "0x1234",
            "--device",
            "0x0b10",
            "--bdf",
            "0000:01:00.0",
            "--method",
            "bus",
            "--expect",
            "kept",
            "--offered",
            "flr,bus",
            "--errno",
            "25"
        ]
    );
    // Any order, `=` forms, hex numbers.
    assert_eq!(
        GuestProgram::parse(&[
            "/bin/pcisim-guest",
            "reset",
            "--errno=25",
            "--method",
            "bus",
            "--device",
            "0x0b10",
            "--offered",
            "flr,bus",
            "--vendor=0x1234",
            "--expect",
            "kept",
            "--bdf",
            "0000:01:00.0",
        ]),
        Ok(g)
    );
    assert_eq!(
        Options::parse(
            Program::MmTeardownWorker,
            &["--role", "opener", "--case", "exit", "--iova", "0x40000000"]
        ),
        Ok(Options::MmTeardownWorker(MmWorkerOptions {
            role: MmRole::Opener,
            case: MmCase::Exit,
            bdf: None,
            group: None,
            iova: 0x4000_0000,
            buf_kib: None,
        }))
    );
}

#[test]
fn test_wrong_options_are_refused_with_a_clear_error() {
    let e = Options::parse(Program::E3, &["--irqs", "msi"]).unwrap_err();
    assert_eq!(
        e,
        WireError::UnknownOption {
            program: "e3",
            option: "irqs".into(),
            accepted: E3Options::FLAGS,
        }
    );
    assert_eq!(
        e.to_string(),
        "e3: unknown option --irqs (it takes: --vectors --irq --bdf)"
    );
    let e = Options::parse(Program::E3, &["--irq", "msx"]).unwrap_err();
    assert_eq!(e.to_string(), "e3: --irq: \"msx\" is not one of msix, msi");
    assert_eq!(
        Options::parse(Program::Reset, &["--bdf", "x"]),
        Err(WireError::MissingOption {
            program: "reset",
            option: "method",
        })
    );
    assert_eq!(
        Options::bare(Program::Reset).unwrap_err().to_string(),
        "reset: missing required option --method"
    );
    assert!(Options::bare(Program::E1).is_ok());
    let bad = |p: Program, args: &[&str]| Options::parse(p, args).unwrap_err().to_string();
    assert_eq!(
        bad(Program::DmaMapPages, &["--mib", "lots"]),
        "dma-map-pages: --mib: \"lots\" is not a number"
    );
    assert_eq!(
        bad(
            Program::ResetHot,
            &["--bdf", "a", "--peer", "b", "--peer-vendor", "0x12345"]
        ),
        "reset-hot: --peer-vendor: \"0x12345\" is out of range"
    );
    assert_eq!(
        bad(Program::E2, &["--bdf", "a", "--bdf", "b"]),
        "e2: --bdf: given twice"
    );
    assert_eq!(bad(Program::E2, &["--bdf"]), "e2: --bdf: needs a value");
    assert_eq!(
        bad(Program::E2, &["0000:01:00.0"]),
        "e2: unexpected argument \"0000:01:00.0\" (options are --name value)"
    );
    assert_eq!(
        bad(Program::E1, &["--expect", "{"]),
        "e1: --expect: not JSON: EOF while parsing an object at line 1 column 1"
    );
    assert_eq!(
        bad(Program::Reset, &["--method", "flr", "--offered", "flr,warm"]),
        "reset: --offered: \"warm\" is not one of flr, af_flr, pm, bus, device_specific, acpi, cxl_bus, pm-cycle, sbr"
    );
    // The ids: required where the program takes them, refused where it does not.
    assert!(matches!(
        GuestProgram::parse(&["/bin/pcisim-guest", "e2", "--bdf", "x"]),
        Err(WireError::BadValue(m)) if m.contains("e2 needs --vendor V --device D")
    ));
    assert!(matches!(
        GuestProgram::parse(&["/bin/pcisim-guest", "e2", "--vendor", "1"]),
        Err(WireError::BadValue(_))
    ));
    assert!(matches!(
        GuestProgram::parse(&[
            "/bin/pcisim-guest", "sva", "--vendor", "1", "--device", "2", "--bdf", "x",
            "--case", "basic"
        ]),
        Err(WireError::BadValue(m)) if m.contains("sva takes no --vendor")
    ));
}

#[test]
fn test_words_round_trip() {
    for m in ResetMethod::ALL {
        assert_eq!(ResetMethod::from_word(m.word()), Ok(*m));
    }
    assert_eq!(u64::from_word("0x10"), Ok(16));
    assert_eq!(Vec::<u32>::from_word(" 1, 2 ,"), Ok(vec![1, 2]));
    assert_eq!(Vec::<u32>::new().to_word(), "");
    assert_eq!(Vec::<u32>::from_word(""), Ok(vec![]));
    assert!(i32::from_word("x").is_err());
    assert!(OnOff::On.is_on() && !OnOff::Off.is_on());
}
