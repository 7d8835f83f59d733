"""Malformed answers from a fake daemon: each ends in a clear exception, never a hang or a
crash of the client, and nothing half-read leaks into the next call."""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from konorkestra import (
    Client,
    ConnectionClosedError,
    KonorError,
    KonorTimeoutError,
    ProtocolError,
    ProtocolRefusedError,
    UnknownGroupError,
    UntrustedDaemonError,
)

Handler = Callable[[socket.socket, dict], Optional[bytes]]


def frame(value: object) -> bytes:
    payload = json.dumps(value).encode()
    return struct.pack(">I", len(payload)) + payload


def answer(request_id: int, body: dict) -> bytes:
    return frame({"response": {"id": request_id, "response": body}})


WELCOME = {"type": "welcome", "protocol": 1, "node_id": "fake", "daemon_version": "0"}


class Close(bytes):
    """A reply to send, after which the fake daemon closes the connection."""


class FakeDaemon:
    """Answers hello with ``welcome`` (unless told otherwise), then hands each later request to
    ``reply``, which returns the raw bytes to send (or None to close)."""

    def __init__(self, reply: Callable[[dict], Optional[bytes]], welcome: Optional[Callable[[int], bytes]] = None):
        self.dir = tempfile.mkdtemp(prefix="konor-fake-")
        self.path = os.path.join(self.dir, "s.sock")
        self.reply = reply
        self.welcome = welcome or (lambda request_id: answer(request_id, WELCOME))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.requests: List[dict] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.talk, args=(conn,), daemon=True).start()

    def talk(self, conn: socket.socket) -> None:
        with conn:
            first = True
            while True:
                header = self.read(conn, 4)
                if header is None:
                    return
                (length,) = struct.unpack(">I", header)
                payload = self.read(conn, length)
                if payload is None:
                    return
                request = json.loads(payload)
                self.requests.append(request)
                out = self.welcome(request["id"]) if first else self.reply(request)
                first = False
                if out is None:
                    return
                conn.sendall(out)
                if isinstance(out, Close):
                    return

    @staticmethod
    def read(conn: socket.socket, count: int) -> Optional[bytes]:
        data = b""
        while len(data) < count:
            try:
                chunk = conn.recv(count - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeDaemon]]:
    made: List[FakeDaemon] = []

    def make(reply: Callable[[dict], Optional[bytes]], **kwargs: object) -> FakeDaemon:
        daemon = FakeDaemon(reply, **kwargs)  # type: ignore[arg-type]
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


def value_of(request: dict, value: object) -> bytes:
    return answer(request["id"], {"type": "value", "group": "g", "key": "k", "value": value,
                                  "freshness": {"revision": 1, "version": "v1", "age_ms": 0, "stale": False}})


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x00\x00\x05hello", "not JSON"),
        (struct.pack(">I", 17 * 1024 * 1024), "more than the limit"),
        (frame([1, 2]), "not an object"),
        (frame({"response": {"id": "x", "response": {"type": "value"}}}), "without a valid id"),
        (frame({"response": {"id": 2, "response": {"no": "type"}}}), "without a type"),
        (frame({"something": 1}), "neither a response nor an event"),
        (frame({"response": {"id": 2, "response": {"type": "snapshot"}}}), "expected a `value` answer"),
        (Close(b'\x00\x00\x00\x40{"response":{"id":2,"a":1,'), "closed in the middle of a frame"),
    ],
)
def test_malformed_answers_raise_clear_errors(fake: Callable[..., FakeDaemon], raw: bytes, message: str) -> None:
    daemon = fake(lambda request: raw)
    client = Client(daemon.path, timeout=2, daemon_uid="any")
    with pytest.raises((ProtocolError, ConnectionClosedError), match=message):
        client.get("g", "k")


def test_a_duplicate_key_in_an_answer_is_refused(fake: Callable[..., FakeDaemon]) -> None:
    text = b'{"response":{"id":2,"response":{"type":"value","value":1,"value":2}}}'
    daemon = fake(lambda request: struct.pack(">I", len(text)) + text)
    with pytest.raises(ProtocolError, match="given twice"):
        Client(daemon.path, timeout=2, daemon_uid="any").get("g", "k")


def test_a_snapshot_whose_hash_does_not_match_is_refused(fake: Callable[..., FakeDaemon]) -> None:
    body = {"type": "snapshot", "group": "g", "settings": {"a": 1}, "content_hash": "0" * 64,
            "freshness": {"revision": 1, "version": "v1", "age_ms": 0, "stale": False}}
    daemon = fake(lambda request: answer(request["id"], body))
    with pytest.raises(ProtocolError, match="hashes to"):
        Client(daemon.path, timeout=2, daemon_uid="any").snapshot("g")


def test_a_daemon_of_another_protocol_version_is_refused_both_ways(fake: Callable[..., FakeDaemon]) -> None:
    newer = fake(lambda request: None, welcome=lambda request_id: answer(request_id, {**WELCOME, "protocol": 2}))
    with pytest.raises(ProtocolError, match="konord speaks protocol 2 and this client 1: upgrade this package"):
        Client(newer.path, daemon_uid="any")
    refusing = fake(lambda request: None, welcome=lambda request_id: answer(
        request_id, {"type": "error", "code": "protocol", "message": "this daemon speaks protocol 0"}))
    with pytest.raises(ProtocolRefusedError, match="speaks protocol 0"):
        Client(refusing.path, daemon_uid="any")


def test_a_silent_daemon_times_out_and_the_next_call_starts_clean(fake: Callable[..., FakeDaemon]) -> None:
    calls: List[int] = []

    def reply(request: dict) -> Optional[bytes]:
        calls.append(request["id"])
        if len(calls) == 1:
            return b""  # says nothing: the client times out
        return value_of(request, 5)

    daemon = fake(reply)
    client = Client(daemon.path, timeout=0.3, daemon_uid="any")
    with pytest.raises(KonorTimeoutError):
        client.get("g", "k")
    assert client.get("g", "k") == 5


def test_error_answers_carry_their_code_and_answers_are_matched_by_id(fake: Callable[..., FakeDaemon]) -> None:
    def reply(request: dict) -> Optional[bytes]:
        # An answer to some other id first (a late one), then the real one.
        return answer(request["id"] + 100, {"type": "done"}) + answer(
            request["id"], {"type": "error", "code": "unknown_group", "message": "no group `g` on this node"})

    daemon = fake(reply)
    with pytest.raises(UnknownGroupError) as raised:
        Client(daemon.path, timeout=2, daemon_uid="any").get("g", "k")
    assert raised.value.code == "unknown_group" and "no group `g`" in raised.value.message


def test_an_idle_close_is_answered_by_sending_again(fake: Callable[..., FakeDaemon]) -> None:
    sent: List[int] = []

    def reply(request: dict) -> Optional[bytes]:
        sent.append(request["id"])
        if len(sent) == 1:
            return answer(0, {"type": "error", "code": "idle", "message": "idle for 5 minutes; closing"})
        return value_of(request, "again")

    daemon = fake(reply)
    assert Client(daemon.path, timeout=2, daemon_uid="any").get("g", "k") == "again"
    assert len(sent) == 2


OTHER_UID = 65534

OTHER_USER_DAEMON = """
import json, socket, struct, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(4)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    header = conn.recv(4)
    if not header:
        conn.close()
        continue
    with open(sys.argv[1] + ".got", "ab") as got:
        got.write(header)
    (length,) = struct.unpack(">I", header)
    request = json.loads(conn.recv(length))
    body = {"type": "welcome", "protocol": 1, "node_id": "other", "daemon_version": "0"}
    payload = json.dumps({"response": {"id": request["id"], "response": body}}).encode()
    conn.sendall(struct.pack(">I", len(payload)) + payload)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another user needs root")
def test_a_daemon_of_another_user_is_refused_before_anything_is_sent() -> None:
    import subprocess
    import sys

    directory = tempfile.mkdtemp(prefix="konor-other-")
    os.chmod(directory, 0o777)
    path = os.path.join(directory, "s.sock")
    # The interpreter running the tests may live where that user cannot read (a pyenv under
    # /root): the fake daemon needs only the standard library, so any system python will do.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    child = subprocess.Popen([python, "-c", OTHER_USER_DAEMON, path], user=OTHER_UID,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with pytest.raises(UntrustedDaemonError, match=f"runs as uid {OTHER_UID}, not as root") as raised:
            Client(path, daemon_uid=None)
        assert f"KONOR_DAEMON_UID={OTHER_UID}" in str(raised.value)
        assert not os.path.exists(path + ".got"), "the client sent something to an untrusted daemon"
        # Named as konord's user, or with the check off, it is accepted.
        assert Client(path, daemon_uid=OTHER_UID).node_id == "other"
        assert Client(path, daemon_uid="any").node_id == "other"
    finally:
        child.kill()
        child.wait()


def test_a_write_whose_connection_closes_before_its_answer_is_not_sent_again(fake: Callable[..., FakeDaemon]) -> None:
    daemon = fake(lambda request: Close(b""))
    client = Client(daemon.path, timeout=2, daemon_uid="any")
    with pytest.raises(ConnectionClosedError):
        client.set("g", {"k": 1})
    sets = [request for request in daemon.requests if request["request"]["type"] == "set"]
    assert len(sets) == 1, "a write that may have been applied was sent again"


def test_a_read_whose_connection_closes_is_sent_again(fake: Callable[..., FakeDaemon]) -> None:
    gets: List[int] = []

    def reply(request: dict) -> Optional[bytes]:
        gets.append(request["id"])
        return Close(b"") if len(gets) == 1 else value_of(request, 9)

    daemon = fake(reply)
    assert Client(daemon.path, timeout=2, daemon_uid="any").get("g", "k") == 9
    assert len(gets) == 2


def test_half_a_frame_is_a_truncated_frame_not_a_hang(fake: Callable[..., FakeDaemon]) -> None:
    # A call: the length says 64 bytes, 10 come, the connection stays open. It ends in time,
    # as a truncated frame or as the call's own timeout, whichever limit comes first.
    daemon = fake(lambda request: b"\x00\x00\x00\x40" + b'{"respons"')
    with pytest.raises((ProtocolError, KonorTimeoutError)):
        Client(daemon.path, timeout=0.5, daemon_uid="any").get("g", "k")
    # A watch waits for events without a deadline, yet half an event does not hold it: the rest
    # is due within the timeout, and the watch then resumes on a new connection.
    watches: List[int] = []

    def reply(request: dict) -> Optional[bytes]:
        watches.append(request["id"])
        return answer(request["id"], {"type": "watching", "group": "g", "revision": 1}) + b"\x00\x00\x00\x40{"

    watcher = fake(reply)
    watch = Client(watcher.path, timeout=0.3, daemon_uid="any").watch("g", 1)
    assert watch.next_event(timeout=2) is None
    watch.close()
    assert len(watches) >= 2, "the watch never gave up on the truncated frame"


def test_calls_that_need_a_connection_of_their_own_are_refused(fake: Callable[..., FakeDaemon]) -> None:
    daemon = fake(lambda request: value_of(request, 1))
    client = Client(daemon.path, timeout=2, daemon_uid="any")
    for kind in ("watch", "unwatch", "hello"):
        with pytest.raises(ValueError, match="use watch"):
            client.call({"type": kind, "group": "g"})
    assert [r["request"]["type"] for r in daemon.requests] == ["hello"]


def test_deeply_nested_or_out_of_range_answers_are_protocol_errors(fake: Callable[..., FakeDaemon]) -> None:
    for raw in (b"[" * 100_000, b'{"response":{"id":2,"response":{"type":"value","value":1e400}}}'):
        daemon = fake(lambda request, raw=raw: struct.pack(">I", len(raw)) + raw)
        with pytest.raises(ProtocolError, match="not JSON"):
            Client(daemon.path, timeout=2, daemon_uid="any").get("g", "k")


def test_a_watch_polled_with_short_timeouts_still_reconnects(fake: Callable[..., FakeDaemon]) -> None:
    watches: List[int] = []

    def reply(request: dict) -> Optional[bytes]:
        if request["request"]["type"] != "watch":
            return None
        watches.append(request["id"])
        watching = answer(request["id"], {"type": "watching", "group": "g", "revision": 5})
        if len(watches) == 1:
            return Close(watching)  # the first connection drops at once
        event = frame({"event": {"event": {"type": "change", "group": "g", "revision": 6, "version": "v6",
                                           "set": {"k": 1}, "removed": None}}})
        return watching + event

    daemon = fake(reply)
    watch = Client(daemon.path, timeout=2, daemon_uid="any").watch("g", 5)
    event = None
    for _ in range(400):  # polls far shorter than the reconnect pause
        event = watch.next_event(timeout=0.01)
        if event is not None:
            break
    watch.close()
    assert event is not None and event.revision == 6 and event.set == {"k": 1}, watches
    assert len(watches) == 2



def test_aio_a_write_that_could_not_be_flushed_in_time_is_not_sent_again(fake: Callable[..., FakeDaemon]) -> None:
    import asyncio
    import time as clock

    from konorkestra import aio

    def reply(request: dict) -> Optional[bytes]:
        if request["request"]["type"] == "get":
            clock.sleep(1.5)  # the daemon stops reading for a while
            return value_of(request, 1)
        return answer(request["id"], {"type": "committed", "group": "g", "version": "v2", "revision": 2,
                                      "content_hash": "0" * 12, "acked_by": ["fake"]})

    daemon = fake(reply)

    async def main() -> None:
        client = await aio.Client.connect(daemon.path, timeout=0.4, daemon_uid="any")
        stuck = asyncio.ensure_future(client.get("g", "k"))
        await asyncio.sleep(0.05)
        with pytest.raises((KonorTimeoutError, ConnectionClosedError)):
            await client.apply("g", "x = '" + "y" * (8 * 1024 * 1024) + "'\n", "toml")
        with pytest.raises(KonorError):
            await stuck
        await client.close()

    asyncio.run(main())
    clock.sleep(2)  # let the fake daemon wake and read whatever reached it
    applies = [request for request in daemon.requests if request["request"]["type"] == "apply"]
    assert len(applies) <= 1, f"the write went out {len(applies)} times"


def test_aio_an_unreadable_frame_fails_the_call_and_the_next_call_reconnects(fake: Callable[..., FakeDaemon]) -> None:
    import asyncio

    from konorkestra import aio

    calls: List[int] = []

    def reply(request: dict) -> Optional[bytes]:
        calls.append(request["id"])
        if len(calls) == 1:
            raw = b"[" * 100_000
            return struct.pack(">I", len(raw)) + raw
        return value_of(request, 3)

    daemon = fake(reply)

    async def main() -> None:
        client = await aio.Client.connect(daemon.path, timeout=2, daemon_uid="any")
        with pytest.raises(ProtocolError, match="not JSON"):
            await client.get("g", "k")
        assert await client.get("g", "k") == 3
        await client.close()

    asyncio.run(main())
