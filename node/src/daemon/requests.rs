//! Answering local calls: reads (from the replica, or held until a `block` group is fresh),
//! writes and group commands handed to the replica, watches, and the status and nodes views.

use super::*;
use crate::health::history::MeshHistory;
use crate::health::{Alerts, DroppedCounts, GroupHealth, MemberCounts, MeshCapacity, NodeHealth, QueueDepths};
use crate::reports::release_report::{Member, RELEASE_REPORT_MAX, Which, release_reports};

/// The author of a version a client writes: the user its door authenticated, at this node;
/// what the client claims (`--author`) follows in parentheses, marked as a claim. A client of
/// unknown user (the simulator, tests) is taken at its word, else named by its process.
fn author(client: &ClientInfo, claimed: &str, node_id: &str) -> String {
    match (&client.user, claimed) {
        (Some(user), "") => format!("{user}@{node_id}"),
        (Some(user), claimed) if claimed == user => format!("{user}@{node_id}"),
        (Some(user), claimed) => {
            let authenticated = format!("{user}@{node_id}");
            // Within the author bound whatever the claim's length: the authenticated part whole.
            let room = konor_crdt::limits::AUTHOR_BYTES_MAX.saturating_sub(authenticated.len() + 3);
            let mut cut = claimed.len().min(room);
            while !claimed.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == 0 { authenticated } else { format!("{authenticated} ({})", &claimed[..cut]) }
        }
        (None, "") => format!("{}@{node_id}", client.process),
        (None, claimed) => claimed.to_owned(),
    }
}

impl Daemon {
    /// The instant of a replica time.
    pub(super) fn instant_at(&self, at: Millis) -> Instant {
        self.started + Duration::from_millis(at.0)
    }

    /// True for a read of a strong group with the `block` fencing policy while this node cannot
    /// prove it is fresh.
    pub(super) fn must_block(&self, request: &Request) -> bool {
        let group = match request {
            Request::Get { group, .. } | Request::Snapshot { group, .. } => group,
            _ => return false,
        };
        self.replica.group(group).is_some_and(|doc| doc.policy().fencing == Fencing::Block)
            && self.replica.is_fenced(group)
    }

    /// Holds a read until this node is fresh (fencing policy `block`), bounded in time and count.
    pub(super) fn block_read(&mut self, client: ClientInfo, request: Request, reply: oneshot::Sender<Response>) {
        let group = match &request {
            Request::Get { group, .. } | Request::Snapshot { group, .. } => group.clone(),
            _ => return,
        };
        if self.blocked_reads.len() >= BLOCKED_READS_MAX {
            let reason = self.replica.fencing_reason(&group).unwrap_or_default();
            let message =
                format!("group {group:?} cannot be read fresh here ({reason}) and too many reads wait already");
            return send(reply, error_response(ErrorCode::Unavailable, message));
        }
        let deadline = Instant::now() + BLOCKED_READ_TIMEOUT;
        self.blocked_reads.push(BlockedRead { group, request, client, reply, deadline });
    }

    /// Answers held reads whose node is fresh again, and fails those past their deadline.
    pub(super) fn answer_blocked_reads(&mut self) {
        if self.blocked_reads.is_empty() {
            return;
        }
        let now = Instant::now();
        let held = std::mem::take(&mut self.blocked_reads);
        for read in held {
            if !self.replica.is_fenced(&read.group) {
                self.handle_request(read.client, read.request, read.reply);
            } else if read.deadline <= now {
                let reason = self.replica.fencing_reason(&read.group).unwrap_or_default();
                let message = format!(
                    "group {:?} could not be read fresh within {BLOCKED_READ_TIMEOUT:?}: {reason} (the group's fencing policy is block)",
                    read.group
                );
                send(read.reply, error_response(ErrorCode::Unavailable, message));
            } else {
                self.blocked_reads.push(read);
            }
        }
    }

    pub(super) fn freshness(&self, group: &str) -> Freshness {
        let doc = self.replica.group(group);
        let stale_reason = self.replica.fencing_reason(group);
        Freshness {
            revision: self.replica.revision(group).unwrap_or(0),
            version: doc.map(|d| d.served_label()).unwrap_or_default(),
            age_ms: self
                .last_change
                .get(group)
                .map_or_else(|| self.started.elapsed().as_millis() as u64, |at| at.elapsed().as_millis() as u64),
            stale: stale_reason.is_some(),
            stale_reason,
        }
    }

    pub(super) fn write_meta(&self, client: &ClientInfo, meta: konor_sdk::protocol::WriteMeta) -> CommitMeta {
        let author = author(client, &meta.author, &self.node_id);
        let condition = konor_crdt::group::Condition { version: meta.if_version, content: meta.if_content };
        CommitMeta::new(author, meta.message, self.wall_clock()).with_condition(condition).with_secret(meta.secret)
    }

    pub(super) fn handle_call(&mut self, call: LocalCall) {
        match call {
            LocalCall::Request { client, request, reply } => self.handle_request(client, request, reply),
            LocalCall::Watch { client, group, from_revision, prefix, events, reply } => {
                let response = self.start_watch(&client, &group, from_revision, prefix, events);
                let _ = reply.send(response);
            }
            LocalCall::Enroll { ask, remote, reply } => {
                let _ = reply.send(self.enroll(ask, remote));
            }
            LocalCall::Health { reply } => {
                let _ = reply.send(self.health());
            }
            LocalCall::Disconnected { connection } => {
                for watchers in self.watchers.values_mut() {
                    watchers.retain(|w| w.connection != connection);
                }
                // A process's report rows (F16) are live as long as its connection, then history.
                let now = self.wall_clock().0;
                self.reports.disconnected(connection, now);
            }
        }
    }

    pub(super) fn start_watch(
        &mut self,
        client: &ClientInfo,
        group: &str,
        from_revision: Option<u64>,
        prefix: Option<String>,
        events: socket::WatchSender,
    ) -> Response {
        let Some(doc) = self.replica.group(group) else {
            return error_response(ErrorCode::UnknownGroup, format!("group {group:?} does not exist on this node"));
        };
        let revision = self.replica.revision(group).unwrap_or(0);
        if let Some(from) = from_revision {
            // A backlog that would fill most of the watcher's queue is replaced by one resync.
            let backlog = match self.replica.events_since(group, from) {
                Some(EventsSince::Events(backlog)) if backlog.len() < socket::WATCH_QUEUE_EVENTS / 2 => Some(backlog),
                _ => None,
            };
            match backlog {
                Some(backlog) => {
                    for notification in backlog {
                        let Some(event) = change_event(&notification, prefix.as_deref()) else { continue };
                        let event = self.for_client(client, event);
                        if events.try_send(event).is_err() {
                            return error_response(ErrorCode::Internal, "watch queue full");
                        }
                    }
                }
                None => {
                    let settings = settings_under(doc.served_settings(), prefix.as_deref());
                    let event =
                        WatchEvent::Resync { group: group.to_owned(), revision, version: doc.served_label(), settings };
                    let event = self.for_client(client, event);
                    if events.try_send(event).is_err() {
                        return error_response(ErrorCode::Internal, "watch queue full");
                    }
                }
            }
        }
        self.watchers.entry(group.to_owned()).or_default().push(Watcher {
            connection: client.connection,
            events,
            prefix,
            reveal: client.reveal,
        });
        Response::Watching { group: group.to_owned(), revision }
    }

    /// `event` as `client` may see it: masked unless it may reveal secrets.
    fn for_client(&self, client: &ClientInfo, event: WatchEvent) -> WatchEvent {
        if client.reveal {
            return event;
        }
        let group = match &event {
            WatchEvent::Change { group, .. } | WatchEvent::Resync { group, .. } => group,
        };
        crate::api::secret_mask::mask_event(self.secret_marks(group), &event).unwrap_or(event)
    }

    /// `response` as `client` may see it: secret values masked unless it may reveal them.
    fn answer_for(&self, client: &ClientInfo, response: Response) -> Response {
        if client.reveal {
            return response;
        }
        let group = match &response {
            Response::Value { group, .. }
            | Response::Snapshot { group, .. }
            | Response::Show { group, .. }
            | Response::History { group, .. }
            | Response::Diff { group, .. }
            | Response::Conflicts { group, .. } => group,
            _ => return response,
        };
        crate::api::secret_mask::mask_response(self.secret_marks(group), response)
    }

    pub(super) fn handle_request(&mut self, client: ClientInfo, request: Request, reply: oneshot::Sender<Response>) {
        let unknown = |group: &str| {
            error_response(
                ErrorCode::UnknownGroup,
                format!("group {group:?} does not exist on this node (create it, or join it with its key)"),
            )
        };
        let response = match request {
            Request::Get { .. } | Request::Snapshot { .. } if self.must_block(&request) => {
                return self.block_read(client, request, reply);
            }
            Request::Get { group, key } => match self.replica.group(&group) {
                Some(doc) => {
                    let value = doc.served_get(&key).cloned();
                    Response::Value { value, freshness: self.freshness(&group), group, key }
                }
                None => unknown(&group),
            },
            Request::Snapshot { group, prefix } => match self.replica.group(&group) {
                Some(doc) => {
                    let (settings, content_hash) = match prefix.as_deref() {
                        None => {
                            let served = doc.served_settings();
                            (settings_under(served, None), served.content_hash().to_hex())
                        }
                        Some(prefix) => {
                            let settings = settings_under(doc.served_settings(), Some(prefix));
                            let hash = konor_sdk::protocol::content_hash(&settings);
                            (settings, hash)
                        }
                    };
                    Response::Snapshot { settings, content_hash, freshness: self.freshness(&group), group }
                }
                None => unknown(&group),
            },
            Request::Show { group, version } => match self.replica.group(&group) {
                Some(doc) => match doc.resolve(&version).and_then(|info| Ok((info, doc.settings_at(&info.id)?))) {
                    Ok((info, settings)) => Response::Show {
                        version: version_row(doc, info),
                        settings: settings_under(&settings, None),
                        group,
                    },
                    Err(error) => error_response(ErrorCode::NotFound, error.to_string()),
                },
                None => unknown(&group),
            },
            Request::SchemaSet { group, schema, meta } => {
                let meta = self.write_meta(&client, meta);
                return self.command(Command::SetSchema { group, schema, meta }, PendingReply::Plain(reply));
            }
            Request::SchemaGet { group } => match self.replica.group(&group) {
                Some(doc) => {
                    // The newest version that set the schema the group holds (after concurrent
                    // sets, the one whose schema won; a stored schema this node cannot compile
                    // has no hash here, so no version is named for it).
                    let hash = doc.schema().map(konor_crdt::Schema::hash);
                    let version = doc
                        .history()
                        .rev()
                        .find(|v| {
                            matches!(&v.kind, konor_crdt::VersionKind::Schema { schema: Some(set) }
                                if Some(set) == hash.as_ref())
                        })
                        .map(|v| doc.label(&v.id));
                    Response::Schema {
                        schema: doc.schema().map(konor_crdt::Schema::to_value),
                        version,
                        unusable: doc.schema_unusable().map(str::to_owned),
                        group,
                    }
                }
                None => unknown(&group),
            },
            Request::SchemaCheck { group, format, text, schema } => match self.replica.group(&group) {
                Some(doc) => schema_check(doc, &format, &text, schema.as_ref()),
                None => unknown(&group),
            },
            Request::ReportApply { group, version, revision, result } => {
                // Rows only for groups this node holds, each message bounded: a client cannot
                // grow the daemon's memory with made-up group names or long messages.
                if self.replica.group(&group).is_none() {
                    return send(reply, unknown(&group));
                }
                let result = match result {
                    ApplyResult::Error { message } => {
                        ApplyResult::Error { message: crate::reports::cut(&message, REPORT_MESSAGE_BYTES_MAX) }
                    }
                    ok => ok,
                };
                // In a gated group, the release that serves this node what the process applied.
                let release = self.replica.group(&group).and_then(|doc| {
                    let (release, to) = doc.serving_release()?;
                    crate::reports::names(&version, to).then(|| release.storage_key())
                });
                let row = ProcessRow {
                    node: self.node_id.clone(),
                    pid: client.pid,
                    process: client.process.clone(),
                    version,
                    revision,
                    result,
                    time_ms: self.wall_clock().0,
                    gone_ms: None,
                    release,
                    superseded: false,
                    error_rate: None,
                };
                self.reports.report(&group, client.connection, row);
                Response::Done
            }
            Request::ReportErrorRate { group, rate } => {
                if self.replica.group(&group).is_none() {
                    return send(reply, unknown(&group));
                }
                if let Err(message) = error_rate_ppm(rate) {
                    return send(reply, error_response(ErrorCode::BadRequest, message));
                }
                if !self.reports.error_rate(&group, client.connection, client.pid, rate) {
                    return send(
                        reply,
                        error_response(
                            ErrorCode::BadRequest,
                            format!(
                                "no apply report from this connection for group {group:?}: report the version it runs first \
                                 (report_apply; the SDKs' on_change does)"
                            ),
                        ),
                    );
                }
                Response::Done
            }
            Request::GroupCreate { name, mode, key, evict_after_ms, fencing, release } => {
                let mode: Mode = match mode.parse() {
                    Ok(mode) => mode,
                    Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                };
                let mut policy = GroupPolicy::default();
                if let Some(ms) = evict_after_ms {
                    if ms < konor_crdt::limits::EVICT_AFTER_MIN_MS {
                        let message = format!(
                            "evict_after {ms} ms is below the minimum of {} ms (a member's read lease must run out before it is evicted)",
                            konor_crdt::limits::EVICT_AFTER_MIN_MS
                        );
                        return send(reply, error_response(ErrorCode::BadRequest, message));
                    }
                    policy.evict_after = Millis(ms);
                }
                if let Some(text) = fencing {
                    match text.parse::<Fencing>() {
                        Ok(fencing) => policy.fencing = fencing,
                        Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                    }
                }
                if let Some(text) = release {
                    match text.parse::<konor_crdt::ReleasePolicy>() {
                        Ok(release) => policy.release = release,
                        Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                    }
                }
                let key = match key {
                    Some(text) => match GroupKey::parse(text.expose()) {
                        Ok(key) => key,
                        Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                    },
                    None => self.draw_key(),
                };
                let meta =
                    CommitMeta::new(format!("{}@{}", client.process, self.node_id), "create group", self.wall_clock());
                let text = Secret::new(key.to_text());
                self.command(
                    Command::CreateGroup { name, mode, key, meta, policy },
                    PendingReply::Created { reply, key: text },
                );
                return;
            }
            Request::GroupJoin { name, key } => match GroupKey::parse(key.expose()) {
                Ok(key) => {
                    return self.command(Command::JoinGroup { name, key, repair: false }, PendingReply::Plain(reply));
                }
                Err(message) => error_response(ErrorCode::BadRequest, message),
            },
            Request::GroupRotateKey { name, key } => {
                let key = match key {
                    Some(text) => match GroupKey::parse(text.expose()) {
                        Ok(key) => key,
                        Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                    },
                    None => self.draw_key(),
                };
                let text = Secret::new(key.to_text());
                return self
                    .command(Command::RotateKey { group: name, key }, PendingReply::Created { reply, key: text });
            }
            Request::GroupLeave { name, force } => {
                return self.command(Command::LeaveGroup { name, force }, PendingReply::Plain(reply));
            }
            Request::GroupRemove { group, nodes, force } => {
                let message = format!("remove {}{}", nodes.join(", "), if force { " (forced)" } else { "" });
                let meta = CommitMeta::new(format!("{}@{}", client.process, self.node_id), message, self.wall_clock());
                let command = Command::RemoveMember { group, nodes, force, meta };
                return self.command(command, PendingReply::Plain(reply));
            }
            Request::GroupList => Response::Groups { groups: self.group_rows() },
            Request::Set { group, entries, meta } => {
                let meta = self.write_meta(&client, meta);
                let entries = entries.into_iter().collect();
                return self.command(Command::Set { group, entries, meta }, PendingReply::Plain(reply));
            }
            Request::Delete { group, keys, meta } => {
                let meta = self.write_meta(&client, meta);
                return self.command(Command::Delete { group, keys, meta }, PendingReply::Plain(reply));
            }
            Request::Apply { group, format, text, meta } => match format.parse::<FileFormat>() {
                Ok(format) => {
                    let meta = self.write_meta(&client, meta);
                    return self.command(Command::Apply { group, format, text, meta }, PendingReply::Plain(reply));
                }
                Err(error) => error_response(ErrorCode::BadRequest, error.to_string()),
            },
            Request::Rollback { group, version, meta } => {
                let meta = self.write_meta(&client, meta);
                return self.command(Command::Rollback { group, version, meta }, PendingReply::Plain(reply));
            }
            Request::Release {
                group,
                version,
                strategy,
                waves,
                selector,
                bake_ms,
                max_failed,
                max_error_rate,
                node_health,
                meta,
            } => {
                let strategy = match release_strategy(strategy.as_deref(), waves, selector.as_deref(), bake_ms) {
                    Ok(strategy) => strategy,
                    Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                };
                let max_error_rate_ppm = match max_error_rate.map(error_rate_ppm).transpose() {
                    Ok(ppm) => ppm,
                    Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                };
                let guards = konor_crdt::Guards {
                    max_failed: max_failed.unwrap_or(0),
                    max_error_rate_ppm,
                    node_health: node_health.unwrap_or(false),
                };
                let meta = self.write_meta(&client, meta);
                let command = Command::Release { group, version, strategy, guards, meta };
                return self.command(command, PendingReply::Plain(reply));
            }
            Request::Promote { group, wave, meta } => {
                // Waves are counted from 1 on the wire, from 0 in the core.
                let wave = match wave {
                    Some(0) => {
                        return send(reply, error_response(ErrorCode::BadRequest, "waves are counted from 1"));
                    }
                    other => other.map(|w| w - 1),
                };
                let meta = self.write_meta(&client, meta);
                return self.command(Command::Promote { group, wave, meta }, PendingReply::Plain(reply));
            }
            Request::Abort { group, reason, meta } => {
                let meta = self.write_meta(&client, meta);
                let reason = reason.unwrap_or_else(|| "aborted by an operator".to_owned());
                return self.command(Command::Abort { group, reason, meta }, PendingReply::Plain(reply));
            }
            Request::History { group } => match self.replica.group(&group) {
                Some(doc) => {
                    Response::History { versions: doc.history().map(|v| version_row(doc, v)).collect(), group }
                }
                None => unknown(&group),
            },
            Request::Diff { group, from, to } => match self.replica.group(&group) {
                Some(doc) => {
                    let ids = doc
                        .resolve(&from)
                        .map(|a| a.id.clone())
                        .and_then(|a| doc.resolve(&to).map(|b| (a, b.id.clone())));
                    match ids.and_then(|(a, b)| doc.diff(&a, &b)) {
                        Ok(diff) => Response::Diff {
                            added: diff.added.into_iter().collect(),
                            removed: diff.removed.into_iter().collect(),
                            changed: diff.changed.into_iter().map(|c| (c.key, (c.old, c.new))).collect(),
                            group,
                        },
                        Err(error) => error_response(ErrorCode::NotFound, error.to_string()),
                    }
                }
                None => unknown(&group),
            },
            Request::Conflicts { group } => match self.replica.group(&group) {
                Some(doc) => Response::Conflicts {
                    conflicts: doc
                        .conflicts()
                        .into_iter()
                        .map(|c| ConflictRow {
                            key: c.key,
                            winner: c.winner.value,
                            winner_version: c.winner.version.map(|v| doc.label(&v)),
                            losers: c.losers.into_iter().map(|l| (l.value, l.version.map(|v| doc.label(&v)))).collect(),
                        })
                        .collect(),
                    group,
                },
                None => unknown(&group),
            },
            Request::Nodes => Response::Nodes { nodes: self.node_rows() },
            Request::Status { group } => self.status(&group),
            Request::ReleaseReport { group, limit, release } => self.release_report(&group, limit, release.as_deref()),
            Request::Health => Response::Health { health: Box::new(self.health()) },
            Request::Alerts => {
                Response::Alerts { alerts: Alerts { active: self.alerts.active(), history: self.alerts.history() } }
            }
            Request::NodeHistory { node } => self.node_history(node),
            Request::Revoke { revocation } => self.revoke(&revocation),
            Request::Revocations => self.revocation_rows(),
            Request::Audit { since_ms, group, node } => {
                // Read off the daemon's thread (the files can be large); answered from there.
                let Some(audit) = self.audit_log() else {
                    return send(reply, error_response(ErrorCode::Unavailable, "this node keeps no audit log"));
                };
                tokio::task::spawn_blocking(move || {
                    let query = crate::audit::Query { since_ms, group, node };
                    let answer = audit.query(&query, &|| reply.is_closed());
                    let _ = reply.send(answer);
                });
                return;
            }
            Request::Hello { .. } | Request::Watch { .. } | Request::Unwatch { .. } | Request::SocketStats => {
                error_response(ErrorCode::Protocol, "handled by the socket layer")
            }
        };
        send(reply, self.answer_for(&client, response));
    }

    /// What the failure detector saw over the last hours (`konorctl node-history`).
    fn node_history(&self, node: Option<String>) -> Response {
        let Some(history) = &self.history else {
            return error_response(ErrorCode::Unavailable, "this node keeps no health history");
        };
        match node {
            Some(node) => match history.node(&node) {
                Some(history) => Response::NodeHistory { history },
                None => error_response(
                    ErrorCode::NotFound,
                    format!("no history of node {node:?} here (not seen in the last six hours)"),
                ),
            },
            None => {
                let window_ms = crate::health::history::SUMMARY_WINDOW_MS;
                Response::MeshHistory {
                    history: MeshHistory {
                        window_ms,
                        nodes: history.summaries(self.wall_clock().0, window_ms),
                        labels: history.labels(),
                        live_by_minute: history.live_by_minute(self.wall_clock().0, window_ms),
                    },
                }
            }
        }
    }

    /// The node's health now (`/api/v1/health`, `/metrics`).
    pub(super) fn health(&self) -> NodeHealth {
        let mut members = MemberCounts::default();
        for node in self.mesh.nodes.values() {
            let count = match node.liveness {
                Liveness::Live => &mut members.live,
                Liveness::Unknown => &mut members.unknown,
                Liveness::Dead => &mut members.dead,
                Liveness::Leaving => &mut members.leaving,
            };
            *count += 1;
        }
        let groups = self
            .group_rows()
            .into_iter()
            .map(|row| {
                let stale_reason = self.replica.fencing_reason(&row.name);
                let since_change =
                    self.last_change.get(&row.name).map_or_else(|| self.started.elapsed(), |at| at.elapsed());
                let release = self.release_health(&row.name);
                GroupHealth {
                    release,
                    since_change_ms: since_change.as_millis() as u64,
                    members: row.members.len() as u64,
                    stale: stale_reason.is_some(),
                    stale_reason,
                    name: row.name,
                    mode: row.mode,
                    revision: row.revision,
                }
            })
            .collect();
        NodeHealth {
            node_id: self.node_id.clone(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            members,
            groups,
            degraded: self.degraded.clone(),
            queues: QueueDepths {
                calls: self.calls_waiting as u64,
                pending_commands: self.pending.len() as u64,
                blocked_reads: self.blocked_reads.len() as u64,
                watchers: self.watchers.values().map(|w| w.len() as u64).sum(),
            },
            dropped: DroppedCounts {
                peer_messages: self.stats.peer_messages_dropped.load(Ordering::Relaxed),
                persist_failures: self.stats.persist_failures.load(Ordering::Relaxed),
            },
            alerts: self.alerts.active(),
            mesh: MeshCapacity {
                nodes: self.mesh.nodes.len() as u64,
                cap: self.membership.nodes_max() as u64,
                at_cap: self.mesh.over_cap || self.cap_refusals.refusing(),
                refused: self.cap_refusals.total,
            },
        }
    }

    pub(super) fn group_rows(&self) -> Vec<GroupRow> {
        self.replica
            .group_names()
            .filter_map(|name| {
                let doc = self.replica.group(name)?;
                let mut members: Vec<String> =
                    self.replica.members(name).into_iter().map(|(node, _, _)| node).collect();
                members.push(self.node_id.clone());
                members.sort();
                Some(GroupRow {
                    name: name.to_owned(),
                    mode: doc.mode().to_string(),
                    version: doc.latest_label(),
                    revision: self.replica.revision(name).unwrap_or(0),
                    keys: doc.settings().len(),
                    members,
                })
            })
            .collect()
    }

    pub(super) fn node_rows(&self) -> Vec<NodeRow> {
        self.mesh
            .nodes
            .values()
            .map(|node| NodeRow {
                id: node.id.clone(),
                address: node.addr.to_string(),
                labels: node.labels.clone(),
                state: match node.liveness {
                    Liveness::Live => "live",
                    Liveness::Unknown => "unknown",
                    Liveness::Dead => "dead",
                    Liveness::Leaving => "leaving",
                }
                .to_owned(),
                last_heartbeat_ms: node.heartbeat_age.map(|age| age.as_millis() as u64),
                is_self: node.id == self.node_id,
                degraded: (node.id == self.node_id).then(|| self.degraded_text()).flatten(),
            })
            .collect()
    }

    pub(super) fn status(&self, group: &str) -> Response {
        let Some(doc) = self.replica.group(group) else {
            return error_response(ErrorCode::UnknownGroup, format!("group {group:?} does not exist on this node"));
        };
        let keys = self.replica.keyring(group);
        let mut nodes = vec![NodeGroupRow {
            node: self.node_id.clone(),
            version: doc.served_label(),
            revision: self.replica.revision(group).unwrap_or(0),
            heads: doc.heads_digest().to_string(),
            live: true,
            key: keys.filter(|keys| keys.generation() > 0).map(|keys| keys.id(group).encode()),
            other_key: false,
        }];
        let members = self.replica.members(group).into_iter().map(|member| (member, false));
        let others = self.replica.other_key_claims(group).into_iter().map(|claim| (claim, true));
        for ((node, live, gossip), other_key) in members.chain(others) {
            nodes.push(NodeGroupRow {
                node,
                version: gossip.version,
                revision: gossip.revision,
                heads: gossip.digest.to_string(),
                live,
                key: gossip.key.map(|id| id.encode()),
                other_key,
            });
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        // This node's processes, then every other member's as its gossip tells them (F16).
        let processes = self.process_rows(group);
        let quorum = self.replica.quorum_info(group);
        Response::Status {
            group: group.to_owned(),
            mode: doc.mode().to_string(),
            nodes,
            processes,
            members: quorum.as_ref().map(|q| q.members.clone()).unwrap_or_default(),
            live: quorum.as_ref().map(|q| q.live.clone()).unwrap_or_default(),
            quorum: quorum.as_ref().map_or(1, |q| q.quorum),
            last_write: quorum.as_ref().and_then(|q| q.last_commit.clone()),
            fenced: quorum.as_ref().is_some_and(|q| q.fenced),
            fenced_reason: quorum.as_ref().and_then(|q| q.fenced_reason.clone()),
            configuration: quorum.as_ref().and_then(|q| q.configuration.as_ref().map(ToString::to_string)),
            unknown: quorum.as_ref().map(|q| q.unknown.clone()).unwrap_or_default(),
            degraded: self.degraded_text(),
            release: doc.is_gated().then(|| Box::new(release_state(doc))),
        }
    }

    /// A gated group's newest `limit` releases (default 1), desired against actual (F16, F28).
    pub(super) fn release_report(&self, group: &str, limit: Option<u32>, release: Option<&str>) -> Response {
        let Some(doc) = self.replica.group(group) else {
            return error_response(ErrorCode::UnknownGroup, format!("group {group:?} does not exist on this node"));
        };
        if !doc.is_gated() {
            return error_response(
                ErrorCode::BadRequest,
                format!("group {group:?} serves every version at once: releases need a gated group"),
            );
        }
        let limit = limit.unwrap_or(1) as usize;
        if limit == 0 || limit > RELEASE_REPORT_MAX {
            return error_response(
                ErrorCode::BadRequest,
                format!("limit must be 1 to {RELEASE_REPORT_MAX} releases, not {limit}"),
            );
        }
        let which = release.map_or(Which::Newest(limit), Which::One);
        let releases = release_reports(doc, &self.release_members(group), &self.process_rows(group), which);
        if let (Some(release), true) = (release, releases.is_empty()) {
            return error_response(ErrorCode::NotFound, format!("group {group:?} has no release {release:?}"));
        }
        Response::ReleaseReport { group: group.to_owned(), releases }
    }

    /// A gated group's newest release as `health` and the metrics carry it.
    fn release_health(&self, group: &str) -> Option<konor_sdk::health::ReleaseHealth> {
        let doc = self.replica.group(group).filter(|doc| doc.is_gated())?;
        let report =
            release_reports(doc, &self.release_members(group), &self.process_rows(group), Which::Newest(1)).pop()?;
        let targeted = report.nodes.iter().filter(|node| node.targeted);
        Some(konor_sdk::health::ReleaseHealth {
            label: report.release.label,
            outcome: report.outcome,
            wave: report.release.wave.unwrap_or(1),
            targeted: targeted.clone().count() as u64,
            done: targeted.filter(|node| node.done).count() as u64,
            processes_ok: u64::from(report.processes_ok),
            processes_failed: u64::from(report.processes_failed),
            time_to_consistency_ms: report.time_to_consistency_ms,
        })
    }

    /// The members of `group` as a release report sees them: this node, then every other member
    /// with the labels and served version its gossip tells.
    pub(super) fn release_members(&self, group: &str) -> Vec<Member> {
        let Some(doc) = self.replica.group(group) else { return Vec::new() };
        let labels_of = |node: &str| self.mesh.nodes.get(node).map(|mesh| mesh.labels.clone()).unwrap_or_default();
        let mut members = vec![Member {
            node: self.node_id.clone(),
            labels: labels_of(&self.node_id),
            live: true,
            serving: doc.served_label(),
        }];
        // Every member this node knows of, also one whose gossip has not arrived yet (a member
        // that just joined): it serves nothing known here, so a release waits for it.
        let gossiped: BTreeMap<String, String> =
            self.replica.members(group).into_iter().map(|(node, _, gossip)| (node, gossip.version)).collect();
        for (node, liveness) in self.replica.member_liveness(group) {
            let live = liveness == konor_crdt::replica::PeerLiveness::Live;
            let serving = gossiped.get(&node).cloned().unwrap_or_default();
            members.push(Member { labels: labels_of(&node), node, live, serving });
        }
        members.sort_by(|a, b| a.node.cmp(&b.node));
        members.dedup_by(|a, b| a.node == b.node);
        members
    }

    /// Why this node is degraded (a failed write to its disk), if it is.
    pub(super) fn degraded_text(&self) -> Option<String> {
        let errors: Vec<&str> = self.degraded.values().map(String::as_str).collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }
}

pub(super) fn send(reply: oneshot::Sender<Response>, response: Response) {
    let _ = reply.send(response);
}

/// Used by `ApplyResult` consumers in tests and status rendering.
pub fn apply_result_text(result: &ApplyResult) -> String {
    match result {
        ApplyResult::Ok => "ok".to_owned(),
        ApplyResult::Error { message } => format!("error: {message}"),
    }
}

/// The settings whose key starts with `prefix` (all of them without one), as the wire carries
/// them.
pub(super) fn settings_under(settings: &konor_crdt::Settings, prefix: Option<&str>) -> BTreeMap<String, Value> {
    settings
        .iter()
        .filter(|(key, _)| prefix.is_none_or(|prefix| key.starts_with(prefix)))
        .map(|(key, value)| (key.to_owned(), value.clone()))
        .collect()
}

/// The watch event a notification makes for a watcher of `prefix`: only the keys under it, and
/// nothing at all when the change touched none of them (a change that touched no key, such as a
/// schema version, reaches only watchers of the whole group).
pub(super) fn change_event(notification: &Notification, prefix: Option<&str>) -> Option<WatchEvent> {
    let under = |key: &str| prefix.is_none_or(|prefix| key.starts_with(prefix));
    let set: BTreeMap<String, Value> =
        notification.set.iter().filter(|(key, _)| under(key)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let removed: Vec<String> = notification.removed.iter().filter(|key| under(key)).cloned().collect();
    if prefix.is_some() && set.is_empty() && removed.is_empty() {
        return None;
    }
    Some(WatchEvent::Change {
        group: notification.group.clone(),
        revision: notification.revision,
        version: notification.version.clone(),
        set,
        removed,
    })
}

/// The strategy a `release` request asks for: `all` (the default) or `canary` with its waves
/// (`[10, 50, 100]`), selector (`region=eu`) and bake time; the core checks the limits.
fn release_strategy(
    strategy: Option<&str>,
    waves: Option<Vec<u8>>,
    selector: Option<&str>,
    bake_ms: Option<u64>,
) -> Result<konor_crdt::ReleaseStrategy, String> {
    match strategy.unwrap_or("all") {
        "all" => {
            if waves.is_some() || selector.is_some() || bake_ms.is_some() {
                return Err("waves, selector and bake_ms belong to strategy canary".to_owned());
            }
            Ok(konor_crdt::ReleaseStrategy::All)
        }
        "canary" => {
            let selector = konor_crdt::configuration::parse_selector(selector.unwrap_or_default())?;
            let waves = waves.ok_or("a canary names its waves (percentages: [10, 50, 100])")?;
            Ok(konor_crdt::ReleaseStrategy::Canary(konor_crdt::Canary {
                waves,
                selector,
                bake_ms: bake_ms.unwrap_or(0),
            }))
        }
        other => Err(format!("unknown release strategy {other:?}: use all or canary")),
    }
}

/// An error rate (a fraction, 0 to 1) in parts per million, or why it is not one.
fn error_rate_ppm(rate: f64) -> Result<u32, String> {
    if !rate.is_finite() || !(0.0..=1.0).contains(&rate) {
        return Err(format!("an error rate is a fraction from 0 to 1 (0.02 is 2%), not {rate}"));
    }
    Ok((rate * f64::from(konor_crdt::configuration::PPM)).round() as u32)
}

/// A gated group's release state as this node sees it (SPEC F14).
fn release_state(doc: &konor_crdt::GroupDoc) -> konor_sdk::protocol::ReleaseState {
    let current =
        doc.current_release().and_then(|(id, info)| crate::reports::release_report::release_row(doc, id, info));
    // The newest version that wrote settings (not a release, promotion, abort, schema or
    // membership version).
    let latest = doc
        .history()
        .rev()
        .find(|v| matches!(v.kind.name(), "create" | "set" | "delete" | "apply" | "rollback"))
        .map_or_else(|| doc.latest_label(), |v| doc.label(&v.id));
    konor_sdk::protocol::ReleaseState { served: doc.served_label(), latest, current }
}

/// A version as listings show it.
fn version_row(doc: &konor_crdt::GroupDoc, version: &konor_crdt::VersionInfo) -> VersionRow {
    VersionRow {
        label: doc.label(&version.id),
        author: version.author.clone(),
        time_ms: version.time.0,
        message: version.message.clone(),
        kind: version.kind.name().to_owned(),
        content_hash: version.content_hash.get(..12).unwrap_or_default().to_owned(),
        parents: version.parents.iter().map(|p| doc.label(p)).collect(),
        secret: version.secret.clone(),
    }
}

/// What a settings file breaks of the group's schema (or of `candidate`), without writing.
fn schema_check(doc: &konor_crdt::GroupDoc, format: &str, text: &str, candidate: Option<&Value>) -> Response {
    let bad = |message: String| error_response(ErrorCode::BadRequest, message);
    let format = match format.parse::<FileFormat>() {
        Ok(format) => format,
        Err(error) => return bad(error.to_string()),
    };
    let settings = match konor_crdt::config_file::parse_config_file(text, format) {
        Ok(settings) => settings,
        Err(error) => return bad(error.to_string()),
    };
    let violations = match candidate {
        Some(schema) => konor_crdt::Schema::compile(schema).map(|schema| schema.violations(&settings)),
        None => return schema_check_answer(doc, settings.len(), doc.check_against_schema(&settings)),
    };
    match violations {
        Ok(violations) => schema_check_answer(doc, settings.len(), Ok(violations)),
        Err(error) => bad(error.to_string()),
    }
}

fn schema_check_answer(
    doc: &konor_crdt::GroupDoc,
    keys: usize,
    violations: Result<Vec<konor_crdt::Violation>, konor_crdt::EditError>,
) -> Response {
    match violations {
        Ok(violations) => Response::SchemaCheck {
            group: doc.name().to_owned(),
            keys,
            violations: violations
                .into_iter()
                .map(|v| ViolationRow { key: v.key, value: v.value, rule: v.rule, message: v.message })
                .collect(),
        },
        Err(error) => error_response(ErrorCode::BadRequest, error.to_string()),
    }
}

#[cfg(test)]
mod author_tests {
    use super::*;

    fn client(user: Option<&str>) -> ClientInfo {
        ClientInfo {
            connection: 1,
            pid: 1,
            process: "konorctl".into(),
            uid: None,
            user: user.map(str::to_owned),
            reveal: true,
        }
    }

    #[test]
    fn the_author_is_the_authenticated_user_and_a_claim_is_marked_as_one() {
        assert_eq!(author(&client(Some("alice")), "", "n1"), "alice@n1");
        assert_eq!(author(&client(Some("alice")), "alice", "n1"), "alice@n1");
        assert_eq!(author(&client(Some("deploy")), "bob", "n1"), "deploy@n1 (bob)");
        let long = "x".repeat(konor_crdt::limits::AUTHOR_BYTES_MAX);
        let bounded = author(&client(Some("deploy")), &long, "n1");
        assert!(
            bounded.starts_with("deploy@n1 (") && bounded.len() <= konor_crdt::limits::AUTHOR_BYTES_MAX,
            "{bounded}"
        );
        assert_eq!(author(&client(None), "", "n1"), "konorctl@n1");
        assert_eq!(author(&client(None), "bob", "n1"), "bob");
    }
}
