#!/usr/bin/env python3
"""A chaos workload client on the Python SDK (konorkestra), the twin of workload.rs's
`run_client`: writes (60%) of unique values `c<client>-<seq>` and reads of keys k0-k2 of each
group, at most 50 ms apart, 5 s per call. Each operation is printed on stdout as one `op` record
of the history (chaos/src/history.rs), timed on the run's clock: CLOCK_MONOTONIC minus the run's
zero (`KONOR_CHAOS_ZERO_NS`), the same clock the runner's recorder reads. The runner copies the
lines into the history. SIGTERM ends it after the operation in flight.

Usage: py_client.py --node N --socket PATH --client NUMBER --seed SEED --groups ev,st
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from typing import Any, Dict, Optional

from konorkestra import Client, ConnectError, DaemonError, KonorError, OutcomeUnknownError

KEYS_PER_GROUP = 3
WRITE_PERCENT = 60
THINK_MAX_S = 0.050
DOWN_RETRY_S = 0.200
CALL_TIMEOUT_S = 5.0
NOT_SENT = "not_sent"

ZERO_NS = int(os.environ["KONOR_CHAOS_ZERO_NS"])


def now_ms() -> int:
    return max(0, (time.monotonic_ns() - ZERO_NS) // 1_000_000)


def printed(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def outcome_of(error: KonorError) -> Dict[str, Any]:
    if isinstance(error, OutcomeUnknownError):
        return {"outcome": "unknown", "detail": f"outcome_unknown: {error.message}"}
    if isinstance(error, DaemonError):
        return {"outcome": "refused", "code": error.code, "message": error.message}
    if isinstance(error, ConnectError):
        return {"outcome": "refused", "code": NOT_SENT, "message": error.detail}
    return {"outcome": "unknown", "detail": str(error)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--client", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--groups", required=True)
    args = parser.parse_args()
    groups = args.groups.split(",")
    rng = random.Random(args.seed ^ (args.client << 32))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    client: Optional[Client] = None
    sequence = 0
    parent = os.getppid()
    # Ends with the runner even if the runner was killed and could not stop it.
    while not stopping and os.getppid() == parent:
        group = groups[rng.randrange(len(groups))]
        key = f"k{rng.randrange(KEYS_PER_GROUP)}"
        write = rng.randrange(100) < WRITE_PERCENT
        if write:
            sequence += 1
            value = f"c{args.client}-{sequence}"
        invoke_ms = now_ms()
        outcome: Dict[str, Any]
        try:
            if client is None:
                client = Client(args.socket, timeout=CALL_TIMEOUT_S, process=f"chaos-py-{args.client}")
            if write:
                committed = client.set(group, {key: value})
                outcome = {"outcome": "committed", "version": committed.version, "revision": committed.revision,
                           "acked_by": committed.acked_by, "content_hash": committed.content_hash}
            else:
                answer = client.call({"type": "get", "group": group, "key": key})
                freshness = answer["freshness"]
                outcome = {"outcome": "value",
                           "value": printed(answer["value"]) if "value" in answer else None,
                           "version": freshness["version"], "revision": freshness["revision"],
                           "stale": freshness["stale"]}
        except KonorError as error:
            outcome = outcome_of(error)
            if isinstance(error, ConnectError):
                client = None
        except (KeyError, TypeError) as error:  # an answer without the fields of its type
            outcome = {"outcome": "unknown", "detail": f"unreadable answer: {error!r}"}
        kind: Dict[str, Any] = {"op": "write", "value": value} if write else {"op": "read"}
        record = {"type": "op", "client": args.client, "node": args.node, "group": group, "key": key, "kind": kind,
                  "invoke_ms": invoke_ms, "complete_ms": now_ms(), "outcome": outcome}
        sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
        sys.stdout.flush()
        not_sent = outcome.get("code") == NOT_SENT
        time.sleep(DOWN_RETRY_S if not_sent else rng.uniform(0, THINK_MAX_S))


if __name__ == "__main__":
    main()
