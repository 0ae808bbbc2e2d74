//! Which scenarios a run takes: `--filter`, then `--shard K/N`; and `--list`, which shows the
//! selection without booting anything.
//!
//! A shard is a deterministic function of the selected list and `K/N` alone (never of the
//! machine or of a previous run), so N CI jobs that each run `--shard K/N` with the same
//! catalogue and filter together run every selected scenario exactly once. Shards are balanced
//! by cost: each scenario's measured wall time ([`MEASURED`], from docs/perf.md) plus, for each
//! VM profile a shard needs, that VM's boot. Whole VM profiles are kept together (one boot per
//! profile in the whole matrix) unless that leaves a shard much heavier than an even split
//! ([`TOLERANCE`]) or empty; then the heaviest profile is split, in catalogue order, into two
//! halves of about equal cost (each half boots its own VM), and the assignment is redone.

use std::fmt;
use std::str::FromStr;

use super::*;

/// `--shard K/N`: the K-th (1-based) of N shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1..=count.
    pub index: usize,
    /// How many shards the selection is split into (≥ 1).
    pub count: usize,
}

/// A `--shard` value that is not `K/N` with 1 ≤ K ≤ N.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid shard {0:?}: expected K/N with 1 <= K <= N (e.g. 2/4)")]
pub struct ShardParseError(String);

impl FromStr for Shard {
    type Err = ShardParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ShardParseError(s.to_string());
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Measured wall time of scenarios, in seconds (release build, TCG, this 2-core machine;
/// docs/perf.md "Guest suite wall time per scenario", and a 2026-12-06 run for M9, K1, K2). Only the relative sizes matter: they
/// balance shards and order VMs. A scenario not listed costs [`DEFAULT_COST`].
pub const MEASURED: &[(&str, f64)] = &[
    ("E1", 0.3),
    ("E2", 0.1),
    ("E3", 0.6),
    ("E4", 0.4),
    ("E5", 0.6),
    ("R0", 0.5),
    ("R1", 1.2),
    ("R2", 5.7),
    ("R2b", 3.5),
    ("R3", 0.5),
    ("R4", 1.1),
    ("R5", 0.4),
    ("R6", 0.9),
    ("R7", 1.0),
    ("R8", 72.1),
    ("R9", 7.3),
    ("H1", 0.8),
    ("H2", 0.4),
    ("H3", 74.0),
    ("H4", 22.3),
    ("H5", 1.1),
    ("H6", 1.0),
    ("H6b", 4.5),
    ("H7", 13.0),
    ("M1", 1.0),
    ("M2", 1.1),
    ("M3", 1.5),
    ("M4", 1.3),
    ("M5", 1.2),
    ("M6", 1.0),
    ("M6b", 1.0),
    ("M6c", 1.1),
    ("M7", 1.2),
    ("M7b", 1.5),
    // Not in docs/perf.md's table: from a `--jobs 2` run of 2026-12-06 (load average 8-9).
    ("M9", 25.6),
    ("K1", 0.2),
    ("K2", 31.4),
];

/// The cost of a scenario without a measurement.
pub const DEFAULT_COST: f64 = 2.0;

/// A VM boot (QEMU start to agent ready) in seconds; docs/perf.md gives 7.2-10.1 s per profile.
pub const BOOT_COST: f64 = 8.0;

/// How much heavier than an even split (total / N) the heaviest shard may be before a VM
/// profile is split across shards.
pub const TOLERANCE: f64 = 1.25;

/// The measured (or default) cost of `s` in seconds.
pub fn cost(s: &Scenario) -> f64 {
    MEASURED
        .iter()
        .find(|(id, _)| *id == s.id)
        .map_or(DEFAULT_COST, |(_, c)| *c)
}

/// Applies the filter (a substring of the name) and the shard to `scenarios`, keeping their order.
pub fn selection(opts: &SuiteOptions, scenarios: Vec<Scenario>) -> Vec<Scenario> {
    let filtered: Vec<Scenario> = scenarios
        .into_iter()
        .filter(|s| opts.filter.as_deref().is_none_or(|f| s.name.contains(f)))
        .collect();
    match opts.shard {
        Some(shard) => shard_of(&filtered, shard),
        None => filtered,
    }
}

/// A unit of assignment: a run of one profile's scenarios (indices into the list), booting one VM.
#[derive(Debug, Clone)]
struct Unit {
    members: Vec<usize>,
    cost: f64,
}

fn unit(list: &[Scenario], members: Vec<usize>) -> Unit {
    let cost = BOOT_COST + members.iter().map(|&i| cost(&list[i])).sum::<f64>();
    Unit { members, cost }
}

/// Longest first onto the least loaded shard (ties: the lower shard, the earlier unit).
/// Returns each unit's shard and the shards' loads. Deterministic: the order is by cost, then
/// by the unit's first scenario.
fn assign(units: &[Unit], n: usize) -> (Vec<usize>, Vec<f64>) {
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by(|&a, &b| {
        units[b]
            .cost
            .total_cmp(&units[a].cost)
            .then(units[a].members[0].cmp(&units[b].members[0]))
    });
    let mut load = vec![0.0f64; n];
    let mut at = vec![0usize; units.len()];
    for u in order {
        let mut best = 0;
        for k in 1..n {
            if load[k] < load[best] {
                best = k;
            }
        }
        at[u] = best;
        load[best] += units[u].cost;
    }
    (at, load)
}

/// The partition of `list` into `n` shards: for each shard, the indices of its scenarios in
/// list order. Every index is in exactly one shard.
pub fn partition(list: &[Scenario], n: usize) -> Vec<Vec<usize>> {
    let n = n.max(1);
    // One unit per profile, in order of first need.
    let mut units: Vec<Unit> = Vec::new();
    let mut profiles: Vec<crate::vm::profile::ProfileId> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, s) in list.iter().enumerate() {
        match profiles.iter().position(|p| *p == s.profile()) {
            Some(g) => groups[g].push(i),
            None => {
                profiles.push(s.profile());
                groups.push(vec![i]);
            }
        }
    }
    units.extend(groups.into_iter().map(|g| unit(list, g)));
    let even = units.iter().map(|u| u.cost).sum::<f64>() / n as f64;
    let (mut at, mut load) = assign(&units, n);
    // Split while a shard is empty or too heavy, and something can still be split.
    loop {
        let empty = load.contains(&0.0);
        let heaviest = load.iter().copied().fold(0.0, f64::max);
        if !empty && heaviest <= even * TOLERANCE {
            break;
        }
        // The costliest unit that has more than one scenario.
        let Some(u) = (0..units.len())
            .filter(|&u| units[u].members.len() > 1)
            .max_by(|&a, &b| {
                units[a]
                    .cost
                    .total_cmp(&units[b].cost)
                    .then(units[b].members[0].cmp(&units[a].members[0]))
            })
        else {
            break;
        };
        let members = units[u].members.clone();
        // Cut where the first half's cost reaches half the total (at least one each side).
        let total: f64 = members.iter().map(|&i| cost(&list[i])).sum();
        let mut acc = 0.0;
        let mut cut = 1;
        for (j, &i) in members.iter().enumerate() {
            acc += cost(&list[i]);
            cut = j + 1;
            if acc >= total / 2.0 {
                break;
            }
        }
        let cut = cut.clamp(1, members.len() - 1);
        let (a, b) = members.split_at(cut);
        units[u] = unit(list, a.to_vec());
        units.push(unit(list, b.to_vec()));
        let next = assign(&units, n);
        // Splitting adds a boot: stop when it no longer helps and no shard is empty.
        let next_heaviest = next.1.iter().copied().fold(0.0, f64::max);
        if !empty && next_heaviest >= heaviest {
            // Undo: merge back and stop.
            units.pop();
            units[u] = unit(list, members);
            break;
        }
        (at, load) = next;
    }
    let mut shards = vec![Vec::new(); n];
    for (u, k) in at.iter().enumerate() {
        shards[*k].extend(units[u].members.iter().copied());
    }
    for s in &mut shards {
        s.sort_unstable();
    }
    shards
}

/// The scenarios of `shard` (in list order).
pub fn shard_of(list: &[Scenario], shard: Shard) -> Vec<Scenario> {
    let parts = partition(list, shard.count);
    parts
        .get(shard.index - 1)
        .map(|p| p.iter().map(|&i| list[i].clone()).collect())
        .unwrap_or_default()
}

/// `--list`: one line per scenario, `ID<TAB>name<TAB>profile<TAB>expected`, where expected is
/// `-` or the declared XFAIL kinds (`gpu0:dma_during_reset`, `kernel:warning`), comma-separated.
pub fn list_lines(scenarios: &[Scenario]) -> Vec<String> {
    scenarios
        .iter()
        .map(|s| {
            let mut kinds: Vec<String> = s
                .violations
                .iter()
                .map(|(dev, kind)| format!("{dev}:{}", kind_name(kind)))
                .collect();
            kinds.extend(s.kernel_reports.iter().map(|k| format!("kernel:{k}")));
            let expected = if kinds.is_empty() {
                "-".to_string()
            } else {
                kinds.join(",")
            };
            format!(
                "{}\t{}\t{}\t{}",
                s.id,
                s.name,
                s.profile().profile().name,
                expected
            )
        })
        .collect()
}

/// The stable serde name of a kind (`dma_during_reset`), or its Debug form if it has none.
fn kind_name<T: serde::Serialize + fmt::Debug>(kind: &T) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{kind:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_shard_parse() {
        assert_eq!("2/4".parse(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!(
            "1/1".parse::<Shard>().map(|s| s.to_string()),
            Ok("1/1".into())
        );
        for bad in ["0/4", "5/4", "1/0", "1", "a/b", "1/2/3", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    /// For every N, the shards are disjoint and their union is the list, each in list order;
    /// the partition does not depend on anything but the list and N.
    #[test]
    fn test_shards_cover_the_catalogue_exactly_once() {
        let list = crate::scenarios::catalogue();
        for n in 1..=list.len() + 2 {
            let parts = partition(&list, n);
            assert_eq!(parts.len(), n);
            let mut seen = vec![0usize; list.len()];
            for p in &parts {
                assert!(p.windows(2).all(|w| w[0] < w[1]), "list order: {p:?}");
                for &i in p {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "n={n}: {seen:?}");
            // Up to the list's length, no shard is empty.
            if n <= list.len() {
                assert!(parts.iter().all(|p| !p.is_empty()), "n={n}: {parts:?}");
            }
            assert_eq!(parts, partition(&list, n), "deterministic");
            let mut union: Vec<Scenario> = (1..=n)
                .flat_map(|k| shard_of(&list, Shard { index: k, count: n }))
                .collect();
            union.sort_by_key(|s| list.iter().position(|x| x.id == s.id));
            assert_eq!(union, list, "n={n}");
        }
    }

    fn load(list: &[Scenario], part: &[usize]) -> f64 {
        let mut profiles = Vec::new();
        let mut total = 0.0;
        for &i in part {
            if !profiles.contains(&list[i].profile()) {
                profiles.push(list[i].profile());
                total += BOOT_COST;
            }
            total += cost(&list[i]);
        }
        total
    }

    /// Balanced by measured cost: with 2 and 4 shards of the catalogue, no shard is more than
    /// TOLERANCE × an even split of the unsplit cost; whole profiles stay together where that
    /// holds (2 shards: no profile boots twice).
    #[test]
    fn test_shards_are_balanced_by_cost() {
        let list = crate::scenarios::catalogue();
        let profiles = plan_vms(&list).len() as f64;
        let total = list.iter().map(cost).sum::<f64>() + profiles * BOOT_COST;
        for n in [2, 3, 4] {
            let parts = partition(&list, n);
            let loads: Vec<f64> = parts.iter().map(|p| load(&list, p)).collect();
            let heaviest = loads.iter().copied().fold(0.0, f64::max);
            let bound = (total / n as f64 * TOLERANCE).max(floor(&list));
            assert!(heaviest <= bound, "n={n}: loads {loads:?}, bound {bound}");
        }
        let parts = partition(&list, 2);
        let boots: usize = parts
            .iter()
            .map(|p| {
                let v: Vec<Scenario> = p.iter().map(|&i| list[i].clone()).collect();
                plan_vms(&v).len()
            })
            .sum();
        assert_eq!(boots as f64, profiles, "2 shards keep every profile whole");
        // R8 and H3 (the two long waits) do not share a shard.
        let where_ = |id: &str| {
            parts
                .iter()
                .position(|p| p.iter().any(|&i| list[i].id == id))
        };
        assert_ne!(where_("R8"), where_("H3"));
    }

    /// The lower bound no assignment can beat: the costliest single scenario with its boot.
    fn floor(list: &[Scenario]) -> f64 {
        list.iter().map(cost).fold(0.0, f64::max) + BOOT_COST
    }

    /// A list where one profile is most of the cost (gpu-hotplug: H1-H5, with H3 and H4, and
    /// gpu-pciehp: H7): that profile is split, and the heaviest shard is within the tolerance
    /// or H3's own cost.
    #[test]
    fn test_a_dominant_profile_is_split() {
        use crate::vm::profile::ProfileId;
        let list: Vec<Scenario> = crate::scenarios::catalogue()
            .into_iter()
            .filter(|s| matches!(s.profile(), ProfileId::GpuHotplug | ProfileId::GpuPciehp))
            .collect();
        let parts = partition(&list, 2);
        let loads: Vec<f64> = parts.iter().map(|p| load(&list, p)).collect();
        let total = list.iter().map(cost).sum::<f64>() + 2.0 * BOOT_COST;
        let bound = (total / 2.0 * TOLERANCE).max(floor(&list));
        assert!(loads.iter().all(|l| *l <= bound), "{loads:?} > {bound}");
        let hotplug_in = parts
            .iter()
            .filter(|p| {
                p.iter()
                    .any(|&i| list[i].profile() == ProfileId::GpuHotplug)
            })
            .count();
        assert_eq!(hotplug_in, 2, "gpu-hotplug is split: {parts:?}");
        // Unsplit, the same list would put all of gpu-hotplug on one shard: what the split fixes.
        let whole = list
            .iter()
            .filter(|s| s.profile() == ProfileId::GpuHotplug)
            .map(cost)
            .sum::<f64>()
            + BOOT_COST;
        assert!(
            whole > bound,
            "the instrument: unsplit {whole} must exceed {bound}"
        );
    }

    #[test]
    fn test_list_lines_name_profile_and_expected_kinds() {
        let list = crate::scenarios::catalogue();
        let lines = list_lines(&list);
        assert_eq!(lines.len(), list.len());
        assert_eq!(lines[0], "E1\tE1 enumeration\tgpu\t-");
        let r2b = lines
            .iter()
            .find(|l| l.starts_with("R2b\t"))
            .expect("R2b listed");
        assert!(r2b.ends_with("\tgpu-nsr\tgpu0:dma_during_reset"), "{r2b}");
        let k1 = lines.iter().find(|l| l.starts_with("K1\t")).expect("K1");
        assert!(k1.contains("kernel:"), "{k1}");
    }
}
