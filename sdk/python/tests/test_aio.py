"""The asyncio flavour against the same real mesh: the same calls, awaited, and concurrent
calls on one connection matched by id."""

from __future__ import annotations

import asyncio
import os
import pwd
from typing import List

import pytest

from conftest import Mesh
from konorkestra import UNSET, Change, Resync, UnchangedError, WatchEvent, content_hash
from konorkestra.aio import Client


def test_reads_writes_and_concurrent_calls(mesh: Mesh) -> None:
    mesh.group("aio-rw")

    async def main() -> None:
        async with await Client.connect(mesh.nodes[0].socket, process="pytest-aio") as client:
            committed = await client.set("aio-rw", {"a": 1, "n": None}, message="aio")
            assert committed.version and committed.acked_by
            assert await client.get("aio-rw", "a") == 1
            assert await client.get("aio-rw", "n") is None
            assert await client.get("aio-rw", "zz") is UNSET
            with pytest.raises(UnchangedError):
                await client.set("aio-rw", {"a": 1})
            # Fifty reads at once on one connection: every answer reaches its own caller.
            keys = [f"k{i}" for i in range(50)]
            await client.set("aio-rw", {key: i for i, key in enumerate(keys)})
            values = await asyncio.gather(*(client.get("aio-rw", key) for key in keys))
            assert values == list(range(50))
            snapshot = await client.snapshot("aio-rw")
            assert snapshot.content_hash == content_hash(snapshot.settings)
            user = pwd.getpwuid(os.getuid()).pw_name
            assert (await client.history("aio-rw"))[-1]["author"] == f"{user}@{client.node_id}"

    asyncio.run(main())


def test_watch_on_change_and_cache(mesh: Mesh) -> None:
    mesh.group("aio-watch")

    async def main() -> None:
        writer = await Client.connect(mesh.nodes[0].socket)
        reader = await Client.connect(mesh.nodes[2].socket, process="pytest-aio")
        await writer.set("aio-watch", {"pool": 1})
        start = await reader.snapshot("aio-watch")
        watch = await reader.watch("aio-watch", start.revision)
        cache = await reader.cached("aio-watch")
        seen: List[int] = []

        async def reload(event: WatchEvent, settings: dict[str, object]) -> None:
            pool = settings.get("pool")
            assert isinstance(pool, int)
            if pool > 3:
                raise ValueError(f"pool {pool} is too large")
            seen.append(pool)

        handle = await reader.on_change("aio-watch", reload)
        for pool in (2, 3, 4):
            await writer.set("aio-watch", {"pool": pool})
        # Changes merged from a peer may arrive as one event per batch: the watch's view must
        # end at 4, its revisions strictly rising, never passing through a value twice.
        state: dict[str, object] = {}
        revisions: List[int] = []
        while state.get("pool") != 4:
            event = await watch.next_event(timeout=30)
            assert event is not None, state
            revisions.append(event.revision)
            state = dict(event.settings) if isinstance(event, Resync) else {**state, **event.set}
        assert all(b > a for a, b in zip(revisions, revisions[1:])), revisions
        assert await cache.wait_for_revision(watch.last_revision, timeout=30)
        assert cache.get("pool") == 4 and cache.content_hash == (await reader.snapshot("aio-watch")).content_hash

        async def reported() -> bool:
            rows = (await reader.status("aio-watch"))["processes"]
            return any("pool 4 is too large" in str(row["result"].get("message")) for row in rows)

        for _ in range(1500):
            if await reported():
                break
            await asyncio.sleep(0.02)
        assert await reported()
        # The callback saw the start (1) and then rising values up to 3 (a merged batch may skip
        # one), and refused 4.
        assert seen[0] == 1 and seen[-1] == 3 and seen == sorted(set(seen)), seen
        await handle.stop()
        await cache.close()
        watch.close()
        await writer.close()
        await reader.close()

    asyncio.run(main())


def test_an_async_watch_resumes_across_a_daemon_restart(mesh: Mesh) -> None:
    mesh.group("aio-restart")
    node = mesh.nodes[1]

    async def main() -> None:
        writer = await Client.connect(mesh.nodes[0].socket)
        await writer.set("aio-restart", {"k": 0})
        reader = await Client.connect(node.socket)
        watch = await reader.watch("aio-restart", (await reader.snapshot("aio-restart")).revision)
        node.kill()
        await writer.set("aio-restart", {"k": 1})
        node.start([mesh.nodes[0].address()])
        await writer.set("aio-restart", {"k": 2})
        state: dict[str, object] = {}
        revisions: List[int] = []
        while state.get("k") != 2:
            event = await watch.next_event(timeout=60)
            assert event is not None, state
            revisions.append(event.revision)
            state = dict(event.settings) if isinstance(event, Resync) else {**state, **event.set}
        assert all(b > a for a, b in zip(revisions, revisions[1:])), revisions
        watch.close()
        await writer.close()
        await reader.close()

    asyncio.run(main())
