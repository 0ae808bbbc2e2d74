//! How long a device takes to answer: for every request that gets a reply, the time from the
//! moment its frame was complete (the `recvmsg` that brought its last byte returned) to the
//! moment the reply's `sendmsg` returned. QEMU waits for each synchronous reply at most
//! `x-msg-timeout` (5 s by default) and then gives the request up; this says how close a device
//! came (issue 15: "the server answers every synchronous request well inside QEMU's 5 s
//! `x-msg-timeout` with several VMs busy").
//!
//! What the interval holds: the wait behind earlier frames of the same read (a burst of posted
//! writes), the handler, the device lock (a control request holding it, a DMA engine), a slow
//! reset, and the reply's `send` (which blocks while the client does not read). What it does
//! not hold: the time the client's bytes spent in the socket before the device's thread got to
//! read them (the thread was busy or not scheduled) — that part is invisible from the server.
//!
//! Cost on the hot path: one clock read per `recvmsg` that returns bytes (in
//! [`crate::reader`]), one per reply after its `sendmsg`, three relaxed atomic adds (count,
//! sum and one histogram bucket) and a relaxed load of the maximum; the command and time of a new
//! maximum are written under a mutex only when the maximum grows. No allocation. The
//! aggregates are shared ([`Arc<ReplyLatency>`], [`crate::ServerOptions::reply_latency`]) so
//! that another thread (`pcisim serve`'s control socket) reads them while the device serves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::proto::Command;

/// A reply slower than this is logged (`warn!`, with its command and id) by the connection:
/// the aggregates say how slow, the server's log says when, next to what else happened.
pub const SLOW_REPLY: Duration = Duration::from_millis(100);

/// Histogram buckets: bucket 0 holds latencies under 1 µs (1024 ns), bucket `k` (1 ≤ k < last)
/// those in `[2^(k-1), 2^k)` × 1024 ns, and the last one everything from `2^(BUCKETS-2)` ×
/// 1024 ns (~8.6 s) up: QEMU's 5 s limit falls inside the one before it.
pub const BUCKETS: usize = 25;

/// Reply latencies of one device, aggregated since the server started (over all its clients).
#[derive(Debug)]
pub struct ReplyLatency {
    count: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
    /// The command and wall-clock time of the slowest reply (written only when `max_ns` grows).
    worst: Mutex<Option<Worst>>,
}

#[derive(Debug, Clone, Copy)]
struct Worst {
    ns: u64,
    command: u16,
    at: SystemTime,
}

impl Default for ReplyLatency {
    fn default() -> Self {
        ReplyLatency {
            count: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            worst: Mutex::new(None),
        }
    }
}

/// The bucket of a latency of `ns` nanoseconds (see [`BUCKETS`]).
pub fn bucket(ns: u64) -> usize {
    let us = ns >> 10;
    ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1)
}

/// The smallest latency in bucket `k`, in ns.
pub fn bucket_floor_ns(k: usize) -> u64 {
    match k {
        0 => 0,
        k => 1024u64 << (k - 1).min(62),
    }
}

impl ReplyLatency {
    /// A reply to a request of `command` whose frame was complete at `received` has just been
    /// sent. Reads the clock once; returns the latency.
    pub fn record(&self, command: u16, received: Instant) -> Duration {
        let latency = received.elapsed();
        self.record_ns(command, latency);
        latency
    }

    /// [`ReplyLatency::record`] with the latency measured by the caller.
    pub fn record_ns(&self, command: u16, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        if let Some(b) = self.buckets.get(bucket(ns)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        if ns > self.max_ns.load(Ordering::Relaxed) {
            self.new_max(ns, command);
        }
    }

    /// Cold path: a new maximum (a handful of times per connection).
    #[cold]
    fn new_max(&self, ns: u64, command: u16) {
        let mut w = self.worst.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked again under the lock: two writers (a server serving two connections through
        // one `ServerOptions`) keep the larger.
        if w.is_some_and(|w| w.ns >= ns) {
            return;
        }
        *w = Some(Worst {
            ns,
            command,
            at: SystemTime::now(),
        });
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The aggregates now. Taken without stopping the writer: the counters may be one reply
    /// apart from each other, never torn.
    pub fn snapshot(&self) -> LatencySnapshot {
        let worst = *self.worst.lock().unwrap_or_else(PoisonError::into_inner);
        let histogram = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(k, b)| {
                let n = b.load(Ordering::Relaxed);
                (n > 0).then(|| HistogramBucket {
                    from_ns: bucket_floor_ns(k),
                    count: n,
                })
            })
            .collect();
        LatencySnapshot {
            replies: self.count.load(Ordering::Relaxed),
            total_ns: self.total_ns.load(Ordering::Relaxed),
            max_ns: worst.map_or(0, |w| w.ns),
            max_command: worst.map(|w| command_name(w.command)),
            max_at_unix_ms: worst.map(|w| {
                w.at.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
            histogram,
        }
    }
}

/// A copy of a device's [`ReplyLatency`] (its JSON form is what `pcisim serve`'s control socket
/// sends as `reply_latency`, docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LatencySnapshot {
    /// Replies sent.
    pub replies: u64,
    /// Their latencies summed, in ns (mean: `total_ns / replies`).
    pub total_ns: u64,
    /// The slowest reply, in ns (0: none yet).
    pub max_ns: u64,
    /// Its request's command (`DEVICE_RESET`, `REGION_READ`, or `command 99` for a number that
    /// is none).
    pub max_command: Option<String>,
    /// When its reply was sent (ms since the Unix epoch).
    pub max_at_unix_ms: Option<u64>,
    /// The non-empty log2 buckets, fastest first.
    pub histogram: Vec<HistogramBucket>,
}

/// One bucket of [`LatencySnapshot::histogram`]: `count` replies took at least `from_ns` and
/// less than the next bucket's `from_ns` (twice this one's, or 1024 ns after the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistogramBucket {
    /// The bucket's lower bound, in ns.
    pub from_ns: u64,
    /// Replies in it.
    pub count: u64,
}

/// The spec's name of command `c` (`REGION_READ`), or `command N`.
pub fn command_name(c: u16) -> String {
    use Command::*;
    let name = match Command::from_u16(c) {
        Some(Version) => "VERSION",
        Some(DmaMap) => "DMA_MAP",
        Some(DmaUnmap) => "DMA_UNMAP",
        Some(DeviceGetInfo) => "DEVICE_GET_INFO",
        Some(DeviceGetRegionInfo) => "DEVICE_GET_REGION_INFO",
        Some(DeviceGetRegionIoFds) => "DEVICE_GET_REGION_IO_FDS",
        Some(DeviceGetIrqInfo) => "DEVICE_GET_IRQ_INFO",
        Some(DeviceSetIrqs) => "DEVICE_SET_IRQS",
        Some(RegionRead) => "REGION_READ",
        Some(RegionWrite) => "REGION_WRITE",
        Some(DmaRead) => "DMA_READ",
        Some(DmaWrite) => "DMA_WRITE",
        Some(DeviceReset) => "DEVICE_RESET",
        Some(DirtyPages) => "DIRTY_PAGES",
        Some(RegionWriteMulti) => "REGION_WRITE_MULTI",
        Some(DeviceFeature) => "DEVICE_FEATURE",
        Some(MigDataRead) => "MIG_DATA_READ",
        Some(MigDataWrite) => "MIG_DATA_WRITE",
        None => return format!("command {c}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn test_buckets_are_log2_of_microseconds() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1023), 0);
        assert_eq!(bucket(1024), 1);
        assert_eq!(bucket(2047), 1);
        assert_eq!(bucket(2048), 2);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        for k in 1..BUCKETS {
            assert_eq!(bucket(bucket_floor_ns(k)), k, "bucket {k}");
            assert_eq!(bucket(bucket_floor_ns(k) - 1), k - 1, "below bucket {k}");
        }
        // QEMU's 5 s limit is not in the open-ended last bucket.
        assert!(bucket(5_000_000_000) < BUCKETS - 1);
    }

    #[test]
    fn test_snapshot_counts_and_keeps_the_slowest() {
        let l = ReplyLatency::default();
        assert_eq!(l.snapshot().replies, 0);
        assert_eq!(l.snapshot().max_command, None);
        l.record_ns(9, Duration::from_micros(10));
        l.record_ns(13, Duration::from_millis(300));
        l.record_ns(9, Duration::from_micros(12));
        let s = l.snapshot();
        assert_eq!(s.replies, 3);
        assert_eq!(s.max_ns, 300_000_000);
        assert_eq!(s.max_command.as_deref(), Some("DEVICE_RESET"));
        assert_eq!(s.total_ns, 300_022_000);
        assert!(s.max_at_unix_ms.unwrap() > 1_700_000_000_000);
        let total: u64 = s.histogram.iter().map(|b| b.count).sum();
        assert_eq!(total, 3);
        assert_eq!(s.histogram.len(), 2, "{:?}", s.histogram);
        assert_eq!(command_name(99), "command 99");
    }
}
