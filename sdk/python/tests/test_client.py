"""The blocking client against a real 3-node mesh."""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
from typing import List

import pytest

from conftest import Mesh, binary, eventually
from konorkestra import (
    UNSET,
    Change,
    Client,
    ConditionFailedError,
    DaemonError,
    NotFoundError,
    Resync,
    SocketUnsetError,
    UnchangedError,
    UnknownGroupError,
    WatchEvent,
    content_hash,
)


def test_get_tells_an_unset_key_from_json_null(mesh: Mesh) -> None:
    n1, n2, n3 = mesh.group("reads")
    committed = n1.set("reads", {"db.pool": 20, "feature.off": None, "name": "shop"}, message="first")
    assert committed.acked_by and committed.version and len(committed.content_hash) == 12
    assert n1.get("reads", "db.pool") == 20
    assert n1.get("reads", "feature.off") is None
    assert n1.get("reads", "missing") is UNSET
    assert n1.get("reads", "missing", default=7) == 7
    eventually("n3 holds the write", lambda: n3.get("reads", "name") if n3.get("reads", "name") is not UNSET else None)


def test_snapshot_carries_a_hash_verified_here(mesh: Mesh) -> None:
    n1, _, _ = mesh.group("snap")
    n1.set("snap", {"a.b": [1, 2.5, "x"], "c": {"nested": True}})
    snapshot = n1.snapshot("snap")
    assert snapshot.settings == {"a.b": [1, 2.5, "x"], "c": {"nested": True}}
    assert snapshot.content_hash == content_hash(snapshot.settings)
    assert snapshot.revision > 0 and snapshot.version.startswith("v")
    assert snapshot.freshness.stale is False


def test_writes_carry_their_metadata_and_refusals_are_typed(mesh: Mesh) -> None:
    n1, n2, _ = mesh.group("writes")
    n1.set("writes", {"k": 1, "gone": True}, author="ops@laptop", message="raise pool")
    with pytest.raises(UnchangedError) as unchanged:
        n1.set("writes", {"k": 1})
    assert unchanged.value.code == "unchanged"
    n1.delete("writes", ["gone"], message="drop")
    applied = n2.apply("writes", "[db]\npool = 24\n", "toml", message="whole file")
    rows = n2.history("writes")
    first = next(row for row in rows if row["message"] == "raise pool")
    # The daemon authors versions as the user it authenticated; the claim follows.
    assert first["author"] == f"{_user()}@{n1.node_id} (ops@laptop)"
    assert rows[-1]["label"] == applied.version
    assert n2.snapshot("writes").settings == {"db.pool": 24}
    n2.rollback("writes", first["label"], message="back")
    assert n2.snapshot("writes").settings == {"k": 1, "gone": True}
    with pytest.raises(UnknownGroupError):
        n1.get("no-such-group", "k")
    with pytest.raises(NotFoundError):
        n1.rollback("writes", "v999")


def test_conditional_writes_and_reads_and_watches_by_prefix(mesh: Mesh) -> None:
    n1, n2, _ = mesh.group("conditional")
    first = n1.set("conditional", {"db.host": "a", "db.port": 1, "name": "shop"})
    # The condition holds: written. The group moved on: refused, nothing changed.
    second = n1.set("conditional", {"db.port": 2}, if_version=first.version, if_content=first.content_hash)
    with pytest.raises(ConditionFailedError) as failed:
        n1.set("conditional", {"db.port": 3}, if_version=first.version)
    assert failed.value.code == "condition_failed" and second.version in failed.value.message
    with pytest.raises(ConditionFailedError):
        n1.delete("conditional", ["name"], if_content=first.content_hash)
    assert n1.get("conditional", "db.port") == 2
    under = n1.snapshot("conditional", prefix="db.")
    assert under.settings == {"db.host": "a", "db.port": 2}
    assert under.content_hash == content_hash(under.settings)
    watch = n2.watch("conditional", n2.snapshot("conditional").revision, prefix="db.")
    try:
        n1.set("conditional", {"name": "store"})
        n1.set("conditional", {"db.port": 4, "name": "mall"})
        event = watch.next_event(timeout=30)
        assert isinstance(event, Change), event
        assert event.set == {"db.port": 4}, "only keys under db., and nothing for the first write"
    finally:
        watch.close()


def _user() -> str:
    """The name konord gives this process's user (its peer credentials' uid)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid:{os.getuid()}"


def test_the_author_is_the_authenticated_user(mesh: Mesh) -> None:
    n1, _, _ = mesh.group("authors")
    n1.set("authors", {"k": 1})
    assert n1.history("authors")[-1]["author"] == f"{_user()}@{n1.node_id}"


def test_the_socket_comes_from_the_environment(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KONOR_SOCKET", raising=False)
    with pytest.raises(SocketUnsetError, match="KONOR_SOCKET is not set"):
        Client()
    monkeypatch.setenv("KONOR_SOCKET", str(mesh.nodes[1].socket))
    with Client() as client:
        assert client.node_id == "n2"


def test_a_watch_sees_every_change_in_order(mesh: Mesh) -> None:
    n1, n2, n3 = mesh.group("watched")
    start = n3.snapshot("watched").revision
    watch = n3.watch("watched", start)
    # Each writer owns its keys, so the last value of each is known whatever the interleaving.
    for i in range(20):
        writer, key = (n1, f"a{i % 3}") if i % 2 == 0 else (n2, f"b{i % 3}")
        writer.set("watched", {key: i})
    expected: dict[str, object] = {}
    for i in range(20):
        expected[f"a{i % 3}" if i % 2 == 0 else f"b{i % 3}"] = i
    state: dict[str, object] = {}
    events = 0
    try:
        while state != expected:
            event = watch.next_event(timeout=30)
            assert event is not None, f"no event; state {state}"
            events += 1
            state = dict(event.settings) if isinstance(event, Resync) else {**state, **event.set}
    finally:
        watch.close()
    assert events >= 1 and watch.last_revision > start


def test_a_watch_resumes_across_a_daemon_restart_without_gap_or_duplicate(mesh: Mesh) -> None:
    n1, _, _ = mesh.group("restarts")
    n1.set("restarts", {"k": 0})
    node3 = mesh.nodes[2]
    watcher = node3.client()
    watch = watcher.watch("restarts", watcher.snapshot("restarts").revision)
    events: List[WatchEvent] = []
    done = threading.Event()

    def follow() -> None:
        for event in watch:
            events.append(event)
            values = event.set if isinstance(event, Change) else event.settings
            if values.get("k") == 10:
                done.set()
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    for i in range(1, 5):
        n1.set("restarts", {"k": i})
    eventually("the watch saw k=4", lambda: True if any(isinstance(e, Change) and e.set.get("k") == 4 for e in events) else None)
    node3.kill()
    for i in range(5, 8):
        n1.set("restarts", {"k": i})
    node3.start([mesh.nodes[0].address()])
    for i in range(8, 11):
        n1.set("restarts", {"k": i})
    try:
        assert done.wait(60), events
    finally:
        watch.close()
        thread.join(10)
    # The watch resumed from its last revision: a resync (the restarted daemon keeps no
    # notifications) or the changes after it; either way revisions strictly rise (no
    # duplicate) and the state built from the events ends where the writes ended (no gap).
    revisions = [event.revision for event in events]
    assert all(b > a for a, b in zip(revisions, revisions[1:])), revisions
    state: dict[str, object] = {}
    for event in events:
        state = dict(event.settings) if isinstance(event, Resync) else {**state, **event.set}
    assert state.get("k") == 10
    watcher.close()


def test_on_change_reports_success_and_the_callbacks_exception(mesh: Mesh) -> None:
    n1, n2, _ = mesh.group("callbacks")
    n1.set("callbacks", {"pool": 10})
    seen: List[int] = []

    def reload(event: WatchEvent, settings: dict[str, object]) -> None:
        pool = settings.get("pool")
        assert isinstance(pool, int)
        if pool > 16:
            raise ValueError(f"pool must be <= 16, got {pool}")
        seen.append(pool)

    handle = n2.on_change("callbacks", reload)
    eventually("the callback ran with the initial state", lambda: True if seen == [10] else None)
    n1.set("callbacks", {"pool": 32})

    def reported_error() -> object:
        rows = n2.status("callbacks")["processes"]
        return next((row for row in rows if row["result"].get("status") == "error"), None)

    row = eventually("status shows the callback's error", reported_error)
    assert "pool must be <= 16, got 32" in row["result"]["message"]
    out = subprocess.run([str(binary("konorctl")), "--socket", str(mesh.nodes[1].socket), "status", "callbacks"],
                         capture_output=True, text=True, check=False)
    assert "pool must be <= 16" in out.stdout, out.stdout + out.stderr
    handle.stop(5)


def test_an_error_rate_goes_on_the_apply_report_of_the_same_connection(mesh: Mesh) -> None:
    n1, n2, _ = mesh.group("rates")
    committed = n1.set("rates", {"pool": 10})
    with pytest.raises(DaemonError) as refused:
        n2.report_error_rate("rates", 0.01)
    assert refused.value.code == "bad_request" and "report the version" in str(refused.value)
    n2.report_apply("rates", committed.version, 1)
    n2.report_error_rate("rates", 0.25)
    with pytest.raises(DaemonError):
        n2.report_error_rate("rates", 1.5)

    def reported() -> object:
        rows = n1.status("rates")["processes"]
        return next((row for row in rows if row.get("error_rate") is not None), None)

    row = eventually("every node sees the rate on n2's row", reported)
    assert row["error_rate"] == 0.25 and row["node"] == mesh.nodes[1].id


def test_a_cache_follows_the_group_and_reads_memory(mesh: Mesh) -> None:
    n1, n2, _ = mesh.group("cached")
    n1.set("cached", {"a": 1, "b": None})
    cache = n2.cached("cached")
    eventually("the cache holds a", lambda: True if cache.get("a") == 1 else None)
    assert cache.get("b") is None and cache.get("c") is UNSET
    committed = n1.set("cached", {"a": 2})
    eventually("the cache follows", lambda: True if cache.get("a") == 2 else None)
    assert cache.content_hash == n2.snapshot("cached").content_hash
    assert cache.version == committed.version or n2.history("cached")[-1]["label"] == cache.version
    cache.close()
    assert cache.get("a") == 2, "a closed cache still serves its last state"


def test_the_example_service_reloads_live_and_reports_a_refusal(mesh: Mesh) -> None:
    import os
    import sys
    from pathlib import Path

    n1, n2, _ = mesh.group("example")
    n1.set("example", {"greeting": "hello", "workers": 4})
    script = Path(__file__).resolve().parents[1] / "examples" / "reload_service.py"
    env = {**os.environ, "KONOR_SOCKET": str(mesh.nodes[1].socket),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    service = subprocess.Popen([sys.executable, "-u", str(script), "example"], env=env, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert service.stdout is not None
        lines: List[str] = []

        def read_until(text: str) -> None:
            while not any(text in line for line in lines):
                line = service.stdout.readline()  # type: ignore[union-attr]
                assert line, f"the service ended before printing {text!r}: {lines}"
                lines.append(line)

        read_until("started with")
        assert "workers=4" in lines[0] and "greeting='hello'" in lines[0]
        read_until("resynced to")
        n1.set("example", {"workers": 8, "feature.new_checkout": True})
        read_until("workers=8")
        assert any("new_checkout=True" in line for line in lines)
        n1.set("example", {"workers": 100})

        def refused() -> object:
            rows = n2.status("example")["processes"]
            return next((row for row in rows if row["process"] == "reload_service"
                         and "more than this service supports" in str(row["result"].get("message"))), None)

        eventually("status shows the service's refusal", refused)
    finally:
        service.terminate()
        service.wait(10)
    assert service.returncode == 0


def test_secret_marks_are_a_list_of_keys_never_one_string() -> None:
    from konorkestra.wire import write_meta

    assert write_meta("", "", secret=["db.password"])["secret"] == ["db.password"]
    assert "secret" not in write_meta("", "")
    # A string would mark each of its letters for good (single letters are keys).
    with pytest.raises(TypeError):
        write_meta("", "", secret="token")
