//! Small crafted histories for the checker's tests: a clean run, and builders of the records
//! that each test changes to inject one bug.

use std::collections::BTreeMap;

use crate::history::{
    FaultEnd, FaultStart, FinalState, FinalVersion, GroupInfo, MembershipSample, Op, OpKind, Outcome, Record, RunInfo,
    WatchRecord, WatchedEvent,
};

/// The failure detection bound of every scenario, ms.
pub(crate) const DETECTION_BOUND_MS: u64 = 3_000;

/// Builders of records; see [`Scenario::clean`] for how they fit together.
#[derive(Debug)]
pub(crate) struct Scenario;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
}

impl Scenario {
    /// Nodes n1..n3, an eventual group `e` and a strong group `s`.
    pub(crate) fn run() -> Record {
        Record::Run(RunInfo {
            seed: 7,
            nodes: vec!["n1".into(), "n2".into(), "n3".into()],
            groups: vec![
                GroupInfo { name: "e".into(), mode: "eventual".into() },
                GroupInfo { name: "s".into(), mode: "strong".into() },
            ],
            duration_ms: 10_000,
            settle_ms: 2_000,
            detection_bound_ms: DETECTION_BOUND_MS,
            started_unix_ms: 1_767_225_600_000,
        })
    }

    /// A write of `value` to `group`/`key` through `node`, from `invoke_ms`, answered 10 ms
    /// later with `outcome`.
    pub(crate) fn write(node: &str, group: &str, key: &str, value: &str, invoke_ms: u64, outcome: Outcome) -> Record {
        Record::Op(Op {
            client: node.trim_start_matches('n').parse().unwrap_or(0),
            node: node.into(),
            group: group.into(),
            key: key.into(),
            kind: OpKind::Write { value: value.into() },
            invoke_ms,
            complete_ms: invoke_ms + 10,
            outcome,
        })
    }

    /// A committed write (see [`Scenario::write`]).
    pub(crate) fn committed(node: &str, group: &str, key: &str, value: &str, invoke_ms: u64, version: &str) -> Record {
        let outcome = Outcome::Committed {
            version: version.into(),
            revision: version.trim_start_matches('v').parse().unwrap_or(0),
            acked_by: vec![node.into()],
            content_hash: String::new(),
        };
        Scenario::write(node, group, key, value, invoke_ms, outcome)
    }

    /// A read through `node` from `invoke_ms`, answered 5 ms later.
    pub(crate) fn read(
        node: &str,
        group: &str,
        key: &str,
        value: Option<&str>,
        version: &str,
        invoke_ms: u64,
        stale: bool,
    ) -> Record {
        Record::Op(Op {
            client: 9,
            node: node.into(),
            group: group.into(),
            key: key.into(),
            kind: OpKind::Read,
            invoke_ms,
            complete_ms: invoke_ms + 5,
            outcome: Outcome::Value {
                value: value.map(str::to_owned),
                version: version.into(),
                revision: version.trim_start_matches('v').parse().unwrap_or(0),
                stale,
            },
        })
    }

    /// A watch event of watcher `watcher` on `node`.
    pub(crate) fn watch(watcher: u32, node: &str, group: &str, at_ms: u64, event: WatchedEvent) -> Record {
        Record::Watch(WatchRecord { watcher, node: node.into(), group: group.into(), at_ms, event })
    }

    /// A watch's snapshot.
    pub(crate) fn start(revision: u64, version: &str, settings: &[(&str, &str)]) -> WatchedEvent {
        WatchedEvent::Start { revision, version: version.into(), settings: map(settings) }
    }

    /// A change setting one key.
    pub(crate) fn change(revision: u64, version: &str, key: &str, value: &str) -> WatchedEvent {
        WatchedEvent::Change { revision, version: version.into(), set: map(&[(key, value)]), removed: Vec::new() }
    }

    /// A resync.
    pub(crate) fn resync(revision: u64, version: &str, settings: &[(&str, &str)]) -> WatchedEvent {
        WatchedEvent::Resync { revision, version: version.into(), settings: map(settings) }
    }

    /// A fault starting.
    pub(crate) fn fault(id: u32, at_ms: u64, kind: &str, nodes: &[&str], detail: &str) -> Record {
        Record::FaultStart(FaultStart {
            id,
            at_ms,
            kind: kind.into(),
            nodes: nodes.iter().map(|node| node.to_string()).collect(),
            sides: Vec::new(),
            detail: detail.into(),
        })
    }

    /// A fault ending.
    pub(crate) fn heal(id: u32, at_ms: u64) -> Record {
        Record::FaultEnd(FaultEnd { id, at_ms, detail: String::new() })
    }

    /// A membership sample.
    pub(crate) fn sample(observer: &str, at_ms: u64, states: &[(&str, &str)]) -> Record {
        Record::Membership(MembershipSample { at_ms, observer: observer.into(), states: map(states) })
    }

    /// A final state whose history is the chain `labels`.
    pub(crate) fn final_state(
        node: &str,
        group: &str,
        heads: &str,
        settings: &[(&str, &str)],
        labels: &[&str],
    ) -> Record {
        let versions = labels
            .iter()
            .enumerate()
            .map(|(position, label)| FinalVersion {
                label: label.to_string(),
                parents: if position == 0 { Vec::new() } else { vec![labels[position - 1].to_string()] },
                content_hash: String::new(),
            })
            .collect();
        Record::Final(FinalState {
            node: node.into(),
            group: group.into(),
            at_ms: 20_000,
            heads: heads.into(),
            settings: map(settings),
            versions,
        })
    }

    /// A run with no bug: two writes to each group with watchers seeing them, fresh strong
    /// reads, n3 killed for 5 s and seen dead, and identical final states.
    pub(crate) fn clean() -> Vec<Record> {
        let all_live = [("n1", "live"), ("n2", "live"), ("n3", "live")];
        let n3_dead = [("n1", "live"), ("n2", "live"), ("n3", "dead")];
        let mut records = vec![
            Scenario::run(),
            Scenario::watch(1, "n1", "e", 50, Scenario::start(1, "v1", &[])),
            Scenario::watch(2, "n2", "s", 50, Scenario::start(1, "v1", &[])),
            Scenario::committed("n1", "e", "k1", "c1-1", 100, "v2"),
            Scenario::watch(1, "n1", "e", 105, Scenario::change(2, "v2", "k1", "c1-1")),
            Scenario::committed("n2", "s", "k1", "c2-1", 200, "v2"),
            Scenario::watch(2, "n2", "s", 205, Scenario::change(2, "v2", "k1", "c2-1")),
            Scenario::read("n3", "s", "k1", Some("c2-1"), "v2", 300, false),
            Scenario::sample("n1", 900, &all_live),
            Scenario::fault(1, 1_000, "kill9", &["n3"], ""),
            Scenario::sample("n1", 4_500, &n3_dead),
            Scenario::sample("n2", 4_500, &n3_dead),
            Scenario::heal(1, 6_000),
            Scenario::committed("n1", "e", "k1", "c1-2", 6_100, "v3"),
            Scenario::watch(1, "n1", "e", 6_105, Scenario::change(3, "v3", "k1", "c1-2")),
            Scenario::committed("n2", "s", "k1", "c2-2", 6_200, "v3"),
            Scenario::watch(2, "n2", "s", 6_205, Scenario::change(3, "v3", "k1", "c2-2")),
            Scenario::read("n1", "s", "k1", Some("c2-2"), "v3", 6_300, false),
            Scenario::sample("n1", 12_000, &all_live),
            Scenario::sample("n2", 12_000, &all_live),
            Scenario::sample("n3", 12_000, &all_live),
        ];
        for node in ["n1", "n2", "n3"] {
            records.push(Scenario::final_state(node, "e", "he", &[("k1", "c1-2")], &["v1", "v2", "v3"]));
            records.push(Scenario::final_state(node, "s", "hs", &[("k1", "c2-2")], &["v1", "v2", "v3"]));
        }
        records
    }
}

impl Scenario {
    /// A clean run of `writes` writes to each group over five keys, each seen by a watcher
    /// and followed by a fresh strong read, with identical final states on `nodes` nodes.
    pub(crate) fn long(writes: u64, nodes: usize) -> Vec<Record> {
        let names: Vec<String> = (1..=nodes).map(|node| format!("n{node}")).collect();
        let Record::Run(mut info) = Scenario::run() else { unreachable!() };
        info.nodes = names.clone();
        let mut records = vec![Record::Run(info)];
        records.push(Scenario::watch(1, "n1", "e", 1, Scenario::start(1, "v1", &[])));
        records.push(Scenario::watch(2, "n2", "s", 1, Scenario::start(1, "v1", &[])));
        let mut labels = vec!["v1".to_owned()];
        let mut settings: [BTreeMap<String, String>; 2] = Default::default();
        for sequence in 0..writes {
            let at_ms = 10 + sequence * 20;
            let version = format!("v{}", sequence + 2);
            let key = format!("k{}", sequence % 5);
            for (slot, group) in ["e", "s"].into_iter().enumerate() {
                let value = format!("c{slot}-{sequence}");
                records.push(Scenario::committed("n1", group, &key, &value, at_ms, &version));
                let revision = sequence + 2;
                records.push(Scenario::watch(
                    slot as u32 + 1,
                    &names[slot],
                    group,
                    at_ms + 5,
                    Scenario::change(revision, &version, &key, &value),
                ));
                settings[slot].insert(key.clone(), value);
            }
            records.push(Scenario::read("n2", "s", &key, Some(&format!("c1-{sequence}")), &version, at_ms + 12, false));
            labels.push(version);
        }
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        for node in &names {
            for (slot, group) in ["e", "s"].into_iter().enumerate() {
                let pairs: Vec<(&str, &str)> =
                    settings[slot].iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
                records.push(Scenario::final_state(node, group, group, &pairs, &labels));
            }
        }
        records
    }
}
