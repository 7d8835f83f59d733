"""The blocking client: reads, writes, watches, apply reports and a local read cache."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union

from .canon import content_hash
from .connection import Connection, DaemonUid, NotSent, connection_error
from .errors import (
    ConnectionClosedError,
    DaemonError,
    IdleError,
    InternalError,
    KonorError,
    KonorTimeoutError,
    ProtocolError,
    UnavailableError,
)
from .wire import (
    TIMEOUT_DEFAULT,
    UNSET,
    Change,
    Committed,
    Resync,
    Settings,
    Snapshot,
    WatchEvent,
    apply_event,
    daemon_uid_from_env,
    expect,
    read_committed,
    read_event,
    read_snapshot,
    read_value,
    read_watching,
    resolve_socket,
    write_meta,
    RESERVED_REQUESTS,
)

__all__ = ["Client", "Watch", "ChangeHandle", "CachedGroup", "RECONNECT_BACKOFF_MIN", "RECONNECT_BACKOFF_MAX"]

log = logging.getLogger("konorkestra")

#: First pause before a watch reconnects, seconds; it doubles up to RECONNECT_BACKOFF_MAX.
RECONNECT_BACKOFF_MIN = 0.05

#: Longest pause between a watch's reconnect attempts: a restarted daemon is picked up within 2 s.
RECONNECT_BACKOFF_MAX = 2.0

_NOT_GIVEN: Any = object()

#: Requests that change nothing, sent again once when their connection closed under them.
_READS = frozenset({"get", "snapshot", "history", "diff", "conflicts", "nodes", "status", "group_list", "socket_stats"})


class Client:
    """A connection to the local konord. Thread-safe: calls from many threads take turns on one
    connection (the daemon answers reads from memory in microseconds). After the connection
    drops, the next call reconnects; a read that crossed a closing connection, and any request
    the daemon closed as ``idle``, is sent again.

    ``socket_path``: the argument, else ``KONOR_SOCKET`` (konord has no default data dir, so no
    default path). ``daemon_uid``: the uid accepted as konord's besides root and our own
    (``"any"``: no check; default ``KONOR_DAEMON_UID``). ``process`` names this process in the
    daemon's status (versions are authored by this process's user, ``<user>@<node>``)."""

    def __init__(
        self,
        socket_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        timeout: float = TIMEOUT_DEFAULT,
        daemon_uid: DaemonUid = _NOT_GIVEN,
        process: Optional[str] = None,
    ) -> None:
        self.path = resolve_socket(socket_path)
        self.timeout = timeout
        self.daemon_uid: DaemonUid = daemon_uid_from_env() if daemon_uid is _NOT_GIVEN else daemon_uid
        self.process = process
        self._lock = threading.Lock()
        self._connection: Optional[Connection] = self._connect()
        self.node_id = self._connection.node_id

    def _connect(self) -> Connection:
        return Connection(self.path, self.timeout, self.daemon_uid, self.process)

    def close(self) -> None:
        """Closes the connection (watches, handles and caches have their own)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the raw door ----------------------------------------------------------------------

    def call(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """Sends one request (a dict with ``type``, as in docs/protocol.md) and returns the
        answer's body. An ``error`` answer is raised as its DaemonError subclass. The whole
        call, waiting for its turn on the connection included, takes at most ``timeout``
        (a reconnect adds its own connect, at most ``timeout`` more)."""
        kind = str(request.get("type", ""))
        if kind in RESERVED_REQUESTS:
            raise ValueError(f"`{kind}` cannot go through call(): use watch() (a watch needs a connection of its own)")
        deadline = time.monotonic() + self.timeout
        attempts = 0
        while True:
            attempts += 1
            if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
                raise KonorTimeoutError(self.timeout)
            try:
                if self._connection is None:
                    self._connection = self._connect()
                    self.node_id = self._connection.node_id
                connection = self._connection
                try:
                    body = connection.exchange(request, deadline)
                except (NotSent, IdleError):
                    # The daemon cannot have handled it (it never arrived whole, or the
                    # connection was closed as idle before it): again, on a new connection.
                    self._drop(connection)
                    if attempts > 2 or time.monotonic() >= deadline:
                        raise
                    continue
                except ConnectionClosedError:
                    # It may have been handled: only a read goes again.
                    self._drop(connection)
                    if kind in _READS and attempts <= 2 and time.monotonic() < deadline:
                        continue
                    raise
                except (KonorTimeoutError, ProtocolError):
                    # The stream may hold a late answer or half a frame: start afresh.
                    self._drop(connection)
                    raise
                except DaemonError:
                    # An id-0 error: the daemon closes the connection after it.
                    self._drop(connection)
                    raise
            finally:
                self._lock.release()
            if body["type"] == "error":
                expect(body, "error")  # raises the daemon's refusal as its DaemonError
            return body

    def _drop(self, connection: Connection) -> None:
        connection.close()
        if self._connection is connection:
            self._connection = None

    # -- reads -----------------------------------------------------------------------------

    def get(self, group: str, key: str, default: Any = UNSET) -> Any:
        """The value of ``key``: ``None`` when it is set to JSON null, ``default`` (``UNSET``
        unless given) when it is not set."""
        value = read_value(self.call({"type": "get", "group": group, "key": key}))
        return default if value is UNSET else value

    def snapshot(self, group: str, prefix: Optional[str] = None) -> Snapshot:
        """All settings of ``group`` (or those whose key starts with ``prefix``) with version,
        revision and freshness; the content hash (of the keys returned) is recomputed here and
        must match the daemon's."""
        request: Dict[str, Any] = {"type": "snapshot", "group": group}
        if prefix is not None:
            request["prefix"] = prefix
        return read_snapshot(self.call(request))

    def history(self, group: str) -> List[Dict[str, Any]]:
        """The versions of ``group``, oldest first (rows as docs/protocol.md shows them)."""
        body = expect(self.call({"type": "history", "group": group}), "history")
        return _rows(body, "versions")

    def status(self, group: str) -> Dict[str, Any]:
        """The group's state on each node and in each local process (the ``status`` answer)."""
        return expect(self.call({"type": "status", "group": group}), "status")

    def nodes(self) -> List[Dict[str, Any]]:
        """The mesh as this node sees it."""
        return _rows(expect(self.call({"type": "nodes"}), "nodes"), "nodes")

    def groups(self) -> List[Dict[str, Any]]:
        """The groups this node holds."""
        return _rows(expect(self.call({"type": "group_list"}), "groups"), "groups")

    # -- writes ----------------------------------------------------------------------------

    def set(
        self, group: str, entries: Mapping[str, Any], *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None, secret: Iterable[str] = (),
    ) -> Committed:
        """Sets keys (dotted names) to JSON values. The daemon authors the version as this
        process's user, ``<user>@<node>``; an ``author`` given follows in parentheses, as a
        claim. ``secret`` names keys to mark secret: from then on callers that may not reveal
        secrets (viewers) read their values as ``MASKED``; a mark is never taken back. A write
        that changes nothing raises UnchangedError."""
        return read_committed(
            self.call({"type": "set", "group": group, "entries": dict(entries),
                       "meta": write_meta(author, message, if_version, if_content, secret)})
        )

    def delete(
        self, group: str, keys: Iterable[str], *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None,
    ) -> Committed:
        """Removes keys."""
        request = {"type": "delete", "group": group, "keys": list(keys),
                   "meta": write_meta(author, message, if_version, if_content)}
        return read_committed(self.call(request))

    def apply(
        self, group: str, text: str, format: str = "toml", *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None,
    ) -> Committed:
        """Replaces the settings with a whole file's (``format``: toml, yaml or json)."""
        request = {"type": "apply", "group": group, "format": format, "text": text,
                   "meta": write_meta(author, message, if_version, if_content)}
        return read_committed(self.call(request))

    def rollback(
        self, group: str, version: str, *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None,
    ) -> Committed:
        """A new version whose settings are those of ``version``."""
        request = {"type": "rollback", "group": group, "version": version,
                   "meta": write_meta(author, message, if_version, if_content)}
        return read_committed(self.call(request))

    # -- groups ----------------------------------------------------------------------------

    def create_group(
        self,
        name: str,
        mode: str = "eventual",
        *,
        key: Optional[str] = None,
        evict_after_ms: Optional[int] = None,
        fencing: Optional[str] = None,
    ) -> str:
        """Creates a group on this node and returns its key (64 hex digits): share it with the
        nodes that should join. Treat the key as a secret."""
        request: Dict[str, Any] = {"type": "group_create", "name": name, "mode": mode, "key": key}
        if evict_after_ms is not None:
            request["evict_after_ms"] = evict_after_ms
        if fencing is not None:
            request["fencing"] = fencing
        created = expect(self.call(request), "group_created")
        group_key = created.get("key")
        if not isinstance(group_key, str):
            raise ProtocolError("a `group_created` answer without the key")
        return group_key

    def join_group(self, name: str, key: str) -> str:
        """Joins a group with its key; returns the version received."""
        joined = expect(self.call({"type": "group_join", "name": name, "key": key}), "joined")
        version = joined.get("version")
        if not isinstance(version, str):
            raise ProtocolError("a `joined` answer without the version")
        return version

    def leave_group(self, name: str, *, force: bool = False) -> None:
        """Leaves a group on this node."""
        expect(self.call({"type": "group_leave", "name": name, "force": force}), "done")

    # -- reports, watches, callbacks, caches -------------------------------------------------

    def report_apply(self, group: str, version: str, revision: int, error: Optional[str] = None) -> None:
        """Tells the daemon this process applied ``version`` (or failed to: ``error``). The
        report is shown in ``status`` while this client's connection lives."""
        result: Dict[str, str] = {"status": "ok"} if error is None else {"status": "error", "message": error}
        request = {"type": "report_apply", "group": group, "version": version, "revision": revision, "result": result}
        expect(self.call(request), "done")

    def report_error_rate(self, group: str, rate: float) -> None:
        """Tells the daemon this process's error rate (failed requests over all, 0 to 1) while it
        runs what it last reported applying: a release with a ``max_error_rate`` guard is rolled
        back when a process on a node it targets reports more. Report what you applied first
        (``on_change`` does), on this client."""
        expect(self.call({"type": "report_error_rate", "group": group, "rate": rate}), "done")

    def watch(self, group: str, from_revision: Optional[int] = None, *, prefix: Optional[str] = None) -> "Watch":
        """Every change of ``group`` after ``from_revision`` (``None``: from now on), on a
        connection of its own, resumed across dropped connections and daemon restarts. With
        ``prefix``, only changes to keys that start with it."""
        return Watch(self, group, from_revision, prefix)

    def on_change(self, group: str, callback: Callable[[WatchEvent, Settings], None]) -> "ChangeHandle":
        """Runs ``callback(event, settings)`` on a thread of its own: first with the current
        state (as a Resync), then on every change, and reports each outcome to the daemon
        (success, or the exception's text). Returns a handle to stop it."""
        return ChangeHandle(self, group, callback)

    def cached(self, group: str) -> "CachedGroup":
        """The group kept in memory (a snapshot plus a watch from its revision): reads do not
        cross the socket."""
        return CachedGroup(self, group)


def _rows(body: Mapping[str, Any], name: str) -> List[Dict[str, Any]]:
    rows = body.get(name)
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ProtocolError(f"a `{body.get('type')}` answer without the list `{name}`")
    return rows


def _is_final(error: KonorError) -> bool:
    """Errors a reconnect cannot cure: the daemon refused the subscription (unknown group, ...),
    speaks another protocol, or is not trusted. Internal ("too many connections", "watch queue
    full"), unavailable and idle pass, so the watch retries."""
    if isinstance(error, DaemonError):
        return not isinstance(error, (InternalError, UnavailableError, IdleError))
    return not isinstance(error, (ConnectionClosedError, KonorTimeoutError)) and not _is_connect(error)


def _is_connect(error: KonorError) -> bool:
    from .errors import ConnectError

    return isinstance(error, ConnectError)


class Watch:
    """Iterate to receive events (``for event in watch``). Every change after the starting
    revision arrives exactly once, in order, or a ``Resync`` replaces the state. A dropped
    connection or a daemon restart is resumed from the last revision delivered (pauses of 50 ms
    doubling to 2 s, kept across calls, so polling with a short timeout still reconnects).
    Iteration ends after ``close()``; an error a reconnect cannot cure (the group is gone) is
    raised once."""

    def __init__(
        self, client: Client, group: str, from_revision: Optional[int], prefix: Optional[str] = None
    ) -> None:
        self.group = group
        self._prefix = prefix
        self._client = client
        self._closed = threading.Event()
        # Held while a thread reads the connection: close() then only shuts it down (the reader
        # closes it); otherwise close() closes it at once.
        self._reading = threading.Lock()
        self._connection: Optional[Connection] = None
        self._backoff = RECONNECT_BACKOFF_MIN
        self._retry_at = 0.0
        revision = self._open(from_revision)
        #: The revision of the last event delivered (or the starting revision).
        self.last_revision = from_revision if from_revision is not None else revision

    def _open(self, from_revision: Optional[int]) -> int:
        client = self._client
        connection = Connection(client.path, client.timeout, client.daemon_uid, client.process)
        try:
            request: Dict[str, Any] = {"type": "watch", "group": self.group, "from_revision": from_revision}
            if self._prefix is not None:
                request["prefix"] = self._prefix
            revision = read_watching(connection.exchange(request, time.monotonic() + client.timeout))
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        if self._closed.is_set():
            self._lose(connection)
        return revision

    def close(self) -> None:
        """Ends the watch (from any thread); an iteration in progress stops."""
        self._closed.set()
        connection = self._connection
        if connection is None:
            return
        if self._reading.acquire(blocking=False):
            try:
                self._lose(connection)
            finally:
                self._reading.release()
        else:
            connection.shutdown()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event

    def next_event(self, timeout: Optional[float] = None) -> Optional[WatchEvent]:
        """The next event; ``None`` once closed, or when ``timeout`` seconds pass first (a
        reconnect in progress may add up to the client's timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._reading:
            try:
                return self._next(deadline)
            finally:
                if self._closed.is_set() and self._connection is not None:
                    self._lose(self._connection)

    def _next(self, deadline: Optional[float]) -> Optional[WatchEvent]:
        while not self._closed.is_set():
            connection = self._connection
            if connection is None:
                wait = self._retry_at - time.monotonic()
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if wait > 0 and self._closed.wait(wait):
                    return None
                if time.monotonic() < self._retry_at:
                    return None  # the deadline came first; the next call goes on waiting
                try:
                    self._open(self.last_revision)
                    log.debug("watch of %s resubscribed from revision %d", self.group, self.last_revision)
                    self._backoff = RECONNECT_BACKOFF_MIN
                except KonorError as error:
                    if _is_final(error):
                        self._closed.set()
                        raise
                    self._retry_at = time.monotonic() + self._backoff
                    self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_MAX)
                continue
            try:
                kind, answer_id, body = connection.read_frame(deadline)
            except KonorTimeoutError:
                return None
            except (ConnectionClosedError, ProtocolError) as error:
                log.debug("watch of %s lost its connection (%s); resuming", self.group, error)
                self._lose(connection)
                continue
            if kind == "response":
                if answer_id == 0:
                    log.debug("watch of %s closed by the daemon: %s", self.group, connection_error(body))
                    self._lose(connection)
                continue
            try:
                event = read_event(body)
            except ProtocolError as error:
                log.warning("watch of %s: unreadable event (%s); resuming", self.group, error)
                self._lose(connection)
                continue
            if event is None:
                log.info("watch of %s: skipping an event of unknown type %r", self.group, body.get("type"))
                continue
            if isinstance(event, Change) and event.revision <= self.last_revision:
                continue
            self.last_revision = event.revision
            return event
        return None

    def _lose(self, connection: Connection) -> None:
        connection.close()
        if self._connection is connection:
            self._connection = None
            self._retry_at = time.monotonic() + self._backoff


class ChangeHandle:
    """A running ``on_change``: ``stop()`` ends it. ``error`` holds what ended it on its own
    (the group is gone, or the daemon's bytes broke the client), if anything."""

    def __init__(self, client: Client, group: str, callback: Callable[[WatchEvent, Settings], None]) -> None:
        self.group = group
        self.error: Optional[Exception] = None
        self._client = client
        self._callback = callback
        snapshot = client.snapshot(group)
        self._watch = client.watch(group, snapshot.revision)
        self._thread = threading.Thread(target=self._run, args=(snapshot,), name=f"konor-on-change-{group}",
                                        daemon=True)
        self._thread.start()

    def _run(self, snapshot: Snapshot) -> None:
        settings: Settings = dict(snapshot.settings)
        initial = Resync(group=snapshot.group, revision=snapshot.revision, version=snapshot.version,
                         settings=dict(settings))
        self._run_and_report(initial, settings)
        try:
            for event in self._watch:
                settings = apply_event(settings, event)
                self._run_and_report(event, settings)
        except Exception as error:  # noqa: BLE001 - the thread must not die silently
            self.error = error
            log.warning("on_change of %s stopped: the watch ended: %s", self.group, error)

    def _run_and_report(self, event: WatchEvent, settings: Settings) -> None:
        failure: Optional[str] = None
        try:
            self._callback(event, dict(settings))
        except Exception as error:  # the callback's refusal, reported to the daemon
            failure = str(error) or type(error).__name__
        try:
            self._client.report_apply(event.group, event.version, event.revision, failure)
        except KonorError as error:
            log.warning("could not report the outcome of %s at revision %d: %s", event.group, event.revision, error)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stops watching and waits (up to ``timeout``) for a callback in progress."""
        self._watch.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def is_running(self) -> bool:
        return self._thread.is_alive()


class _CacheState:
    """What a cache holds, swapped as one: readers see one state or the next, never a mix."""

    __slots__ = ("settings", "revision", "version", "hash")

    def __init__(self, settings: Settings, revision: int, version: str, hash: Optional[str]) -> None:
        self.settings = settings
        self.revision = revision
        self.version = version
        self.hash = hash


class _CachedReads:
    """The read side both caches share (the blocking one here, the asyncio one in aio.py): one
    ``_CacheState`` swapped whole by the follower, read without a lock."""

    group: str
    _state: _CacheState

    def get(self, key: str, default: Any = UNSET) -> Any:
        """The value of ``key`` from memory (``default``, ``UNSET`` unless given, when unset)."""
        return self._state.settings.get(key, default)

    @property
    def settings(self) -> Settings:
        """The settings as a new dict."""
        return dict(self._state.settings)

    @property
    def revision(self) -> int:
        return self._state.revision

    @property
    def version(self) -> str:
        return self._state.version

    @property
    def content_hash(self) -> str:
        """The content hash of the settings held, computed once per change."""
        state = self._state
        if state.hash is None:
            try:
                state.hash = content_hash(state.settings)
            except ValueError as error:
                raise ProtocolError(f"the cached settings of {self.group!r} cannot be hashed: {error}") from None
        return state.hash


class CachedGroup(_CachedReads):
    """A group held in memory and kept current by a watch on a thread of its own: ``get`` reads
    memory only. While the daemon is unreachable it serves the last state it saw."""

    def __init__(self, client: Client, group: str) -> None:
        self.group = group
        snapshot = client.snapshot(group)
        self._state = _CacheState(dict(snapshot.settings), snapshot.revision, snapshot.version, snapshot.content_hash)
        self._changed = threading.Condition()
        self._following = True
        self._watch = client.watch(group, snapshot.revision)
        self.error: Optional[Exception] = None
        self._thread = threading.Thread(target=self._follow, name=f"konor-cache-{group}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for event in self._watch:
                state = _CacheState(apply_event(self._state.settings, event), event.revision, event.version, None)
                with self._changed:
                    self._state = state
                    self._changed.notify_all()
        except Exception as error:  # noqa: BLE001 - the thread must not die silently
            self.error = error
            log.warning("the cache of %s stopped following: %s", self.group, error)
        finally:
            with self._changed:
                self._following = False
                self._changed.notify_all()


    def wait_for_revision(self, revision: int, timeout: Optional[float] = None) -> bool:
        """Waits until the cache holds ``revision`` or later; False on timeout, or once the
        cache stopped following (``error`` says why)."""
        with self._changed:
            self._changed.wait_for(lambda: self._state.revision >= revision or not self._following, timeout)
            return self._state.revision >= revision

    def close(self) -> None:
        """Stops following (the last state stays readable)."""
        self._watch.close()
        if threading.current_thread() is not self._thread:
            self._thread.join()
