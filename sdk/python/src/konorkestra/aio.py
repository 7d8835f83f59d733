"""The asyncio flavour: the same calls as ``konorkestra.Client``, awaited.

    from konorkestra.aio import Client

    client = await Client.connect()            # KONOR_SOCKET, or Client.connect(path)
    pool = await client.get("checkout", "db.pool")
    async for event in await client.watch("checkout"):
        ...

One connection carries many calls at once (answers are matched by id, as the protocol allows);
a watch, an ``on_change`` and a cache each have a connection of their own, as in the blocking
client, and resume across daemon restarts the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Union

from .client import _READS, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN, _CachedReads, _CacheState, _is_final, _rows
from .connection import DaemonUid, check_daemon
from .errors import (
    ConnectError,
    ConnectionClosedError,
    DaemonError,
    IdleError,
    KonorError,
    KonorTimeoutError,
    ProtocolError,
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
    check_welcome,
    daemon_uid_from_env,
    encode_frame,
    expect,
    frame_length,
    hello,
    read_committed,
    read_event,
    read_server_frame,
    read_snapshot,
    read_value,
    read_watching,
    resolve_socket,
    write_meta,
    RESERVED_REQUESTS,
)

__all__ = ["Client", "Watch", "ChangeHandle", "CachedGroup"]

log = logging.getLogger("konorkestra")

_NOT_GIVEN: Any = object()

Callback = Callable[[WatchEvent, Settings], Union[None, Awaitable[None]]]


#: Events a watch link holds for its reader: past it the link stops reading, the daemon's write
#: budget fills, the daemon drops the watch, and the watch resumes from its last revision.
WATCH_BUFFER_EVENTS = 1024


class _Link:
    """One greeted connection whose reader task routes answers to waiting calls by id and
    events to a bounded queue."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self._next_id = 1
        self._waiting: Dict[int, "asyncio.Future[Dict[str, Any]]"] = {}
        self.events: "asyncio.Queue[Optional[Dict[str, Any]]]" = asyncio.Queue(WATCH_BUFFER_EVENTS)
        self.closed: Optional[KonorError] = None
        self.node_id = ""
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def open(cls, path: str, timeout: float, daemon_uid: DaemonUid, process: Optional[str]) -> "_Link":
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as error:
            raise ConnectError(path, error.strerror or str(error)) from None
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), timeout)
            check_daemon(sock, path, daemon_uid)
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except asyncio.TimeoutError:
            sock.close()
            raise ConnectError(path, "timed out") from None
        except OSError as error:
            sock.close()
            raise ConnectError(path, error.strerror or str(error)) from None
        except BaseException:
            sock.close()
            raise
        link = cls(reader, writer, timeout)
        try:
            link.node_id = check_welcome(await link.exchange(hello(process)))
        except BaseException:
            link.close()
            raise
        return link

    async def _read_loop(self) -> None:
        error: KonorError = ConnectionClosedError("connection to konord closed")
        try:
            while True:
                first = await self._reader.readexactly(1)
                # Once a frame began, the rest must follow within the timeout (truncated else).
                rest = await asyncio.wait_for(self._reader.readexactly(3), self.timeout)
                length = frame_length(first + rest)
                payload = await asyncio.wait_for(self._reader.readexactly(length), self.timeout)
                kind, answer_id, body = read_server_frame(payload)
                if kind == "event":
                    await self.events.put(body)
                elif answer_id == 0:
                    try:
                        expect(body, "error")
                        error = ProtocolError(f"the daemon sent a `{body['type']}` answer on id 0")
                    except DaemonError as refused:
                        error = refused
                    break
                else:
                    waiter = self._waiting.pop(answer_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(body)
        except asyncio.IncompleteReadError as incomplete:
            where = "in the middle of a frame" if incomplete.partial else "before the answer"
            error = ConnectionClosedError(f"connection to konord closed {where}")
        except asyncio.TimeoutError:
            error = ProtocolError(f"truncated frame: its rest did not arrive within {self.timeout:.1f} s")
        except KonorError as bad:
            error = bad
        except asyncio.CancelledError:
            error = ConnectionClosedError("connection to konord closed by this client")
        except Exception as unexpected:  # noqa: BLE001 - the reader must never die silently
            error = ProtocolError(f"unreadable frame from the daemon: {unexpected!r}")
        finally:
            self._fail(error)

    def _fail(self, error: KonorError) -> None:
        if self.closed is None:
            self.closed = error
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiting.clear()
        # Undelivered events go: the watch resumes from the last one it delivered.
        while not self.events.empty():
            self.events.get_nowait()
        self.events.put_nowait(None)
        self._writer.close()

    async def exchange(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """Sends ``request`` and waits for its answer, all within the timeout. ``_NotSent`` only
        when the link was closed before anything was written; once written, a request counts as
        sent (a timeout then closes the link: its outcome is unknown)."""
        if self.closed is not None:
            raise _NotSent(str(self.closed))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        request_id = self._next_id
        self._next_id += 1
        waiter: "asyncio.Future[Dict[str, Any]]" = loop.create_future()
        self._waiting[request_id] = waiter
        self._writer.write(encode_frame(request_id, request))
        try:
            await asyncio.wait_for(self._writer.drain(), max(deadline - loop.time(), 0))
            return await asyncio.wait_for(asyncio.shield(waiter), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            self._waiting.pop(request_id, None)
            self.close()
            raise KonorTimeoutError(self.timeout) from None
        except OSError as error:
            self._waiting.pop(request_id, None)
            self.close()
            raise ConnectionClosedError(f"connection to konord closed: {error}") from None

    def close(self) -> None:
        if self.closed is None:
            self.closed = ConnectionClosedError("connection to konord closed by this client")
        self._task.cancel()
        self._writer.close()


class _NotSent(ConnectionClosedError):
    """The request never left: safe to send again on a new connection."""


class Client:
    """A connection to the local konord for asyncio. Create it with ``await Client.connect()``.
    Calls may run concurrently. Options as in ``konorkestra.Client``."""

    def __init__(self, path: str, timeout: float, daemon_uid: DaemonUid, process: Optional[str]) -> None:
        self.path = path
        self.timeout = timeout
        self.daemon_uid = daemon_uid
        self.process = process
        self.node_id = ""
        self._link: Optional[_Link] = None
        self._reconnect = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        socket_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        timeout: float = TIMEOUT_DEFAULT,
        daemon_uid: DaemonUid = _NOT_GIVEN,
        process: Optional[str] = None,
    ) -> "Client":
        uid = daemon_uid_from_env() if daemon_uid is _NOT_GIVEN else daemon_uid
        client = cls(resolve_socket(socket_path), timeout, uid, process)
        await client._current()
        return client

    async def _current(self) -> _Link:
        async with self._reconnect:
            if self._link is None or self._link.closed is not None:
                self._link = await _Link.open(self.path, self.timeout, self.daemon_uid, self.process)
                self.node_id = self._link.node_id
            return self._link

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def call(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """One request; the answer's body. An ``error`` answer is raised as its DaemonError."""
        kind = str(request.get("type", ""))
        if kind in RESERVED_REQUESTS:
            raise ValueError(f"`{kind}` cannot go through call(): use watch() (a watch needs a connection of its own)")
        for attempt in range(3):
            link = await self._current()
            try:
                body = await link.exchange(request)
            except (_NotSent, IdleError):
                continue
            except ConnectionClosedError:
                if kind in _READS and attempt < 2:
                    continue
                raise
            except KonorTimeoutError:
                link.close()
                raise
            if body["type"] == "error":
                expect(body, "error")
            return body
        raise ConnectionClosedError("connection to konord closed three times in a row")

    async def get(self, group: str, key: str, default: Any = UNSET) -> Any:
        value = read_value(await self.call({"type": "get", "group": group, "key": key}))
        return default if value is UNSET else value

    async def snapshot(self, group: str, prefix: Optional[str] = None) -> Snapshot:
        request: Dict[str, Any] = {"type": "snapshot", "group": group}
        if prefix is not None:
            request["prefix"] = prefix
        return read_snapshot(await self.call(request))

    async def history(self, group: str) -> List[Dict[str, Any]]:
        return _rows(expect(await self.call({"type": "history", "group": group}), "history"), "versions")

    async def status(self, group: str) -> Dict[str, Any]:
        return expect(await self.call({"type": "status", "group": group}), "status")

    async def nodes(self) -> List[Dict[str, Any]]:
        return _rows(expect(await self.call({"type": "nodes"}), "nodes"), "nodes")

    async def groups(self) -> List[Dict[str, Any]]:
        return _rows(expect(await self.call({"type": "group_list"}), "groups"), "groups")

    async def set(
        self, group: str, entries: Mapping[str, Any], *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None, secret: Iterable[str] = (),
    ) -> Committed:
        request = {"type": "set", "group": group, "entries": dict(entries),
                   "meta": write_meta(author, message, if_version, if_content, secret)}
        return read_committed(await self.call(request))

    async def delete(
        self, group: str, keys: Iterable[str], *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None,
    ) -> Committed:
        request = {"type": "delete", "group": group, "keys": list(keys),
                   "meta": write_meta(author, message, if_version, if_content)}
        return read_committed(await self.call(request))

    async def apply(
        self, group: str, text: str, format: str = "toml", *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None,
    ) -> Committed:
        request = {"type": "apply", "group": group, "format": format, "text": text,
                   "meta": write_meta(author, message, if_version, if_content)}
        return read_committed(await self.call(request))

    async def rollback(
        self, group: str, version: str, *, author: str = "", message: str = "",
        if_version: Optional[str] = None, if_content: Optional[str] = None,
    ) -> Committed:
        request = {"type": "rollback", "group": group, "version": version,
                   "meta": write_meta(author, message, if_version, if_content)}
        return read_committed(await self.call(request))

    async def create_group(self, name: str, mode: str = "eventual", *, key: Optional[str] = None) -> str:
        created = expect(await self.call({"type": "group_create", "name": name, "mode": mode, "key": key}),
                         "group_created")
        group_key = created.get("key")
        if not isinstance(group_key, str):
            raise ProtocolError("a `group_created` answer without the key")
        return group_key

    async def join_group(self, name: str, key: str) -> str:
        joined = expect(await self.call({"type": "group_join", "name": name, "key": key}), "joined")
        version = joined.get("version")
        if not isinstance(version, str):
            raise ProtocolError("a `joined` answer without the version")
        return version

    async def report_apply(self, group: str, version: str, revision: int, error: Optional[str] = None) -> None:
        result: Dict[str, str] = {"status": "ok"} if error is None else {"status": "error", "message": error}
        request = {"type": "report_apply", "group": group, "version": version, "revision": revision, "result": result}
        expect(await self.call(request), "done")

    async def report_error_rate(self, group: str, rate: float) -> None:
        """This process's error rate (0 to 1) while it runs what it last reported applying, for
        a release's ``max_error_rate`` guard; report what you applied first."""
        expect(await self.call({"type": "report_error_rate", "group": group, "rate": rate}), "done")

    async def watch(
        self, group: str, from_revision: Optional[int] = None, *, prefix: Optional[str] = None
    ) -> "Watch":
        """Every change of ``group`` after ``from_revision`` (``None``: from now on):
        ``async for event in watch``. With ``prefix``, only changes to keys that start with it."""
        watch = Watch(self, group, prefix)
        await watch._start(from_revision)
        return watch

    async def on_change(self, group: str, callback: Callback) -> "ChangeHandle":
        """Runs ``callback(event, settings)`` (a function or a coroutine function) with the
        current state, then on every change, and reports each outcome to the daemon."""
        snapshot = await self.snapshot(group)
        watch = await self.watch(group, snapshot.revision)
        return ChangeHandle(self, snapshot, watch, callback)

    async def cached(self, group: str) -> "CachedGroup":
        """The group kept in memory by a watch: ``get`` is a plain (not awaited) memory read."""
        snapshot = await self.snapshot(group)
        watch = await self.watch(group, snapshot.revision)
        return CachedGroup(snapshot, watch)


class Watch:
    """An async iterator of events with the blocking Watch's guarantees (exactly once, in
    order, or a Resync; resumed after dropped connections and daemon restarts, pauses kept
    across polls, so polling with a short timeout still reconnects)."""

    def __init__(self, client: Client, group: str, prefix: Optional[str] = None) -> None:
        self.group = group
        self._prefix = prefix
        self._client = client
        self._link: Optional[_Link] = None
        self._closed = False
        self._backoff = RECONNECT_BACKOFF_MIN
        self._retry_at = 0.0
        # A reconnect in progress: it outlives one poll's timeout, so no half-open link leaks.
        self._opening: Optional["asyncio.Task[int]"] = None
        self.last_revision = 0

    async def _start(self, from_revision: Optional[int]) -> None:
        revision = await self._open(from_revision)
        self.last_revision = from_revision if from_revision is not None else revision

    async def _open(self, from_revision: Optional[int]) -> int:
        client = self._client
        link = await _Link.open(client.path, client.timeout, client.daemon_uid, client.process)
        try:
            request: Dict[str, Any] = {"type": "watch", "group": self.group, "from_revision": from_revision}
            if self._prefix is not None:
                request["prefix"] = self._prefix
            revision = read_watching(await link.exchange(request))
        except BaseException:
            link.close()
            raise
        if self._closed:
            link.close()
        else:
            self._link = link
        return revision

    def close(self) -> None:
        """Ends the watch; an iteration in progress stops."""
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
        if self._link is not None:
            self._link.close()

    def __aiter__(self) -> "Watch":
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next_event(self, timeout: Optional[float] = None) -> Optional[WatchEvent]:
        """The next event; ``None`` once closed or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> Optional[float]:
            return None if deadline is None else max(deadline - loop.time(), 0)

        while not self._closed:
            link = self._link
            if link is None:
                if self._opening is None:
                    wait = self._retry_at - loop.time()
                    if wait > 0:
                        remaining = left()
                        await asyncio.sleep(wait if remaining is None else min(wait, remaining))
                        if self._closed or loop.time() < self._retry_at:
                            return None
                    self._opening = asyncio.ensure_future(self._open(self.last_revision))
                opening = self._opening
                done, _ = await asyncio.wait({opening}, timeout=left())
                if not done:
                    return None
                self._opening = None
                try:
                    opening.result()
                    self._backoff = RECONNECT_BACKOFF_MIN
                except asyncio.CancelledError:
                    return None
                except KonorError as error:
                    if _is_final(error):
                        self._closed = True
                        raise
                    self._retry_at = loop.time() + self._backoff
                    self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_MAX)
                continue
            try:
                body = await asyncio.wait_for(link.events.get(), left())
            except asyncio.TimeoutError:
                return None
            if body is None:
                self._lose(link)
                continue
            try:
                event = read_event(body)
            except ProtocolError as error:
                log.warning("watch of %s: unreadable event (%s); resuming", self.group, error)
                self._lose(link)
                continue
            if event is None:
                continue
            if isinstance(event, Change) and event.revision <= self.last_revision:
                continue
            self.last_revision = event.revision
            return event
        return None

    def _lose(self, link: _Link) -> None:
        link.close()
        if self._link is link:
            self._link = None
            self._retry_at = asyncio.get_running_loop().time() + self._backoff


class ChangeHandle:
    """A running ``on_change``; ``await handle.stop()`` ends it."""

    def __init__(self, client: Client, snapshot: Snapshot, watch: Watch, callback: Callback) -> None:
        self.group = snapshot.group
        self.error: Optional[Exception] = None
        self._client = client
        self._watch = watch
        self._callback = callback
        self._task = asyncio.ensure_future(self._run(snapshot))

    async def _run(self, snapshot: Snapshot) -> None:
        settings: Settings = dict(snapshot.settings)
        await self._run_and_report(
            Resync(group=snapshot.group, revision=snapshot.revision, version=snapshot.version, settings=dict(settings)),
            settings,
        )
        try:
            async for event in self._watch:
                settings = apply_event(settings, event)
                await self._run_and_report(event, settings)
        except Exception as error:  # noqa: BLE001 - the task must not die silently
            self.error = error
            log.warning("on_change of %s stopped: the watch ended: %s", self.group, error)

    async def _run_and_report(self, event: WatchEvent, settings: Settings) -> None:
        failure: Optional[str] = None
        try:
            outcome = self._callback(event, dict(settings))
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as error:  # the callback's refusal, reported to the daemon
            failure = str(error) or type(error).__name__
        try:
            await self._client.report_apply(event.group, event.version, event.revision, failure)
        except KonorError as error:
            log.warning("could not report the outcome of %s at revision %d: %s", event.group, event.revision, error)

    async def stop(self) -> None:
        await _end(self._watch, self._task)


class CachedGroup(_CachedReads):
    """A group held in memory, kept current by a watch task. ``get`` reads memory."""

    def __init__(self, snapshot: Snapshot, watch: Watch) -> None:
        self.group = snapshot.group
        self._state = _CacheState(dict(snapshot.settings), snapshot.revision, snapshot.version, snapshot.content_hash)
        self._watch = watch
        self._changed = asyncio.Condition()
        self._following = True
        self.error: Optional[Exception] = None
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        try:
            async for event in self._watch:
                state = _CacheState(apply_event(self._state.settings, event), event.revision, event.version, None)
                async with self._changed:
                    self._state = state
                    self._changed.notify_all()
        except Exception as error:  # noqa: BLE001 - the task must not die silently
            self.error = error
        finally:
            self._following = False
            async with self._changed:
                self._changed.notify_all()

    async def wait_for_revision(self, revision: int, timeout: Optional[float] = None) -> bool:
        """Waits until the cache holds ``revision`` or later; False on timeout or once the
        cache stopped following."""

        async def reach() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self._state.revision >= revision or not self._following)

        try:
            await asyncio.wait_for(reach(), timeout)
        except asyncio.TimeoutError:
            return False
        return self._state.revision >= revision

    async def close(self) -> None:
        """Stops following (the last state stays readable)."""
        await _end(self._watch, self._task)


async def _end(watch: Watch, task: "asyncio.Future[None]") -> None:
    """Closes a watch and waits for the task that followed it."""
    watch.close()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


