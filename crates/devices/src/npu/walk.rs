//! The NPU's own x86-64 page walker: 4-level paging (PML4 → PDPT → PD → PT) over guest physical
//! memory, as an IOMMU or an SVA-capable device walks a process's page tables.
//!
//! ```text
//!  VA bits  47..39   38..30   29..21   20..12   11..0
//!           PML4     PDPT     PD       PT       offset
//!  root ──▶ [PML4E] ──▶ [PDPTE] ──▶ [PDE] ──▶ [PTE] ──▶ 4 KiB page
//!                         │PS=1       │PS=1
//!                         ▼           ▼
//!                       1 GiB       2 MiB page
//! ```
//!
//! Rules (Intel SDM vol. 3 §4.5, with CR0.WP = 1, EFER.NXE = 1, MAXPHYADDR = 52):
//! - the root is CR3-style: bits 51:12 name the PML4 table, bits 11:0 (PCD/PWT) are ignored;
//! - a virtual address must be canonical (bits 63:47 all equal);
//! - each entry needs P (bit 0); R/W (bit 1) and U/S (bit 2) must allow the access at *every*
//!   level: a write needs R/W everywhere, a user access needs U/S everywhere;
//! - PS (bit 7) is reserved in a PML4E, selects a 1 GiB page in a PDPTE and a 2 MiB page in a PDE;
//!   a large-page entry's address bits below the page size (other than PAT, bit 12) are
//!   reserved and must be 0;
//! - XD (bit 63) is ignored (the device never fetches instructions); bits 62:52 are ignored;
//! - accessed/dirty bits are neither checked nor set (see docs/npu.md).
//!
//! A walk reads at most four 8-byte entries and never panics: a table the device cannot read
//! ends the walk with [`FaultReason::TableUnreadable`].

use super::regs;

/// Bits 51:12 of an entry or of the root: the next table or page frame.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Entry bit: present.
pub const PTE_P: u64 = 1 << 0;
/// Entry bit: writable.
pub const PTE_RW: u64 = 1 << 1;
/// Entry bit: user accessible.
pub const PTE_US: u64 = 1 << 2;
/// Entry bit: accessed.
pub const PTE_A: u64 = 1 << 5;
/// Entry bit: dirty (leaf entries).
pub const PTE_D: u64 = 1 << 6;
/// Entry bit: page size (PDPTE: 1 GiB, PDE: 2 MiB).
pub const PTE_PS: u64 = 1 << 7;
/// Entry bit: execute disable (ignored by the walker).
pub const PTE_XD: u64 = 1 << 63;

/// 4 KiB.
pub const PAGE_4K: u64 = 1 << 12;
/// 2 MiB.
pub const PAGE_2M: u64 = 1 << 21;
/// 1 GiB.
pub const PAGE_1G: u64 = 1 << 30;

/// Why guest physical memory could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// Nothing the device can reach at this address.
    #[error("no memory at {pa:#x}+{len:#x}")]
    Unmapped {
        /// Address.
        pa: u64,
        /// Length.
        len: u64,
    },
    /// The device may not access memory now (Bus Master Enable clear, D3hot, link down,
    /// reset): the access can be retried when bus mastering is allowed again.
    #[error("memory access refused")]
    Refused,
    /// The access failed for another reason (no client, injected error).
    #[error("memory access failed")]
    Failed,
}

/// Guest physical memory as the walker sees it.
pub trait PhysMem {
    /// Read `buf.len()` bytes at guest physical address `pa`.
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError>;
}

/// The kind of access a translation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// A write (needs R/W at every level).
    pub write: bool,
    /// A user-mode access (needs U/S at every level).
    pub user: bool,
}

impl Access {
    /// A user-mode read.
    pub const USER_READ: Access = Access {
        write: false,
        user: true,
    };
    /// A user-mode write.
    pub const USER_WRITE: Access = Access {
        write: true,
        user: true,
    };
}

/// A successful translation of one virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest physical address of the translated virtual address (page frame + offset).
    pub pa: u64,
    /// Size of the page that maps it: [`PAGE_4K`], [`PAGE_2M`] or [`PAGE_1G`].
    pub page_size: u64,
    /// R/W was set at every level.
    pub writable: bool,
    /// U/S was set at every level.
    pub user: bool,
}

impl Translation {
    /// Whether the translation permits `access`.
    pub fn permits(&self, access: Access) -> bool {
        (!access.write || self.writable) && (!access.user || self.user)
    }

    /// Guest physical address of the start of the page.
    pub fn page_pa(&self) -> u64 {
        self.pa & !(self.page_size - 1)
    }
}

/// Why a walk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultReason {
    /// The virtual address is not canonical.
    NonCanonical,
    /// An entry on the path is not present.
    NotPresent,
    /// A write to a page that is read-only at some level.
    WriteProtect,
    /// A user access to a page that is supervisor-only at some level.
    UserProtect,
    /// A reserved bit is set in an entry.
    Reserved,
    /// A table on the path could not be read.
    TableUnreadable,
}

impl FaultReason {
    /// The reason's code in fault-queue records (docs/npu.md).
    pub fn code(self) -> u32 {
        match self {
            FaultReason::NotPresent => regs::FAULT_NOT_PRESENT,
            FaultReason::WriteProtect => regs::FAULT_WRITE_PROTECT,
            FaultReason::UserProtect => regs::FAULT_USER_PROTECT,
            FaultReason::Reserved => regs::FAULT_RESERVED,
            FaultReason::NonCanonical => regs::FAULT_NON_CANONICAL,
            FaultReason::TableUnreadable => regs::FAULT_TABLE_UNREADABLE,
        }
    }
}

/// A failed walk: at which level (4 = PML4 .. 1 = PT; 4 also for non-canonical addresses) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page walk fault at level {level}: {reason:?}")]
pub struct WalkFault {
    /// Paging level whose entry faulted.
    pub level: u8,
    /// Why.
    pub reason: FaultReason,
}

/// Whether `va` is canonical for 48-bit virtual addresses.
pub fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == (1 << 17) - 1
}

/// Index of `va` in the table of `level` (4 = PML4 .. 1 = PT).
fn index(va: u64, level: u8) -> u64 {
    (va >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff
}

/// Reserved address bits of a large-page entry at `level` (3: 1 GiB, 2: 2 MiB), PAT excluded.
fn large_reserved(level: u8) -> u64 {
    match level {
        3 => 0x3fff_e000,
        _ => 0x001f_e000,
    }
}

/// Translate `va` through the tables rooted at `root`, returning the effective permissions of
/// the path. Permission checks are left to the caller ([`walk_access`] does both).
pub fn walk(mem: &dyn PhysMem, root: u64, va: u64) -> Result<Translation, WalkFault> {
    if !is_canonical(va) {
        return Err(WalkFault {
            level: 4,
            reason: FaultReason::NonCanonical,
        });
    }
    let mut table = root & ADDR_MASK;
    let mut writable = true;
    let mut user = true;
    for level in (1..=4u8).rev() {
        let fault = |reason| WalkFault { level, reason };
        let mut raw = [0u8; 8];
        mem.read(table + 8 * index(va, level), &mut raw)
            .map_err(|_| fault(FaultReason::TableUnreadable))?;
        let e = u64::from_le_bytes(raw);
        if e & PTE_P == 0 {
            return Err(fault(FaultReason::NotPresent));
        }
        writable &= e & PTE_RW != 0;
        user &= e & PTE_US != 0;
        let large = e & PTE_PS != 0;
        if large && level == 4 {
            return Err(fault(FaultReason::Reserved));
        }
        if level == 1 || large {
            if large && e & large_reserved(level) != 0 {
                return Err(fault(FaultReason::Reserved));
            }
            let page_size = match level {
                3 => PAGE_1G,
                2 => PAGE_2M,
                _ => PAGE_4K,
            };
            let frame = e & ADDR_MASK & !(page_size - 1);
            return Ok(Translation {
                pa: frame | (va & (page_size - 1)),
                page_size,
                writable,
                user,
            });
        }
        table = e & ADDR_MASK;
    }
    // Unreachable: level 1 always returns above. Report it as a reserved-bit fault rather
    // than panicking.
    Err(WalkFault {
        level: 1,
        reason: FaultReason::Reserved,
    })
}

/// The fault `access` takes on translation `t`, if any.
pub fn check_access(t: &Translation, access: Access) -> Result<(), FaultReason> {
    if access.user && !t.user {
        Err(FaultReason::UserProtect)
    } else if access.write && !t.writable {
        Err(FaultReason::WriteProtect)
    } else {
        Ok(())
    }
}

/// Translate `va` for `access`: [`walk`] plus the permission check (a permission fault is
/// reported at level 1).
pub fn walk_access(
    mem: &dyn PhysMem,
    root: u64,
    va: u64,
    access: Access,
) -> Result<Translation, WalkFault> {
    let t = walk(mem, root, va)?;
    check_access(&t, access).map_err(|reason| WalkFault { level: 1, reason })?;
    Ok(t)
}

#[cfg(test)]
pub(crate) mod testmem {
    //! A sparse guest-physical memory image and a page-table builder for tests.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// Sparse 4 KiB pages; reads of absent pages fail (like unmapped DMA), unless `zero_fill`.
    #[derive(Debug, Default)]
    pub struct SparseMem {
        pages: Mutex<HashMap<u64, Box<[u8; 4096]>>>,
        /// Upper bound of valid addresses (reads/writes at or above fail).
        pub limit: u64,
    }

    impl SparseMem {
        /// Memory with addresses `0..limit` allocatable.
        pub fn new(limit: u64) -> SparseMem {
            SparseMem {
                pages: Mutex::new(HashMap::new()),
                limit,
            }
        }

        /// Make the page at `pa` exist (zeroed).
        pub fn touch(&self, pa: u64) {
            let mut p = self.pages.lock().unwrap();
            p.entry(pa & !0xfff).or_insert_with(|| Box::new([0; 4096]));
        }

        /// Whether the page at `pa` exists.
        pub fn has(&self, pa: u64) -> bool {
            self.pages.lock().unwrap().contains_key(&(pa & !0xfff))
        }

        fn check(&self, pa: u64, len: usize) -> Result<(), MemError> {
            let end = pa.checked_add(len as u64);
            if end.is_none_or(|e| e > self.limit) {
                return Err(MemError::Unmapped {
                    pa,
                    len: len as u64,
                });
            }
            let p = self.pages.lock().unwrap();
            let mut a = pa & !0xfff;
            while a < pa + len as u64 {
                if !p.contains_key(&a) {
                    return Err(MemError::Unmapped {
                        pa,
                        len: len as u64,
                    });
                }
                a += 4096;
            }
            Ok(())
        }

        /// Read; fails on absent pages.
        pub fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.check(pa, buf.len())?;
            let p = self.pages.lock().unwrap();
            for (i, b) in buf.iter_mut().enumerate() {
                let a = pa + i as u64;
                *b = p[&(a & !0xfff)][(a & 0xfff) as usize];
            }
            Ok(())
        }

        /// Write; fails on absent pages.
        pub fn write_bytes(&self, pa: u64, data: &[u8]) -> Result<(), MemError> {
            self.check(pa, data.len())?;
            let mut p = self.pages.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                let a = pa + i as u64;
                p.get_mut(&(a & !0xfff)).unwrap()[(a & 0xfff) as usize] = *b;
            }
            Ok(())
        }

        /// Write, creating pages as needed.
        pub fn poke(&self, pa: u64, data: &[u8]) {
            let mut a = pa & !0xfff;
            while a < pa + data.len() as u64 {
                self.touch(a);
                a += 4096;
            }
            self.write_bytes(pa, data).unwrap();
        }

        /// Read a u64 (panics on absent pages: tests only).
        pub fn peek_u64(&self, pa: u64) -> u64 {
            let mut b = [0u8; 8];
            self.read_bytes(pa, &mut b).unwrap();
            u64::from_le_bytes(b)
        }

        /// Read bytes (panics on absent pages: tests only).
        pub fn peek(&self, pa: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.read_bytes(pa, &mut v).unwrap();
            v
        }
    }

    impl PhysMem for SparseMem {
        fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.read_bytes(pa, buf)
        }
    }

    /// Builds 4-level page tables inside a [`SparseMem`], allocating tables from `next`.
    #[derive(Debug)]
    pub struct Tables<'a> {
        /// The memory.
        pub mem: &'a SparseMem,
        /// The PML4 table's address.
        pub root: u64,
        /// Next free page for tables.
        pub next: u64,
    }

    /// Flags of intermediate entries made by [`Tables::map`].
    pub const DIR_FLAGS: u64 = PTE_P | PTE_RW | PTE_US;

    impl<'a> Tables<'a> {
        /// A PML4 at `root`; further tables are allocated from `root + 4096` upwards.
        pub fn new(mem: &'a SparseMem, root: u64) -> Tables<'a> {
            mem.touch(root);
            Tables {
                mem,
                root,
                next: root + 4096,
            }
        }

        fn alloc(&mut self) -> u64 {
            let a = self.next;
            self.next += 4096;
            self.mem.touch(a);
            a
        }

        /// Address of the entry for `va` at `level`, creating intermediate tables with
        /// [`DIR_FLAGS`] down to `level`.
        pub fn entry_addr(&mut self, va: u64, level: u8) -> u64 {
            let mut table = self.root;
            for l in (level + 1..=4).rev() {
                let ea = table + 8 * index(va, l);
                let e = self.mem.peek_u64(ea);
                table = if e & PTE_P != 0 && e & PTE_PS == 0 {
                    e & ADDR_MASK
                } else {
                    let t = self.alloc();
                    self.mem.poke(ea, &(t | DIR_FLAGS).to_le_bytes());
                    t
                };
            }
            table + 8 * index(va, level)
        }

        /// Map the page of `size` at `va` to `pa` with leaf `flags` (P added; PS added for
        /// large pages).
        pub fn map(&mut self, va: u64, pa: u64, size: u64, flags: u64) {
            let (level, ps) = match size {
                PAGE_1G => (3, PTE_PS),
                PAGE_2M => (2, PTE_PS),
                _ => (1, 0),
            };
            let ea = self.entry_addr(va, level);
            self.mem
                .poke(ea, &((pa & ADDR_MASK) | flags | PTE_P | ps).to_le_bytes());
        }

        /// Set the raw entry for `va` at `level`.
        pub fn set_entry(&mut self, va: u64, level: u8, raw: u64) {
            let ea = self.entry_addr(va, level);
            self.mem.poke(ea, &raw.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testmem::*;
    use super::*;

    const ROOT: u64 = 0x10_0000;
    const UF: u64 = PTE_RW | PTE_US;

    #[test]
    fn test_walk_4k_page_translates_with_offset() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        t.map(0x7f12_3456_7000, 0x4567_8000, PAGE_4K, UF);
        let tr = walk(&mem, ROOT, 0x7f12_3456_7abc).unwrap();
        assert_eq!(
            tr,
            Translation {
                pa: 0x4567_8abc,
                page_size: PAGE_4K,
                writable: true,
                user: true
            }
        );
        assert_eq!(tr.page_pa(), 0x4567_8000);
    }

    #[test]
    fn test_walk_2m_page_translates_with_offset() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        t.map(0x4020_0000, 0x8000_0000, PAGE_2M, UF);
        let tr = walk(&mem, ROOT, 0x4020_0000 + 0x1_2345).unwrap();
        assert_eq!(tr.pa, 0x8001_2345);
        assert_eq!(tr.page_size, PAGE_2M);
    }

    #[test]
    fn test_walk_1g_page_translates_with_offset() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        t.map(0x80_4000_0000, 0x1_4000_0000, PAGE_1G, UF);
        let tr = walk(&mem, ROOT, 0x80_4000_0000 + 0x3abc_def0).unwrap();
        assert_eq!(tr.pa, 0x1_7abc_def0);
        assert_eq!(tr.page_size, PAGE_1G);
    }

    #[test]
    fn test_walk_root_low_bits_ignored() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        t.map(0x1000, 0x2000_0000, PAGE_4K, UF);
        assert_eq!(walk(&mem, ROOT | 0x018, 0x1000).unwrap().pa, 0x2000_0000);
    }

    #[test]
    fn test_walk_not_present_at_each_level_reports_level() {
        let va = 0x7f00_1234_5000;
        for level in 1..=4u8 {
            let mem = SparseMem::new(1 << 40);
            let mut t = Tables::new(&mem, ROOT);
            t.map(va, 0x3000_0000, PAGE_4K, UF);
            assert!(walk(&mem, ROOT, va).is_ok());
            // Clear P only, keep the address bits: the walker must stop there.
            let ea = t.entry_addr(va, level);
            let e = mem.peek_u64(ea);
            mem.poke(ea, &(e & !PTE_P).to_le_bytes());
            assert_eq!(
                walk(&mem, ROOT, va),
                Err(WalkFault {
                    level,
                    reason: FaultReason::NotPresent
                }),
                "level {level}"
            );
        }
    }

    #[test]
    fn test_walk_readonly_page_write_faults_read_ok() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        t.map(0x40_0000, 0x50_0000, PAGE_4K, PTE_US);
        assert!(walk_access(&mem, ROOT, 0x40_0000, Access::USER_READ).is_ok());
        assert_eq!(
            walk_access(&mem, ROOT, 0x40_0000, Access::USER_WRITE),
            Err(WalkFault {
                level: 1,
                reason: FaultReason::WriteProtect
            })
        );
    }

    #[test]
    fn test_walk_readonly_intermediate_level_write_faults() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        let va = 0x40_0000;
        t.map(va, 0x50_0000, PAGE_4K, UF);
        let ea = t.entry_addr(va, 3);
        let e = mem.peek_u64(ea);
        mem.poke(ea, &(e & !PTE_RW).to_le_bytes());
        let tr = walk(&mem, ROOT, va).unwrap();
        assert!(!tr.writable);
        assert_eq!(
            walk_access(&mem, ROOT, va, Access::USER_WRITE).map_err(|f| f.reason),
            Err(FaultReason::WriteProtect)
        );
    }

    #[test]
    fn test_walk_supervisor_page_user_access_faults() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        let va = 0xffff_8880_0000_0000;
        t.map(va, 0x60_0000, PAGE_4K, PTE_RW);
        assert_eq!(
            walk_access(&mem, ROOT, va, Access::USER_READ).map_err(|f| f.reason),
            Err(FaultReason::UserProtect)
        );
        let sup = Access {
            write: true,
            user: false,
        };
        assert_eq!(walk_access(&mem, ROOT, va, sup).unwrap().pa, 0x60_0000);
    }

    #[test]
    fn test_walk_supervisor_directory_user_access_faults() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        let va = 0x1000_0000;
        t.map(va, 0x60_0000, PAGE_4K, UF);
        let ea = t.entry_addr(va, 4);
        let e = mem.peek_u64(ea);
        mem.poke(ea, &(e & !PTE_US).to_le_bytes());
        assert_eq!(
            walk_access(&mem, ROOT, va, Access::USER_READ).map_err(|f| f.reason),
            Err(FaultReason::UserProtect)
        );
    }

    #[test]
    fn test_walk_noncanonical_va_faults_without_reads() {
        // Empty memory: a read would fail with TableUnreadable, so NonCanonical proves no read.
        let mem = SparseMem::new(0);
        for va in [
            0x0000_8000_0000_0000,
            0x1234_0000_0000_0000,
            0xffff_7fff_ffff_f000,
        ] {
            assert_eq!(
                walk(&mem, ROOT, va),
                Err(WalkFault {
                    level: 4,
                    reason: FaultReason::NonCanonical
                }),
                "va {va:#x}"
            );
        }
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(is_canonical(0x0000_7fff_ffff_ffff));
    }

    #[test]
    fn test_walk_ps_in_pml4_is_reserved_fault() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        t.set_entry(0, 4, 0x4000_0000 | PTE_P | PTE_RW | PTE_US | PTE_PS);
        assert_eq!(
            walk(&mem, ROOT, 0x1000),
            Err(WalkFault {
                level: 4,
                reason: FaultReason::Reserved
            })
        );
    }

    #[test]
    fn test_walk_large_page_reserved_bits_fault() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        // 2 MiB page with bit 13 set (reserved; bit 12 is PAT and allowed).
        t.set_entry(0x20_0000, 2, 0x4000_2000 | PTE_P | PTE_US | PTE_PS);
        assert_eq!(
            walk(&mem, ROOT, 0x20_0000).map_err(|f| (f.level, f.reason)),
            Err((2, FaultReason::Reserved))
        );
        t.set_entry(0x20_0000, 2, 0x4000_1000 | PTE_P | PTE_US | PTE_PS);
        assert_eq!(walk(&mem, ROOT, 0x20_0000).unwrap().pa, 0x4000_0000);
        // 1 GiB page with bit 20 set.
        t.set_entry(0x40_0000_0000, 3, 0x8010_0000 | PTE_P | PTE_US | PTE_PS);
        assert_eq!(
            walk(&mem, ROOT, 0x40_0000_0000).map_err(|f| (f.level, f.reason)),
            Err((3, FaultReason::Reserved))
        );
    }

    #[test]
    fn test_walk_table_outside_memory_unreadable_fault() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        // PDPT pointer into a page that does not exist.
        t.set_entry(0x1000, 4, 0x7777_0000 | PTE_P | PTE_RW | PTE_US);
        assert_eq!(
            walk(&mem, ROOT, 0x1000),
            Err(WalkFault {
                level: 3,
                reason: FaultReason::TableUnreadable
            })
        );
        // Root itself unreadable.
        assert_eq!(
            walk(&mem, 0xdead_0000, 0x1000).map_err(|f| (f.level, f.reason)),
            Err((4, FaultReason::TableUnreadable))
        );
    }

    #[test]
    fn test_walk_xd_and_ignored_high_bits_do_not_change_address() {
        let mem = SparseMem::new(1 << 40);
        let mut t = Tables::new(&mem, ROOT);
        t.set_entry(0x5000, 1, PTE_XD | (0x7ff << 52) | 0x9000 | PTE_P | UF);
        assert_eq!(walk(&mem, ROOT, 0x5008).unwrap().pa, 0x9008);
    }

    #[test]
    fn test_walk_garbage_tables_never_panic_bounded() {
        // Fill every table page with pseudo-random entries; walks must terminate (they read at
        // most 4 entries) and either translate or fault.
        let mem = SparseMem::new(1 << 52);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for p in 0..16u64 {
            let mut page = [0u8; 4096];
            for c in page.chunks_mut(8) {
                // Mostly present entries pointing into the 16 existing pages (sometimes large,
                // with whatever reserved bits that gives), sometimes pure garbage.
                let v = next();
                let e = if v & 7 != 0 {
                    let ps = if (v >> 3) & 7 == 0 { PTE_PS } else { 0 };
                    ((v >> 8) % 16) << 12 | PTE_P | PTE_RW | PTE_US | ps
                } else {
                    next()
                };
                c.copy_from_slice(&e.to_le_bytes());
            }
            mem.poke(p << 12, &page);
        }
        let (mut ok, mut faults) = (0, 0);
        for _ in 0..20_000 {
            // Mostly canonical addresses (lower half), sometimes anything.
            let v = next();
            let va = if v & 15 == 0 {
                next()
            } else {
                v & 0x0000_7fff_ffff_ffff
            };
            let root = (next() % 20) << 12;
            match walk(&mem, root, va) {
                Ok(t) => {
                    assert!(
                        t.page_size == PAGE_4K || t.page_size == PAGE_2M || t.page_size == PAGE_1G
                    );
                    ok += 1;
                }
                Err(f) => {
                    assert!((1..=4).contains(&f.level));
                    faults += 1;
                }
            }
        }
        assert!(ok > 0 && faults > 0, "ok {ok} faults {faults}");
    }
}
