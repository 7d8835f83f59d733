//! Every bound the core enforces, in one place, each with the reason for its number.
//!
//! The shell (node/) and the SDK refer to these constants instead of repeating numbers, so a
//! limit changes in one line and the `const` assertions at the bottom keep related limits
//! consistent.

/// Longest group name in bytes: group names travel in every gossip key of a node, and chitchat
/// keeps the whole digest of a node in one UDP-sized message (FACTS), so names stay short.
pub const GROUP_NAME_BYTES_MAX: usize = 64;

/// Longest setting key in bytes, dots included: keys are repeated in every change that writes
/// them and in every diff line an operator reads.
pub const KEY_BYTES_MAX: usize = 256;

/// Most dot-separated segments in a key: deeper nesting is a smell in configuration and would
/// make file round trips (TOML/YAML tables) unreadable.
pub const KEY_SEGMENTS_MAX: usize = 16;

/// Longest single segment of a key in bytes.
pub const KEY_SEGMENT_BYTES_MAX: usize = 64;

/// Largest value in bytes, measured as canonical JSON. FACTS: Automerge memory explodes when
/// many changes with ~1 KiB values are applied at once; values are settings, not blobs.
pub const VALUE_BYTES_MAX: usize = 16 * 1024;

/// Most keys in one group: the read view, the content hash and a full-file apply are linear in
/// this; 10k keys still load in tens of milliseconds.
pub const KEYS_PER_GROUP_MAX: usize = 10_000;

/// Largest total size of a group's settings (keys plus canonical values), so that a snapshot of
/// the settings comfortably fits one socket frame for the SDK.
pub const SETTINGS_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Keys a group may have marked secret: as many as it may hold. Marks are never taken back, so
/// a group that keeps naming new keys secret would otherwise grow its mark set without end.
pub const SECRET_KEYS_MAX: usize = KEYS_PER_GROUP_MAX;

/// Largest input file for `apply`: room for [`SETTINGS_BYTES_MAX`] of settings plus the
/// formatting overhead of TOML or YAML.
pub const CONFIG_FILE_BYTES_MAX: usize = 2 * SETTINGS_BYTES_MAX;

/// Most waves of a canary release: each is a promotion an operator (or a guard) makes; ten
/// steps cover any rollout an operator can follow.
pub const RELEASE_WAVES_MAX: usize = 10;

/// Most labels a release's selector names: a selector is stored in its release version forever
/// and matched on every node at every change.
pub const RELEASE_SELECTOR_LABELS_MAX: usize = 8;

/// Longest overlay selector as stored (`env=dev,region=eu-west`), in bytes: it is part of each
/// overlay key, which every change of the key carries.
pub const OVERLAY_SELECTOR_BYTES_MAX: usize = 256;

/// Most distinct overlay selectors in one group: each is a view every schema check validates
/// and every node matches against its labels.
pub const OVERLAY_SELECTORS_MAX: usize = 16;

/// Most views of a group's settings a schema check validates (one per set of labels that
/// matches overlays together): overlays of many independent labels multiply, and each view is
/// one schema run on every write.
pub const OVERLAY_VIEWS_MAX: usize = 64;

/// Longest label key or value in a selector, in bytes: as long as a node's own labels may be.
pub const LABEL_BYTES_MAX: usize = 64;

/// Longest bake time of a canary wave: a week; a rollout that needs longer is a new release.
pub const RELEASE_BAKE_MS_MAX: u64 = 7 * 24 * 3_600_000;

/// How much longer than its bake time a wave waits before a member promotes it: wall clocks
/// of members differ, and a wave is promoted by a node's own clock against the writer's stamp
/// (docs/releases.md).
pub const BAKE_SKEW_MARGIN_MS: u64 = 1_000;

/// Longest commit message in bytes: it is stored in every version forever.
pub const MESSAGE_BYTES_MAX: usize = 1024;

/// Longest author name in bytes.
pub const AUTHOR_BYTES_MAX: usize = 128;

/// Most remote changes applied to a document in one Automerge call. FACTS: 1,000 changes in one
/// call took 3.3 GiB while the same changes 10 at a time stayed at 127 MiB.
pub const APPLY_BATCH_CHANGES_MAX: usize = 16;

/// Largest single Automerge change accepted from a peer: a whole-file apply of a full group
/// plus Automerge's own overhead.
pub const CHANGE_BYTES_MAX: usize = 2 * SETTINGS_BYTES_MAX;

/// Most rows one column of a remote change may declare, and most predecessors all its operations
/// may name together, checked before Automerge decodes it (`change_bounds`): Automerge trusts
/// these run-length counts, and 130 bytes declaring billions made it allocate over 2 GB. An
/// honest change has one row per operation: a whole-file apply of a full group replaces at most
/// `KEYS_PER_GROUP_MAX` keys (deletes and sets) plus a few metadata operations, 50 times less.
pub const CHANGE_ROWS_MAX: u64 = 1 << 20;

/// Most bytes the deflated columns of one document (a snapshot, a join grant, a whole document in
/// a sync message) may inflate to, checked before Automerge inflates them without a limit: an
/// honest save deflates a few times at most, so 4 times the largest sync message is room enough,
/// while a 64 MiB deflate bomb would otherwise become tens of GB.
pub const DOCUMENT_INFLATED_BYTES_MAX: usize = 4 * SYNC_MESSAGE_BYTES_MAX;

/// Most rows one column of a document may declare (operations or changes of its whole history),
/// checked before Automerge decodes it, as [`CHANGE_ROWS_MAX`] is for one change: 16 times
/// the rows of a 1 million-change history of one operation each.
pub const DOCUMENT_ROWS_MAX: u64 = 1 << 24;

/// Largest sync message accepted from a peer: a sync message may carry a whole document save
/// when the peer is far behind.
pub const SYNC_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Largest record payload in a group file: one snapshot of the biggest document we allow.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = SYNC_MESSAGE_BYTES_MAX;

const _: () = assert!(KEY_SEGMENT_BYTES_MAX <= KEY_BYTES_MAX);
const _: () = assert!(KEY_SEGMENTS_MAX * (KEY_SEGMENT_BYTES_MAX + 1) >= KEY_BYTES_MAX);
const _: () = assert!(VALUE_BYTES_MAX + KEY_BYTES_MAX <= SETTINGS_BYTES_MAX);
const _: () = assert!(CHANGE_BYTES_MAX >= SETTINGS_BYTES_MAX);
const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX >= CHANGE_BYTES_MAX);
const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(APPLY_BATCH_CHANGES_MAX >= 1);

/// Most changes a writer puts in one push to a member: the writes of one batch of events share
/// a push, and a member applies at most [`APPLY_BATCH_CHANGES_MAX`] in one Automerge call, so
/// a push never needs more than one.
pub const PUSH_CHANGES_MAX: usize = APPLY_BATCH_CHANGES_MAX;

/// Most change bytes in one shared push: another change joins a queued push only within this
/// (a change larger than it goes alone). 1 MiB is dozens of ordinary writes and keeps one frame
/// far under [`PEER_MESSAGE_BYTES_MAX`].
pub const PUSH_BYTES_MAX: usize = 1024 * 1024;
const _: () = assert!(CHANGE_ROWS_MAX >= 4 * KEYS_PER_GROUP_MAX as u64);

/// Change records after the snapshot at which a small group's file is compacted into a fresh
/// snapshot (a larger one waits for [`COMPACT_TAIL_FRACTION`] of its changes). Loading applies
/// the tail in bounded batches (about 0.1 ms per change since document format 3), so 256 is
/// about 25 ms of replay on start, and a snapshot of a small document is cheap to rewrite.
pub const COMPACT_TAIL_CHANGES_MAX: usize = 256;

/// A group file is compacted once its change tail holds 1/8 of the document's changes (and at
/// least [`COMPACT_TAIL_CHANGES_MAX`]). Compaction saves the whole document: 34 ms at 10k
/// versions, growing with history until epochs bound it. Compacting every 256 changes made
/// that cost O(history) per change (1.4 ms a change at 100k versions, spent in stalls of the
/// daemon's loop); in proportion it is constant (about 14 µs a change), and the tail replayed
/// on start stays under 1/8 of the document.
pub const COMPACT_TAIL_FRACTION: usize = 8;

const _: () = assert!(COMPACT_TAIL_CHANGES_MAX >= APPLY_BATCH_CHANGES_MAX);

/// Largest encoded peer message: a join grant carries a whole document save.
pub const PEER_MESSAGE_BYTES_MAX: usize = SYNC_MESSAGE_BYTES_MAX + 1024 * 1024;

/// Notifications a replica keeps per group for watch resume; a watcher further behind gets an
/// explicit resync (SPEC F13). 1,024 events cover minutes of heavy writes.
pub const WATCH_EVENTS_KEPT: usize = 1024;

/// The span of revisions each run of a node has for an eventual group: run `i` (its store's
/// incarnation) counts from `(i - 1) × 10⁹` plus the group's change count, so a revision never
/// names two states across restarts, though a watcher may have seen a pushed change the
/// restart lost (issue 14). It holds while a group's whole history stays under a billion
/// changes, out of reach (a document that long would not fit in memory: 100,000 versions take
/// about 270 MB), and the base stays below 2⁵³, the largest integer every JSON reader keeps
/// exact, for 9 million restarts (then it stops growing).
pub const REVISIONS_PER_RUN_MAX: u64 = 1_000_000_000;

/// The first revision of run `incarnation` (see [`REVISIONS_PER_RUN_MAX`]), kept below 2⁵³.
pub fn revision_base(incarnation: u64) -> u64 {
    const JSON_EXACT_LIMIT: u64 = (1 << 53) - 1;
    incarnation.saturating_sub(1).saturating_mul(REVISIONS_PER_RUN_MAX).min(JSON_EXACT_LIMIT - REVISIONS_PER_RUN_MAX)
}

/// How long a peer's gossiped heads may differ from ours before anti-entropy starts a sync
/// session: pushes normally close the gap within milliseconds, so waiting avoids a redundant
/// session per write while still repairing a lost push within about a second.
pub const ANTI_ENTROPY_DELAY_MS: u64 = 1_000;

/// A sync session with no answer for this long is reset (FACTS: lost sync messages can stall
/// the protocol unless the state is reset).
pub const SYNC_SESSION_TIMEOUT_MS: u64 = 5_000;

/// How long one join attempt waits for a member's answer before trying another member.
pub const JOIN_STEP_TIMEOUT_MS: u64 = 3_000;

/// How long a join waits in total, including waiting for a member to appear in gossip.
pub const JOIN_TIMEOUT_MS: u64 = 15_000;

const _: () = assert!(PEER_MESSAGE_BYTES_MAX > SYNC_MESSAGE_BYTES_MAX);
const _: () = assert!(PUSH_BYTES_MAX + CHANGE_BYTES_MAX < PEER_MESSAGE_BYTES_MAX);
const _: () = assert!(JOIN_STEP_TIMEOUT_MS < JOIN_TIMEOUT_MS);
const _: () = assert!(ANTI_ENTROPY_DELAY_MS < SYNC_SESSION_TIMEOUT_MS);

/// How long an eventual write waits for a live quorum of durable acks before it answers with
/// an error naming the members that did not ack (the change stays applied and keeps spreading).
pub const COMMIT_TIMEOUT_MS: u64 = 5_000;

/// How long a strong round waits for every vote before it aborts.
pub const ROUND_TIMEOUT_MS: u64 = 3_000;

/// How long a member holds a staged round without a decision before it asks its peers. Longer
/// than a round, so the coordinator has decided (or given up) by then.
pub const DECISION_TIMEOUT_MS: u64 = 2 * ROUND_TIMEOUT_MS;

/// Local writes to a strong group that may wait for the group's current round to end before
/// being refused as busy: enough to absorb a burst from local clients without unbounded memory.
pub const ROUND_QUEUE_MAX: usize = 64;

/// Peers whose expected membership proof a node remembers per group (`ProofMemo`): twice the
/// largest mesh (`MESH_NODES_MAX` = 800 in konord), so a mesh that churns through node ids
/// cannot grow the memo without bound; past it the group's memo starts over.
pub const PROOF_MEMO_NODES_MAX: usize = 1_600;

/// Groups whose proofs a node remembers (`ProofMemo`); past it the memo starts over. A node
/// holds far fewer groups than this in any deployment we know.
pub const PROOF_MEMO_GROUPS_MAX: usize = 256;

/// Round outcomes a node remembers per group to answer in-doubt peers.
pub const DECISIONS_KEPT: usize = 256;

/// Groups this node left during a run whose last round outcomes it keeps for the members it
/// left behind (a member in doubt about the round of this node's leave may have no one else to
/// ask). Each keeps at most [`DECISIONS_KEPT`] outcomes (about 50 bytes each): under 1 MiB.
pub const DEPARTED_GROUPS_KEPT: usize = 64;

const _: () = assert!(DECISION_TIMEOUT_MS > ROUND_TIMEOUT_MS);

/// Default of a strong group's `evict_after` policy: a member dead this long is removed from the
/// configuration (if a majority agrees), so the rest can write again. Long enough that a
/// restart or a short network blip never costs a member its seat; short enough that a dead host
/// blocks writes for under a minute.
pub const EVICT_AFTER_DEFAULT_MS: u64 = 30_000;

/// Shortest `evict_after` a group accepts: eviction must wait until every read lease the
/// evicted node may still hold has expired ([`LEASE_MS`] plus its margin), and beyond the
/// failure detector's bound, or a paused node would be evicted while it still serves reads.
pub const EVICT_AFTER_MIN_MS: u64 = 2 * (LEASE_MS + LEASE_MARGIN_MS);

/// How long a read lease lasts, counted on the holder's clock from when it asked. A strong-group
/// member serves reads as fresh only while a majority of its configuration granted it a lease
/// this recent (SPEC F12). About the failure detector's bound at the default gossip period
/// (2 s), so a paused or cut-off node turns stale about when its peers see it dead.
pub const LEASE_MS: u64 = 2_000;

/// How often a member asks for its read lease again: a few requests per lease, so one lost
/// message does not let the lease lapse.
pub const LEASE_RENEW_MS: u64 = 500;

/// Extra time a granter keeps its promise (not to vote for the holder's eviction) beyond the
/// lease: covers clocks that run at slightly different rates and the request's time in flight.
pub const LEASE_MARGIN_MS: u64 = 1_000;

const _: () = assert!(LEASE_RENEW_MS * 3 <= LEASE_MS);
const _: () = assert!(EVICT_AFTER_MIN_MS <= EVICT_AFTER_DEFAULT_MS);

/// How long a coordinator waits for a majority of the configuration to record its commit
/// decision before it answers that the outcome is unknown (the round then settles by recovery).
pub const DECIDE_TIMEOUT_MS: u64 = ROUND_TIMEOUT_MS;

/// How long a node that holds a strong group but is not in its configuration waits between
/// attempts to join the configuration (after a join, or after it was evicted and came back).
pub const REJOIN_RETRY_MS: u64 = 1_000;

/// How long a new member of an eventual group waits for the members it announced itself to
/// (so that their next write counts it) before its join answers anyway.
pub const ANNOUNCE_TIMEOUT_MS: u64 = 1_000;

/// For this long after a start, members a node knew before and has not heard of yet in gossip
/// count as members it cannot judge (unknown), so a node that just started never takes itself
/// for the only member. Gossip brings every node's state within a few rounds; 10 s is several
/// failure-detection bounds.
pub const START_GRACE_MS: u64 = 10_000;

/// Largest group schema in bytes, as canonical JSON (SPEC F8): it is stored in the group's
/// document with every version that sets it, and compiled on every load; a schema describes
/// keys, it is not a place for data.
pub const SCHEMA_BYTES_MAX: usize = 64 * 1024;

/// Largest compiled size of one `pattern` of a schema (the `regex` crate's size limit): a
/// pattern's memory is bounded even when the schema's text is short.
pub const SCHEMA_REGEX_BYTES_MAX: usize = 1024 * 1024;

/// Most schema violations a refusal or a check names one by one: enough to fix a file in one
/// pass, short enough for one error line on a terminal; a longer list ends with "and more".
pub const VIOLATIONS_REPORTED_MAX: usize = 20;

/// Most JSON values a group schema holds with every `$ref` written out in place: the work of a
/// check grows with it (a schema of a few KB whose `allOf` refers twice to the next level costs
/// 2^depth checks per value). A 64 KiB schema without `$ref` holds fewer than this.
pub const SCHEMA_EXPANDED_NODES_MAX: usize = 65_536;

/// Most regular expressions (`pattern`, `patternProperties`) in a group schema: each is
/// compiled whenever the schema is loaded or changes (a few thousand took over a second).
pub const SCHEMA_PATTERNS_MAX: usize = 256;
