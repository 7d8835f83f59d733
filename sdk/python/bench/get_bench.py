#!/usr/bin/env python3
"""Python's socket and cached `get` next to the Rust SDK's, against one konord, in interleaved
rounds (a benchmark, not a test: it prints figures and judges nothing).

    cargo build --release -p konor-node --bins -p konor-sdk --example get_latency
    python3 sdk/python/bench/get_bench.py [--rounds 3] [--gets 20000] [--socket PATH]

Without --socket it starts a throw-away one-node konord (release build) in a temp dir. Run it on
a quiet machine: absolute times drift, the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "sdk" / "python" / "src"))

from konorkestra import Client  # noqa: E402

GROUP, KEY = "bench", "db.pool"
CACHED_GETS_PER_BATCH = 1_000


def quantile(sorted_values: List[int], q: float) -> int:
    return sorted_values[int((len(sorted_values) - 1) * q)]


def python_round(socket: str, gets: int, batches: int) -> Dict[str, int]:
    client = Client(socket, process="get_bench")
    for _ in range(gets // 10):
        client.get(GROUP, KEY)
    clock = time.perf_counter_ns
    samples = []
    for _ in range(gets):
        started = clock()
        client.get(GROUP, KEY)
        samples.append(clock() - started)
    samples.sort()
    cache = client.cached(GROUP)
    get = cache.get
    per_get = []
    for _ in range(batches):
        started = clock()
        for _ in range(CACHED_GETS_PER_BATCH):
            get(KEY)
        per_get.append((clock() - started) // CACHED_GETS_PER_BATCH)
    per_get.sort()
    cache.close()
    client.close()
    return {"socket_p50_ns": quantile(samples, 0.5), "socket_p99_ns": quantile(samples, 0.99),
            "cached_ns": quantile(per_get, 0.5)}


def rust_round(socket: str, gets: int, batches: int) -> Dict[str, int]:
    binary = REPO / "target" / "release" / "examples" / "get_latency"
    out = subprocess.run([str(binary), socket, GROUP, KEY, str(gets), str(batches)], check=True,
                         capture_output=True, text=True).stdout
    result: Dict[str, int] = json.loads(out)
    return result


def start_konord(root: Path) -> subprocess.Popen[bytes]:
    release = REPO / "target" / "release"
    subprocess.run([str(release / "konorctl"), "ca", "init", "--dir", str(root / "ca")], check=True, capture_output=True)
    subprocess.run([str(release / "konorctl"), "cert", "issue", "--ca-dir", str(root / "ca"), "--node-id", "n1",
                    "--out", str(root / "n1" / "tls")], check=True, capture_output=True)
    log = open(root / "n1.log", "wb")
    daemon = subprocess.Popen([str(release / "konord"), "--data-dir", str(root / "n1"), "--node-id", "n1",
                               "--listen", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while not (root / "n1" / "konord.sock").exists():
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"konord did not start; see {root / 'n1.log'}")
        time.sleep(0.05)
    return daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gets", type=int, default=20_000)
    parser.add_argument("--batches", type=int, default=2_000)
    parser.add_argument("--socket")
    args = parser.parse_args()
    root: Optional[Path] = None
    daemon = None
    socket = args.socket
    if socket is None:
        root = Path(tempfile.mkdtemp(prefix="konor-get-bench-"))
        daemon = start_konord(root)
        socket = str(root / "n1" / "konord.sock")
    try:
        setup = Client(socket, process="get_bench")
        if not any(row["name"] == GROUP for row in setup.groups()):
            setup.create_group(GROUP)
        setup.set(GROUP, {KEY: 20, "feature.beta": True, "name": "bench"})
        setup.close()
        rows: Dict[str, List[Dict[str, int]]] = {"rust": [], "python": []}
        for _ in range(args.rounds):
            rows["rust"].append(rust_round(socket, args.gets, args.batches))
            rows["python"].append(python_round(socket, args.gets, args.batches))
        print(f"get latency over {args.rounds} interleaved rounds (median of the rounds), {args.gets} socket gets, "
              f"{args.batches} batches of {CACHED_GETS_PER_BATCH} cached gets per round; Python {sys.version.split()[0]}")
        print(f"{'figure':<22}{'rust sdk':>12}{'python sdk':>14}{'ratio':>9}")
        for figure, label in [("socket_p50_ns", "socket get p50"), ("socket_p99_ns", "socket get p99"),
                              ("cached_ns", "cached get")]:
            rust = statistics.median(row[figure] for row in rows["rust"])
            python = statistics.median(row[figure] for row in rows["python"])
            print(f"{label:<22}{rust / 1000:>10.2f}µs{python / 1000:>12.2f}µs{python / max(rust, 1):>8.1f}x")
        print("rounds:", json.dumps(rows))
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(10)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
