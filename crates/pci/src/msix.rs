//! MSI-X state: the vector table and the Pending Bit Array (PCI Local Bus 3.0 §6.8.2.6-9).
//!
//! QEMU emulates the table itself but forwards PBA reads, so the PBA here is authoritative.
//! Delivery rule: QEMU's vfio client binds a vector's eventfd through SET_IRQS when the guest
//! unmasks (and enables) it and unbinds it when the vector is masked, so **a bound eventfd is an
//! enabled, unmasked vector**. [`MsixState::raise`] signals the eventfd; if none is bound (or the
//! vector is masked through SET_IRQS) the vector's pending bit is set instead, and
//! [`MsixState::deliver_pending`] delivers and clears pending bits once their vectors are bound.
//!
//! Table entry (16 bytes): Message Address (RW), Message Upper Address (RW), Message Data (RW),
//! Vector Control (bit 0 Mask, RW, reset to 1; other bits reserved).

use log::warn;
use pcisim_vfio_user::{irq_index, Interrupts, Signal};

use crate::caps::msix::{MsixConfig, ENTRY_SIZE};
use crate::field::{Access, Field};

/// Fields of one table entry, offsets relative to the entry.
pub const ENTRY_FIELDS: [Field; 4] = [
    Field::new("Entry.MessageAddress", 0x0, 0..=31, Access::Rw),
    Field::new("Entry.MessageUpperAddress", 0x4, 0..=31, Access::Rw),
    Field::new("Entry.MessageData", 0x8, 0..=31, Access::Rw),
    Field::new("Entry.VectorControl.Mask", 0xc, 0..=0, Access::Rw).with_value(1),
];

/// What became of a raised vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixOutcome {
    /// The vector's eventfd was signalled.
    Delivered,
    /// No eventfd was bound (or the vector was masked): the pending bit is set.
    Pending,
    /// The function may not send messages now (Bus Master Enable clear, D3hot, reset, link
    /// down): the pending bit is set.
    Refused,
    /// The vector number is not below the table size.
    InvalidVector,
}

/// Table and PBA of one function.
#[derive(Debug, Clone)]
pub struct MsixState {
    cfg: MsixConfig,
    table: Vec<u8>,
    table_wmask: [u8; ENTRY_SIZE as usize],
    entry_reset: [u8; ENTRY_SIZE as usize],
    pba: Vec<u64>,
}

impl MsixState {
    /// State for `cfg.vectors` vectors, all masked, nothing pending.
    pub fn new(cfg: MsixConfig) -> MsixState {
        let mut table_wmask = [0u8; ENTRY_SIZE as usize];
        let mut entry_reset = [0u8; ENTRY_SIZE as usize];
        for f in &ENTRY_FIELDS {
            let mask = f.mask();
            let value = f.value << f.lsb;
            for k in 0..4u16 {
                let at = usize::from(f.offset + k);
                if let (Some(w), Some(r)) = (table_wmask.get_mut(at), entry_reset.get_mut(at)) {
                    if f.access.is_writable() {
                        *w |= (mask >> (8 * k)) as u8;
                    }
                    *r |= (value >> (8 * k)) as u8;
                }
            }
        }
        let mut s = MsixState {
            cfg,
            table: Vec::new(),
            table_wmask,
            entry_reset,
            pba: vec![0; usize::from(cfg.vectors).div_ceil(64)],
        };
        s.reset();
        s
    }

    /// The layout this state was built for.
    pub fn config(&self) -> &MsixConfig {
        &self.cfg
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.cfg.vectors
    }

    /// Reset: every entry masked with zero address and data, PBA cleared.
    pub fn reset(&mut self) {
        self.table = self
            .entry_reset
            .iter()
            .copied()
            .cycle()
            .take(self.cfg.table_len() as usize)
            .collect();
        self.pba.iter_mut().for_each(|w| *w = 0);
    }

    /// Whether `(bar, offset..offset+len)` lies inside the table; `Some(false)` when it only
    /// partly overlaps (an access the caller must refuse).
    pub fn table_hit(&self, bar: u32, offset: u64, len: usize) -> Option<bool> {
        hit(
            bar,
            offset,
            len,
            u32::from(self.cfg.table_bar),
            u64::from(self.cfg.table_offset),
            self.cfg.table_len(),
        )
    }

    /// Like [`MsixState::table_hit`] for the PBA.
    pub fn pba_hit(&self, bar: u32, offset: u64, len: usize) -> Option<bool> {
        hit(
            bar,
            offset,
            len,
            u32::from(self.cfg.pba_bar),
            u64::from(self.cfg.pba_offset),
            self.cfg.pba_len(),
        )
    }

    /// Read table bytes at `rel` (offset inside the table); bytes past the table read 0.
    pub fn table_read(&self, rel: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = usize::try_from(rel)
                .ok()
                .and_then(|r| self.table.get(r + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Write table bytes at `rel` honouring the entry layout (reserved Vector Control bits
    /// stay 0); bytes past the table are ignored.
    pub fn table_write(&mut self, rel: u64, data: &[u8]) {
        let Ok(rel) = usize::try_from(rel) else {
            return;
        };
        for (i, &v) in data.iter().enumerate() {
            let at = rel + i;
            let w = self
                .table_wmask
                .get(at % ENTRY_SIZE as usize)
                .copied()
                .unwrap_or(0);
            if let Some(d) = self.table.get_mut(at) {
                *d = (*d & !w) | (v & w);
            }
        }
    }

    /// Whether the table (as stored here) masks `vector`.
    pub fn entry_masked(&self, vector: u16) -> bool {
        let at = usize::from(vector) * ENTRY_SIZE as usize + 12;
        self.table.get(at).is_none_or(|b| b & 1 != 0)
    }

    /// Read PBA bytes at `rel` (little-endian qwords); bytes past the PBA read 0.
    pub fn pba_read(&self, rel: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let at = rel.saturating_add(i as u64);
            let word = usize::try_from(at / 8)
                .ok()
                .and_then(|w| self.pba.get(w))
                .copied()
                .unwrap_or(0);
            *b = (word >> (8 * (at % 8))) as u8;
        }
    }

    /// Whether `vector` is pending.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.pba
            .get(usize::from(vector) / 64)
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    /// Set or clear the pending bit of `vector`.
    pub fn set_pending(&mut self, vector: u16, on: bool) {
        if let Some(w) = self.pba.get_mut(usize::from(vector) / 64) {
            let bit = 1u64 << (vector % 64);
            if on {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    /// Raise `vector`: signal its eventfd through `irqs` (no client: `None`), or set its
    /// pending bit.
    pub fn raise(&mut self, irqs: Option<&Interrupts>, vector: u16) -> MsixOutcome {
        if vector >= self.cfg.vectors {
            return MsixOutcome::InvalidVector;
        }
        let signal = irqs.map(|i| i.signal(irq_index::MSIX, u32::from(vector)));
        match signal {
            Some(Ok(Signal::Delivered)) => MsixOutcome::Delivered,
            Some(Ok(Signal::NotBound | Signal::Masked)) | None => {
                self.set_pending(vector, true);
                MsixOutcome::Pending
            }
            Some(Err(e)) => {
                warn!("MSI-X vector {vector}: signalling failed, left pending: {e}");
                self.set_pending(vector, true);
                MsixOutcome::Pending
            }
        }
    }

    /// Deliver pending vectors whose eventfd is now bound and clear their pending bits.
    /// Returns the vectors delivered, in order.
    pub fn deliver_pending(&mut self, irqs: &Interrupts) -> Vec<u16> {
        let mut delivered = Vec::new();
        for v in 0..self.cfg.vectors {
            if !self.is_pending(v) {
                continue;
            }
            match irqs.signal(irq_index::MSIX, u32::from(v)) {
                Ok(Signal::Delivered) => {
                    self.set_pending(v, false);
                    delivered.push(v);
                }
                Ok(Signal::NotBound | Signal::Masked) => {}
                Err(e) => warn!("MSI-X vector {v}: delivering pending interrupt failed: {e}"),
            }
        }
        delivered
    }
}

fn hit(bar: u32, offset: u64, len: usize, sbar: u32, start: u64, size: u64) -> Option<bool> {
    if bar != sbar {
        return None;
    }
    let end = offset.saturating_add(len as u64);
    let send = start.saturating_add(size);
    if end <= start || offset >= send {
        None
    } else {
        Some(offset >= start && end <= send)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(vectors: u16) -> MsixState {
        MsixState::new(MsixConfig {
            vectors,
            table_bar: 0,
            table_offset: 0x8000,
            pba_bar: 0,
            pba_offset: 0xc000,
        })
    }

    #[test]
    fn test_msix_table_reset_entries_masked() {
        let s = state(4);
        let mut e = [0u8; 16];
        s.table_read(16, &mut e);
        assert_eq!(e, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!((0..4).all(|v| s.entry_masked(v)));
    }

    #[test]
    fn test_msix_table_write_stored_reserved_bits_zero() {
        let mut s = state(4);
        s.table_write(32, &[0xff; 16]);
        let mut e = [0u8; 16];
        s.table_read(32, &mut e);
        assert_eq!(&e[..12], &[0xff; 12]);
        assert_eq!(
            &e[12..],
            &[1, 0, 0, 0],
            "only the mask bit of Vector Control"
        );
        s.table_write(44, &[0, 0, 0, 0]);
        assert!(!s.entry_masked(2));
        s.reset();
        assert!(s.entry_masked(2));
        s.table_write(u64::MAX, &[1]);
    }

    #[test]
    fn test_msix_raise_without_client_sets_pba() {
        let mut s = state(70);
        assert_eq!(s.raise(None, 3), MsixOutcome::Pending);
        assert_eq!(s.raise(None, 65), MsixOutcome::Pending);
        assert_eq!(s.raise(None, 70), MsixOutcome::InvalidVector);
        let mut pba = [0u8; 16];
        s.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b1000);
        assert_eq!(pba[8], 0b10);
        let mut b = [0u8; 1];
        s.pba_read(8, &mut b);
        assert_eq!(b[0], 0b10, "byte reads inside the PBA");
        s.reset();
        assert!(!s.is_pending(3));
    }

    #[test]
    fn test_msix_raise_unbound_vector_goes_to_pba() {
        let irqs = Interrupts::new(&[1, 0, 4, 1, 1]);
        let mut s = state(4);
        assert_eq!(s.raise(Some(&irqs), 2), MsixOutcome::Pending);
        assert!(s.is_pending(2));
        assert!(s.deliver_pending(&irqs).is_empty(), "still nothing bound");
        assert!(s.is_pending(2));
    }

    #[test]
    fn test_msix_table_and_pba_ranges_hit() {
        let s = state(16);
        assert_eq!(s.table_hit(0, 0x8000, 4), Some(true));
        assert_eq!(s.table_hit(0, 0x80fc, 4), Some(true));
        assert_eq!(s.table_hit(0, 0x80fe, 4), Some(false));
        assert_eq!(s.table_hit(0, 0x7ffc, 8), Some(false));
        assert_eq!(s.table_hit(0, 0x8100, 4), None);
        assert_eq!(s.table_hit(2, 0x8000, 4), None);
        assert_eq!(s.pba_hit(0, 0xc000, 8), Some(true));
        assert_eq!(s.pba_hit(0, 0xc008, 8), None);
    }
}
