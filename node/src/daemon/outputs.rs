//! Executing the replica's outputs: appends and their fsyncs (group commit), sends, publishes,
//! notifications and replies, reloads and repairs of damaged files, and settling the read view.

use super::*;
use crate::api::secret_mask::mask_event;

/// What a reply says when a persist of its group failed earlier in the batch: the failure
/// (`not_durable`: not committed) for an answer that depended on it, except a strong commit a
/// majority recorded before the batch (its receipt says so), which is final whatever this
/// node's disk does now.
fn reply_after(
    persist_failed: Option<&str>,
    result: Result<CommandOutcome, CommandError>,
) -> Result<Result<CommandOutcome, CommandError>, String> {
    match (persist_failed, result) {
        (Some(_), Ok(CommandOutcome::Committed(receipt))) if receipt.final_before_reply => {
            Ok(Ok(CommandOutcome::Committed(receipt)))
        }
        (Some(error), Ok(_)) => Err(error.to_owned()),
        (_, result) => Ok(result),
    }
}

impl Daemon {
    /// Runs the replica's outputs in order, except that a run of appends is written together:
    /// every append up to the next other persist operation goes into one write and one fsync
    /// per group file, and the outputs between them wait until that is durable. Waiting longer
    /// is always safe (an ack, a reply or a heads digest only ever follows its fsync), and
    /// concurrent writers share the cost of the fsync.
    pub(super) async fn execute_outputs(&mut self) {
        for batch in 1.. {
            let failed = self.execute_batch().await;
            if failed.is_empty() {
                self.settle_reads();
                return;
            }
            // Whatever was not made durable is dropped from memory: the replica reloads the
            // groups from their files and fails what depended on them. Their outputs (error
            // answers, the durable gossip) run in a batch of their own.
            for (group, error) in failed {
                let reloaded = self.reload_group(&group).await;
                let unreadable = reloaded.is_none();
                let now = self.now();
                let input = Input::PersistFailed { group: group.clone(), error, reloaded: reloaded.map(Box::new) };
                self.replica.handle(now, input);
                if unreadable {
                    self.repair_unreadable(&group).await;
                }
                // An eventual group's watchers may have been told of changes the reload dropped,
                // and its revision moved above theirs: they get a resync. A strong group's were
                // told only what is saved, and its revision is back where they are.
                if self.replica.group(&group).is_none_or(|doc| doc.mode() == Mode::Eventual || doc.is_gated()) {
                    self.resync_watchers(&group);
                }
            }
            if batch >= FAILED_BATCHES_MAX {
                // Those outputs failed again and again: give the main loop its turn (ticks,
                // gossip, the rewrite of a file a failed write left unknown); the rest runs
                // after its next event. The read view is settled then, once nothing undurable
                // is left to serve. (Chaos seed 302: each failure led to another append that
                // failed, handled one inside the other until the stack overflowed.)
                warn!(batches = batch, "persists keep failing; leaving the rest of the outputs for the next turn");
                return;
            }
        }
    }

    /// Runs the replica's outputs until none is left; returns the groups whose persist failed,
    /// with the error.
    async fn execute_batch(&mut self) -> BTreeMap<String, String> {
        // Stale flags first: a vote or an acceptance about to leave makes this node in doubt,
        // and no read may be served as fresh once it is (the commit may be reported any moment).
        // Flags only: the contents follow the notifications, which run after their persists.
        self.settle_freshness();
        // Groups whose persist failed in this batch, with the error. A failure silences the
        // later outputs of its own group only: each group's outputs depend on that group's
        // persists alone, and a durable write of another group must still be answered and
        // announced (chaos seed 238: a strong group's watcher missed a revision because an
        // eventual group's append had failed just before it in the batch).
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let mut outputs: std::collections::VecDeque<Output> =
            std::iter::from_fn(|| self.replica.poll_output()).collect();
        loop {
            let Some(output) = outputs.pop_front() else {
                // Outputs queued while these ran (a resumed apply) run in the same batch.
                outputs.extend(std::iter::from_fn(|| self.replica.poll_output()));
                if outputs.is_empty() {
                    break;
                }
                continue;
            };
            // A persist failure ends its group's persists in this batch too: the replica reloads
            // the group from its file and drops what came after the failure, and a later record
            // landing in that file would sit on a gap (chaos seed 336: a round's change and
            // decision failed to append, the next round's `Staged`, built on that change, fitted,
            // and the group reloaded from the file had lost the round in doubt: the node served
            // the version before the commit as fresh).
            if let Output::Persist(op) = &output
                && Self::skips_after_failure(op)
                && failed.contains_key(persist_op_group(op))
            {
                continue;
            }
            match output {
                Output::Persist(PersistOp::Append { group, records }) => {
                    let mut appends: Vec<(String, Vec<u8>)> = vec![(group, records)];
                    // Each waiting output with the number of appends that came before it.
                    let mut waiting: Vec<(usize, Output)> = Vec::new();
                    let mut resume = false;
                    while let Some(next) = outputs.pop_front() {
                        match next {
                            Output::Persist(PersistOp::Append { group, .. }) if failed.contains_key(&group) => {}
                            Output::Persist(PersistOp::Append { group, records }) => appends.push((group, records)),
                            Output::Persist(other) => {
                                outputs.push_front(Output::Persist(other));
                                break;
                            }
                            // Each push persisted before its apply queues a `Resume`; only
                            // the newest deferred apply is left to resume (each later event
                            // finished the one before it), so the run of appends goes on and
                            // every push of the batch shares its fsync.
                            Output::Resume => resume = true,
                            other => waiting.push((appends.len(), other)),
                        }
                    }
                    let order: Vec<String> = appends.iter().map(|(group, _)| group.clone()).collect();
                    // With an apply to resume, the appends go to a blocking thread and the
                    // apply runs while they are saved. Otherwise the loop would only wait for
                    // them: they are written right here, after the early notifications, which
                    // saves the hop to a blocking thread and back (on a busy 2-core machine that
                    // hop took about as long as the fsync itself).
                    let mut appends = Some(appends);
                    let overlapped = if resume { appends.take().map(|a| self.start_appends(a, true)) } else { None };
                    // Pushed changes of eventual groups are told while the fsync runs.
                    let mut held = BTreeSet::new();
                    let early;
                    (early, waiting) =
                        waiting.into_iter().partition(|(_, output)| self.goes_early(output, &failed, &mut held));
                    for (_, output) in early {
                        self.notify_early(output);
                    }
                    let writing = match (overlapped, appends) {
                        (Some(writing), _) => writing,
                        (None, appends) => self.start_appends(appends.unwrap_or_default(), false),
                    };
                    if resume {
                        // The replica applies while the fsync runs. What it queues belongs to its
                        // newest deferred apply, which is the last event of the batch (a later
                        // event would have finished it): those outputs go to the back, after
                        // everything already queued, and run once the fsync is done (except the
                        // notifications that go early, as above).
                        let now = self.now();
                        self.replica.handle(now, Input::Resume);
                        outputs.extend(std::iter::from_fn(|| self.replica.poll_output()));
                        let mut scanning = true;
                        let (early, late): (Vec<Output>, Vec<Output>) = outputs.drain(..).partition(|output| {
                            scanning &=
                                !matches!(output, Output::Persist(op) if !matches!(op, PersistOp::Append { .. }));
                            scanning && self.goes_early(output, &failed, &mut held)
                        });
                        outputs.extend(late);
                        for output in early {
                            self.notify_early(output);
                        }
                    }
                    let failed_now = writing.await;
                    for (group, error) in &failed_now {
                        if let Some(reads) = &self.reads {
                            reads.remove(group);
                        }
                        self.mark_degraded(group, error);
                    }
                    for group in &order {
                        if !failed_now.iter().any(|(failed_group, _)| failed_group == group) {
                            self.clear_degraded(group);
                        }
                    }
                    // As if run one by one: an output sees the failure of its group's append
                    // only if that append came before it.
                    let mut seen = failed.clone();
                    let mut appended = 0;
                    for (appends_before, output) in waiting {
                        while appended < appends_before {
                            let group = &order[appended];
                            if let Some((_, error)) = failed_now.iter().find(|(failed_group, _)| failed_group == group)
                            {
                                seen.entry(group.clone()).or_insert_with(|| error.clone());
                            }
                            appended += 1;
                        }
                        let failure = self.failure_for(&output, &seen);
                        self.execute_plain(output, failure.as_deref()).await;
                    }
                    for (group, error) in failed_now {
                        failed.entry(group).or_insert(error);
                    }
                }
                Output::Persist(op) => {
                    if let PersistOp::RemoveGroup { group } = &op
                        && let Some(reads) = &self.reads
                    {
                        reads.remove(group);
                    }
                    let group = persist_op_group(&op).to_owned();
                    let create_or_compact = matches!(op, PersistOp::CreateGroup { .. } | PersistOp::Compact { .. });
                    // Best effort: a lost sync state costs a larger sync, lost members a less
                    // careful first seconds after a restart (and fewer members trusted to hand
                    // this node a rotated key); the key file's records (members seen leaving or
                    // back) are saved again with the next change. The key itself is required.
                    let sync_state = matches!(
                        op,
                        PersistOp::SyncState { .. }
                            | PersistOp::Members { .. }
                            | PersistOp::Keys { required: false, .. }
                    );
                    match self.persist(op).await {
                        Ok(()) if create_or_compact => self.clear_degraded(&group),
                        Ok(()) => {}
                        // A sync state is an optimisation: losing one costs a larger sync.
                        Err(error) if sync_state => warn!(%group, %error, "could not save a sync state"),
                        Err(error) => {
                            let text = persist_error_text(&group, &error);
                            self.mark_degraded(&group, &text);
                            failed.entry(group).or_insert(text);
                        }
                    }
                }
                other => {
                    let failure = self.failure_for(&other, &failed);
                    self.execute_plain(other, failure.as_deref()).await;
                }
            }
        }
        failed
    }

    /// True for a notification that may run before the fsync it follows (issue 14): a change
    /// a peer pushed (its writer saves it too) to an eventual group, whose group has no
    /// notification held before it (`held`, filled as outputs are looked at in order: a
    /// group's notifications keep their order), and whose persists did not fail in this batch
    /// or last time (a node whose disk fails tells nothing it has not saved: anti-entropy
    /// offers the same change every second, and its watchers would see it come and go). If this
    /// node then loses the change (a crash, a failed persist), its watchers learn it: revisions
    /// never repeat ([`Replica::start_revisions_at`]), a watcher resuming at a lost one gets a
    /// resync, and a reload resyncs the live ones ([`Daemon::resync_watchers`]). Commits still
    /// count only durable acknowledgements: acks and gossiped heads wait for the fsync.
    fn goes_early(&self, output: &Output, failed: &BTreeMap<String, String>, held: &mut BTreeSet<String>) -> bool {
        let Output::Notify(notification) = output else { return false };
        let group = &notification.group;
        let early = notification.pushed
            && !held.contains(group)
            && !failed.contains_key(group)
            && !self.degraded.contains_key(group)
            && self.replica.group(group).is_some_and(|doc| doc.mode() == Mode::Eventual);
        if !early {
            held.insert(group.clone());
        }
        early
    }

    /// Runs a notification [`Daemon::goes_early`] let through.
    fn notify_early(&mut self, output: Output) {
        let Output::Notify(notification) = output else { return };
        if let Some(reads) = &self.reads {
            reads.apply(&notification, self.secret_marks(&notification.group));
        }
        self.notify(notification);
    }

    /// Tells the live watchers of an eventual `group` its whole state after a reload (they may
    /// have seen changes the reload dropped, and its revision moved above every one given
    /// before): an explicit resync at the group's new revision. A group that is gone (its file
    /// could not be read after a failed write) ends its watches: the clients resume and are
    /// told `unknown_group`. Kept, they would hear the changes of a copy joined again later as
    /// diffs against one they never saw.
    pub(super) fn resync_watchers(&mut self, group: &str) {
        let Some(watchers) = self.watchers.get_mut(group) else { return };
        let (Some(doc), Some(revision)) = (self.replica.group(group), self.replica.revision(group)) else {
            self.watchers.remove(group);
            return;
        };
        let resync = |prefix: Option<&str>| WatchEvent::Resync {
            group: group.to_owned(),
            revision,
            version: doc.served_label(),
            settings: super::requests::settings_under(doc.served_settings(), prefix),
        };
        let marks = doc.secret_keys();
        let for_watcher = |prefix: Option<&str>, reveal: bool| {
            let event = resync(prefix);
            if reveal { event } else { mask_event(marks, &event).unwrap_or(event) }
        };
        let whole = socket::EncodedEvent::from(resync(None));
        watchers.retain(|watcher| match watcher.prefix.as_deref() {
            None if watcher.reveal || marks.is_empty() => watcher.events.try_send(whole.clone()).is_ok(),
            prefix => watcher.events.try_send(for_watcher(prefix, watcher.reveal)).is_ok(),
        });
    }

    /// True for a persist operation that must not run once an earlier persist of its group
    /// failed in the same batch: it extends or rewrites the group's file (or its sync state)
    /// from what the replica held in memory, which included what was not saved. The replica
    /// drops that and reloads the group from its file, as if nothing after the failure had run
    /// (`Input::PersistFailed`). Removing a group or creating one starts over, and the members
    /// file does not depend on the document: those still run.
    fn skips_after_failure(op: &PersistOp) -> bool {
        match op {
            PersistOp::Append { .. } | PersistOp::Compact { .. } | PersistOp::SyncState { .. } => true,
            PersistOp::CreateGroup { .. }
            | PersistOp::RemoveGroup { .. }
            | PersistOp::Members { .. }
            | PersistOp::Keys { .. } => false,
        }
    }

    /// The persist failure `output` must see, if any: its group's, from `failed`. An output of
    /// no known group (a reply whose command is gone) sees any failure, as all outputs did
    /// before failures were scoped to groups.
    fn failure_for(&self, output: &Output, failed: &BTreeMap<String, String>) -> Option<String> {
        if failed.is_empty() {
            return None;
        }
        let group = match output {
            Output::Send { message, .. } => Some(message.group()),
            Output::Reply { id, .. } => self.pending_groups.get(id).map(String::as_str),
            Output::Notify(notification) => Some(notification.group.as_str()),
            Output::Publish { group, .. } | Output::Withdraw { group } => Some(group.as_str()),
            Output::Persist(_) | Output::Dropped { .. } | Output::Resume => return None,
        };
        match group {
            Some(group) => failed.get(group).cloned(),
            None => failed.values().next().cloned(),
        }
    }

    /// A group dropped because its file does not load after a failed write is repaired from a
    /// peer while the node runs, as one found damaged at start is: its file goes to quarantine
    /// and a join (`repair`) is queued with its key. Not when the file could not be read at all
    /// (an I/O error may pass: a good file is never moved aside for it; a restart reads it
    /// again), nor for a group with no key left (one this node was leaving).
    async fn repair_unreadable(&mut self, group: &str) {
        if self.replica.group(group).is_some() || self.repairs.iter().any(|repair| repair.name == group) {
            return;
        }
        let name = group.to_owned();
        let actor = self.replica_actor();
        let damaged = self
            .with_store(move |store| match store.read_group(&name) {
                Ok(bytes) => konor_crdt::load_group_file(&bytes, actor).is_err(),
                Err(crate::storage::store::StoreError::GroupNotFound { .. }) => true,
                Err(_) => false,
            })
            .await
            .unwrap_or(false);
        if !damaged {
            return error!(%group, "group file unreadable after a failed write; not served until konord restarts and reads it again");
        }
        let name = group.to_owned();
        let key = match self.with_store(move |store| store.read_group_key(&name)).await {
            Ok(Ok(Some(text))) => Keyring::parse(text.expose()).ok().map(|keys| keys.key().clone()),
            _ => None,
        };
        let Some(key) = key else { return };
        let name = group.to_owned();
        match self.with_store(move |store| store.quarantine_group(&name)).await {
            Ok(Ok(moved)) => {
                error!(%group, moved = %moved.display(), "group file unreadable after a failed write; moved aside, repairing from peers")
            }
            Ok(Err(crate::storage::store::StoreError::GroupNotFound { .. })) => {
                error!(%group, "group file gone after a failed write; repairing from peers")
            }
            Ok(Err(error)) => {
                return error!(%group, %error, "cannot move the unreadable group file aside; not repairing it");
            }
            Err(error) => {
                return error!(%group, %error, "cannot move the unreadable group file aside; not repairing it");
            }
        }
        self.rewrites.remove(group);
        self.repairs.push(Repair { name: group.to_owned(), key, next: Instant::now(), attempts: 0 });
    }

    /// A group as its file holds it now (what is durable), for the replica after a failed
    /// persist; `None` when the file cannot be read or loaded (see [`Daemon::repair_unreadable`]).
    pub(super) async fn reload_group(&mut self, group: &str) -> Option<LoadedState> {
        let name = group.to_owned();
        let read = self.with_store(move |store| store.read_group(&name)).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(crate::storage::store::StoreError::GroupNotFound { .. })) => return None,
            Ok(Err(error)) => {
                error!(%group, %error, "cannot read the group file after a failed write");
                return None;
            }
            Err(error) => {
                error!(%group, %error, "cannot read the group file after a failed write");
                return None;
            }
        };
        let file = match konor_crdt::load_group_file(&bytes, self.replica_actor()) {
            Ok(file) => file,
            Err(error) => {
                error!(%group, %error, "the group file does not load after a failed write");
                return None;
            }
        };
        let name = group.to_owned();
        let keys = self.with_store(move |store| store.read_group_key(&name)).await.ok()?.ok()??;
        let keys = Keyring::parse(keys.expose()).ok()?;
        let needs_rewrite = {
            let name = group.to_owned();
            self.with_store(move |store| store.needs_recovery(&name)).await.unwrap_or(true)
        };
        if needs_rewrite {
            self.rewrites
                .entry(group.to_owned())
                .or_insert((Instant::now() + REWRITE_BACKOFF_MIN, REWRITE_BACKOFF_MIN));
        }
        Some(LoadedState {
            damaged: false,
            doc: file.group,
            keys,
            tail_changes: file.tail_changes,
            sync_states: BTreeMap::new(),
            staged: file.staged,
            decisions: file.decisions,
            known_members: Default::default(),
            ballots: file.ballots,
        })
    }

    /// The replica's actor, for loading documents as this node.
    pub(super) fn replica_actor(&self) -> konor_crdt::ActorId {
        self.replica_actor.clone()
    }

    /// A write of `group` to disk failed: the node is degraded until a later one succeeds.
    pub(super) fn mark_degraded(&mut self, group: &str, error: &str) {
        self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
        if self.degraded.insert(group.to_owned(), error.to_owned()).is_none() {
            error!(%group, %error, "disk write failed: node degraded (nothing that was not saved is served or acknowledged)");
        } else {
            warn!(%group, %error, "disk write failed again");
        }
    }

    pub(super) fn clear_degraded(&mut self, group: &str) {
        if self.degraded.remove(group).is_some() {
            info!(%group, "disk writes succeed again: no longer degraded");
        }
    }

    /// Rewrites group files a failed fsync left unknown, once their backoff has passed.
    pub(super) async fn rewrite_due_files(&mut self) {
        let now = Instant::now();
        let due: Vec<String> =
            self.rewrites.iter().filter(|(_, (at, _))| *at <= now).map(|(group, _)| group.clone()).collect();
        for group in due {
            let Some(file) = self.replica.compacted_file(&group) else {
                self.rewrites.remove(&group);
                continue;
            };
            let name = group.clone();
            match self.with_store(move |store| store.replace_group(&name, &file)).await {
                Ok(Ok(())) => {
                    self.rewrites.remove(&group);
                    self.clear_degraded(&group);
                    warn!(%group, "group file rewritten after a failed write");
                }
                Ok(Err(error)) => {
                    let text = persist_error_text(&group, &error);
                    if let Some((at, backoff)) = self.rewrites.get_mut(&group) {
                        *backoff = (*backoff * 2).min(REPAIR_BACKOFF_MAX);
                        *at = now + *backoff;
                    }
                    self.mark_degraded(&group, &text);
                }
                Err(error) => warn!(%group, %error, "the store thread failed"),
            }
        }
    }

    /// Runs one output that is not a persist operation; `persist_failed` says an earlier
    /// persist of this batch failed.
    pub(super) async fn execute_plain(&mut self, output: Output, persist_failed: Option<&str>) {
        match output {
            Output::Persist(op) => {
                // Callers route persist operations elsewhere; run it rather than lose it.
                if let Err(error) = self.persist(op).await {
                    self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
                    error!(%error, "persist failed");
                }
            }
            Output::Send { to, message } => {
                if persist_failed.is_some() {
                    return;
                }
                match self.peer_addr(&to) {
                    Some(addr) => self.network.send(addr, Some(&to), Channel::Replica, message.encode()),
                    None => warn!(peer = %to, "no address known for peer; message dropped"),
                }
            }
            Output::Reply { id, result } => self.reply(id, reply_after(persist_failed, result)),
            // After a failed persist nothing further is announced: watchers and gossip must
            // not learn of state that is not on disk (gossiped heads count as acks).
            Output::Notify(_) | Output::Publish { .. } if persist_failed.is_some() => {}
            Output::Notify(notification) => {
                if let Some(reads) = &self.reads {
                    reads.apply(&notification, self.secret_marks(&notification.group));
                }
                self.notify(notification);
            }
            Output::Publish { group, gossip } => {
                let value = gossip.map_or_else(|| GROUP_LEFT.to_owned(), |g| g.encode());
                self.membership.publish(&format!("{GROUP_PREFIX}{group}"), &value);
            }
            Output::Withdraw { group } => {
                self.membership.publish(&format!("{GROUP_PREFIX}{group}"), GROUP_WITHDRAWN);
            }
            Output::Dropped { from, reason } => {
                self.stats.peer_messages_dropped.fetch_add(1, Ordering::Relaxed);
                warn!(peer = %from, %reason, "peer message dropped");
            }
            // Not after an append run (the replica resumed already): the outputs it queues are
            // picked up before the batch ends.
            Output::Resume => {
                let now = self.now();
                self.replica.handle(now, Input::Resume);
            }
        }
    }

    /// Brings the read view in line with the replica after a batch: groups that appeared, or
    /// whose revision moved without a notification (load, join, repair), are copied whole;
    /// stale flags follow fencing; groups that were left go.
    pub(super) fn settle_reads(&self) {
        self.settle_view(true);
    }

    /// Refreshes the stale flags of the groups in the read view, copying nothing in: what the
    /// replica holds may include changes whose persist has not run yet.
    pub(super) fn settle_freshness(&self) {
        self.settle_view(false);
    }

    pub(super) fn settle_view(&self, copy_contents: bool) {
        let Some(reads) = &self.reads else { return };
        let present: Vec<String> = self.replica.group_names().map(str::to_owned).collect();
        let mut fresh = BTreeMap::new();
        for name in &present {
            let Some(doc) = self.replica.group(name) else { continue };
            let revision = self.replica.revision(name).unwrap_or(0);
            if copy_contents && reads.revision(name) != Some(revision) {
                let served = doc.served_settings();
                let settings = served.iter().map(|(key, value)| (key.to_owned(), value.clone())).collect();
                let changed = self.last_change.get(name).copied().unwrap_or(self.started);
                let read = GroupRead {
                    settings,
                    revision,
                    version: doc.served_label(),
                    changed,
                    stale: true,
                    stale_reason: None,
                    fresh_until: None,
                    block: false,
                    secrets: doc.secret_keys().clone(),
                };
                reads.replace(name, read);
            }
            let block = doc.policy().fencing == Fencing::Block && doc.mode() == Mode::Strong;
            let mut state = match self.replica.freshness(name) {
                Ok(until) => Fresh { stale_reason: None, fresh_until: until.map(|at| self.instant_at(at)), block },
                Err(reason) => Fresh { stale_reason: Some(reason), fresh_until: None, block },
            };
            // The replica may already hold changes whose persist (and so whose notification)
            // has not run: the view serves older contents until it has, and must not call them
            // fresh (found by the fault tests: a joiner served the version before a commit as
            // fresh for a moment, between applying the commit and saving it).
            if !copy_contents
                && doc.mode() == Mode::Strong
                && state.stale_reason.is_none()
                && reads.revision(name).is_some_and(|shown| shown != revision)
            {
                state.stale_reason = Some("a change is being saved here".to_owned());
            }
            fresh.insert(name.clone(), state);
        }
        reads.settle(&present, &fresh);
    }

    /// Queues a failed repair again, with a longer wait.
    pub(super) fn queue_repair(&mut self, name: String, key: GroupKey, attempts: u32, error: &str) {
        let backoff = REPAIR_BACKOFF_MIN.saturating_mul(1 << attempts.min(5)).min(REPAIR_BACKOFF_MAX);
        warn!(group = %name, %error, retry_in = ?backoff, "repair from a peer failed; it is tried again");
        self.repairs.push(Repair { name, key, next: Instant::now() + backoff, attempts });
    }

    /// Runs `work` on the store where [`StoreIo`] says.
    pub(super) async fn with_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let store = self.store.clone();
        let run = move || work(&mut store.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        match self.store_io {
            StoreIo::Inline => Ok(run()),
            StoreIo::Blocking => tokio::task::spawn_blocking(run).await.context("the store thread failed"),
        }
    }

    /// Starts appending every record, grouped by file in order, with one write and one fsync
    /// per file: at once on a blocking thread when the caller has work to `overlap` with them
    /// and the store is [`StoreIo::Blocking`], or else right here. The future answers the groups
    /// whose append failed, with the error.
    pub(super) fn start_appends(
        &self,
        appends: Vec<(String, Vec<u8>)>,
        overlap: bool,
    ) -> impl std::future::Future<Output = Vec<(String, String)>> + 'static {
        let mut by_group: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for (group, records) in appends {
            by_group.entry(group).or_default().push(records);
        }
        let groups: Vec<String> = by_group.keys().cloned().collect();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let write = move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut failed = Vec::new();
            for (group, records) in &by_group {
                let parts: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
                let started = std::time::Instant::now();
                let appended = store.append_batch(group, &parts);
                metrics.observe_persist(started.elapsed());
                if let Err(error) = appended {
                    failed.push((group.clone(), persist_error_text(group, &error)));
                }
            }
            failed
        };
        // Inline: written now, the future only hands the result over. Blocking: running now
        // on the blocking pool, the future waits for it.
        let (written, running) = match self.store_io {
            StoreIo::Blocking if overlap => (Vec::new(), Some(tokio::task::spawn_blocking(write))),
            StoreIo::Blocking | StoreIo::Inline => (write(), None),
        };
        async move {
            let Some(running) = running else { return written };
            running.await.unwrap_or_else(|error| {
                groups.into_iter().map(|group| (group, format!("the store thread failed: {error}"))).collect()
            })
        }
    }

    pub(super) async fn persist(&mut self, op: PersistOp) -> anyhow::Result<()> {
        if let PersistOp::RemoveGroup { group } = &op {
            self.watchers.remove(group);
            // Apply reports (F16) were about the copy this node leaves.
            self.reports.forget_group(group);
        }
        self.with_store(move |store| -> anyhow::Result<()> {
            match op {
                PersistOp::CreateGroup { group, file, keys } => {
                    store.write_group_key(&group, &Secret::new(keys.to_text()))?;
                    store.create_group(&group, &file)?;
                }
                PersistOp::Keys { group, keys, .. } => store.write_group_key(&group, &Secret::new(keys.to_text()))?,
                PersistOp::Append { group, records } => store.append(&group, &records)?,
                PersistOp::Compact { group, file } => store.replace_group(&group, &file)?,
                PersistOp::RemoveGroup { group } => {
                    store.remove_group(&group)?;
                }
                PersistOp::SyncState { group, peer, state } => store.write_sync_state(&group, &peer, &state)?,
                PersistOp::Members { group, members } => store.write_members(&group, &members)?,
            }
            Ok(())
        })
        .await?
    }

    pub(super) fn reply(&mut self, id: u64, result: Result<Result<CommandOutcome, CommandError>, String>) {
        self.pending_groups.remove(&id);
        let started = self.command_started.remove(&id);
        if let (Some(started), Ok(Ok(CommandOutcome::Committed(receipt)))) = (started, &result)
            && let Some(doc) = self.replica.group(&receipt.group)
        {
            self.metrics.observe_commit(doc.mode(), started.elapsed());
        }
        let Some(pending) = self.pending.remove(&id) else { return };
        let (sender, key) = match pending {
            PendingReply::Plain(sender) => (sender, None),
            PendingReply::Created { reply, key } => (reply, Some(key)),
            PendingReply::Repair { name, key } => {
                let attempts = self.repair_attempts.get(&name).copied().unwrap_or(1);
                match result {
                    Ok(Ok(_)) => {
                        info!(group = %name, "group repaired from a peer");
                        self.repair_attempts.remove(&name);
                    }
                    Ok(Err(CommandError::AlreadyExists(_) | CommandError::JoinInProgress(_))) => {}
                    Ok(Err(error)) => self.queue_repair(name, key, attempts, &error.to_string()),
                    Err(error) => self.queue_repair(name, key, attempts, &error),
                }
                return;
            }
        };
        log_outcome(&result);
        let response = match result {
            Err(persist_error) => error_response(
                ErrorCode::NotDurable,
                format!(
                    "{persist_error}; the write is not acknowledged by this node and nothing of it is served here (it may still reach the members it was sent to: read the group before retrying)"
                ),
            ),
            Ok(Err(error)) => command_error_response(&error),
            Ok(Ok(CommandOutcome::Committed(receipt))) => Response::Committed {
                group: receipt.group,
                version: receipt.label,
                revision: receipt.revision,
                content_hash: receipt.version.content_hash.get(..12).unwrap_or_default().to_owned(),
                acked_by: receipt.acked_by,
            },
            Ok(Ok(CommandOutcome::Created { name })) => Response::GroupCreated { name, key: key.unwrap_or_default() },
            Ok(Ok(CommandOutcome::Joined { name, version })) => Response::Joined { name, version },
            Ok(Ok(CommandOutcome::Left { .. })) => Response::Done,
            Ok(Ok(CommandOutcome::Reconfigured { group, configuration })) => {
                Response::Reconfigured { group, configuration }
            }
            Ok(Ok(CommandOutcome::KeyRotated { group, generation, entitled })) => {
                Response::KeyRotated { group, generation, entitled, key: key.unwrap_or_default() }
            }
        };
        let _ = sender.send(response);
    }

    pub(super) fn notify(&mut self, notification: Notification) {
        if notification.quiet {
            // A gated group's write that is not released: the read view took its revision,
            // nothing served moved, so nobody is told (SPEC F14).
            return;
        }
        self.last_change.insert(notification.group.clone(), Instant::now());
        if notification.pushed
            && let Some(origin) = self.replica.group(&notification.group).and_then(|doc| doc.latest_version())
        {
            // Origin time (the writer's wall clock) to now on this node's: clocks apart by a
            // skew count it in; a change that seems to come from the future counts as 0.
            let lag = self.wall_clock().0.saturating_sub(origin.time.0);
            self.metrics.observe_propagation(Duration::from_millis(lag));
        }
        let marks = match self.replica.group(&notification.group) {
            Some(doc) => doc.secret_keys(),
            None => &NO_MARKS,
        };
        let Some(watchers) = self.watchers.get_mut(&notification.group) else { return };
        // Encoded once, shared by every watcher of the whole group (once more, masked, for
        // those that may not reveal secrets); a watcher of a key prefix gets the keys under it,
        // or nothing when the change touched none.
        let whole = super::requests::change_event(&notification, None);
        let whole_masked = whole.as_ref().and_then(|event| mask_event(marks, event)).map(socket::EncodedEvent::from);
        let whole = whole.map(socket::EncodedEvent::from);
        // A watcher whose queue is full is dropped: its connection closes and the SDK resumes
        // from its last revision, so it misses nothing.
        watchers.retain(|watcher| match (watcher.prefix.as_deref(), &whole, &whole_masked) {
            (None, Some(_), Some(masked)) if !watcher.reveal => watcher.events.try_send(masked.clone()).is_ok(),
            (None, Some(event), _) => watcher.events.try_send(event.clone()).is_ok(),
            (prefix, _, _) => match super::requests::change_event(&notification, prefix) {
                Some(event) if !watcher.reveal => {
                    let event = mask_event(marks, &event).unwrap_or(event);
                    watcher.events.try_send(event).is_ok()
                }
                Some(event) => watcher.events.try_send(event).is_ok(),
                None => true,
            },
        });
    }
}

/// The marks of a group that has none (or is gone).
static NO_MARKS: BTreeSet<String> = BTreeSet::new();

impl Daemon {
    /// The keys of `group` marked secret (issue 17); none for a group this node does not hold.
    pub(super) fn secret_marks(&self, group: &str) -> &BTreeSet<String> {
        self.replica.group(group).map_or(&NO_MARKS, |doc| doc.secret_keys())
    }
}

/// Logs what an operator looks for in a command's outcome (issue 12): groups created, joined,
/// left and reconfigured at INFO; writes not committed and refused joins at WARN. Committed writes
/// are not logged (they are the normal case, and many).
fn log_outcome(result: &Result<Result<CommandOutcome, CommandError>, String>) {
    match result {
        Ok(Ok(CommandOutcome::Created { name })) => info!(group = %name, "group created"),
        Ok(Ok(CommandOutcome::Joined { name, version })) => info!(group = %name, %version, "group joined"),
        Ok(Ok(CommandOutcome::Left { name })) => info!(group = %name, "group left"),
        Ok(Ok(CommandOutcome::Reconfigured { group, configuration })) => {
            info!(%group, %configuration, "strong group reconfigured")
        }
        Ok(Ok(CommandOutcome::KeyRotated { group, generation, entitled })) => {
            info!(%group, generation, entitled, "group key rotated")
        }
        Ok(Ok(CommandOutcome::Committed(_))) => {}
        // A file's parse error quotes its lines, which may hold secrets: the caller has the
        // detail; the log says what kind of refusal it was. (Schema violations come with the
        // values of secret keys taken out, by the core.)
        Ok(Err(CommandError::Edit(konor_crdt::EditError::File(_)))) => {
            warn!("command refused: the file does not read as settings (the detail went to the caller)")
        }
        Ok(Err(error)) => warn!(%error, "command refused or not committed"),
        Err(persist_error) => warn!(error = %persist_error, "write not durable on this node"),
    }
}

#[cfg(test)]
mod reply_tests {
    use super::*;

    fn committed(final_before_reply: bool) -> Result<CommandOutcome, CommandError> {
        let (doc, commit) = konor_crdt::GroupDoc::create(
            "app",
            konor_crdt::Mode::Strong,
            konor_crdt::ActorId::from([1u8; 16]),
            &konor_crdt::CommitMeta::new("a", "m", konor_crdt::Millis(1)),
        )
        .unwrap();
        Ok(CommandOutcome::Committed(konor_crdt::replica::CommitReceipt {
            group: doc.name().to_owned(),
            version: commit.version,
            label: "v1".into(),
            revision: 1,
            acked_by: vec!["n1".into()],
            final_before_reply,
        }))
    }

    /// Found in review (issue 14): a strong commit final at a majority was answered
    /// `not_durable` ("not committed") when an unrelated append of its group failed earlier in
    /// the batch; the simulator now holds a strong `not_durable` to "committed nowhere".
    #[test]
    fn a_failed_persist_earlier_in_the_batch_does_not_unsay_a_final_strong_commit() {
        assert!(matches!(reply_after(Some("disk full"), committed(true)), Ok(Ok(CommandOutcome::Committed(_)))));
        // Any other answer that came after the failure depended on it.
        assert_eq!(reply_after(Some("disk full"), committed(false)), Err("disk full".to_owned()));
        assert!(matches!(reply_after(None, committed(false)), Ok(Ok(CommandOutcome::Committed(_)))));
    }
}
