//! Benchmark of the konor-crdt core (issue 3): set, get, remote apply, save/load, record sizes.
//!
//! A plain harness (`harness = false`) run by `cargo bench -p konor-crdt`. Every operation is timed
//! with `Instant` and recorded in nanoseconds in an HDR histogram; the table prints p50/p99/max
//! and, where issue 3 sets one, the target and whether it is met. Documents are built once and
//! reused across measurements so the whole run stays well under two minutes on 2 cores.

// Benches must read the clock: the purity rule of crdt/clippy.toml is for the core, not for this.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
// A bench has no caller to report errors to: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use konor_crdt::journal::{change_record, load_group_file, snapshot_file};
use konor_crdt::{ActorId, CommitMeta, GroupDoc, Millis, Mode};
use serde_json::{Value, json};

/// Single-key sets measured per figure (after warm-up).
const SETS: usize = 2_000;
/// Remote changes measured per history size (after warm-up).
const APPLIES: usize = 500;
/// Iterations discarded before measuring.
const WARMUP: usize = 50;
/// Gets per timed batch, so one `Instant` pair is spread over many gets.
const GET_BATCH: usize = 1_000;
/// Timed get batches.
const GET_BATCHES: usize = 2_000;
/// Changes per `apply_changes` call in the batched figure: the core's own batch bound.
const APPLY_BATCH: usize = konor_crdt::limits::APPLY_BATCH_CHANGES_MAX;
/// Timed batched `apply_changes` calls (after two warm-up calls).
const APPLY_BATCHES: usize = 20;
/// Repetitions of each save or load of the 10k-version document.
const SAVE_LOAD_RUNS: usize = 20;

fn main() {
    let started = Instant::now();
    print_machine();
    let mut rows = Vec::new();
    let mut clock = 0u64;

    // 1. Local set + commit on a group with ~100 keys; its changes also give the record sizes.
    let mut small = group(1);
    populate(&mut small, 100, &mut clock);
    let before = small.version_count();
    let (set_100, sizes) = measure_sets(&mut small, 100, &mut clock);
    let history = span(before, small.version_count());
    rows.push(Row::new(&format!("local set+commit, 100 keys, {history}"), &set_100, Unit::Micros).target(40.0));

    // 3a. Remote apply at ~1k history: 1,000 keys written one version each, replica B loaded
    // from A's save. A's timed sets double as the 1,000-key set figure.
    let mut big = group(2);
    populate(&mut big, 1_000, &mut clock);
    let before = big.version_count();
    let mut replica = GroupDoc::load(&big.save(), actor(3)).unwrap();
    let (set_1k, apply_1k) = measure_applies(&mut big, &mut replica, &mut clock);
    let history_1k = span(before, big.version_count());
    rows.push(Row::new(&format!("local set+commit, 1,000 keys, {history_1k}"), &set_1k, Unit::Micros).target(40.0));
    let before = big.version_count();
    let prepare_1k = measure_prepares(&mut big, &mut clock);
    let history = span(before, big.version_count());
    rows.push(Row::new(&format!("strong write's prepare, 1,000 keys, {history}"), &prepare_1k, Unit::Micros));

    // 1b. The same on a group with a schema (issue 16): every write validates the settings.
    let mut schematized = group(6);
    populate(&mut schematized, 1_000, &mut clock);
    let schema = json!({
        "type": "object",
        "maxProperties": 2_000,
        "patternProperties": {"^svc[0-9]{2}\\.setting_[0-9]{4}$": {"type": "string", "maxLength": 64}},
        "additionalProperties": false
    });
    schematized.edit(konor_crdt::group::Edit::Schema(Some(schema)), &meta(&mut clock)).unwrap();
    let before = schematized.version_count();
    let (set_schema, _) = measure_sets(&mut schematized, 1_000, &mut clock);
    let history = span(before, schematized.version_count());
    rows.push(Row::new(&format!("local set+commit with a schema, 1,000 keys, {history}"), &set_schema, Unit::Micros));

    // 2. Read-view get on the 1,000-key group.
    let get = measure_gets(&big);
    rows.push(Row::new("read-view get, 1,000 keys (per get)", &get, Unit::PerGetNanos).target(100.0));

    rows.push(Row::new(&format!("remote apply per change, 1,000 keys, {history_1k}"), &apply_1k, Unit::Micros));

    // 4. Grow A to 10k versions, then save and load it.
    grow_to(&mut big, 10_000, &mut clock);
    let versions_10k = big.version_count();
    let (save, load, load_file, snapshot_bytes, file_bytes) = measure_save_load(&big);
    rows.push(Row::new(&format!("save, 1,000 keys, {versions_10k} versions"), &save, Unit::Millis));
    rows.push(Row::new(&format!("GroupDoc::load, 1,000 keys, {versions_10k} versions"), &load, Unit::Millis));
    rows.push(Row::new(
        &format!("load_group_file(snapshot_file), 1,000 keys, {versions_10k} versions"),
        &load_file,
        Unit::Millis,
    ));

    // A strong write's prepare at ~10k history (each then applied, as its commit does).
    let before = big.version_count();
    let prepare_10k = measure_prepares(&mut big, &mut clock);
    let history = span(before, big.version_count());
    rows.push(Row::new(&format!("strong write's prepare, 1,000 keys, {history}"), &prepare_10k, Unit::Micros));

    // 3b. Remote apply at ~10k history (and the set figure on the same document).
    let before = big.version_count();
    let mut replica = GroupDoc::load(&big.save(), actor(4)).unwrap();
    let (set_10k, apply_10k) = measure_applies(&mut big, &mut replica, &mut clock);
    let history_10k = span(before, big.version_count());
    rows.push(Row::new(&format!("local set+commit, 1,000 keys, {history_10k}"), &set_10k, Unit::Micros).target(40.0));
    rows.push(Row::new(&format!("remote apply per change, 1,000 keys, {history_10k}"), &apply_10k, Unit::Micros));

    // Extra: the same replica fed APPLY_BATCH changes per call (as load_group_file and sync do).
    let before = big.version_count();
    let batched = measure_batched_applies(&mut big, &mut replica, &mut clock);
    let history = span(before, big.version_count());
    let name = format!("remote apply per change, {APPLY_BATCH} per call, 1,000 keys, {history}");
    rows.push(Row::new(&name, &batched, Unit::MicrosPer(APPLY_BATCH)));

    // 3c. Remote apply at ~100k history: flat since document format 3 (issue 14's goal: within
    // 2x of the 1k figure).
    grow_to(&mut big, 100_000, &mut clock);
    let before = big.version_count();
    let mut replica = GroupDoc::load(&big.save(), actor(5)).unwrap();
    let (set_100k, apply_100k) = measure_applies(&mut big, &mut replica, &mut clock);
    let history_100k = span(before, big.version_count());
    rows.push(Row::new(&format!("local set+commit, 1,000 keys, {history_100k}"), &set_100k, Unit::Micros).target(40.0));
    rows.push(Row::new(&format!("remote apply per change, 1,000 keys, {history_100k}"), &apply_100k, Unit::Micros));
    let growth = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / apply_1k.value_at_quantile(0.5).max(1) as f64;
    println!(
        "remote apply p50 relative to 1k history: 10k {:.2}x, 100k {:.2}x (goal: within 2x)",
        growth(&apply_10k),
        growth(&apply_100k)
    );

    print_table(&rows);
    println!();
    println!("sizes (bytes)");
    println!("  snapshot (GroupDoc::save), 1,000 keys, {versions_10k} versions: {snapshot_bytes}");
    println!("  snapshot_file output (header + snapshot record + meta):    {file_bytes}");
    print_sizes("change_record of a one-key set (incremental record)", &sizes.records);
    print_sizes("  of which the Automerge change (LocalCommit::change)", &sizes.changes);
    print_sizes("  of which the version entry JSON inside the change", &sizes.version_json);
    println!();
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
}

/// Prints the core count and CPU model so figures can be compared across machines.
fn print_machine() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let profile = if cfg!(debug_assertions) { "debug assertions ON (not a bench profile)" } else { "optimized" };
    println!("konor-crdt core benchmark");
    println!("machine: nproc {cores}, CPU {model}, build {profile}");
    println!();
}

fn actor(n: u8) -> ActorId {
    ActorId::from([n; 16])
}

fn meta(clock: &mut u64) -> CommitMeta {
    *clock += 1;
    CommitMeta::new("bench", "bench write", Millis(1_700_000_000_000 + *clock))
}

fn key(index: usize) -> String {
    format!("svc{:02}.setting_{index:04}", index % 16)
}

fn value(n: u64) -> Value {
    json!(format!("value-{n}"))
}

fn group(actor_byte: u8) -> GroupDoc {
    let mut clock = 0;
    GroupDoc::create("bench", Mode::Eventual, actor(actor_byte), &meta(&mut clock)).unwrap().0
}

/// Writes `keys` keys, one version each.
fn populate(group: &mut GroupDoc, keys: usize, clock: &mut u64) {
    for index in 0..keys {
        let meta = meta(clock);
        group.set(vec![(key(index), value(*clock))], &meta).unwrap();
    }
}

/// Rewrites existing keys one version at a time until the group has `versions` versions.
fn grow_to(group: &mut GroupDoc, versions: usize, clock: &mut u64) {
    let keys = group.settings().len();
    while group.version_count() < versions {
        let meta = meta(clock);
        group.set(vec![(key(*clock as usize % keys), value(*clock))], &meta).unwrap();
    }
}

/// Sizes of what one-key sets produce.
#[derive(Default)]
struct RecordSizes {
    /// `journal::change_record(&commit.change)`: what the node appends to the group file.
    records: Vec<usize>,
    /// The raw Automerge change inside it.
    changes: Vec<usize>,
    /// The `VersionInfo` JSON the change stores in the `versions` map.
    version_json: Vec<usize>,
}

/// Times one-key sets of existing keys; returns the histogram and the sizes they produced.
fn measure_sets(group: &mut GroupDoc, keys: usize, clock: &mut u64) -> (Histogram<u64>, RecordSizes) {
    let mut histogram = histogram();
    let mut sizes = RecordSizes::default();
    for round in 0..WARMUP + SETS {
        let meta = meta(clock);
        let entries = vec![(key(round % keys), value(*clock))];
        let start = Instant::now();
        let commit = group.set(entries, &meta);
        let elapsed = start.elapsed();
        let commit = commit.unwrap();
        if round >= WARMUP {
            record(&mut histogram, elapsed);
            sizes.records.push(change_record(&commit.change).unwrap().len());
            sizes.changes.push(commit.change.len());
            sizes.version_json.push(serde_json::to_string(&commit.version).unwrap().len());
        }
    }
    (histogram, sizes)
}

/// Times `prepare` of one-key sets (a strong write's change, built and not applied), each
/// applied afterwards as its round's commit does.
fn measure_prepares(group: &mut GroupDoc, clock: &mut u64) -> Histogram<u64> {
    let keys = group.settings().len();
    let mut histogram = histogram();
    for round in 0..WARMUP + APPLIES {
        let meta = meta(clock);
        let edit = konor_crdt::group::Edit::Set(vec![(key((round * 13) % keys), value(*clock))]);
        let start = Instant::now();
        let prepared = group.prepare(edit, &meta);
        let elapsed = start.elapsed();
        group.apply_changes(&[prepared.unwrap().change]).unwrap();
        if round >= WARMUP {
            record(&mut histogram, elapsed);
        }
    }
    histogram
}

/// A writes one-key sets; B applies each change alone. Returns (A's set, B's apply) histograms.
fn measure_applies(writer: &mut GroupDoc, replica: &mut GroupDoc, clock: &mut u64) -> (Histogram<u64>, Histogram<u64>) {
    let keys = writer.settings().len();
    let (mut sets, mut applies) = (histogram(), histogram());
    for round in 0..WARMUP + APPLIES {
        let meta = meta(clock);
        let entries = vec![(key((round * 7) % keys), value(*clock))];
        let start = Instant::now();
        let commit = writer.set(entries, &meta);
        let set_time = start.elapsed();
        let change = [commit.unwrap().change];
        let start = Instant::now();
        let applied = replica.apply_changes(&change);
        let apply_time = start.elapsed();
        assert_eq!(applied.unwrap().changes_applied, 1, "each change is new to the replica");
        if round >= WARMUP {
            record(&mut sets, set_time);
            record(&mut applies, apply_time);
        }
    }
    assert_eq!(replica.heads(), writer.heads(), "replica caught up");
    assert_eq!(replica.settings(), writer.settings(), "replica serves the same settings");
    (sets, applies)
}

/// A writes one-key sets; B applies them APPLY_BATCH per call. The histogram holds call times.
fn measure_batched_applies(writer: &mut GroupDoc, replica: &mut GroupDoc, clock: &mut u64) -> Histogram<u64> {
    let keys = writer.settings().len();
    let mut histogram = histogram();
    for round in 0..2 + APPLY_BATCHES {
        let changes: Vec<Vec<u8>> = (0..APPLY_BATCH)
            .map(|n| {
                let meta = meta(clock);
                writer.set(vec![(key((round * 31 + n * 7) % keys), value(*clock))], &meta).unwrap().change
            })
            .collect();
        let start = Instant::now();
        let applied = replica.apply_changes(&changes);
        let elapsed = start.elapsed();
        assert_eq!(applied.unwrap().changes_applied, APPLY_BATCH, "every change is new to the replica");
        if round >= 2 {
            record(&mut histogram, elapsed);
        }
    }
    assert_eq!(replica.heads(), writer.heads(), "replica caught up");
    histogram
}

/// Times batches of gets in a scrambled key order; the histogram holds whole-batch times.
fn measure_gets(group: &GroupDoc) -> Histogram<u64> {
    let keys: Vec<String> = group.settings().iter().map(|(key, _)| key.to_owned()).collect();
    // A fixed stride permutation (coprime with the key count) so lookups do not walk in order.
    let order: Vec<&str> = (0..GET_BATCH).map(|i| keys[(i * 389 + 17) % keys.len()].as_str()).collect();
    let mut histogram = histogram();
    for round in 0..GET_BATCHES / 10 + GET_BATCHES {
        let start = Instant::now();
        for key in &order {
            black_box(group.get(black_box(key)));
        }
        let elapsed = start.elapsed();
        if round >= GET_BATCHES / 10 {
            record(&mut histogram, elapsed);
        }
    }
    histogram
}

/// Times save, load and load_group_file; also returns the snapshot and file sizes.
fn measure_save_load(group: &GroupDoc) -> (Histogram<u64>, Histogram<u64>, Histogram<u64>, usize, usize) {
    let (mut save, mut load, mut load_file) = (histogram(), histogram(), histogram());
    let mut snapshot = Vec::new();
    for _ in 0..SAVE_LOAD_RUNS {
        let start = Instant::now();
        snapshot = black_box(group.save());
        record(&mut save, start.elapsed());
    }
    for _ in 0..SAVE_LOAD_RUNS {
        let start = Instant::now();
        let loaded = GroupDoc::load(&snapshot, actor(5)).unwrap();
        record(&mut load, start.elapsed());
        assert_eq!(loaded.version_count(), group.version_count());
    }
    let file = snapshot_file(group, Some(b"{\"revision\":1}")).unwrap();
    for _ in 0..SAVE_LOAD_RUNS {
        let start = Instant::now();
        let loaded = load_group_file(&file, actor(6)).unwrap();
        record(&mut load_file, start.elapsed());
        assert_eq!(loaded.group.heads(), group.heads());
    }
    (save, load, load_file, snapshot.len(), file.len())
}

/// "versions A-B": the history length before and after a measurement that adds versions.
fn span(before: usize, after: usize) -> String {
    format!("versions {before}-{after}")
}

fn print_sizes(what: &str, sizes: &[usize]) {
    let average = sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64;
    let (min, max) = (sizes.iter().min().unwrap_or(&0), sizes.iter().max().unwrap_or(&0));
    println!("  {what}: avg {average:.0}, min {min}, max {max} (n = {})", sizes.len());
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap()
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    histogram.record(nanos.max(1)).unwrap();
}

/// How a histogram of nanoseconds is shown.
#[derive(Clone, Copy)]
enum Unit {
    Micros,
    Millis,
    /// Whole-batch nanoseconds, shown per get.
    PerGetNanos,
    /// Whole-call nanoseconds, shown in microseconds per item of a call of this many.
    MicrosPer(usize),
}

impl Unit {
    fn scale(self, nanos: u64) -> f64 {
        match self {
            Unit::Micros => nanos as f64 / 1e3,
            Unit::Millis => nanos as f64 / 1e6,
            Unit::PerGetNanos => nanos as f64 / GET_BATCH as f64,
            Unit::MicrosPer(items) => nanos as f64 / 1e3 / items as f64,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Unit::Micros | Unit::MicrosPer(_) => "µs",
            Unit::Millis => "ms",
            Unit::PerGetNanos => "ns",
        }
    }
}

struct Row {
    name: String,
    unit: Unit,
    samples: u64,
    p50: f64,
    p99: f64,
    max: f64,
    /// The p50 target, in `unit`.
    target: Option<f64>,
}

impl Row {
    fn new(name: &str, histogram: &Histogram<u64>, unit: Unit) -> Row {
        Row {
            name: name.to_owned(),
            unit,
            samples: histogram.len(),
            p50: unit.scale(histogram.value_at_quantile(0.50)),
            p99: unit.scale(histogram.value_at_quantile(0.99)),
            max: unit.scale(histogram.max()),
            target: None,
        }
    }

    fn target(mut self, p50_max: f64) -> Row {
        self.target = Some(p50_max);
        self
    }
}

fn print_table(rows: &[Row]) {
    let width = rows.iter().map(|row| row.name.chars().count()).max().unwrap_or(0);
    println!(
        "{:<width$}  {:>6}  {:>10}  {:>10}  {:>10}  {:>4}  target (p50)",
        "figure", "n", "p50", "p99", "max", "unit"
    );
    println!("{}", "-".repeat(width + 70));
    for row in rows {
        let target = match row.target {
            Some(max) if row.p50 <= max => format!("<= {max} {}: met", row.unit.label()),
            Some(max) => format!("<= {max} {}: MISSED", row.unit.label()),
            None => "-".to_owned(),
        };
        println!(
            "{:<width$}  {:>6}  {:>10.2}  {:>10.2}  {:>10.2}  {:>4}  {target}",
            row.name,
            row.samples,
            row.p50,
            row.p99,
            row.max,
            row.unit.label()
        );
    }
}
