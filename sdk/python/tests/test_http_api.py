"""konord's HTTP API (issue 15) against the real 3-node mesh, with Python's own TLS and HTTP
client (an independent implementation) and the Prometheus client's OpenMetrics parser."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml
from openapi_spec_validator import validate
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import Mesh, Node, binary, eventually

# Every node answers to this name in its certificate (konor_node::pki::SERVER_NAME).
SERVER_NAME = "konor-node"


class Https(http.client.HTTPSConnection):
    """An HTTPS connection to 127.0.0.1 that checks the server's certificate for SERVER_NAME."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__(SERVER_NAME, port, context=context, timeout=30)
        self.tls = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=SERVER_NAME)


def context(ca: Path, cert: Optional[Path] = None) -> ssl.SSLContext:
    tls = ssl.create_default_context(cafile=str(ca / "ca.crt"))
    if cert is not None:
        tls.load_cert_chain(str(cert / "node.crt"), str(cert / "node.key"))
    return tls


def issue(ca: Path, identity: str, out: Path) -> Path:
    if not (out / "node.crt").exists():
        subprocess.run([str(binary("konorctl")), "cert", "issue", "--ca-dir", str(ca), "--node-id", identity,
                        "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def operator(mesh: Mesh) -> Path:
    """An operator's certificate from the cluster CA."""
    return issue(mesh.ca, "ops-alice", mesh.root / "ops-alice")


def call(node: Node, tls: ssl.SSLContext, method: str, path: str,
         body: Optional[Dict[str, Any]] = None) -> Tuple[int, Any]:
    connection = Https(node.http_port(), tls)
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers={"content-type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        return response.status, json.loads(text) if text.startswith("{") else text
    finally:
        connection.close()


def test_health_and_metrics_answer_without_a_certificate(mesh: Mesh) -> None:
    n1 = mesh.nodes[0]
    anonymous = context(mesh.ca)
    status, body = call(n1, anonymous, "GET", "/api/v1/health")
    assert status == 200 and body["healthy"] is True
    assert body["health"]["node_id"] == "n1" and body["health"]["members"]["live"] == 3
    status, text = call(n1, anonymous, "GET", "/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    live = [s for s in families["konord_members"].samples if s.labels == {"state": "live"}]
    assert [s.value for s in live] == [3.0]
    assert families["konord_degraded"].samples[0].value == 0.0


def test_the_served_openapi_description_is_valid_openapi(mesh: Mesh) -> None:
    status, text = call(mesh.nodes[0], context(mesh.ca), "GET", "/api/v1/openapi.yaml")
    assert status == 200
    description = yaml.safe_load(text)
    validate(description)
    assert "/api/v1/groups/{group}/watch" in description["paths"]


def test_health_thresholds_answer_503_with_the_reasons(mesh: Mesh) -> None:
    n1 = mesh.nodes[0]
    mesh.group("quiet")
    anonymous = context(mesh.ca)
    status, body = call(n1, anonymous, "GET", "/api/v1/health?max_dead=0&max_stale=0")
    assert status == 200, body
    # The answer may be up to half a second old (the door caches the daemon's health).
    def quiet_fails() -> Optional[Tuple[int, Any]]:
        status, body = call(n1, anonymous, "GET", "/api/v1/health?max_since_change_ms=0")
        named = any("group quiet last changed here" in failure for failure in body["failures"])
        return (status, body) if named else None

    status, body = eventually("the quiet group fails max_since_change_ms=0", quiet_fails)
    assert status == 503 and body["healthy"] is False
    status, body = call(n1, anonymous, "GET", "/api/v1/health?max_dead=many")
    assert status == 400 and body["code"] == "bad_request"
    status, body = call(n1, anonymous, "GET", "/api/v1/health?unknown=1")
    assert status == 400 and body["code"] == "bad_request"


def test_reads_and_writes_need_a_certificate_from_the_cluster_ca(mesh: Mesh) -> None:
    n1 = mesh.nodes[0]
    mesh.group("guarded")
    anonymous = context(mesh.ca)
    # Every operation the served description does not mark open is refused without a
    # certificate, before its body is read (an empty body would otherwise be a 400).
    description = yaml.safe_load(call(n1, anonymous, "GET", "/api/v1/openapi.yaml")[1])
    guarded = [(method.upper(), path.replace("{group}", "guarded").replace("{key}", "x"))
               for path, item in description["paths"].items()
               for method, operation in item.items()
               if method != "parameters" and operation.get("security") != []]
    assert len(guarded) >= 19, guarded
    for method, path in guarded:
        status, answer = call(n1, anonymous, method, path)
        assert (status, answer["code"]) == (401, "unauthenticated"), (method, path)
    # A certificate from another CA is refused in the handshake.
    foreign_ca = mesh.root / "foreign-ca"
    if not foreign_ca.exists():
        subprocess.run([str(binary("konorctl")), "ca", "init", "--dir", str(foreign_ca)], check=True,
                       capture_output=True)
    stranger = issue(foreign_ca, "ops-alice", mesh.root / "foreign-ops")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        call(n1, context(mesh.ca, stranger), "PUT", "/api/v1/groups/guarded/settings/x", {"value": 1})
    assert n1.client().snapshot("guarded").settings == {}


def test_a_write_over_http_reaches_the_sdk_on_other_nodes_with_the_callers_identity(
        mesh: Mesh, operator: Path) -> None:
    c1, c2, c3 = mesh.group("web")
    n1 = mesh.nodes[0]
    tls = context(mesh.ca, operator)
    status, body = call(n1, tls, "PUT", "/api/v1/groups/web/settings/db.pool", {"value": 20, "message": "more"})
    assert status == 200 and body["type"] == "committed", body
    version = body["version"]
    eventually("n3 reads the HTTP write", lambda: True if c3.get("web", "db.pool") == 20 else None)
    status, body = call(n1, tls, "GET", "/api/v1/groups/web/settings/db.pool")
    assert (status, body["value"]) == (200, 20)
    status, body = call(n1, tls, "GET", "/api/v1/groups/web/versions")
    row = [v for v in body["versions"] if v["label"] == version][0]
    assert row["author"] == "ops-alice@n1" and row["message"] == "more"
    status, body = call(n1, tls, "POST", "/api/v1/groups/web/settings",
                        {"entries": {"a": 1, "b": "x"}, "message": "two"})
    assert status == 200, body
    status, body = call(n1, tls, "DELETE", "/api/v1/groups/web/settings/a?message=gone")
    assert status == 200, body
    eventually("n2 sees the delete", lambda: True if "a" not in c2.snapshot("web").settings else None)
    status, body = call(n1, tls, "GET", f"/api/v1/groups/web/diff?from={version}&to={body['version']}")
    assert status == 200 and body["type"] == "diff", body
    # Errors keep the socket's stable codes, with an HTTP status.
    assert call(n1, tls, "GET", "/api/v1/groups/nope/settings")[1]["code"] == "unknown_group"
    assert call(n1, tls, "GET", "/api/v1/groups/nope/settings")[0] == 404
    status, body = call(n1, tls, "PUT", "/api/v1/groups/web/settings/db.pool", {"value": 20})
    assert (status, body["code"]) == (409, "unchanged")
    status, body = call(n1, tls, "PUT", "/api/v1/groups/web/settings/bad..key", {"value": 1})
    assert (status, body["code"]) == (400, "bad_request")
    status, body = call(n1, tls, "GET", "/api/v1/no-such-route")
    assert (status, body["code"]) == (404, "not_found")
    status, body = call(n1, tls, "POST", "/api/v1/nodes", {})
    assert (status, body["code"]) == (405, "method_not_allowed")
    status, body = call(n1, tls, "POST", "/api/v1/groups/web/settings", {"entries": {"a": 1}, "extra": 1})
    assert (status, body["code"]) == (400, "bad_request") and "extra" in body["message"]
    for client in (c1, c2, c3):
        client.close()


def sse_events(node: Node, tls: ssl.SSLContext, path: str,
               headers: Optional[Dict[str, str]] = None) -> Iterator[Dict[str, str]]:
    """The Server-Sent Events of one stream, each as its fields."""
    connection = Https(node.http_port(), tls)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("content-type", "").startswith("text/event-stream")
    fields: Dict[str, str] = {}
    try:
        while True:
            line = response.readline().decode()
            if line == "":
                return
            line = line.rstrip("\n")
            if line == "":
                if fields:
                    yield fields
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
    finally:
        connection.close()


def test_the_watch_stream_delivers_changes_and_resumes_from_last_event_id(mesh: Mesh, operator: Path) -> None:
    c1, c2, c3 = mesh.group("live")
    n2 = mesh.nodes[1]
    tls = context(mesh.ca, operator)
    stream = sse_events(n2, tls, "/api/v1/groups/live/watch")
    first = next(stream)
    assert first["event"] == "watching"
    c1.set("live", {"color": "blue"})
    change = next(stream)
    assert change["event"] == "change"
    data = json.loads(change["data"])
    assert data["set"] == {"color": "blue"} and change["id"] == f"n2:{data['revision']}"
    stream.close()
    # Resuming after the change's revision gets the next change only, as a socket watch does.
    c1.set("live", {"color": "red"})
    eventually("n2 holds the second change", lambda: True if c2.get("live", "color") == "red" else None)
    resumed = sse_events(n2, tls, "/api/v1/groups/live/watch", {"Last-Event-ID": change["id"]})
    events: List[Dict[str, str]] = [next(resumed), next(resumed)]
    resumed.close()
    assert events[0]["event"] == "watching"
    assert events[1]["event"] == "change" and json.loads(events[1]["data"])["set"] == {"color": "red"}
    # An id from another node (a load balancer sent the reconnect elsewhere) gets a resync:
    # revisions are local to a node.
    elsewhere = sse_events(mesh.nodes[2], tls, "/api/v1/groups/live/watch", {"Last-Event-ID": change["id"]})
    assert next(elsewhere)["event"] == "watching"
    resync = next(elsewhere)
    elsewhere.close()
    assert resync["event"] == "resync" and json.loads(resync["data"])["settings"]["color"] == "red"
    assert resync["id"].startswith("n3:")
    for client in (c1, c2, c3):
        client.close()


def test_metrics_count_commits_and_show_each_group(mesh: Mesh, operator: Path) -> None:
    c1, c2, c3 = mesh.group("counted", "strong")
    n1 = mesh.nodes[0]
    c1.set("counted", {"k": 1})
    assert call(n1, context(mesh.ca), "GET", "/api/v1/health")[0] == 200
    status, text = call(n1, context(mesh.ca), "GET", "/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    commits = {s.labels["mode"]: s.value for s in families["konord_commit_duration_seconds"].samples
               if s.name.endswith("_count")}
    assert commits.get("strong", 0) >= 1
    revisions = {s.labels["group"]: s for s in families["konord_group_revision"].samples}
    assert revisions["counted"].labels["mode"] == "strong" and revisions["counted"].value >= 2
    assert families["konord_http_requests"].samples[0].value >= 1
    gossip_in = [s.value for s in families["konord_peer_frames"].samples
                 if s.labels == {"channel": "gossip", "direction": "in"}]
    assert gossip_in and gossip_in[0] > 0

    def members_seen() -> Optional[bool]:
        text = call(n1, context(mesh.ca), "GET", "/metrics")[1]
        families = {family.name: family for family in text_string_to_metric_families(text)}
        members = {s.labels["group"]: s.value for s in families["konord_group_members"].samples}
        return True if members["counted"] == 3 else None

    eventually("n1's gossip shows the group's three members", members_seen)
    for client in (c1, c2, c3):
        client.close()


def test_metrics_measure_how_long_a_peers_change_took_to_arrive(mesh: Mesh) -> None:
    c1, c2, c3 = mesh.group("lagged")
    n1 = mesh.nodes[0]

    def lag_samples() -> float:
        text = call(n1, context(mesh.ca), "GET", "/metrics")[1]
        families = {family.name: family for family in text_string_to_metric_families(text)}
        return sum(s.value for s in families["konord_propagation_lag_seconds"].samples if s.name.endswith("_count"))

    before = lag_samples()
    c2.set("lagged", {"from": "n2"})
    eventually("n1 reads n2's change", lambda: True if c1.get("lagged", "from") == "n2" else None)
    eventually("n1 measured the change's propagation", lambda: True if lag_samples() > before else None)
    for client in (c1, c2, c3):
        client.close()
