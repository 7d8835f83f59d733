"""A 3-node mesh of real konord processes, set up as README.md's quick start does: a cluster CA,
a certificate per node from ``konorctl``, konord on loopback, n2 and n3 seeded at n1.

The binaries come from ``KONOR_BIN_DIR`` or the workspace's ``target/debug`` (then
``target/release``), as ``cargo build -p konor-node --bins`` leaves them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

import pytest

from konorkestra import Client

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")


def binary(name: str) -> Path:
    candidates = []
    if os.environ.get("KONOR_BIN_DIR"):
        candidates.append(Path(os.environ["KONOR_BIN_DIR"]) / name)
    candidates += [REPO / "target" / "debug" / name, REPO / "target" / "release" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{name} not found in {[str(c) for c in candidates]}: run `cargo build -p konor-node --bins`")


def eventually(what: str, check: Callable[[], Optional[T]], timeout: float = 30.0) -> T:
    """Polls ``check`` until it returns something other than None (an event with no hook)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - a check may fail while the mesh settles
            value = None
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.02)


class Node:
    def __init__(self, root: Path, node_id: str, ca: Path, extra_args: Sequence[str] = ()) -> None:
        self.id = node_id
        self.extra_args = list(extra_args)
        self.dir = root / node_id
        self.socket = self.dir / "konord.sock"
        self.log = root / f"{node_id}.log"
        self.process: Optional[subprocess.Popen[bytes]] = None
        subprocess.run([str(binary("konorctl")), "cert", "issue", "--ca-dir", str(ca), "--node-id", node_id,
                        "--out", str(self.dir / "tls")], check=True, capture_output=True)

    def address(self) -> str:
        return (self.dir / "listen.addr").read_text().strip()

    def http_port(self) -> int:
        """The port of the node's HTTP API (konord writes http.addr at start)."""
        return int((self.dir / "http.addr").read_text().strip().rsplit(":", 1)[1])

    def start(self, seeds: List[str]) -> None:
        listen = self.address() if (self.dir / "listen.addr").exists() else "127.0.0.1:0"
        # The HTTP port is new at each start: an address left by the last run must not be read.
        (self.dir / "http.addr").unlink(missing_ok=True)
        args = [str(binary("konord")), "--data-dir", str(self.dir), "--node-id", self.id, "--listen", listen,
                "--gossip-interval-ms", "100", "--http-listen", "127.0.0.1:0", *self.extra_args]
        for seed in seeds:
            args += ["--seed", seed]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        eventually(f"{self.id} listens", lambda: True if self.socket.exists() and (self.dir / "listen.addr").exists()
                   and (self.dir / "http.addr").exists() else None)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None

    def client(self) -> Client:
        return eventually(f"a client of {self.id}", lambda: Client(self.socket, process="pytest"))


class Mesh:
    def __init__(self, root: Path, extra_args: Sequence[str] = ()) -> None:
        self.root = root
        ca = root / "ca"
        self.ca = ca
        subprocess.run([str(binary("konorctl")), "ca", "init", "--dir", str(ca)], check=True, capture_output=True)
        self.nodes = [Node(root, f"n{i}", ca, extra_args) for i in (1, 2, 3)]
        self.nodes[0].start([])
        for node in self.nodes[1:]:
            node.start([self.nodes[0].address()])
        clients = [node.client() for node in self.nodes]
        for client in clients:
            eventually("every node sees three live nodes",
                       lambda: True if sum(row["state"] == "live" for row in client.nodes()) == 3 else None)
        for client in clients:
            client.close()

    def group(self, name: str, mode: str = "eventual") -> List[Client]:
        """A group created on n1 and joined by n2 and n3; a client per node."""
        clients = [node.client() for node in self.nodes]
        key = clients[0].create_group(name, mode)
        for client in clients[1:]:
            eventually(f"{client.node_id} joins {name}", lambda: client.join_group(name, key))
        return clients

    def close(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="konor-py-"))
    built = Mesh(root)
    try:
        yield built
    finally:
        built.close()
        shutil.rmtree(root, ignore_errors=True)
