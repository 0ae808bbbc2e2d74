//! The device's testimony: a bounded journal of what happened to a function, and the invariant
//! checker that turns forbidden sequences into violations.
//!
//! Every function has one [`Journal`], shared by the endpoint (config writes, resets, client
//! events), its bus (pcisim-pci's `Bus`: DMA and interrupts, from any thread) and the device model (PASID
//! bind/unbind, ATC, faults). Each [`Journal::record`] runs the checker over the event first,
//! so a violation is recorded right after the event that caused it.
//!
//! Memory is bounded: the record ring keeps the last `capacity` records (older ones are dropped
//! and counted), violations are also kept in a separate bounded list so a flood of DMA records
//! cannot evict them, and DMA accesses are aggregated (consecutive accesses of the same direction
//! and PASID to adjacent or overlapping ranges become one record with a count).
//!
//! Aggregation never changes a record a reader has already been given by [`Journal::since`]
//! (a follower would miss the update), and a DMA access that commits a violation always starts
//! a record of its own, so the violation follows exactly the access that caused it. Violations
//! are logged (`log::warn!`) only while they fit in the retained list; later ones are counted.

use crate::checker::Checker;
use crate::event::{Event, Record, Stats, ViolationKind};

/// Default number of records kept.
pub const DEFAULT_CAPACITY: usize = 4096;
/// Violations kept apart from the ring, per reader window: once a reader has moved past a
/// violation ([`Journal::violations_since`] with a later `after`), a new one may take its
/// place; while every kept violation is still unread, later ones are only counted.
pub const MAX_VIOLATIONS: usize = 256;

struct Inner {
    start: std::time::Instant,
    capacity: usize,
    ring: std::collections::VecDeque<Record>,
    next_seq: u64,
    /// Kept violation records, oldest first (at most [`MAX_VIOLATIONS`]).
    violations: std::collections::VecDeque<Record>,
    /// Kept violations with `seq` at or below this belong to windows a reader has finished
    /// with (see `violations_since`) and may be replaced.
    violations_read: u64,
    /// A "violations no longer kept" warning was logged and no violation was kept since.
    unkept_warned: bool,
    /// Highest sequence number handed out by `since`: records up to it are no longer modified.
    read_upto: u64,
    stats: Stats,
    checker: Checker,
}

/// A function's journal. Cheap to clone; safe to use from any thread.
#[derive(Clone)]
pub struct Journal {
    name: std::sync::Arc<str>,
    inner: std::sync::Arc<std::sync::Mutex<Inner>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("name", &self.name).finish()
    }
}

impl Journal {
    /// A journal for the function `name` keeping the last `capacity` records.
    pub fn new(name: &str, capacity: usize) -> Journal {
        Journal {
            name: name.into(),
            inner: std::sync::Arc::new(std::sync::Mutex::new(Inner {
                start: std::time::Instant::now(),
                capacity: capacity.max(16),
                ring: std::collections::VecDeque::new(),
                next_seq: 1,
                violations: std::collections::VecDeque::new(),
                violations_read: 0,
                unkept_warned: false,
                read_upto: 0,
                stats: Stats::default(),
                checker: Checker::default(),
            })),
        }
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Recording never leaves the journal half-updated in a way later records depend on.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record an event (after checking it against the invariants; violations follow it).
    pub fn record(&self, event: Event) {
        let mut g = self.lock();
        let findings = g.checker.check(&event);
        g.append(event, findings.is_empty());
        for (kind, detail) in findings {
            g.append_violation(&self.name, kind, detail);
        }
    }

    /// Record that the oracle lost sight of something (a `checker_degraded` violation record
    /// with `what` as its detail): the window it falls in cannot pass as clean.
    pub fn degraded(&self, what: String) {
        self.lock()
            .append_violation(&self.name, ViolationKind::CheckerDegraded, what);
    }

    /// Records with `seq > after`, oldest first, and how many records with `seq > after` were
    /// dropped from the ring before they could be read.
    ///
    /// Records returned here are final: a later DMA access is never folded into them.
    pub fn since(&self, after: u64) -> (Vec<Record>, u64) {
        let mut g = self.lock();
        let first_kept = g.ring.front().map_or(g.next_seq, |r| r.seq);
        let lost = first_kept.saturating_sub(after.saturating_add(1));
        // The ring is in sequence order: skip the older part without scanning it.
        let skip = g.ring.partition_point(|r| r.seq <= after);
        let recs: Vec<Record> = g.ring.iter().skip(skip).cloned().collect();
        if let Some(last) = recs.last() {
            g.read_upto = g.read_upto.max(last.seq);
        }
        (recs, lost)
    }

    /// The violation records kept (at most [`MAX_VIOLATIONS`], oldest first; see
    /// [`Journal::violations_since`] for which).
    pub fn violations(&self) -> Vec<Record> {
        self.lock().violations.iter().cloned().collect()
    }

    /// Kept violations with `seq > after`, for a reader whose window starts after `after`.
    ///
    /// This also tells the journal which violations a reader has finished with: those with
    /// `seq <= after` (the reader moved past them), and those this call returns that lie
    /// within the records [`Journal::since`] has already handed out (the reader has read the
    /// window they are in: the lab reads a window's records, then its violations). From then
    /// on they may be replaced by new ones when the list is full. So each reader window gets
    /// room for [`MAX_VIOLATIONS`] of its own, however many earlier windows found; a
    /// violation is never dropped before a reader has been given it with its window — while
    /// the list is full of such unread ones, new ones are only counted (`stats().violations`).
    /// A second reader reading ahead can only make the first see fewer violations than were
    /// counted (its window is then not clean: the safe direction), never more.
    pub fn violations_since(&self, after: u64) -> Vec<Record> {
        let mut g = self.lock();
        let list: Vec<Record> = g
            .violations
            .iter()
            .filter(|r| r.seq > after)
            .cloned()
            .collect();
        let read = list.last().map_or(0, |r| r.seq.min(g.read_upto));
        g.violations_read = g.violations_read.max(after).max(read);
        list
    }

    /// The sequence number of the newest record (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }
}

impl Inner {
    /// Append a violation record (logged while it is kept; once the kept list is full of
    /// unread violations, one warning until one is kept again).
    fn append_violation(&mut self, name: &str, kind: ViolationKind, detail: String) {
        let room = self.violations.len() < MAX_VIOLATIONS
            || self
                .violations
                .front()
                .is_some_and(|r| r.seq <= self.violations_read);
        if room {
            log::warn!("{name}: VIOLATION {kind:?}: {detail}");
            self.unkept_warned = false;
        } else if !self.unkept_warned {
            log::warn!(
                "{name}: {MAX_VIOLATIONS} unread violations kept: further ones are only \
                 counted until a reader moves past them"
            );
            self.unkept_warned = true;
        }
        self.append(Event::Violation { kind, detail }, false);
    }

    /// Append `event`; a DMA access may be folded into the newest record if `may_fold`.
    fn append(&mut self, event: Event, may_fold: bool) {
        match &event {
            Event::Dma { count, bytes, .. } => {
                self.stats.dma_accesses = self.stats.dma_accesses.saturating_add(*count);
                self.stats.dma_bytes = self.stats.dma_bytes.saturating_add(*bytes);
                if may_fold && self.aggregate(&event) {
                    return;
                }
            }
            Event::DmaRefused { .. } => self.stats.dma_refused += 1,
            Event::DmaFault { .. } => self.stats.dma_faults += 1,
            Event::Interrupt { .. } => self.stats.interrupts += 1,
            Event::ResetBegin { .. } => self.stats.resets += 1,
            Event::Violation { kind, .. } => {
                self.stats.violations += 1;
                if *kind == ViolationKind::CheckerDegraded {
                    self.stats.degraded += 1;
                }
            }
            _ => {}
        }
        let rec = Record {
            seq: self.next_seq,
            t_ns: self.start.elapsed().as_nanos() as u64,
            event,
        };
        self.next_seq += 1;
        self.stats.records += 1;
        if matches!(rec.event, Event::Violation { .. }) {
            if self.violations.len() >= MAX_VIOLATIONS
                && self
                    .violations
                    .front()
                    .is_some_and(|r| r.seq <= self.violations_read)
            {
                // The oldest kept one belongs to a window a reader has moved past.
                self.violations.pop_front();
            }
            if self.violations.len() < MAX_VIOLATIONS {
                self.violations.push_back(rec.clone());
            }
        }
        if self.ring.len() >= self.capacity {
            self.ring.pop_front();
            self.stats.dropped += 1;
        }
        self.ring.push_back(rec);
    }

    /// Fold a DMA event into the newest record when it continues it (same direction and PASID,
    /// range adjacent or overlapping) and no reader has been given that record yet. Returns
    /// whether it was folded.
    fn aggregate(&mut self, event: &Event) -> bool {
        let Event::Dma {
            dir,
            pasid,
            iova,
            len,
            count,
            bytes,
        } = *event
        else {
            return false;
        };
        let read_upto = self.read_upto;
        let Some(last) = self.ring.back_mut().filter(|r| r.seq > read_upto) else {
            return false;
        };
        let Event::Dma {
            dir: ld,
            pasid: lp,
            iova: li,
            len: ll,
            count: lc,
            bytes: lb,
        } = &mut last.event
        else {
            return false;
        };
        if *ld != dir || *lp != pasid {
            return false;
        }
        let (a0, a1) = (u128::from(*li), u128::from(*li) + u128::from(*ll));
        let (b0, b1) = (u128::from(iova), u128::from(iova) + u128::from(len));
        if b0 > a1 || a0 > b1 {
            return false;
        }
        let lo = a0.min(b0);
        let hi = a1.max(b1);
        *li = lo as u64;
        *ll = u64::try_from(hi - lo).unwrap_or(u64::MAX);
        *lc = lc.saturating_add(count);
        *lb = lb.saturating_add(bytes);
        last.t_ns = self.start.elapsed().as_nanos() as u64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Dir, InterruptOutcome, Refusal, ResetKind};

    fn dma(dir: Dir, pasid: Option<u32>, iova: u64, len: u64) -> Event {
        Event::Dma {
            dir,
            pasid,
            iova,
            len,
            count: 1,
            bytes: len,
        }
    }

    fn note(i: u64) -> Event {
        Event::Note {
            text: format!("note {i}"),
        }
    }

    /// A journal whose checker sees 0..0x10_0000 mapped and Bus Master on.
    fn enabled(capacity: usize) -> Journal {
        let j = Journal::new("t", capacity);
        j.record(Event::ClientConnected);
        j.record(Event::DmaMapped {
            iova: 0,
            size: 0x10_0000,
            backed: true,
            read: true,
            write: true,
        });
        j.record(Event::Command {
            old: 0,
            new: 0x0006,
        });
        j
    }

    fn all(j: &Journal) -> Vec<Record> {
        j.since(0).0
    }

    #[test]
    fn test_aggregation_adjacent_writes_one_record() {
        let j = enabled(64);
        let before = j.last_seq();
        for i in 0..100u64 {
            j.record(dma(Dir::Write, None, 0x1000 + i * 64, 64));
        }
        let recs = all(&j);
        assert_eq!(j.last_seq(), before + 1);
        let last = recs.last().map(|r| r.event.clone());
        assert_eq!(
            last,
            Some(Event::Dma {
                dir: Dir::Write,
                pasid: None,
                iova: 0x1000,
                len: 100 * 64,
                count: 100,
                bytes: 6400,
            })
        );
        let st = j.stats();
        assert_eq!(st.dma_accesses, 100);
        assert_eq!(st.dma_bytes, 6400);
        assert!(j.violations().is_empty());
    }

    #[test]
    fn test_aggregation_same_range_repeated_counts_accesses() {
        let j = enabled(64);
        for _ in 0..10 {
            j.record(dma(Dir::Read, Some(3), 0x2000, 8));
        }
        let last = all(&j).pop().map(|r| r.event);
        assert_eq!(
            last,
            Some(Event::Dma {
                dir: Dir::Read,
                pasid: Some(3),
                iova: 0x2000,
                len: 8,
                count: 10,
                bytes: 80,
            })
        );
    }

    #[test]
    fn test_aggregation_other_pasid_dir_or_gap_new_record() {
        let j = enabled(64);
        let before = j.last_seq();
        j.record(dma(Dir::Write, Some(1), 0x1000, 64));
        j.record(dma(Dir::Write, Some(1), 0x1040, 64)); // folded
        j.record(dma(Dir::Write, Some(2), 0x1080, 64)); // other PASID
        j.record(dma(Dir::Write, None, 0x10c0, 64)); // no PASID
        j.record(dma(Dir::Read, None, 0x1100, 64)); // other direction
        j.record(dma(Dir::Read, None, 0x9000, 64)); // not adjacent
        assert_eq!(j.last_seq(), before + 5);
        let recs = all(&j);
        let n = recs.len();
        assert!(matches!(
            recs[n - 5].event,
            Event::Dma {
                pasid: Some(1),
                iova: 0x1000,
                len: 128,
                count: 2,
                ..
            }
        ));
        assert!(matches!(
            recs[n - 4].event,
            Event::Dma {
                pasid: Some(2),
                count: 1,
                ..
            }
        ));
    }

    #[test]
    fn test_aggregation_violating_access_own_record_then_violation() {
        let j = enabled(64);
        j.record(dma(Dir::Write, None, 0xf_ffc0, 64));
        // Crosses the end of the map: adjacent, but must not be folded.
        j.record(dma(Dir::Write, None, 0x10_0000, 64));
        j.record(dma(Dir::Write, None, 0x10_0040, 64));
        let recs = all(&j);
        let tail: Vec<&Event> = recs.iter().rev().take(5).rev().map(|r| &r.event).collect();
        let is_dma =
            |e: &Event, at: u64| matches!(*e, Event::Dma { iova, count: 1, .. } if iova == at);
        let is_outside = |e: &Event| {
            matches!(
                e,
                Event::Violation {
                    kind: ViolationKind::DmaOutsideMap,
                    ..
                }
            )
        };
        assert!(is_dma(tail[0], 0xf_ffc0), "{tail:?}");
        assert!(is_dma(tail[1], 0x10_0000), "{tail:?}");
        assert!(is_outside(tail[2]), "{tail:?}");
        assert!(is_dma(tail[3], 0x10_0040), "{tail:?}");
        assert!(is_outside(tail[4]), "{tail:?}");
        assert_eq!(j.violations().len(), 2);
    }

    #[test]
    fn test_aggregation_after_since_read_starts_new_record() {
        let j = enabled(64);
        j.record(dma(Dir::Write, None, 0x1000, 64));
        let (recs, _) = j.since(0);
        let seen = recs.last().map(|r| r.seq).unwrap_or_default();
        // The record the reader has is final: a new one starts.
        j.record(dma(Dir::Write, None, 0x1040, 64));
        // Not read yet: this one folds.
        j.record(dma(Dir::Write, None, 0x1080, 64));
        let (recs, lost) = j.since(seen);
        assert_eq!(lost, 0);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].seq, seen + 1);
        assert!(matches!(
            recs[0].event,
            Event::Dma {
                iova: 0x1040,
                len: 128,
                count: 2,
                ..
            }
        ));
        // And that record is now final too.
        j.record(dma(Dir::Write, None, 0x10c0, 64));
        assert_eq!(j.last_seq(), seen + 2);
        // The cumulative record was not changed behind the reader's back.
        assert_eq!(j.since(seen).0[0], recs[0]);
    }

    #[test]
    fn test_ring_over_capacity_evicts_oldest_and_counts() {
        let j = Journal::new("t", 16);
        for i in 0..40 {
            j.record(note(i));
        }
        let st = j.stats();
        assert_eq!(st.records, 40);
        assert_eq!(st.dropped, 24);
        assert_eq!(j.last_seq(), 40);
        let (recs, lost) = j.since(0);
        assert_eq!(lost, 24);
        assert_eq!(recs.len(), 16);
        assert_eq!(recs.first().map(|r| r.seq), Some(25));
        assert_eq!(recs.last().map(|r| r.seq), Some(40));
        assert_eq!(recs[0].event, note(24));
    }

    #[test]
    fn test_ring_small_capacity_raised_to_minimum() {
        let j = Journal::new("t", 1);
        for i in 0..20 {
            j.record(note(i));
        }
        assert_eq!(j.since(0).0.len(), 16);
    }

    #[test]
    fn test_since_counts_only_lost_records_after_cursor() {
        let j = Journal::new("t", 16);
        assert_eq!(j.since(0), (Vec::new(), 0));
        assert_eq!(j.last_seq(), 0);
        for i in 0..40 {
            j.record(note(i));
        }
        // Cursor inside the dropped part: 11..=24 were lost.
        let (recs, lost) = j.since(10);
        assert_eq!((recs.len(), lost), (16, 14));
        // Cursor exactly before the oldest kept record: nothing lost.
        let (recs, lost) = j.since(24);
        assert_eq!((recs.len(), lost), (16, 0));
        // Cursor inside the ring.
        let (recs, lost) = j.since(30);
        assert_eq!(recs.len(), 10);
        assert_eq!(recs.first().map(|r| r.seq), Some(31));
        assert_eq!(lost, 0);
        // Up to date, or beyond.
        assert_eq!(j.since(40), (Vec::new(), 0));
        assert_eq!(j.since(1000), (Vec::new(), 0));
    }

    #[test]
    fn test_violations_survive_ring_eviction() {
        let j = Journal::new("t", 16);
        j.record(Event::PasidUnbindAck { pasid: 4 });
        j.record(Event::PageWalk {
            pasid: 4,
            va: 0x1000,
            pa: None,
        });
        for i in 0..100 {
            j.record(note(i));
        }
        let (recs, lost) = j.since(0);
        assert!(lost > 0);
        assert!(!recs
            .iter()
            .any(|r| matches!(r.event, Event::Violation { .. })));
        let v = j.violations();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].seq, 3);
        assert!(matches!(
            v[0].event,
            Event::Violation {
                kind: ViolationKind::WalkAfterRelease,
                ..
            }
        ));
        assert_eq!(j.violations_since(2).len(), 1);
        assert!(j.violations_since(3).is_empty());
    }

    #[test]
    fn test_violations_over_limit_first_kept_all_counted() {
        let j = Journal::new("t", 16);
        j.record(Event::PasidReleased { pasid: 1 });
        let n = MAX_VIOLATIONS as u64 + 44;
        for i in 0..n {
            j.record(Event::PageWalk {
                pasid: 1,
                va: i * 0x1000,
                pa: None,
            });
        }
        let v = j.violations();
        assert_eq!(v.len(), MAX_VIOLATIONS);
        assert_eq!(v.first().map(|r| r.seq), Some(3));
        assert_eq!(j.stats().violations, n);
        // The newest are still in the ring.
        let (recs, _) = j.since(0);
        assert!(matches!(
            recs.last().map(|r| &r.event),
            Some(Event::Violation { .. })
        ));
    }

    /// One violation per PageWalk after the PASID's release.
    fn walk_violations(j: &Journal, n: u64) {
        for i in 0..n {
            j.record(Event::PageWalk {
                pasid: 1,
                va: i * 0x1000,
                pa: None,
            });
        }
    }

    /// The lab's reading of one window (`JournalWatch::check`): the records after `mark`, then
    /// the kept violations after `mark`, split at the window's end; returns (the window's
    /// violations as listed, the window's end, unretained = counted by the device but in
    /// neither list).
    fn read_window(j: &Journal, mark: u64, counted: &mut u64) -> (Vec<Record>, u64, u64) {
        let (recs, lost) = j.since(mark);
        let end = recs.last().map_or(mark + lost, |r| r.seq).max(mark);
        let list = j.violations_since(mark);
        let total = j.stats().violations;
        let (in_window, beyond): (Vec<Record>, Vec<Record>) =
            list.into_iter().partition(|r| r.seq <= end);
        let listed = (in_window.len() + beyond.len()) as u64;
        let unretained = total.saturating_sub(*counted).saturating_sub(listed);
        *counted += in_window.len() as u64 + unretained;
        (in_window, end, unretained)
    }

    /// The kept-violation list is per reader window: a third window, after two that found more
    /// than [`MAX_VIOLATIONS`] between them, still gets its own violations listed (and is not
    /// judged against the earlier windows' ones).
    #[test]
    fn test_violations_kept_per_reader_window_not_per_device_lifetime() {
        let j = Journal::new("t", 1 << 16);
        j.record(Event::PasidReleased { pasid: 1 });
        let mut counted = 0;
        // Window A: 200 violations.
        walk_violations(&j, 200);
        let (a, mark, unretained) = read_window(&j, 0, &mut counted);
        assert_eq!((a.len(), unretained), (200, 0));
        // Window B: 100 more (300 in all, more than the list holds).
        walk_violations(&j, 100);
        let (b, mark, unretained) = read_window(&j, mark, &mut counted);
        assert_eq!((b.len(), unretained), (100, 0), "window B has room");
        assert!(b.iter().all(|r| r.seq > a[199].seq), "none of A's in B");
        // Window C: 3 of another kind.
        j.record(Event::PasidUnbindAck { pasid: 9 });
        for _ in 0..3 {
            j.record(Event::Dma {
                dir: Dir::Read,
                pasid: Some(9),
                iova: 0,
                len: 4,
                count: 1,
                bytes: 4,
            });
        }
        let (c, _, unretained) = read_window(&j, mark, &mut counted);
        let kinds: Vec<ViolationKind> = c
            .iter()
            .filter_map(|r| match r.event {
                Event::Violation { kind, .. } => Some(kind),
                _ => None,
            })
            .collect();
        // Without a client or Bus Master the DMA also breaks the device-state rule: count
        // only the PASID ones, which are this window's own.
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == ViolationKind::PasidAfterUnbind)
                .count(),
            3,
            "{kinds:?}"
        );
        assert!(
            !kinds.contains(&ViolationKind::WalkAfterRelease),
            "{kinds:?}"
        );
        assert_eq!(unretained, 0);
        assert_eq!(j.stats().violations, 300 + c.len() as u64);
    }

    /// Kept violations are never dropped before a reader has moved past them: while the list
    /// is full of unread ones, later violations are only counted; `violations_since` with a
    /// later `after` frees the room.
    #[test]
    fn test_violations_unread_never_evicted_reader_frees_room() {
        let j = Journal::new("t", 1 << 16);
        j.record(Event::PasidReleased { pasid: 1 });
        walk_violations(&j, MAX_VIOLATIONS as u64 + 10);
        let kept = j.violations();
        assert_eq!(kept.len(), MAX_VIOLATIONS);
        let first = kept[0].seq;
        let last_kept = kept[MAX_VIOLATIONS - 1].seq;
        assert_eq!(first, 3, "the first ones are kept");
        assert_eq!(j.stats().violations, MAX_VIOLATIONS as u64 + 10);
        // A reader that asks from 0 keeps everything pinned.
        assert_eq!(j.violations_since(0).len(), MAX_VIOLATIONS);
        walk_violations(&j, 5);
        assert_eq!(j.violations().first().map(|r| r.seq), Some(first));
        // The reader moves past the first ten kept ones: ten new ones may take their place.
        let tenth = kept[9].seq;
        assert_eq!(j.violations_since(tenth).len(), MAX_VIOLATIONS - 10);
        walk_violations(&j, 12);
        let now = j.violations();
        assert_eq!(now.len(), MAX_VIOLATIONS);
        assert_eq!(now[0].seq, kept[10].seq, "only read ones were replaced");
        assert!(now[MAX_VIOLATIONS - 1].seq > last_kept);
        assert_eq!(
            j.violations_since(tenth)
                .iter()
                .filter(|r| r.seq > last_kept)
                .count(),
            10
        );
    }

    /// Violations recorded after a reader took a window's records but before it asked for the
    /// window's violations lie beyond that window: they are returned, but stay kept (a flood
    /// cannot replace them) until the reader has read the window they belong to.
    #[test]
    fn test_violations_beyond_the_window_stay_kept_until_their_window_is_read() {
        let j = Journal::new("t", 1 << 16);
        j.record(Event::PasidReleased { pasid: 1 });
        let mut counted = 0;
        walk_violations(&j, 10);
        let (recs, _) = j.since(0);
        let end = recs.last().map_or(0, |r| r.seq);
        walk_violations(&j, 3); // beyond this window
        let listed = j.violations_since(0);
        assert_eq!(listed.len(), 13);
        let beyond: Vec<u64> = listed
            .iter()
            .filter(|r| r.seq > end)
            .map(|r| r.seq)
            .collect();
        assert_eq!(beyond.len(), 3);
        // A flood fills the list many times over.
        walk_violations(&j, 3 * MAX_VIOLATIONS as u64);
        let kept: Vec<u64> = j.violations().iter().map(|r| r.seq).collect();
        assert!(
            beyond.iter().all(|s| kept.contains(s)),
            "beyond-window violations must survive until their window is read"
        );
        // The next window (from `end`) lists them as its own; the first window's ten were
        // counted by it.
        counted += 10;
        let (w, _, unretained) = read_window(&j, end, &mut counted);
        assert_eq!(
            &w.iter().map(|r| r.seq).collect::<Vec<_>>()[..3],
            &beyond[..]
        );
        assert_eq!(w.len(), MAX_VIOLATIONS);
        assert_eq!(
            unretained,
            3 + 3 * MAX_VIOLATIONS as u64 - MAX_VIOLATIONS as u64
        );
    }

    /// A degradation is a `checker_degraded` violation record: listed, counted (also apart),
    /// so a window containing it is not clean.
    #[test]
    fn test_degraded_is_a_counted_violation_record() {
        let j = Journal::new("t", 16);
        j.record(note(0));
        j.degraded("drain timed out".into());
        let v = j.violations_since(0);
        assert_eq!(v.len(), 1);
        assert!(matches!(
            &v[0].event,
            Event::Violation {
                kind: ViolationKind::CheckerDegraded,
                detail
            } if detail == "drain timed out"
        ));
        let st = j.stats();
        assert_eq!((st.violations, st.degraded), (1, 1));
        let json = serde_json::to_value(&v[0]).unwrap_or_default();
        assert_eq!(json["type"], "violation");
        assert_eq!(json["kind"], "checker_degraded");
    }

    #[test]
    fn test_stats_count_events_by_kind() {
        let j = Journal::new("t", 16);
        j.record(Event::ResetBegin {
            kind: ResetKind::Flr,
        });
        j.record(Event::DmaRefused {
            dir: Dir::Read,
            iova: 0,
            len: 4,
            reason: Refusal::Resetting,
        });
        j.record(Event::ResetEnd {
            kind: ResetKind::Flr,
        });
        j.record(Event::Interrupt {
            vector: 0,
            outcome: InterruptOutcome::Refused(Refusal::BusMasterDisabled),
        });
        let st = j.stats();
        assert_eq!(
            (st.resets, st.dma_refused, st.interrupts, st.violations),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn test_record_serializes_flat_with_type_tag() {
        let j = Journal::new("t", 16);
        j.record(Event::Command {
            old: 0,
            new: 0x0006,
        });
        let rec = j.since(0).0.pop().map(|r| serde_json::to_value(&r).ok());
        let v = rec.flatten().unwrap_or_default();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["type"], "command");
        assert_eq!(v["new"], 6);
    }
}
