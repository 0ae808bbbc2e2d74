//! Tests of [`super`] (checker.rs).

use super::*;
use crate::event::Refusal;
use crate::journal::Journal;

const BME: u16 = 0x0006;

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

fn write(iova: u64, len: u64) -> Event {
    dma(Dir::Write, None, iova, len)
}

fn fault(pasid: Option<u32>, iova: u64, len: u64) -> Event {
    Event::DmaFault {
        dir: Dir::Read,
        pasid,
        iova,
        len,
    }
}

fn map(iova: u64, size: u64) -> Event {
    Event::DmaMapped {
        iova,
        size,
        backed: true,
        read: true,
        write: true,
    }
}

fn unmap(iova: u64, size: u64) -> Event {
    Event::DmaUnmapped { iova, size }
}

fn command(new: u16) -> Event {
    Event::Command { old: 0, new }
}

fn irq(outcome: &str) -> Event {
    Event::Interrupt {
        vector: 1,
        outcome: outcome.parse().unwrap(),
    }
}

fn reset_begin(kind: ResetKind) -> Event {
    Event::ResetBegin { kind }
}

fn reset_end(kind: ResetKind) -> Event {
    Event::ResetEnd { kind }
}

/// PASID `pasid` bound to a page table at 0.
fn bind(pasid: u32) -> Event {
    Event::PasidBind { pasid, root: 0 }
}

/// A connected client, 0x1000..0x2000 mapped, memory and bus master enabled.
fn enabled() -> Vec<Event> {
    vec![Event::ClientConnected, map(0x1000, 0x1000), command(BME)]
}

fn with(mut base: Vec<Event>, more: impl IntoIterator<Item = Event>) -> Vec<Event> {
    base.extend(more);
    base
}

/// A fresh journal of `capacity` records (its checker included) after recording `events`.
fn recorded(capacity: usize, events: Vec<Event>) -> Journal {
    let j = Journal::new("t", capacity);
    for e in events {
        j.record(e);
    }
    j
}

/// Violations found (kind and detail) when recording `events` in a fresh journal.
fn run(events: Vec<Event>) -> Vec<(ViolationKind, String)> {
    recorded(4096, events)
        .violations()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::Violation { kind, detail } => Some((kind, detail)),
            _ => None,
        })
        .collect()
}

/// Exactly one violation, of `kind`; returns its detail.
fn only(kind: ViolationKind, events: Vec<Event>) -> String {
    let v = run(events);
    assert_eq!(v.len(), 1, "expected exactly one {kind:?}, got {v:?}");
    assert_eq!(v[0].0, kind, "{v:?}");
    v[0].1.clone()
}

fn none(events: Vec<Event>) {
    let v = run(events);
    assert!(v.is_empty(), "expected no violation, got {v:?}");
}

// --- DmaOutsideMap ---

#[test]
fn test_dma_outside_any_map_is_outside_map() {
    let d = only(
        ViolationKind::DmaOutsideMap,
        with(enabled(), [write(0x5000, 0x40)]),
    );
    assert!(d.contains("dma write 0x5000+0x40"), "{d}");
    assert!(d.contains("nearest below 0x1000..0x2000"), "{d}");
}

#[test]
fn test_dma_inside_map_no_violation() {
    none(with(
        enabled(),
        [
            write(0x1000, 0x40),
            write(0x1fc0, 0x40),
            dma(Dir::Read, None, 0x1800, 8),
        ],
    ));
}

#[test]
fn test_dma_crossing_map_end_is_outside_map() {
    let d = only(
        ViolationKind::DmaOutsideMap,
        with(enabled(), [write(0x1fc0, 0x80)]),
    );
    assert!(d.contains("0x2000..0x2040"), "{d}");
}

#[test]
fn test_dma_spanning_adjacent_maps_no_violation() {
    none(with(
        enabled(),
        [
            Event::DmaMapped {
                iova: 0x2000,
                size: 0x1000,
                backed: false,
                read: true,
                write: true,
            },
            write(0x1fc0, 0x80),
        ],
    ));
}

#[test]
fn test_dma_fault_never_mapped_is_outside_map() {
    only(
        ViolationKind::DmaOutsideMap,
        with(enabled(), [fault(None, 0x8000, 4)]),
    );
}

#[test]
fn test_dma_fault_in_unbacked_map_no_violation() {
    none(with(
        enabled(),
        [
            Event::DmaMapped {
                iova: 0xc0000,
                size: 0x20000,
                backed: false,
                read: true,
                write: true,
            },
            fault(None, 0xc1000, 4),
        ],
    ));
}

// --- DmaAfterUnmap ---

#[test]
fn test_dma_after_unmap_is_after_unmap() {
    let d = only(
        ViolationKind::DmaAfterUnmap,
        with(enabled(), [unmap(0x1000, 0x1000), write(0x1800, 0x40)]),
    );
    assert!(d.contains("0x1800..0x1840"), "{d}");
    assert!(d.contains("0x1000..0x2000"), "{d}");
}

#[test]
fn test_dma_map_use_unmap_no_violation() {
    none(with(
        enabled(),
        [write(0x1000, 0x40), unmap(0x1000, 0x1000)],
    ));
}

#[test]
fn test_dma_after_remap_no_violation() {
    none(with(
        enabled(),
        [
            unmap(0x1000, 0x1000),
            map(0x1000, 0x1000),
            write(0x1000, 0x40),
        ],
    ));
}

#[test]
fn test_dma_fault_after_unmap_is_after_unmap() {
    only(
        ViolationKind::DmaAfterUnmap,
        with(enabled(), [unmap(0x1000, 0x1000), fault(None, 0x1000, 4)]),
    );
}

#[test]
fn test_dma_partial_unmap_only_hole_is_after_unmap() {
    let base = vec![Event::ClientConnected, map(0, 0x4000), command(BME)];
    let base = with(base, [unmap(0x1000, 0x1000)]);
    none(with(base.clone(), [write(0, 0x40), write(0x3000, 0x40)]));
    only(
        ViolationKind::DmaAfterUnmap,
        with(base, [write(0x1800, 0x40)]),
    );
}

#[test]
fn test_dma_unmap_to_2_pow_64_only_mapped_part_is_after_unmap() {
    // QEMU unmaps 0xfef00000..2^64 at power-off.
    let base = with(
        enabled(),
        [
            map(0xfef0_0000, 0x1000),
            unmap(0xfef0_0000, 0u64.wrapping_sub(0xfef0_0000)),
        ],
    );
    only(
        ViolationKind::DmaAfterUnmap,
        with(base.clone(), [write(0xfef0_0000, 4)]),
    );
    only(
        ViolationKind::DmaOutsideMap,
        with(base.clone(), [write(0xff00_0000, 4)]),
    );
    only(
        ViolationKind::DmaOutsideMap,
        with(base, [write(u64::MAX, 1)]),
    );
}

#[test]
fn test_dma_after_client_reconnect_is_after_unmap() {
    only(
        ViolationKind::DmaAfterUnmap,
        with(
            enabled(),
            [
                write(0x1000, 0x40),
                Event::ClientDisconnected,
                Event::ClientConnected,
                command(BME),
                write(0x1000, 0x40),
            ],
        ),
    );
}

// --- DmaWithoutBusMaster ---

#[test]
fn test_dma_bus_master_off_is_without_bus_master() {
    let d = only(
        ViolationKind::DmaWithoutBusMaster,
        with(enabled(), [command(0x0002), write(0x1000, 0x40)]),
    );
    assert_eq!(
        d,
        "dma write 0x1000+0x40 while Command=0x0002 (bus master off)"
    );
}

#[test]
fn test_dma_bus_master_never_set_is_without_bus_master() {
    only(
        ViolationKind::DmaWithoutBusMaster,
        vec![
            Event::ClientConnected,
            map(0x1000, 0x1000),
            write(0x1000, 4),
        ],
    );
}

#[test]
fn test_dma_bus_master_cleared_then_set_no_violation() {
    none(with(
        enabled(),
        [command(0x0002), command(BME), write(0x1000, 0x40)],
    ));
}

#[test]
fn test_dma_refused_never_a_violation() {
    none(vec![
        Event::Link { up: false },
        Event::DmaRefused {
            dir: Dir::Write,
            iova: 0x9000,
            len: 4,
            reason: Refusal::LinkDown,
        },
        reset_begin(ResetKind::Flr),
        Event::DmaRefused {
            dir: Dir::Read,
            iova: 0,
            len: 4,
            reason: Refusal::Resetting,
        },
    ]);
}

// --- DmaInD3hot ---

#[test]
fn test_dma_in_d3hot_is_in_d3hot() {
    let d = only(
        ViolationKind::DmaInD3hot,
        with(
            enabled(),
            [Event::Power { from: 0, to: 3 }, write(0x1000, 0x40)],
        ),
    );
    assert!(d.contains("D3hot"), "{d}");
}

#[test]
fn test_dma_back_in_d0_no_violation() {
    // No_Soft_Reset=1: D3hot -> D0 keeps the configuration.
    none(with(
        enabled(),
        [
            Event::Power { from: 0, to: 3 },
            Event::Power { from: 3, to: 0 },
            write(0x1000, 0x40),
        ],
    ));
}

// --- DmaLinkDown ---

#[test]
fn test_dma_link_down_is_link_down() {
    only(
        ViolationKind::DmaLinkDown,
        with(enabled(), [Event::Link { up: false }, write(0x1000, 0x40)]),
    );
}

#[test]
fn test_dma_link_back_up_no_violation() {
    none(with(
        enabled(),
        [
            Event::Link { up: false },
            Event::Link { up: true },
            write(0x1000, 0x40),
        ],
    ));
}

// --- DmaDuringReset ---

#[test]
fn test_dma_during_reset_is_during_reset() {
    let d = only(
        ViolationKind::DmaDuringReset,
        with(
            enabled(),
            [reset_begin(ResetKind::Flr), write(0x1000, 0x40)],
        ),
    );
    assert!(d.contains("flr"), "{d}");
}

#[test]
fn test_dma_after_reset_before_reenable_is_during_reset() {
    let d = only(
        ViolationKind::DmaDuringReset,
        with(
            enabled(),
            [
                reset_begin(ResetKind::Flr),
                reset_end(ResetKind::Flr),
                write(0x1000, 0x40),
            ],
        ),
    );
    assert!(d.contains("before re-enable"), "{d}");
}

#[test]
fn test_dma_command_without_bus_master_after_reset_is_during_reset() {
    only(
        ViolationKind::DmaDuringReset,
        with(
            enabled(),
            [
                reset_begin(ResetKind::DeviceReset),
                reset_end(ResetKind::DeviceReset),
                command(0x0002),
                write(0x1000, 0x40),
            ],
        ),
    );
}

#[test]
fn test_dma_after_reset_and_reenable_no_violation() {
    none(with(
        enabled(),
        [
            reset_begin(ResetKind::Flr),
            reset_end(ResetKind::Flr),
            command(BME),
            write(0x1000, 0x40),
        ],
    ));
}

#[test]
fn test_dma_bus_master_set_during_reset_still_during_reset() {
    only(
        ViolationKind::DmaDuringReset,
        with(
            enabled(),
            [
                reset_begin(ResetKind::Flr),
                command(BME),
                reset_end(ResetKind::Flr),
                write(0x1000, 0x40),
            ],
        ),
    );
}

// --- InterruptWhileDisabled ---

#[test]
fn test_interrupt_bus_master_off_is_while_disabled() {
    let d = only(
        ViolationKind::InterruptWhileDisabled,
        with(enabled(), [command(0x0002), irq("delivered")]),
    );
    assert!(d.contains("vector 1 delivered"), "{d}");
    assert!(d.contains("Command=0x0002 (bus master off)"), "{d}");
}

#[test]
fn test_interrupt_pending_in_d3hot_is_while_disabled() {
    only(
        ViolationKind::InterruptWhileDisabled,
        with(enabled(), [Event::Power { from: 0, to: 3 }, irq("pending")]),
    );
}

#[test]
fn test_interrupt_link_down_is_while_disabled() {
    only(
        ViolationKind::InterruptWhileDisabled,
        with(enabled(), [Event::Link { up: false }, irq("delivered")]),
    );
}

#[test]
fn test_interrupt_during_reset_is_while_disabled() {
    only(
        ViolationKind::InterruptWhileDisabled,
        with(
            enabled(),
            [reset_begin(ResetKind::PmSoftReset), irq("delivered")],
        ),
    );
}

/// A vector held while the function could not send it and sent later is an `interrupt`
/// record (outcome `delivered-after-hold`) judged like any other delivery.
#[test]
fn test_interrupt_delivered_after_hold_judged_like_any_delivery() {
    let held = "delivered-after-hold";
    let d = only(
        ViolationKind::InterruptWhileDisabled,
        with(enabled(), [command(0x0002), irq(held)]),
    );
    assert!(d.contains("vector 1 delivered-after-hold"), "{d}");
    assert!(d.contains("bus master off"), "{d}");
    let d = only(
        ViolationKind::InterruptWhileDisabled,
        with(enabled(), [Event::Power { from: 0, to: 3 }, irq(held)]),
    );
    assert!(d.contains("D3hot"), "{d}");
    none(with(
        enabled(),
        [
            Event::Power { from: 0, to: 3 },
            irq("refused:d3hot"),
            Event::Power { from: 3, to: 0 },
            irq(held),
        ],
    ));
}

#[test]
fn test_interrupt_enabled_or_refused_no_violation() {
    none(with(
        enabled(),
        [
            irq("delivered"),
            irq("pending"),
            command(0x0002),
            irq("refused:bus_master_disabled"),
            Event::Power { from: 0, to: 3 },
            irq("refused:d3hot"),
        ],
    ));
}

#[test]
fn test_interrupt_intx_while_interrupt_disable_is_while_disabled() {
    let d = only(
        ViolationKind::InterruptWhileDisabled,
        with(enabled(), [command(0x0406), irq("intx-delivered")]),
    );
    assert!(d.contains("Interrupt Disable"), "{d}");
}

#[test]
fn test_interrupt_intx_bus_master_off_or_held_no_violation() {
    none(with(
        enabled(),
        [
            command(0x0002),
            irq("intx-delivered"),
            command(0x0402),
            irq("intx-held:intx_disabled"),
            Event::Power { from: 0, to: 3 },
            irq("intx-held:d3hot"),
        ],
    ));
}

#[test]
fn test_link_down_then_lost_connection_reset_new_client_no_violation() {
    none(with(
        enabled(),
        [
            Event::Link { up: false },
            Event::ClientDisconnected,
            reset_begin(ResetKind::LostConnection),
            reset_end(ResetKind::LostConnection),
            Event::ClientConnected,
            map(0x1000, 0x1000),
            command(BME),
            write(0x1000, 0x40),
            irq("delivered"),
        ],
    ));
}

// --- PasidAfterUnbind ---

fn unbound(pasid: u32) -> Vec<Event> {
    with(
        enabled(),
        [
            Event::PasidBind {
                pasid,
                root: 0x10_0000,
            },
            dma(Dir::Read, Some(pasid), 0x1000, 8),
            Event::PasidUnbindBegin { pasid },
            Event::PasidDrained { pasid, aborted: 0 },
            Event::PasidUnbindAck { pasid },
        ],
    )
}

#[test]
fn test_pasid_dma_after_unbind_ack_is_after_unbind() {
    let d = only(
        ViolationKind::PasidAfterUnbind,
        with(unbound(5), [dma(Dir::Read, Some(5), 0x1000, 8)]),
    );
    assert!(d.contains("pasid 5"), "{d}");
}

#[test]
fn test_pasid_fault_after_unbind_ack_is_after_unbind() {
    let base = with(
        unbound(5),
        [Event::DmaMapped {
            iova: 0xc0000,
            size: 0x1000,
            backed: false,
            read: true,
            write: true,
        }],
    );
    only(
        ViolationKind::PasidAfterUnbind,
        with(base, [fault(Some(5), 0xc0000, 8)]),
    );
}

#[test]
fn test_pasid_dma_during_unbind_or_after_rebind_no_violation() {
    none(with(
        enabled(),
        [
            bind(5),
            Event::PasidUnbindBegin { pasid: 5 },
            dma(Dir::Write, Some(5), 0x1000, 8),
            Event::PasidDrained {
                pasid: 5,
                aborted: 1,
            },
            Event::PasidUnbindAck { pasid: 5 },
            dma(Dir::Write, Some(6), 0x1000, 8),
            write(0x1000, 8),
            bind(5),
            dma(Dir::Write, Some(5), 0x1000, 8),
        ],
    ));
}

#[test]
fn test_pasid_after_unbind_with_bus_master_off_two_violations() {
    let v = run(with(
        unbound(7),
        [command(0), dma(Dir::Read, Some(7), 0x1000, 8)],
    ));
    let kinds: Vec<ViolationKind> = v.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        [
            ViolationKind::DmaWithoutBusMaster,
            ViolationKind::PasidAfterUnbind
        ]
    );
}

// --- StaleTranslation ---

#[test]
fn test_stale_translation_used_is_stale_translation() {
    let d = only(
        ViolationKind::StaleTranslation,
        with(
            enabled(),
            [
                bind(3),
                Event::StaleTranslationUsed {
                    pasid: 3,
                    va: 0x7f00_0000,
                    cached_pa: 0x1000,
                    walked_pa: Some(0x3000),
                },
                // An invalidation of another range or PASID does not excuse it.
                Event::Invalidate {
                    pasid: 3,
                    va: 0x7f00_1000,
                    len: 0x1000,
                },
                Event::Invalidate {
                    pasid: 4,
                    va: 0,
                    len: u64::MAX,
                },
                Event::PasidUnbindBegin { pasid: 3 },
            ],
        ),
    );
    assert!(d.contains("0x7f000000"), "{d}");
    assert!(d.contains("0x1000"), "{d}");
    assert!(d.contains("0x3000"), "{d}");
}

fn stale(pasid: u32, va: u64) -> Event {
    Event::StaleTranslationUsed {
        pasid,
        va,
        cached_pa: 0x1000,
        walked_pa: None,
    }
}

#[test]
fn test_stale_translation_judged_only_when_the_binding_ends() {
    // Held: no violation while the invalidation may still be on its way.
    none(with(enabled(), [bind(3), stale(3, 0x7f00_0000)]));
    // Released without an invalidation: a violation.
    only(
        ViolationKind::StaleTranslation,
        with(
            enabled(),
            [
                bind(3),
                stale(3, 0x7f00_0000),
                Event::PasidReleased { pasid: 3 },
            ],
        ),
    );
}

#[test]
fn test_stale_translation_then_covering_invalidation_is_legal() {
    none(with(
        enabled(),
        [
            bind(3),
            stale(3, 0x7f00_3000),
            Event::Invalidate {
                pasid: 3,
                va: 0x7f00_0000,
                len: 0x10000,
            },
            stale(3, 0x7f10_0000),
            Event::Invalidate {
                pasid: 3,
                va: 0,
                len: u64::MAX,
            },
            Event::PasidUnbindBegin { pasid: 3 },
            Event::PasidUnbindAck { pasid: 3 },
            Event::PasidReleased { pasid: 3 },
        ],
    ));
}

#[test]
fn test_stale_translation_after_unbind_ack_is_immediate() {
    only(
        ViolationKind::StaleTranslation,
        with(
            enabled(),
            [
                bind(3),
                Event::PasidUnbindBegin { pasid: 3 },
                Event::PasidUnbindAck { pasid: 3 },
                stale(3, 0x7f00_0000),
            ],
        ),
    );
}

#[test]
fn test_stale_translation_walk_invalidate_walk_no_violation() {
    none(with(
        enabled(),
        [
            bind(3),
            Event::PageWalk {
                pasid: 3,
                va: 0x7f00_0000,
                pa: Some(0x1000),
            },
            Event::Invalidate {
                pasid: 3,
                va: 0x7f00_0000,
                len: 0x1000,
            },
            Event::PageWalk {
                pasid: 3,
                va: 0x7f00_0000,
                pa: None,
            },
            Event::TranslationFault {
                pasid: 3,
                va: 0x7f00_0000,
                write: true,
            },
        ],
    ));
}

// --- WalkAfterRelease ---

fn walk(pasid: u32) -> Event {
    Event::PageWalk {
        pasid,
        va: 0x4000,
        pa: None,
    }
}

#[test]
fn test_walk_after_release_is_walk_after_release() {
    let d = only(
        ViolationKind::WalkAfterRelease,
        vec![bind(9), walk(9), Event::PasidReleased { pasid: 9 }, walk(9)],
    );
    assert!(d.contains("pasid 9 va 0x4000"), "{d}");
    assert!(d.contains("released"), "{d}");
}

#[test]
fn test_walk_after_unbind_ack_is_walk_after_release() {
    only(
        ViolationKind::WalkAfterRelease,
        vec![bind(9), Event::PasidUnbindAck { pasid: 9 }, walk(9)],
    );
}

#[test]
fn test_walk_bound_or_rebound_no_violation() {
    none(vec![
        bind(9),
        walk(9),
        Event::PasidReleased { pasid: 9 },
        walk(10),
        bind(9),
        walk(9),
    ]);
}

// --- ordering, bounds, internals ---

#[test]
fn test_violation_record_follows_its_event() {
    let (recs, _) = recorded(64, with(enabled(), [write(0x9000, 4)])).since(0);
    let n = recs.len();
    assert!(n >= 2);
    assert!(matches!(recs[n - 2].event, Event::Dma { iova: 0x9000, .. }));
    assert!(matches!(
        recs[n - 1].event,
        Event::Violation {
            kind: ViolationKind::DmaOutsideMap,
            ..
        }
    ));
}

#[test]
fn test_unmapped_history_over_bound_forgets_oldest() {
    let mut c = Checker::default();
    c.check(&command(BME));
    let n = MAX_UNMAPPED_RANGES as u64 + 10;
    for i in 0..n {
        // Disjoint, non-adjacent pages.
        c.check(&map(i * 0x2000, 0x1000));
        c.check(&unmap(i * 0x2000, 0x1000));
    }
    // Trimmed once, to 7/8 of the bound, when the 4097th range came; 9 more since.
    let kept = MAX_UNMAPPED_RANGES - MAX_UNMAPPED_RANGES / 8 + 9;
    assert_eq!(c.unmapped.len(), kept);
    assert_eq!(c.unmapped_forgotten, n - kept as u64);
    // Exactly the oldest went.
    let first_kept = c.unmapped.map.keys().next().copied();
    assert_eq!(first_kept, Some(u128::from(n - kept as u64) * 0x2000));
    let old = c.check(&write(0, 4));
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].0, ViolationKind::DmaOutsideMap);
    assert!(old[0].1.contains("513 older unmapped ranges forgotten"));
    let recent = c.check(&write((n - 1) * 0x2000, 4));
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].0, ViolationKind::DmaAfterUnmap);
}

#[test]
fn test_unmapped_history_adjacent_ranges_merge() {
    let mut c = Checker::default();
    for i in 0..100u64 {
        c.check(&map(i * 0x1000, 0x1000));
    }
    // Adjacent maps with the same backing are one range.
    assert_eq!(c.mapped.len(), 1);
    for i in 0..100u64 {
        c.check(&unmap(i * 0x1000, 0x1000));
    }
    assert_eq!(c.mapped.len(), 0);
    assert_eq!(c.unmapped.len(), 1);
}

/// The checker's findings of kind `checker_degraded` among `v`.
fn degraded(v: &Findings) -> Vec<&String> {
    v.iter()
        .filter(|(k, _)| *k == ViolationKind::CheckerDegraded)
        .map(|(_, d)| d)
        .collect()
}

#[test]
fn test_mapped_set_over_bound_stops_judging_membership() {
    let mut c = Checker::default();
    c.check(&command(BME));
    for i in 0..MAX_MAPPED_RANGES as u64 {
        let v = c.check(&map(i * 0x2000, 0x1000));
        assert!(v.is_empty(), "map {i}: {v:?}");
    }
    // The map past the bound: the oracle goes partly blind, and says so once.
    let v = c.check(&map(MAX_MAPPED_RANGES as u64 * 0x2000, 0x1000));
    let d = degraded(&v);
    assert_eq!(d.len(), 1, "{v:?}");
    assert!(d[0].contains("mapped set overflow"), "{}", d[0]);
    let v = c.check(&map((MAX_MAPPED_RANGES as u64 + 1) * 0x2000, 0x1000));
    assert!(v.is_empty(), "reported once per episode: {v:?}");
    assert!(c.mapped.len() <= MAX_MAPPED_RANGES);
    assert!(c.mapped_untracked);
    // Unknown: no false violation.
    assert!(c.check(&write(u64::MAX - 0x1000, 4)).is_empty());
    c.check(&Event::ClientDisconnected);
    // Everything mapped moved to the history, which stays bounded.
    assert_eq!(c.mapped.len(), 0);
    assert!(c.unmapped.len() <= MAX_UNMAPPED_RANGES);
    c.check(&Event::ClientConnected);
    c.check(&command(BME));
    assert!(!c.mapped_untracked);
    let v = c.check(&write(u64::MAX - 0x1000, 4));
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].0, ViolationKind::DmaOutsideMap);
}

#[test]
fn test_pasid_marks_over_bound_stay_bounded() {
    let mut c = Checker::default();
    let mut reports = Vec::new();
    for p in 0..(MAX_TRACKED_PASIDS as u32 + 100) {
        let v = c.check(&Event::PasidUnbindAck { pasid: p });
        reports.extend(degraded(&v).into_iter().map(|d| (p, d.clone())));
    }
    // Forgetting marks is a degradation: reported at the one trim (an eighth at once).
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].0, MAX_TRACKED_PASIDS as u32);
    let gone = MAX_TRACKED_PASIDS + 1 - trim_target(MAX_TRACKED_PASIDS);
    assert!(
        reports[0]
            .1
            .contains(&format!("forgot {gone} unbound/released PASIDs")),
        "{}",
        reports[0].1
    );
    assert!(c.pasids.len() <= MAX_TRACKED_PASIDS);
    // The oldest were forgotten, the newest are kept.
    let first_kept = c.pasids.keys().next().copied();
    assert_eq!(
        first_kept,
        Some(MAX_TRACKED_PASIDS as u32 + 100 - c.pasids.len() as u32)
    );
    assert!(c.pasids.contains_key(&(MAX_TRACKED_PASIDS as u32 + 99)));
}

#[test]
fn test_ranges_carve_middle_splits_range() {
    let mut r: Ranges<bool> = Ranges::default();
    r.insert(0, 0x4000, true, |a, b| (a == b).then_some(a));
    let removed = r.carve(0x1000, 0x2000);
    assert_eq!(removed, [(0x1000, 0x2000, true)]);
    assert_eq!(r.len(), 2);
    assert_eq!(r.gaps(0, 0x4000), [(0x1000, 0x2000)]);
    assert!(r.contains(0, 0x1000));
    assert!(!r.contains(0x800, 0x1800));
}

// --- BindingOutlivedMm, DrainNotAwaited (docs/sva.md: which lifetime rule broke) ---

/// bind 3 → unbind_begin → drained → ack → released: the correct driver's whole unbind.
fn unbind_all(pasid: u32) -> [Event; 4] {
    [
        Event::PasidUnbindBegin { pasid },
        Event::PasidDrained { pasid, aborted: 2 },
        Event::PasidUnbindAck { pasid },
        Event::PasidReleased { pasid },
    ]
}

#[test]
fn test_address_space_empty_while_bound_is_binding_outlived_mm() {
    // M6b: exit_mmap zaps the PTEs (stale uses, held), then frees the tables (the device finds
    // the root empty) with the PASID still bound; the unbind comes only at file release.
    let mut events = with(
        enabled(),
        [
            bind(3),
            stale(3, 0x7f00_0000),
            stale(3, 0x7f00_1000),
            Event::AddressSpaceEmpty { pasid: 3 },
            stale(3, 0x7f00_2000),
            Event::AddressSpaceEmpty { pasid: 3 },
        ],
    );
    events.extend(unbind_all(3));
    let d = only(ViolationKind::BindingOutlivedMm, events);
    assert!(d.contains("pasid 3"), "{d}");
    assert!(d.contains("2 stale translation use(s)"), "{d}");
}

#[test]
fn test_binding_outlived_mm_is_per_binding() {
    // A new binding of the same PASID starts clean: its stale uses are judged again, and a
    // second teardown under it is a second violation.
    let mut events = with(enabled(), [bind(3), Event::AddressSpaceEmpty { pasid: 3 }]);
    events.extend(unbind_all(3));
    events.extend([
        Event::PasidBind {
            pasid: 3,
            root: 0x5000,
        },
        stale(3, 0x7f00_0000),
        Event::PasidUnbindBegin { pasid: 3 },
        Event::PasidBind {
            pasid: 3,
            root: 0x6000,
        },
        Event::AddressSpaceEmpty { pasid: 3 },
    ]);
    let kinds: Vec<ViolationKind> = run(events).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        kinds,
        [
            ViolationKind::BindingOutlivedMm,
            ViolationKind::StaleTranslation,
            ViolationKind::BindingOutlivedMm
        ]
    );
}

#[test]
fn test_address_space_empty_after_unbind_ack_no_violation() {
    // M6: the driver unbound on mm release; the tables are torn down after the ack. (The
    // device reports only bound or draining PASIDs; the checker stays quiet if told anyway.)
    let mut events = with(enabled(), [bind(3)]);
    events.extend(unbind_all(3));
    events.push(Event::AddressSpaceEmpty { pasid: 3 });
    none(events);
}

#[test]
fn test_stale_use_while_draining_is_drain_not_awaited() {
    // M6c: UNBIND (finish) issued on mm release, the driver returned without waiting, the
    // queued work runs on while exit_mmap zaps the PTEs: a violation at once, not at the end.
    let d = only(
        ViolationKind::DrainNotAwaited,
        with(
            enabled(),
            [
                bind(3),
                Event::PasidUnbindBegin { pasid: 3 },
                stale(3, 0x7f00_0000),
            ],
        ),
    );
    assert!(d.contains("pasid 3 va 0x7f000000"), "{d}");
    assert!(d.contains("draining"), "{d}");
    // The tables found empty during the drain: the same rule.
    let kinds: Vec<ViolationKind> = run(with(
        enabled(),
        [
            bind(3),
            Event::PasidUnbindBegin { pasid: 3 },
            Event::AddressSpaceEmpty { pasid: 3 },
            stale(3, 0x7f00_0000),
            Event::PasidDrained {
                pasid: 3,
                aborted: 0,
            },
            Event::PasidUnbindAck { pasid: 3 },
            Event::PasidReleased { pasid: 3 },
        ],
    ))
    .into_iter()
    .map(|(k, _)| k)
    .collect();
    assert_eq!(
        kinds,
        [
            ViolationKind::DrainNotAwaited,
            ViolationKind::DrainNotAwaited
        ]
    );
}

#[test]
fn test_draining_ends_at_ack_and_is_per_pasid() {
    // Another PASID's drain does not make a held use urgent; after an acknowledged unbind
    // and a new binding, a stale use is held again (and an invalidation clears it).
    let mut events = with(
        enabled(),
        [
            bind(3),
            bind(4),
            Event::PasidUnbindBegin { pasid: 4 },
            stale(3, 0x7f00_0000),
            Event::Invalidate {
                pasid: 3,
                va: 0,
                len: u64::MAX,
            },
        ],
    );
    events.extend(unbind_all(3));
    events.extend([
        bind(3),
        stale(3, 0x7f00_0000),
        Event::Invalidate {
            pasid: 3,
            va: 0x7f00_0000,
            len: 0x1000,
        },
    ]);
    events.extend(unbind_all(3));
    none(events);
}

#[test]
fn test_stale_use_before_the_unbind_stays_a_missed_invalidation() {
    // M7b: the address space lives, the driver never invalidates; the use came before the
    // unbind began, so the verdict is the missed invalidation, not the drain.
    let mut events = with(enabled(), [bind(3), stale(3, 0x7f00_0000)]);
    events.extend(unbind_all(3));
    only(ViolationKind::StaleTranslation, events);
}
