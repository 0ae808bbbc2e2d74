//! The docs' register tables (docs/programming-model.md, docs/npu.md) name the same registers at
//! the same offsets as the abi crate: a register added to one and not the other fails here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use pcisim_abi::c::Define;

fn doc(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

/// Register name → offset from the `| 0x... | NAME | ...` rows between the line `from` and
/// the line `to`. `0x100 / 0x104 | SQ_BASE_LO / HI` rows give both halves; `0x040..0x07C |
/// SCRATCH[0..16]` gives SCRATCH at its first offset.
fn table(text: &str, from: &str, to: &str) -> BTreeMap<String, u64> {
    let start = text
        .lines()
        .position(|l| l.trim() == from)
        .unwrap_or_else(|| panic!("no line {from:?}"));
    let mut out = BTreeMap::new();
    for line in text.lines().skip(start + 1).take_while(|l| l.trim() != to) {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        if cols.len() < 4 || !cols[1].starts_with("0x") {
            continue;
        }
        let offsets: Vec<u64> = cols[1]
            .split(" / ")
            .map(|o| {
                let o = o.split("..").next().unwrap_or(o);
                u64::from_str_radix(o.trim_start_matches("0x"), 16)
                    .unwrap_or_else(|e| panic!("offset {o:?} in {line:?}: {e}"))
            })
            .collect();
        let name = cols[2].split('[').next().unwrap_or(cols[2]);
        let names: Vec<String> = match name.split_once(" / ") {
            Some((lo, hi)) => {
                let stem = lo.strip_suffix("_LO").unwrap_or(lo);
                vec![lo.to_string(), format!("{stem}_{hi}")]
            }
            None => vec![name.to_string()],
        };
        assert_eq!(offsets.len(), names.len(), "{line:?}");
        for (n, o) in names.into_iter().zip(offsets) {
            assert!(out.insert(n.clone(), o).is_none(), "{n} twice");
        }
    }
    out
}

fn abi(defs: &[Define]) -> BTreeMap<String, u64> {
    defs.iter().map(|d| (d.name.to_string(), d.value)).collect()
}

/// What differs between the docs' table and the abi's, register by register (empty: none).
fn differences(docs: &BTreeMap<String, u64>, abi: &BTreeMap<String, u64>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, off) in abi {
        match docs.get(name) {
            None => out.push(format!(
                "{name} ({off:#x}) is in the abi but not in the docs' table"
            )),
            Some(d) if d != off => out.push(format!("{name}: docs {d:#x}, abi {off:#x}")),
            Some(_) => {}
        }
    }
    for (name, off) in docs {
        if !abi.contains_key(name) {
            out.push(format!(
                "{name} ({off:#x}) is in the docs' table but not in the abi"
            ));
        }
    }
    out
}

fn check(doc_name: &str, docs: &BTreeMap<String, u64>, defs: &[Define]) {
    let diff = differences(docs, &abi(defs));
    assert!(
        diff.is_empty(),
        "docs/{doc_name} and the abi crate disagree:\n  {}",
        diff.join("\n  ")
    );
}

#[test]
fn test_gpu_register_table_matches_the_abi() {
    let docs = table(
        &doc("programming-model.md"),
        "### BAR0 registers",
        "### Details the table leaves open",
    );
    check(
        "programming-model.md",
        &docs,
        pcisim_abi::gpu::regs::REGISTERS,
    );
}

#[test]
fn test_npu_register_tables_match_the_abi() {
    let docs = table(
        &doc("npu.md"),
        "## BAR0",
        "### Descriptors (SQ entries, 64 bytes)",
    );
    check("npu.md", &docs, pcisim_abi::npu::regs::REGISTERS);
}

#[test]
fn test_differences_name_each_register() {
    let m = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
        v.iter().map(|(n, o)| (n.to_string(), *o)).collect()
    };
    let docs = m(&[("A", 0), ("B", 4), ("D", 12)]);
    let abi = m(&[("A", 0), ("B", 8), ("C", 12)]);
    assert_eq!(
        differences(&docs, &abi),
        [
            "B: docs 0x4, abi 0x8",
            "C (0xc) is in the abi but not in the docs' table",
            "D (0xc) is in the docs' table but not in the abi",
        ]
    );
    assert!(differences(&docs, &docs).is_empty());
}

#[test]
fn test_table_parser_reads_pairs_and_ranges() {
    let t = table(
        "x\n| 0x040..0x07C | SCRATCH[0..16] | RW | s |\n| 0x100 / 0x104 | SQ_BASE_LO / HI | RW | b |\ny\n",
        "x",
        "y",
    );
    let want: BTreeMap<String, u64> = [
        ("SCRATCH", 0x40),
        ("SQ_BASE_LO", 0x100),
        ("SQ_BASE_HI", 0x104),
    ]
    .into_iter()
    .map(|(n, o)| (n.to_string(), o))
    .collect();
    assert_eq!(t, want);
}
