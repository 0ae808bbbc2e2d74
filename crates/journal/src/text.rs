//! Records as one readable line (`pcisim ctl journal`, the lab's KTAP diagnostics):
//! `     12        3.250 ms gpu0     dma write iova=0x1000 len=0x200 x3 (1536 B)`.

use serde_json::Value;

use crate::event::{Event, Record};

/// Fields whose numbers read best in hexadecimal.
const HEX_FIELDS: &[&str] = &[
    "iova",
    "size",
    "len",
    "va",
    "root",
    "pa",
    "cached_pa",
    "walked_pa",
    "old",
    "new",
];

fn field_text(key: &str, v: &Value) -> String {
    match v {
        Value::Number(n) if HEX_FIELDS.contains(&key) => match n.as_u64() {
            Some(u) => format!("{u:#x}"),
            None => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The event in a few words: `dma write iova=0x1000 len=0x200 x3 (1536 B)`,
/// `VIOLATION dma_after_unmap: ...`, `ring_error code=dma_refused detail=... slot=3`. Events
/// without a form of their own are their type and fields (`key=value`, in name order;
/// addresses and sizes in hex).
pub fn summarize(event: &Event) -> String {
    let hex = |v: u64| format!("{v:#x}");
    let pasid = |p: &Option<u32>| p.map(|p| format!(" pasid={p}")).unwrap_or_default();
    match event {
        Event::Violation { kind, detail } => {
            format!("VIOLATION {kind}: {detail}")
        }
        Event::Dma {
            dir,
            pasid: p,
            iova,
            len,
            count,
            bytes,
        } => {
            let times = if *count == 1 {
                String::new()
            } else {
                format!(" x{count}")
            };
            format!(
                "dma {}{} iova={} len={}{times} ({bytes} B)",
                serde_name(dir),
                pasid(p),
                hex(*iova),
                hex(*len)
            )
        }
        Event::DmaMapped {
            iova, size, backed, ..
        } => format!(
            "dma_mapped iova={} size={}{}",
            hex(*iova),
            hex(*size),
            if *backed { "" } else { " (no fd)" }
        ),
        Event::Command { old, new } => format!(
            "command {} -> {}",
            hex(u64::from(*old)),
            hex(u64::from(*new))
        ),
        Event::Power { from, to } => format!("power D{from} -> D{to}"),
        Event::Link { up } => format!("link {}", if *up { "up" } else { "down" }),
        Event::Interrupt { vector, outcome } => format!("interrupt vector {vector} {outcome}"),
        Event::FaultInjected { fault } => format!("fault injected: {fault}"),
        Event::Note { text } => format!("note: {text}"),
        other => generic(other),
    }
}

/// `type key=value ...` from the event's JSON form.
fn generic(event: &Event) -> String {
    summarize_json(&serde_json::to_value(event).unwrap_or(Value::Null))
}

/// A JSON record this crate may not know (a newer server's event type) in the generic form:
/// `type key=value ...`, fields in name order (`seq`, `t_ns` left out), addresses in hex.
pub fn summarize_json(v: &Value) -> String {
    let mut s = v
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    if let Some(obj) = v.as_object() {
        for (k, v) in obj {
            if matches!(k.as_str(), "seq" | "t_ns" | "type") || v.is_null() {
                continue;
            }
            s.push_str(&format!(" {k}={}", field_text(k, v)));
        }
    }
    s
}

/// A unit-like enum's serde name (`write`, `dma_after_unmap`).
fn serde_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => "?".to_string(),
    }
}

/// One readable line for a record of `device`: sequence number, time in milliseconds since
/// the journal began, device, event.
pub fn format_record(device: &str, record: &Record) -> String {
    let t_ms = record.t_ns as f64 / 1e6;
    format!(
        "{:>7} {t_ms:>12.3} ms {device:<8} {}",
        record.seq,
        summarize(&record.event)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Dir, InterruptOutcome, RingErrorCode, ViolationKind};

    #[test]
    fn test_summaries() {
        let dma = Event::Dma {
            dir: Dir::Write,
            pasid: Some(3),
            iova: 0x1000,
            len: 0x600,
            count: 3,
            bytes: 1536,
        };
        assert_eq!(
            summarize(&dma),
            "dma write pasid=3 iova=0x1000 len=0x600 x3 (1536 B)"
        );
        assert_eq!(
            summarize(&Event::Command { old: 0, new: 6 }),
            "command 0x0 -> 0x6"
        );
        assert_eq!(
            summarize(&Event::Interrupt {
                vector: 1,
                outcome: InterruptOutcome::DeliveredAfterHold
            }),
            "interrupt vector 1 delivered-after-hold"
        );
        assert_eq!(
            summarize(&Event::Violation {
                kind: ViolationKind::DmaAfterUnmap,
                detail: "x".into()
            }),
            "VIOLATION dma_after_unmap: x"
        );
        // Generic: fields in name order, addresses in hex.
        assert_eq!(
            summarize(&Event::RingError {
                code: RingErrorCode::DmaRefused,
                slot: 3,
                detail: "FILL".into()
            }),
            "ring_error code=dma_refused detail=FILL slot=3"
        );
        assert_eq!(
            summarize(&Event::PageWalk {
                pasid: 1,
                va: 0x2000,
                pa: None
            }),
            "page_walk pasid=1 va=0x2000"
        );
        let rec = Record {
            seq: 12,
            t_ns: 3_250_000,
            event: Event::ClientConnected,
        };
        assert_eq!(
            format_record("gpu0", &rec),
            "     12        3.250 ms gpu0     client_connected"
        );
    }
}
