//! `--case m7` (M7): the CPU changes the page tables under the device; invalidations must
//! come first.

use std::time::Duration;

use super::dev::{strerror, Npu, Region};
use super::dev::{NO_FAULT_SERVICE, OP_FILL, OP_MEMCPY, ST_OK, ST_TRANSLATION_FAULT};
use super::target::{expect, Checks, Target};

pub(super) const M7_LEN: usize = 16 * 4096;

/// M7: the CPU changes the page tables under the device; invalidations must come first.
pub(super) fn case_m7(c: &mut Checks<'_>, t: &Target) -> Result<(), String> {
    let npu = Npu::open(&t.dev)?;
    let info = npu.info().map_err(strerror)?;
    println!("# pasid {}", info.pasid);

    // MADV_DONTNEED: the pages go; the device must not read the old ones.
    let mut b = Region::new(M7_LEN)?;
    let mut cbuf = Region::new(M7_LEN)?;
    b.fill(0xa5);
    cbuf.fill(0);
    let first = npu.run(OP_MEMCPY, 0, b.addr(), cbuf.addr(), M7_LEN as u64);
    c.check(
        "a copy caches the buffer's translations (data copied)",
        match first {
            Ok(w) if w.status == ST_OK => expect(cbuf.bytes().iter().all(|&x| x == 0xa5), || {
                "wrong data".into()
            }),
            Ok(w) => Err(format!("status {}", w.status)),
            Err((e, _)) => Err(strerror(e)),
        },
    );
    b.madvise(libc::MADV_DONTNEED)?;
    let second = npu.run(OP_MEMCPY, 0, b.addr(), cbuf.addr(), M7_LEN as u64);
    if let Ok(w) = &second {
        c.k.diag(&format!(
            "{} fault(s) serviced after MADV_DONTNEED",
            w.faults
        ));
    }
    c.strict(
        "after MADV_DONTNEED the device faults on the discarded pages and copies zeros (no stale page read)",
        match second {
            Ok(w) if w.status == ST_OK => {
                let zeros = cbuf.bytes().iter().all(|&x| x == 0);
                expect(zeros && w.faults >= 1, || format!("{} faults, destination all zeros: {zeros}", w.faults))
            }
            Ok(w) => Err(format!("status {}", w.status)),
            Err((e, _)) => Err(strerror(e)),
        },
    );

    // munmap: the device must fault, not read the freed pages.
    let mut d = Region::new(M7_LEN)?;
    d.fill(0x77);
    let _ = npu.run(OP_MEMCPY, 0, d.addr(), cbuf.addr(), M7_LEN as u64);
    let gone = d.addr();
    d.unmap()?;
    let r = npu.run(OP_MEMCPY, 0, gone, cbuf.addr(), M7_LEN as u64);
    c.strict(
        "after munmap a copy from the range fails with a translation fault (EFAULT), nothing read",
        match r {
            Err((libc::EFAULT, w)) if w.status == ST_TRANSLATION_FAULT => expect(
                w.fault_va >= gone && w.fault_va < gone + M7_LEN as u64,
                || format!("fault va {:#x} outside the range", w.fault_va),
            ),
            Err((e, w)) => Err(format!("{} status {}", strerror(e), w.status)),
            Ok(w) => Err(format!(
                "succeeded (status {}, {} bytes): read through a stale translation",
                w.status, w.result
            )),
        },
    );

    // mprotect(PROT_READ): the device's cached write permission must go.
    let mut e = Region::new(M7_LEN)?;
    e.fill(0x11);
    let _ = npu.run(OP_FILL, 0, 0x2222_2222_2222_2222, e.addr(), M7_LEN as u64);
    e.protect(libc::PROT_READ)?;
    let r = npu.run(
        OP_FILL,
        NO_FAULT_SERVICE,
        0x3333_3333_3333_3333,
        e.addr(),
        M7_LEN as u64,
    );
    let untouched = e.bytes().iter().all(|&x| x == 0x22);
    c.strict(
        "after mprotect(PROT_READ) a device write faults (write to read-only) and the memory is unchanged",
        match r {
            Err((libc::EFAULT, w)) if w.status == ST_TRANSLATION_FAULT => expect(untouched, || "memory changed".into()),
            Err((e, w)) => Err(format!("{} status {}", strerror(e), w.status)),
            Ok(w) => Err(format!("the write succeeded (status {}), memory unchanged: {untouched}", w.status)),
        },
    );

    // Concurrent: copies from a range while the CPU discards it repeatedly.
    let mut f = Region::new(4 * M7_LEN)?;
    let g = Region::new(4 * M7_LEN)?;
    f.fill(0x5a);
    let (fa, ga) = (f.addr(), g.addr());
    let npu_fd = npu.fd();
    let copier = std::thread::spawn(move || {
        let n = Npu::borrowed(npu_fd);
        let mut res = Vec::new();
        for _ in 0..12 {
            res.push(
                n.run(OP_MEMCPY, 0, fa, ga, 4 * M7_LEN as u64)
                    .map(|w| (w.status, w.faults))
                    .map_err(|(e, _)| e),
            );
        }
        res
    });
    for _ in 0..12 {
        f.madvise(libc::MADV_DONTNEED)?;
        std::thread::sleep(Duration::from_millis(15));
    }
    let res = copier
        .join()
        .map_err(|_| "the copier thread panicked".to_string())?;
    let faults: u32 = res.iter().filter_map(|r| r.ok()).map(|(_, f)| f).sum();
    c.k.diag(&format!(
        "12 copies raced 12 MADV_DONTNEEDs: {faults} fault(s) serviced"
    ));
    c.check(
        "copies racing MADV_DONTNEED of their source all complete (faults serviced, no error)",
        expect(res.iter().all(|r| matches!(r, Ok((ST_OK, _)))), || {
            format!("{res:?}")
        }),
    );
    drop(g);
    drop(npu);
    Ok(())
}
