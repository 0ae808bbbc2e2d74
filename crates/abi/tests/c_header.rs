//! The C side cannot drift from the abi crate: the committed `guest-tests/kmod/pcisim_regs.h`
//! is exactly what the generator writes, and the hand-written uapi header
//! `guest-tests/kmod/pcisim_npu_uapi.h` has the numbers and layouts of `pcisim_abi::npu::uapi`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use pcisim_abi::c::{self, Struct};
use pcisim_abi::npu::{queue, regs as npu_regs, uapi};

fn kmod_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest-tests/kmod")
}

fn read(name: &str) -> String {
    let path = kmod_dir().join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

fn generated() -> String {
    let mut text = String::new();
    c::write_header(&mut text).expect("rendering into a String cannot fail");
    text
}

#[test]
fn test_committed_c_header_is_the_generated_one() {
    let committed = read(c::HEADER_NAME);
    let want = generated();
    if committed != want {
        let line = committed
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || committed.lines().count().min(want.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "guest-tests/kmod/{} differs from the abi crate (first difference at line {line}).\n\
             Regenerate it from the repository root:\n    {}",
            c::HEADER_NAME,
            c::REGENERATE
        );
    }
}

#[test]
fn test_c_names_are_unique_and_layouts_cover_every_byte() {
    let mut names = BTreeSet::new();
    for s in c::SECTIONS {
        for d in s.defines {
            let name = format!("{}{}", s.prefix, d.name);
            assert!(names.insert(name.clone()), "{name} defined twice");
            assert!(!d.doc.trim().is_empty(), "{name} has no doc");
        }
    }
    // Layout tables: fields in order, no gap, no overlap, ending at the size.
    for st in c::STRUCTS {
        let mut at = 0;
        for f in st.fields {
            assert_eq!(f.offset, at, "{}.{} offset", st.name, f.name);
            assert!(
                [1, 2, 4, 8].contains(&f.size),
                "{}.{} size",
                st.name,
                f.name
            );
            assert_eq!(f.offset % f.size, 0, "{}.{} aligned", st.name, f.name);
            at += f.size * f.count;
        }
        assert_eq!(at, st.size, "{} size", st.name);
    }
}

/// The value of field `name` of `st` in the little-endian `bytes`.
fn field(st: &Struct, bytes: &[u8], name: &str) -> u64 {
    let f = st
        .fields
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("{} has no field {name}", st.name));
    let mut v = [0u8; 8];
    v[..f.size].copy_from_slice(&bytes[f.offset..f.offset + f.size]);
    u64::from_le_bytes(v)
}

#[test]
fn test_c_layouts_match_the_rust_encoders() {
    let d = queue::Descriptor {
        op: 0x11,
        flags: 0x22,
        pasid: 0x3333_3333,
        src: 0x4444_4444_4444_4444,
        dst: 0x5555_5555_5555_5555,
        len: 0x6666_6666_6666_6666,
        crec: 0x7777_7777_7777_7777,
        tag: 0x8888_8888_8888_8888,
        reserved_set: false,
    };
    let b = d.encode();
    let l = &queue::DESCRIPTOR_LAYOUT;
    assert_eq!(b.len(), l.size);
    for (name, want) in [
        ("op", 0x11),
        ("flags", 0x22),
        ("reserved0", 0),
        ("pasid", 0x3333_3333),
        ("src", d.src),
        ("dst", d.dst),
        ("len", d.len),
        ("completion", d.crec),
        ("tag", d.tag),
        ("reserved1", 0),
    ] {
        assert_eq!(field(l, &b, name), want, "npu_desc.{name}");
    }
    let c = queue::Completion {
        tag: 0x1111_1111_1111_1111,
        status: 0x2222_2222,
        slot: 0x3333_3333,
        result: 0x4444_4444_4444_4444,
        pasid: 0x5555_5555,
    };
    let b = c.encode();
    let l = &queue::COMPLETION_LAYOUT;
    assert_eq!(b.len(), l.size);
    for (name, want) in [
        ("tag", c.tag),
        ("status", 0x2222_2222),
        ("slot", 0x3333_3333),
        ("result", c.result),
        ("pasid", 0x5555_5555),
        ("valid", u64::from(npu_regs::COMPLETION_VALID)),
    ] {
        assert_eq!(field(l, &b, name), want, "npu_cqe.{name}");
    }
    let f = queue::FaultRecord {
        va: 0x1111_1111_1111_1111,
        pasid: 0x2222_2222,
        access: 0x3333_3333,
        reason: 0x4444_4444,
        level: 0x5555_5555,
        tag: 0x6666_6666_6666_6666,
    };
    let b = f.encode();
    let l = &queue::FAULT_LAYOUT;
    assert_eq!(b.len(), l.size);
    for (name, want) in [
        ("va", f.va),
        ("pasid", 0x2222_2222),
        ("access", 0x3333_3333),
        ("reason", 0x4444_4444),
        ("level", 0x5555_5555),
        ("tag", f.tag),
    ] {
        assert_eq!(field(l, &b, name), want, "npu_fault.{name}");
    }
    let raw = pcisim_abi::gpu::ring::RawCommand {
        opcode: 0x11,
        flags: 0x22,
        reserved: [0; 6],
        a: 0x3333_3333_3333_3333,
        b: 0x4444_4444_4444_4444,
        c: 0x5555_5555_5555_5555,
    };
    let b = raw.encode();
    let l = &pcisim_abi::gpu::ring::LAYOUT;
    assert_eq!(b.len(), l.size);
    for (name, want) in [
        ("opcode", 0x11),
        ("flags", 0x22),
        ("a", raw.a),
        ("b", raw.b),
        ("c", raw.c),
    ] {
        assert_eq!(field(l, &b, name), want, "gpu_ring_cmd.{name}");
    }
}

/// `#define NAME VALUE` lines of a C header with a simple integer VALUE: decimal, hex, a
/// character literal, `(1u << n)`, an optional `u` suffix.
fn simple_defines(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .filter_map(|rest| {
            let rest = rest.split("/*").next()?.trim();
            let (name, value) = rest.split_once(char::is_whitespace)?;
            Some((name.to_string(), value.trim().to_string()))
        })
        .collect()
}

fn parse_value(v: &str) -> Option<u64> {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('(').and_then(|v| v.strip_suffix(')')) {
        let (a, b) = inner.split_once("<<")?;
        return Some(parse_value(a)? << parse_value(b)?);
    }
    if let Some(ch) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        let mut chars = ch.chars();
        let c = chars.next()?;
        return chars.next().is_none().then_some(c as u64);
    }
    let v = v.trim_end_matches(['u', 'U', 'l', 'L']);
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Struct name → fields (name, offset, size) of the `struct NAME { __uN field; ... };` blocks,
/// with C's natural alignment.
/// Fields of a parsed struct: (name, offset, size).
type Fields = Vec<(String, usize, usize)>;

fn structs(text: &str) -> BTreeMap<String, Fields> {
    let mut out = BTreeMap::new();
    let mut cur: Option<(String, Fields, usize)> = None;
    for line in text.lines() {
        let l = line.split("/*").next().unwrap_or("").trim();
        if let Some(name) = l.strip_prefix("struct ").and_then(|r| r.strip_suffix(" {")) {
            cur = Some((name.to_string(), Vec::new(), 0));
        } else if l == "};" {
            if let Some((name, fields, _)) = cur.take() {
                out.insert(name, fields);
            }
        } else if let Some((_, fields, at)) = cur.as_mut() {
            let Some((ty, rest)) = l.split_once(char::is_whitespace) else {
                continue;
            };
            let size = match ty {
                "__u8" => 1,
                "__u16" => 2,
                "__u32" => 4,
                "__u64" => 8,
                other => panic!("unexpected type {other} in {line:?}"),
            };
            let fname = rest.trim().trim_end_matches(';').to_string();
            *at = at.next_multiple_of(size);
            fields.push((fname, *at, size));
            *at += size;
        }
    }
    out
}

#[test]
fn test_uapi_header_numbers_match_the_abi() {
    let text = read("pcisim_npu_uapi.h");
    let defines = simple_defines(&text);
    let mut checked = 0;
    for d in uapi::TABLE {
        let cname = format!("PCISIM_NPU_{}", d.name);
        let Some(v) = defines.get(&cname) else {
            panic!("pcisim_npu_uapi.h does not define {cname}");
        };
        let got = if let Some(args) = v
            .strip_prefix("_IOR(")
            .map(|a| (uapi::IOC_READ, a))
            .or_else(|| {
                v.strip_prefix("_IOWR(")
                    .map(|a| (uapi::IOC_READ | uapi::IOC_WRITE, a))
            }) {
            let (dir, args) = args;
            let parts: Vec<&str> = args
                .trim_end_matches(')')
                .split(',')
                .map(str::trim)
                .collect();
            assert_eq!(parts.len(), 3, "{cname} = {v}");
            assert_eq!(parts[0], "PCISIM_NPU_IOC_MAGIC", "{cname}");
            let nr = parse_value(parts[1]).unwrap_or_else(|| panic!("{cname}: nr {}", parts[1]));
            let size = match parts[2] {
                "struct pcisim_npu_info" => std::mem::size_of::<uapi::Info>(),
                "struct pcisim_npu_work" => std::mem::size_of::<uapi::Work>(),
                other => panic!("{cname}: unexpected argument type {other}"),
            };
            uapi::ioc(dir, nr, size)
        } else {
            parse_value(v).unwrap_or_else(|| panic!("{cname} = {v}: not a number"))
        };
        assert_eq!(got, d.value, "{cname}");
        checked += 1;
    }
    // Every PCISIM_NPU_ number of the header is one of the abi's (no unchecked extra).
    let extra: Vec<&String> = defines
        .keys()
        .filter(|k| {
            k.starts_with("PCISIM_NPU_")
                && k.as_str() != "PCISIM_NPU_UAPI_H"
                && !uapi::TABLE
                    .iter()
                    .any(|d| format!("PCISIM_NPU_{}", d.name) == **k)
        })
        .collect();
    assert!(extra.is_empty(), "defines the abi does not know: {extra:?}");
    assert_eq!(checked, uapi::TABLE.len());
    assert!(checked >= 20, "the parser found only {checked} numbers");
}

#[test]
fn test_uapi_header_structs_match_the_abi() {
    use std::mem::{offset_of, size_of};
    let parsed = structs(&read("pcisim_npu_uapi.h"));
    macro_rules! fields {
        ($t:ty: $($f:ident),*) => {
            vec![$((stringify!($f).to_string(), offset_of!($t, $f), {
                let v = <$t>::default();
                std::mem::size_of_val(&v.$f)
            })),*]
        };
    }
    let want = [
        (
            "pcisim_npu_info",
            size_of::<uapi::Info>(),
            fields!(uapi::Info: pasid, flags, root, owner_pid, contexts, reserved),
        ),
        (
            "pcisim_npu_work",
            size_of::<uapi::Work>(),
            fields!(uapi::Work: op, flags, src, dst, len, ticket, status, faults, result, fault_va),
        ),
        (
            "pcisim_npu_status",
            size_of::<uapi::StatusPage>(),
            fields!(uapi::StatusPage: magic, pasid, bound, reserved, submitted, completed, faults, last_fault_va),
        ),
    ];
    for (name, size, fields) in want {
        let Some(got) = parsed.get(name) else {
            panic!(
                "pcisim_npu_uapi.h has no struct {name} (found {:?})",
                parsed.keys()
            );
        };
        assert_eq!(got, &fields, "struct {name}");
        let end = got.last().map_or(0, |(_, o, s)| o + s);
        assert_eq!(end.next_multiple_of(8), size, "struct {name} size");
    }
}

#[test]
fn test_header_parsers_see_what_they_check() {
    // The instruments above must be able to fail: a changed number and a moved field are seen.
    let d = simple_defines("#define PCISIM_NPU_WAIT (1u << 3)\n#define X 'N'\n#define Y 0x10u\n");
    assert_eq!(parse_value(&d["PCISIM_NPU_WAIT"]), Some(8));
    assert_eq!(parse_value(&d["X"]), Some(78));
    assert_eq!(parse_value(&d["Y"]), Some(16));
    let s = structs("struct a {\n\t__u32 x; /* c */\n\t__u64 y;\n};\n");
    assert_eq!(
        s["a"],
        vec![("x".to_string(), 0, 4), ("y".to_string(), 8, 8)]
    );
}
