//! `--case basic` (M6): bind, work on heap and mmap'd memory, faults serviced, the status
//! page.

use super::dev::{strerror, Npu, Region, StatusMap};
use super::dev::{
    INFO_BOUND, INFO_SVA, OP_COMPARE, OP_FILL, OP_MEMCPY, STATUS_MAGIC, ST_MISMATCH, ST_OK,
};
use super::target::{expect, Checks, Target};

/// M6 basic: bind, work on heap and mmap'd memory, faults serviced, the status page.
pub(super) fn case_basic(c: &mut Checks<'_>, t: &Target) -> Result<(), String> {
    let npu = Npu::open(&t.dev)?;
    let info = npu.info().map_err(|e| format!("INFO: {}", strerror(e)))?;
    println!("# pasid {}", info.pasid);
    c.k.diag(&format!(
        "pasid {} root {:#x} flags {:#x}",
        info.pasid, info.root, info.flags
    ));
    c.check(
        "open binds the opener's mm: a PASID, bound, the device reaches physical memory",
        expect(
            info.pasid > 0
                && info.flags & INFO_BOUND != 0
                && info.flags & INFO_SVA != 0
                && info.owner_pid == std::process::id(),
            || format!("{info:?}"),
        ),
    );

    // FILL into mmap'd memory, MEMCPY from the heap, COMPARE.
    let mut a = Region::new(3 * 4096 + 512)?;
    a.fill(0);
    let r = npu.run(OP_FILL, 0, 0x0807_0605_0403_0201, a.addr() + 100, 3 * 4096);
    c.check(
        "FILL of 12 KiB at an unaligned VA of an mmap'd buffer",
        match r {
            Ok(w) if w.status == ST_OK && w.result == 3 * 4096 => {
                let b = a.bytes();
                let bad = (0..3 * 4096).find(|&i| b[100 + i] != (i % 8) as u8 + 1);
                expect(
                    bad.is_none() && b[99] == 0 && b[100 + 3 * 4096] == 0,
                    || format!("byte {bad:?} wrong (or the neighbours were touched)"),
                )
            }
            Ok(w) => Err(format!("status {} result {}", w.status, w.result)),
            Err((e, _)) => Err(strerror(e)),
        },
    );
    let heap: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut b = Region::new(20_000)?;
    b.fill(0xff);
    let r = npu.run(
        OP_MEMCPY,
        0,
        heap.as_ptr() as u64,
        b.addr(),
        heap.len() as u64,
    );
    c.check(
        "MEMCPY of 20000 bytes from the heap (malloc) to an mmap'd buffer",
        match r {
            Ok(w) if w.status == ST_OK => {
                expect(b.bytes() == heap.as_slice(), || "the copy differs".into())
            }
            Ok(w) => Err(format!("status {} result {}", w.status, w.result)),
            Err((e, _)) => Err(strerror(e)),
        },
    );
    let eq = npu.run(
        OP_COMPARE,
        0,
        heap.as_ptr() as u64,
        b.addr(),
        heap.len() as u64,
    );
    let mut heap2 = heap.clone();
    heap2[12_345] ^= 0x40;
    let ne = npu.run(
        OP_COMPARE,
        0,
        heap2.as_ptr() as u64,
        b.addr(),
        heap.len() as u64,
    );
    c.check(
        "COMPARE: equal ranges OK, one flipped byte reported at its offset",
        match (eq, ne) {
            (Ok(e), Ok(n)) => expect(
                e.status == ST_OK && n.status == ST_MISMATCH && n.result == 12_345,
                || {
                    format!(
                        "equal: status {}; different: status {} offset {}",
                        e.status, n.status, n.result
                    )
                },
            ),
            (Err((e, _)), _) | (_, Err((e, _))) => Err(strerror(e)),
        },
    );

    // Memory the process never touched: the device faults, the driver faults the pages in.
    let fresh = Region::new(8 * 4096)?;
    let source: Vec<u8> = (0..8 * 4096u32).map(|i| (i * 13 % 241) as u8).collect();
    let r = npu.run(OP_MEMCPY, 0, source.as_ptr() as u64, fresh.addr(), 8 * 4096);
    if let Ok(w) = &r {
        c.k.diag(&format!(
            "{} fault(s) serviced for 8 untouched pages",
            w.faults
        ));
    }
    c.check(
        "MEMCPY into untouched memory: translation faults serviced by the driver, data correct",
        match r {
            Ok(w) if w.status == ST_OK => {
                expect(w.faults >= 1 && fresh.bytes() == source.as_slice(), || {
                    format!(
                        "{} faults, data equal: {}",
                        w.faults,
                        fresh.bytes() == source.as_slice()
                    )
                })
            }
            Ok(w) => Err(format!(
                "status {} result {} faults {}",
                w.status, w.result, w.faults
            )),
            Err((e, w)) => Err(format!("{} (fault va {:#x})", strerror(e), w.fault_va)),
        },
    );

    let st = StatusMap::map(&npu)?;
    let s = st.read();
    c.check(
        "the status page (mmap of the device file) shows the binding and its counters",
        expect(
            s.magic == STATUS_MAGIC
                && s.pasid == info.pasid
                && s.bound == 1
                && s.submitted >= 5
                && s.faults >= 1,
            || format!("{s:?}"),
        ),
    );
    // SAFETY: mmap with PROT_WRITE of the device file must be refused; nothing is mapped on
    // failure, and a success is unmapped at once.
    let w = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            npu.fd(),
            0,
        )
    };
    let refused = w == libc::MAP_FAILED;
    if !refused {
        // SAFETY: unmaps the mapping just made.
        unsafe { libc::munmap(w, 4096) };
    }
    c.check(
        "a writable mapping of the status page is refused",
        expect(refused, || "mapped".into()),
    );
    Ok(())
}
