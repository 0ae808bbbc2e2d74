//! The device translation cache (ATC): recently used translations per (PASID, page), bounded,
//! least-recently-used eviction. The driver must invalidate entries (by PASID and range) when
//! the page tables change; the device never notices a change by itself — which is the point:
//! a missed invalidation is a use of a stale translation (see [`super::engine`]'s checking
//! mode).
//!
//! Entries cache whole pages of the size the walk found (4 KiB, 2 MiB or 1 GiB). A lookup
//! tries the three page sizes; an invalidation removes every entry of the PASID overlapping the
//! range.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::walk::{Translation, PAGE_1G, PAGE_2M, PAGE_4K};

/// Default capacity (entries).
pub const DEFAULT_CAPACITY: usize = 512;

/// Length meaning "the whole address space of the PASID".
pub const ALL: u64 = u64::MAX;

/// One cached page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Virtual address of the start of the page.
    pub va: u64,
    /// The translation as walked (for the page start: `pa` is the page's frame).
    pub t: Translation,
    /// A stale use of this entry was already reported (report once per entry).
    pub stale_reported: bool,
}

impl Entry {
    /// The physical address `va` (inside the page) translates to.
    pub fn pa_of(&self, va: u64) -> u64 {
        self.t.page_pa() + (va - self.va)
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AtcStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups not in the cache.
    pub misses: u64,
    /// Invalidation requests (of any size).
    pub invalidations: u64,
    /// Entries removed by invalidations.
    pub invalidated_entries: u64,
    /// Entries evicted for capacity.
    pub evictions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    pasid: u32,
    va: u64,
    size: u64,
}

/// The cache's hasher: keys are a few integers the device chose itself (no attacker picks
/// them to collide, and a collision only costs a probe), so the per-lookup cost of the default
/// SipHash — two thirds of an ATC hit before — buys nothing. Multiply-rotate per word, then a
/// final avalanche (murmur3's fmix64) so page-aligned addresses, whose low 12 bits are all
/// zero, still spread over the table's buckets.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl KeyHasher {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn word(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(Self::K);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.word(u64::from_le_bytes(w));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.word(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.word(v);
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    entry: Entry,
    last_use: u64,
}

/// The translation cache.
#[derive(Debug)]
pub struct Atc {
    capacity: usize,
    map: HashMap<Key, Slot, BuildHasherDefault<KeyHasher>>,
    tick: u64,
    stats: AtcStats,
}

impl Default for Atc {
    fn default() -> Atc {
        Atc::new(DEFAULT_CAPACITY)
    }
}

impl Atc {
    /// An empty cache of `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Atc {
        Atc {
            capacity: capacity.max(1),
            map: HashMap::default(),
            tick: 0,
            stats: AtcStats::default(),
        }
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The counters.
    pub fn stats(&self) -> AtcStats {
        self.stats
    }

    fn find(&self, pasid: u32, va: u64) -> Option<Key> {
        [PAGE_4K, PAGE_2M, PAGE_1G]
            .into_iter()
            .map(|size| Key {
                pasid,
                va: va & !(size - 1),
                size,
            })
            .find(|k| self.map.contains_key(k))
    }

    /// Look `va` up for `pasid`, counting a hit or a miss. One probe per page size tried,
    /// smallest first (a 4 KiB hit costs one hash and one probe).
    pub fn lookup(&mut self, pasid: u32, va: u64) -> Option<Entry> {
        self.tick += 1;
        let tick = self.tick;
        for size in [PAGE_4K, PAGE_2M, PAGE_1G] {
            let key = Key {
                pasid,
                va: va & !(size - 1),
                size,
            };
            if let Some(slot) = self.map.get_mut(&key) {
                slot.last_use = tick;
                self.stats.hits += 1;
                return Some(slot.entry);
            }
        }
        self.stats.misses += 1;
        None
    }

    /// Look `va` up as [`Atc::lookup`] does for a hit — recency updated — but only if `take`
    /// accepts the entry, and without counting: the caller counts the hits it keeps with
    /// [`Atc::count_hits`] or puts recency back with [`Atc::untouch`]. A miss or a refused
    /// entry touches nothing. On a touch, `saved` gets the entry's previous recency.
    pub fn touch_if(
        &mut self,
        pasid: u32,
        va: u64,
        saved: &mut Vec<u64>,
        take: impl FnOnce(&Entry) -> bool,
    ) -> Option<Entry> {
        for size in [PAGE_4K, PAGE_2M, PAGE_1G] {
            let key = Key {
                pasid,
                va: va & !(size - 1),
                size,
            };
            if let Some(slot) = self.map.get_mut(&key) {
                if !take(&slot.entry) {
                    return None;
                }
                saved.push(slot.last_use);
                self.tick += 1;
                slot.last_use = self.tick;
                return Some(slot.entry);
            }
        }
        None
    }

    /// Count `n` hits (of entries [`Atc::touch_if`] touched and the caller used).
    pub fn count_hits(&mut self, n: u64) {
        self.stats.hits += n;
    }

    /// Undo the [`Atc::touch_if`] calls that filled `saved`, at the 4 KiB pages from `va` on
    /// (the first at `va`, each next one at the next page boundary): recency and the clock
    /// return to what they were, as if the lookups never happened.
    pub fn untouch(&mut self, pasid: u32, va: u64, saved: &[u64]) {
        let mut pages = Vec::with_capacity(saved.len());
        let mut at = va;
        for _ in saved {
            pages.push(at);
            at = (at | (PAGE_4K - 1)).wrapping_add(1);
        }
        // Newest first: an entry covering several pages gets its oldest recency back last.
        for (&at, &old) in pages.iter().zip(saved).rev() {
            if let Some(slot) = self.find(pasid, at).and_then(|k| self.map.get_mut(&k)) {
                slot.last_use = old;
            }
        }
        self.tick -= saved.len() as u64;
    }

    /// Look `va` up without touching counters or recency (one probe per page size tried,
    /// smallest first, as [`Atc::lookup`]).
    pub fn peek(&self, pasid: u32, va: u64) -> Option<Entry> {
        [PAGE_4K, PAGE_2M, PAGE_1G].into_iter().find_map(|size| {
            let key = Key {
                pasid,
                va: va & !(size - 1),
                size,
            };
            self.map.get(&key).map(|s| s.entry)
        })
    }

    /// Mark the entry covering `va` as reported stale.
    pub fn mark_stale_reported(&mut self, pasid: u32, va: u64) {
        if let Some(slot) = self.find(pasid, va).and_then(|k| self.map.get_mut(&k)) {
            slot.entry.stale_reported = true;
        }
    }

    /// Cache translation `t` of `va` for `pasid` (replacing an entry for the same page),
    /// evicting the least recently used entry when full.
    pub fn insert(&mut self, pasid: u32, va: u64, t: Translation) {
        let size = t.page_size;
        let key = Key {
            pasid,
            va: va & !(size - 1),
            size,
        };
        // A page cached under another size (the tables changed shape) is replaced too.
        while let Some(old) = self.find(pasid, va) {
            self.map.remove(&old);
        }
        if self.map.len() >= self.capacity {
            if let Some(victim) = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| *k)
            {
                self.map.remove(&victim);
                self.stats.evictions += 1;
            }
        }
        self.tick += 1;
        self.map.insert(
            key,
            Slot {
                entry: Entry {
                    va: key.va,
                    t: Translation {
                        pa: t.page_pa(),
                        ..t
                    },
                    stale_reported: false,
                },
                last_use: self.tick,
            },
        );
    }

    /// Remove the entry covering `va` for `pasid`, if any.
    pub fn remove(&mut self, pasid: u32, va: u64) {
        if let Some(k) = self.find(pasid, va) {
            self.map.remove(&k);
        }
    }

    /// Invalidate every entry of `pasid` overlapping `va..va+len` (`len` = [`ALL`]: the whole
    /// PASID; ranges running past 2^64 are clipped). Returns how many entries were removed.
    pub fn invalidate(&mut self, pasid: u32, va: u64, len: u64) -> usize {
        self.stats.invalidations += 1;
        let end = if len == ALL {
            u128::MAX
        } else {
            u128::from(va) + u128::from(len)
        };
        let start = if len == ALL { 0 } else { u128::from(va) };
        let before = self.map.len();
        self.map.retain(|k, _| {
            let (s, e) = (u128::from(k.va), u128::from(k.va) + u128::from(k.size));
            !(k.pasid == pasid && s < end && start < e)
        });
        let n = before - self.map.len();
        self.stats.invalidated_entries += n as u64;
        n
    }

    /// Invalidate everything cached for `pasid`.
    pub fn invalidate_pasid(&mut self, pasid: u32) -> usize {
        self.invalidate(pasid, 0, ALL)
    }

    /// Drop everything cached for `pasid` as part of the device's own bookkeeping (a binding
    /// created or torn down), not counted as an invalidation.
    pub fn drop_pasid(&mut self, pasid: u32) -> usize {
        let before = self.map.len();
        self.map.retain(|k, _| k.pasid != pasid);
        before - self.map.len()
    }

    /// Drop every entry (reset). Counters are kept until [`Atc::reset_stats`].
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Zero the counters.
    pub fn reset_stats(&mut self) {
        self.stats = AtcStats::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(pa: u64, size: u64) -> Translation {
        Translation {
            pa,
            page_size: size,
            writable: true,
            user: true,
        }
    }

    /// Page-aligned keys of one PASID (low 12 bits zero) spread over the low bits a table
    /// uses for its buckets, and over the top 7 bits it uses as tags.
    #[test]
    fn test_atc_key_hasher_spreads_page_aligned_keys() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let b = BuildHasherDefault::<KeyHasher>::default();
        let hashes: Vec<u64> = (0..1024u64)
            .map(|p| {
                b.hash_one(Key {
                    pasid: 5,
                    va: 0x7f00_0000_0000 + (p << 12),
                    size: PAGE_4K,
                })
            })
            .collect();
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        let top: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(
            low.len() > 600,
            "{} distinct bucket indexes of 1024",
            low.len()
        );
        assert!(top.len() > 100, "{} distinct tags of 128", top.len());
    }

    #[test]
    fn test_atc_lookup_hit_after_insert_counts() {
        let mut atc = Atc::new(8);
        assert!(atc.lookup(1, 0x1000).is_none());
        atc.insert(1, 0x1234, tr(0x9234, PAGE_4K));
        let e = atc.lookup(1, 0x1ff8).unwrap();
        assert_eq!(e.va, 0x1000);
        assert_eq!(e.pa_of(0x1ff8), 0x9ff8);
        assert!(atc.lookup(2, 0x1000).is_none(), "other PASID misses");
        assert_eq!(atc.stats().hits, 1);
        assert_eq!(atc.stats().misses, 2);
    }

    #[test]
    fn test_atc_large_page_covers_inner_addresses() {
        let mut atc = Atc::new(8);
        atc.insert(3, 0x4020_0000 + 0x5000, tr(0x8000_5000, PAGE_2M));
        let e = atc.lookup(3, 0x4030_0010).unwrap();
        assert_eq!(e.pa_of(0x4030_0010), 0x8010_0010);
        atc.insert(3, 0x80_4000_0000, tr(0x1_4000_0000, PAGE_1G));
        assert_eq!(
            atc.lookup(3, 0x80_7fff_fff0).unwrap().pa_of(0x80_7fff_fff0),
            0x1_7fff_fff0
        );
    }

    #[test]
    fn test_atc_invalidate_range_removes_overlapping_only() {
        let mut atc = Atc::new(64);
        for i in 0..8u64 {
            atc.insert(1, i << 12, tr(0x10_0000 + (i << 12), PAGE_4K));
            atc.insert(2, i << 12, tr(0x20_0000 + (i << 12), PAGE_4K));
        }
        // 0x2800..0x4800 overlaps pages 2, 3, 4.
        assert_eq!(atc.invalidate(1, 0x2800, 0x2000), 3);
        for i in 0..8u64 {
            assert_eq!(
                atc.peek(1, i << 12).is_some(),
                !(2..=4).contains(&i),
                "page {i}"
            );
            assert!(atc.peek(2, i << 12).is_some());
        }
        assert_eq!(atc.stats().invalidations, 1);
        assert_eq!(atc.stats().invalidated_entries, 3);
    }

    #[test]
    fn test_atc_invalidate_inside_large_page_removes_it() {
        let mut atc = Atc::new(8);
        atc.insert(1, 0x20_0000, tr(0x40_0000, PAGE_2M));
        assert_eq!(atc.invalidate(1, 0x3f_f000, 0x1000), 1);
        assert!(atc.peek(1, 0x20_0000).is_none());
    }

    #[test]
    fn test_atc_invalidate_zero_len_and_end_of_space() {
        let mut atc = Atc::new(8);
        atc.insert(1, 0xffff_ffff_ffff_f000, tr(0x1000, PAGE_4K));
        atc.insert(1, 0x5000, tr(0x1000, PAGE_4K));
        assert_eq!(atc.invalidate(1, 0x5000, 0), 0, "empty range");
        assert_eq!(atc.invalidate(1, 0xffff_ffff_ffff_f800, 0x7ff), 1);
        assert_eq!(atc.invalidate(1, 0, ALL), 1);
        assert!(atc.is_empty());
    }

    #[test]
    fn test_atc_invalidate_pasid_keeps_others() {
        let mut atc = Atc::new(8);
        atc.insert(1, 0x1000, tr(0x1000, PAGE_4K));
        atc.insert(1, 0x40_0000, tr(0x1000, PAGE_2M));
        atc.insert(7, 0x1000, tr(0x1000, PAGE_4K));
        assert_eq!(atc.invalidate_pasid(1), 2);
        assert_eq!(atc.len(), 1);
        atc.insert(1, 0x1000, tr(0x1000, PAGE_4K));
        assert_eq!(atc.drop_pasid(1), 1);
        assert_eq!(
            atc.stats().invalidations,
            1,
            "dropping is not an invalidation"
        );
    }

    #[test]
    fn test_atc_full_evicts_least_recently_used() {
        let mut atc = Atc::new(4);
        for i in 0..4u64 {
            atc.insert(1, i << 12, tr(i << 12, PAGE_4K));
        }
        // Touch page 0 so page 1 is the oldest.
        atc.lookup(1, 0);
        atc.insert(1, 9 << 12, tr(0, PAGE_4K));
        assert_eq!(atc.len(), 4);
        assert!(atc.peek(1, 0).is_some());
        assert!(atc.peek(1, 1 << 12).is_none());
        assert_eq!(atc.stats().evictions, 1);
    }

    #[test]
    fn test_atc_touch_then_untouch_leaves_recency_and_counters_as_they_were() {
        let mut atc = Atc::new(4);
        // A 2 MiB entry covering pages 0 and 1, and 4 KiB pages at 2 MiB and above.
        atc.insert(1, 0, tr(0, PAGE_2M));
        for i in 0..3u64 {
            atc.insert(1, PAGE_2M + (i << 12), tr(i << 12, PAGE_4K));
        }
        let before = atc.stats();
        let mut saved = Vec::new();
        // Pages 0 and 1 (the 2 MiB entry twice); a refused entry is not touched.
        assert!(atc.touch_if(1, 0, &mut saved, |_| true).is_some());
        assert!(atc.touch_if(1, 1 << 12, &mut saved, |_| true).is_some());
        assert!(atc
            .touch_if(1, PAGE_2M + (1 << 12), &mut saved, |_| false)
            .is_none());
        assert!(atc.touch_if(1, 7 << 30, &mut saved, |_| true).is_none());
        assert_eq!(saved.len(), 2);
        atc.untouch(1, 0, &saved);
        assert_eq!(atc.stats(), before);
        // The 2 MiB entry is the oldest again: the next insert evicts it.
        atc.insert(1, 9 << 30, tr(0, PAGE_4K));
        assert!(atc.peek(1, 0).is_none());
        assert!(atc.peek(1, PAGE_2M).is_some());
        // Touched and kept: counted as hits once counted, and recency moves.
        let mut atc2 = Atc::new(2);
        atc2.insert(1, 0, tr(0, PAGE_4K));
        atc2.insert(1, 1 << 12, tr(1 << 12, PAGE_4K));
        saved.clear();
        assert!(atc2.touch_if(1, 0, &mut saved, |_| true).is_some());
        atc2.count_hits(1);
        assert_eq!(atc2.stats().hits, 1);
        atc2.insert(1, 5 << 12, tr(0, PAGE_4K));
        assert!(atc2.peek(1, 0).is_some());
        assert!(atc2.peek(1, 1 << 12).is_none());
    }

    #[test]
    fn test_atc_reinsert_other_size_replaces() {
        let mut atc = Atc::new(4);
        atc.insert(1, 0x20_0000, tr(0x40_0000, PAGE_2M));
        atc.insert(1, 0x20_1000, tr(0x9000, PAGE_4K));
        assert_eq!(atc.len(), 1);
        assert_eq!(atc.peek(1, 0x20_1000).unwrap().pa_of(0x20_1008), 0x9008);
    }

    #[test]
    fn test_atc_stale_reported_flag_sticks_until_replaced() {
        let mut atc = Atc::new(4);
        atc.insert(1, 0x1000, tr(0x1000, PAGE_4K));
        atc.mark_stale_reported(1, 0x1800);
        assert!(atc.peek(1, 0x1000).unwrap().stale_reported);
        atc.insert(1, 0x1000, tr(0x2000, PAGE_4K));
        assert!(!atc.peek(1, 0x1000).unwrap().stale_reported);
    }
}
