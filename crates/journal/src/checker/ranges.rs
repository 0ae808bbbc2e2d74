//! Disjoint IOVA ranges with a value each: the checker's map of mapped, and of recently
//! unmapped, DMA space. A leaf of [`super`].

use std::collections::BTreeMap;

/// One past the last IOVA.
pub(super) const SPACE_END: u128 = 1 << 64;

/// `iova..iova+len` as a half-open u128 range clipped to the address space (a range may end at
/// exactly 2^64).
pub(super) fn span(iova: u64, len: u64) -> (u128, u128) {
    let s = u128::from(iova);
    (s, (s + u128::from(len)).min(SPACE_END))
}

/// The bytes an access touches; an empty access is checked as its first byte.
pub(super) fn access_span(iova: u64, len: u64) -> (u128, u128) {
    span(iova, len.max(1))
}

/// Disjoint half-open ranges of the IOVA space, each with a value.
#[derive(Debug, Clone)]
pub(super) struct Ranges<V> {
    /// start → (end, value); ranges never overlap.
    pub(super) map: BTreeMap<u128, (u128, V)>,
}

impl<V> Default for Ranges<V> {
    fn default() -> Self {
        Ranges {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Copy> Ranges<V> {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether one range contains all of `s..e` (the common case, without allocating).
    pub(super) fn contains(&self, s: u128, e: u128) -> bool {
        self.map
            .range(..=s)
            .next_back()
            .is_some_and(|(_, &(end, _))| end >= e)
    }

    /// Ranges overlapping `s..e`, in order.
    pub(super) fn overlapping(&self, s: u128, e: u128) -> Vec<(u128, u128, V)> {
        let mut out = Vec::new();
        if s >= e {
            return out;
        }
        if let Some((&k, &(end, v))) = self.map.range(..s).next_back() {
            if end > s {
                out.push((k, end, v));
            }
        }
        out.extend(self.map.range(s..e).map(|(&k, &(end, v))| (k, end, v)));
        out
    }

    /// The parts of `s..e` no range covers, in order.
    pub(super) fn gaps(&self, s: u128, e: u128) -> Vec<(u128, u128)> {
        let mut out = Vec::new();
        let mut at = s;
        for (k, end, _) in self.overlapping(s, e) {
            if k > at {
                out.push((at, k));
            }
            at = at.max(end);
        }
        if at < e {
            out.push((at, e));
        }
        out
    }

    /// Remove `s..e` (splitting ranges that stick out); returns the removed pieces.
    pub(super) fn carve(&mut self, s: u128, e: u128) -> Vec<(u128, u128, V)> {
        let hit = self.overlapping(s, e);
        let mut removed = Vec::with_capacity(hit.len());
        for (k, end, v) in hit {
            self.map.remove(&k);
            if k < s {
                self.map.insert(k, (s, v));
            }
            if end > e {
                self.map.insert(e, (end, v));
            }
            removed.push((k.max(s), end.min(e), v));
        }
        removed
    }

    /// Set `s..e` to `v`, merging with an adjacent range when `merge` allows.
    pub(super) fn insert(&mut self, s: u128, e: u128, v: V, merge: impl Fn(V, V) -> Option<V>) {
        if s >= e {
            return;
        }
        self.carve(s, e);
        let (mut s, mut e, mut v) = (s, e, v);
        if let Some((&k, &(end, lv))) = self.map.range(..s).next_back() {
            if end == s {
                if let Some(m) = merge(lv, v) {
                    self.map.remove(&k);
                    (s, v) = (k, m);
                }
            }
        }
        if let Some(&(end, rv)) = self.map.get(&e) {
            if let Some(m) = merge(v, rv) {
                self.map.remove(&e);
                (e, v) = (end, m);
            }
        }
        self.map.insert(s, (e, v));
    }

    /// Remove everything; returns what was there.
    pub(super) fn take_all(&mut self) -> Vec<(u128, u128, V)> {
        std::mem::take(&mut self.map)
            .into_iter()
            .map(|(k, (end, v))| (k, end, v))
            .collect()
    }
}
