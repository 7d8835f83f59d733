#!/usr/bin/env python3
"""reload_service: a Python service configured live by Konorkestra (the twin of the Rust
example `konor-app`). It prints its settings at start, reloads them whenever they change
(reporting success or failure to its daemon, so `konorctl status` shows which version each
process runs), and serves hot reads from the SDK's in-memory cache.

Usage: KONOR_SOCKET=/path/to/konord.sock python3 reload_service.py [GROUP]   (default: demo)
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict

from konorkestra import Change, Client, WatchEvent, nest


@dataclass
class AppConfig:
    """The shape this service expects; unknown keys are ignored, missing ones take defaults."""

    greeting: str = ""
    workers: int = 1
    new_checkout: bool = False

    @classmethod
    def from_settings(cls, settings: Dict[str, Any]) -> "AppConfig":
        tree = nest(settings)
        feature = tree.get("feature", {})
        config = cls(
            greeting=str(tree.get("greeting", "")),
            workers=tree.get("workers", 1),
            new_checkout=bool(feature.get("new_checkout", False)) if isinstance(feature, dict) else False,
        )
        if not isinstance(config.workers, int) or isinstance(config.workers, bool):
            raise ValueError(f"workers must be a whole number, not {config.workers!r}")
        if config.workers > 64:
            # The service refuses settings it cannot run with; the daemon records the refusal.
            raise ValueError(f"workers = {config.workers} is more than this service supports (64)")
        return config


def main() -> None:
    group = sys.argv[1] if len(sys.argv) > 1 else "demo"
    client = Client(process="reload_service")
    node = client.node_id
    snapshot = client.snapshot(group)
    print(f"[reload_service on {node}] started with {snapshot.version}: {AppConfig.from_settings(snapshot.settings)}",
          flush=True)
    cache = client.cached(group)

    def reload(event: WatchEvent, settings: Dict[str, Any]) -> None:
        config = AppConfig.from_settings(settings)
        what = f"reloaded {event.version} (revision {event.revision})" if isinstance(event, Change) \
            else f"resynced to {event.version}"
        print(f"[reload_service on {node}] {what}: {config}", flush=True)

    reloads = client.on_change(group, reload)
    # Hot reads come from memory: measure a few to show it.
    started = time.perf_counter()
    for _ in range(100_000):
        cache.get("greeting")
    print(f"[reload_service] cached read: {(time.perf_counter() - started) * 10:.2f} µs per get", flush=True)
    # Run until stopped; the SDK reconnects and resumes by itself if the daemon restarts.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    reloads.stop(5)
    cache.close()
    client.close()


if __name__ == "__main__":
    main()
