"""The socket protocol without I/O: frames, the hello, answers and events read strictly into
typed values (docs/protocol.md, "Local socket protocol"). The blocking client and the asyncio
client share it, so both read the daemon's bytes the same way."""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .canon import INT_MAX, parse_json
from .errors import ProtocolError, daemon_error

#: The protocol version this package speaks.
PROTOCOL_VERSION = 1

# What a caller that may not reveal secret values (a viewer) reads in place of each value of a
# key marked secret (docs/operations.md, "Secret values").
MASKED = "<secret>"

#: Largest frame payload either side sends (16 MiB).
FRAME_BYTES_MAX = 16 * 1024 * 1024

#: The socket path's environment variable.
SOCKET_ENV = "KONOR_SOCKET"

#: The environment variable naming the uid konord runs as (or ``any``).
DAEMON_UID_ENV = "KONOR_DAEMON_UID"

#: How long one exchange may take by default (connect, a request and its answer), seconds.
TIMEOUT_DEFAULT = 10.0

#: The longest process name the hello may carry (bytes).
PROCESS_BYTES_MAX = 256

_HEADER = struct.Struct(">I")

Settings = Dict[str, Any]


class _Unset:
    """The value of a key that is not set (``get``'s default), unlike JSON ``null`` (``None``)."""

    _instance: Optional["_Unset"] = None

    def __new__(cls) -> "_Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


#: What ``get`` returns for a key that is not set (``None`` is a key set to JSON ``null``).
UNSET: Any = _Unset()


@dataclass(frozen=True)
class Freshness:
    """How current a read is: this node's revision, the newest version served, the time since
    the node last applied a change, and whether a strong group's read could not be shown fresh."""

    revision: int
    version: str
    age_ms: int
    stale: bool
    stale_reason: Optional[str] = None


@dataclass(frozen=True)
class Snapshot:
    """A group's settings with their content hash (verified by the client) and freshness."""

    group: str
    settings: Settings
    content_hash: str
    freshness: Freshness

    @property
    def revision(self) -> int:
        return self.freshness.revision

    @property
    def version(self) -> str:
        return self.freshness.version


@dataclass(frozen=True)
class Committed:
    """A write committed: the new version, this node's revision, the short content hash, and
    the nodes known to hold it durably."""

    group: str
    version: str
    revision: int
    content_hash: str
    acked_by: List[str]


@dataclass(frozen=True)
class Change:
    """Keys in ``set`` took these values and keys in ``removed`` are gone; the node's revision
    is now ``revision``."""

    group: str
    revision: int
    version: str
    set: Settings = field(default_factory=dict)
    removed: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Resync:
    """The whole state at ``revision``: replaces everything the client holds."""

    group: str
    revision: int
    version: str
    settings: Settings = field(default_factory=dict)


WatchEvent = Union[Change, Resync]


def apply_event(settings: Settings, event: WatchEvent) -> Settings:
    """The settings after ``event`` (a new dict; ``settings`` is left as it was)."""
    if isinstance(event, Resync):
        return dict(event.settings)
    updated = dict(settings)
    for key in event.removed:
        updated.pop(key, None)
    updated.update(event.set)
    return updated


def encode_frame(request_id: int, request: Mapping[str, Any]) -> bytes:
    """A client frame: the 4-byte big-endian length, then ``{"id":..,"request":..}``."""
    payload = json.dumps({"id": request_id, "request": request}, ensure_ascii=False, separators=(",", ":"),
                         allow_nan=False).encode("utf-8")
    if len(payload) > FRAME_BYTES_MAX:
        raise ValueError(f"the request is {len(payload)} bytes, more than the frame limit of {FRAME_BYTES_MAX}")
    return _HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    """The payload length a frame header announces, checked against the limit."""
    (length,) = _HEADER.unpack(header)
    if length > FRAME_BYTES_MAX:
        raise ProtocolError(f"the daemon announced a frame of {length} bytes, more than the limit of {FRAME_BYTES_MAX}")
    return int(length)


def hello(process: Optional[str] = None) -> Dict[str, Any]:
    """The hello request: this protocol version, this process's pid and name."""
    name = process if process is not None else os.path.basename(sys.argv[0] or "") or "python"
    # A name with undecodable bytes (surrogate escapes from argv) is sent with replacements.
    encoded = name.encode("utf-8", "replace")[:PROCESS_BYTES_MAX]
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
            "process": encoded.decode("utf-8", "ignore")}


ServerFrame = Tuple[str, int, Dict[str, Any]]


def read_server_frame(payload: bytes) -> ServerFrame:
    """``("response", id, body)`` or ``("event", 0, body)``; anything else is a ProtocolError."""
    try:
        frame = parse_json(payload.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"the daemon sent a frame that is not JSON: {error}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("the daemon sent a frame that is not an object")
    if "response" in frame:
        envelope = frame["response"]
        if not isinstance(envelope, dict):
            raise ProtocolError("the daemon sent a response that is not an object")
        request_id = envelope.get("id")
        body = envelope.get("response")
        if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id <= INT_MAX:
            raise ProtocolError(f"the daemon sent a response without a valid id: {request_id!r}")
        return "response", request_id, _body(body, "response")
    if "event" in frame:
        envelope = frame["event"]
        if not isinstance(envelope, dict):
            raise ProtocolError("the daemon sent an event that is not an object")
        return "event", 0, _body(envelope.get("event"), "event")
    raise ProtocolError(f"the daemon sent a frame that is neither a response nor an event (keys {sorted(frame)})")


def _body(body: Any, what: str) -> Dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise ProtocolError(f"the daemon sent a {what} without a type")
    return body


def expect(body: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """``body`` if it is a ``kind`` answer; the daemon's error as its exception; else a
    ProtocolError naming both types."""
    if body["type"] == "error":
        raise daemon_error(_text(body, "code"), _text(body, "message"))
    if body["type"] != kind:
        raise ProtocolError(f"expected a `{kind}` answer, got `{body['type']}`")
    return body


def check_welcome(body: Dict[str, Any]) -> str:
    """The daemon's node id from its welcome, after checking it speaks our protocol."""
    welcome = expect(body, "welcome")
    protocol = _int(welcome, "protocol")
    if protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            f"konord speaks protocol {protocol} and this client {PROTOCOL_VERSION}: upgrade "
            f"{'this package' if protocol > PROTOCOL_VERSION else 'konord'}"
        )
    return _text(welcome, "node_id")


def read_freshness(value: Any) -> Freshness:
    if not isinstance(value, dict):
        raise ProtocolError("the answer has no freshness object")
    reason = value.get("stale_reason")
    return Freshness(
        revision=_int(value, "revision"),
        version=_text(value, "version"),
        age_ms=_int(value, "age_ms"),
        # An older daemon may leave the flag out: not stale, as the Rust SDK reads it.
        stale=value.get("stale") is True,
        stale_reason=reason if isinstance(reason, str) else None,
    )


def read_value(body: Dict[str, Any]) -> Any:
    """A ``value`` answer's value: ``UNSET`` when absent, ``None`` for JSON null."""
    value = expect(body, "value")
    return value["value"] if "value" in value else UNSET


def read_snapshot(body: Dict[str, Any]) -> Snapshot:
    from .canon import content_hash

    snapshot = expect(body, "snapshot")
    settings = _object(snapshot, "settings")
    announced = _text(snapshot, "content_hash")
    try:
        computed = content_hash(settings)
    except ValueError as error:  # a lone surrogate, a number JSON cannot hold
        raise ProtocolError(f"the snapshot of {snapshot.get('group')!r} cannot be hashed: {error}") from None
    if computed != announced:
        raise ProtocolError(
            f"the snapshot of {snapshot.get('group')!r} hashes to {computed}, not to the {announced} the daemon sent"
        )
    return Snapshot(group=_text(snapshot, "group"), settings=settings, content_hash=announced,
                    freshness=read_freshness(snapshot.get("freshness")))


def read_committed(body: Dict[str, Any]) -> Committed:
    committed = expect(body, "committed")
    acked = committed.get("acked_by")
    if not isinstance(acked, list) or not all(isinstance(node, str) for node in acked):
        raise ProtocolError("a `committed` answer without an acked_by list of node ids")
    return Committed(group=_text(committed, "group"), version=_text(committed, "version"),
                     revision=_int(committed, "revision"), content_hash=_text(committed, "content_hash"),
                     acked_by=list(acked))


def read_watching(body: Dict[str, Any]) -> int:
    """The revision a ``watching`` answer names."""
    return _int(expect(body, "watching"), "revision")


def read_event(body: Dict[str, Any]) -> Optional[WatchEvent]:
    """A watch event; ``None`` for an event type this client does not know (skipped)."""
    kind = body["type"]
    if kind == "change":
        # Absent or null lists and maps are empty (readers default what they do not get).
        removed = body.get("removed") or []
        changed = body.get("set") or {}
        if not isinstance(removed, list) or not all(isinstance(key, str) for key in removed):
            raise ProtocolError("a `change` event whose `removed` is not a list of keys")
        if not isinstance(changed, dict):
            raise ProtocolError("a `change` event whose `set` is not an object")
        return Change(group=_text(body, "group"), revision=_int(body, "revision"), version=_text(body, "version"),
                      set=changed, removed=list(removed))
    if kind == "resync":
        return Resync(group=_text(body, "group"), revision=_int(body, "revision"), version=_text(body, "version"),
                      settings=_object(body, "settings"))
    return None


#: Requests a client call may not send: the connection's own hello, and watches, which need a
#: connection of their own (``watch()``).
RESERVED_REQUESTS = frozenset({"hello", "watch", "unwatch"})


def write_meta(
    author: str, message: str, if_version: Optional[str] = None, if_content: Optional[str] = None,
    secret: Iterable[str] = (),
) -> Dict[str, Any]:
    """A write's ``meta``: author, message, the optional preconditions (docs/protocol.md,
    "Conditional writes") and the keys it marks secret."""
    meta: Dict[str, Any] = {"author": author, "message": message}
    if if_version is not None:
        meta["if_version"] = if_version
    if if_content is not None:
        meta["if_content"] = if_content
    if isinstance(secret, (str, bytes)):
        raise TypeError("secret is a list of keys (secret=[\"db.password\"]), not one string")
    marks = list(secret)
    if marks:
        meta["secret"] = marks
    return meta


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"a `{body.get('type')}` answer without the text field `{name}`")
    return value


def _int(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"a `{body.get('type', 'freshness')}` answer without the count `{name}`")
    return value


def _object(body: Mapping[str, Any], name: str) -> Dict[str, Any]:
    value = body.get(name)
    if not isinstance(value, dict):
        raise ProtocolError(f"a `{body.get('type')}` answer without the object `{name}`")
    return value


def daemon_uid_from_env() -> Optional[Union[int, str]]:
    """``KONOR_DAEMON_UID``: ``None`` (root or our own uid), a uid, or ``"any"``."""
    text = os.environ.get(DAEMON_UID_ENV)
    if text is None:
        return None
    return parse_daemon_uid(text)


def parse_daemon_uid(text: str) -> Union[int, str]:
    stripped = text.strip()
    if stripped == "any":
        return "any"
    try:
        return int(stripped)
    except ValueError:
        from .errors import KonorError

        raise KonorError(
            f"invalid setting: {DAEMON_UID_ENV}={text!r} is not a uid: set it to the number of the user konord "
            "runs as, or to `any`"
        ) from None


def daemon_accepted(accepted: Optional[Union[int, str]], uid: int, own: int) -> bool:
    if accepted == "any":
        return True
    return uid == 0 or uid == own or (isinstance(accepted, int) and uid == accepted)


def resolve_socket(path: Optional[Union[str, "os.PathLike[str]"]]) -> str:
    """The socket path: the argument, else ``KONOR_SOCKET``. konord has no default data dir, so
    there is no default path; without either, SocketUnsetError (as the Rust SDK)."""
    if path is not None:
        return os.fspath(path)
    from_env = os.environ.get(SOCKET_ENV)
    if from_env:
        return from_env
    from .errors import SocketUnsetError

    raise SocketUnsetError()


def nest(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Dotted keys as nested objects: ``{"db.pool": 20}`` -> ``{"db": {"pool": 20}}``. A key
    that is both a value and a prefix of others (``a`` and ``a.b``) raises ValueError."""
    nested: Dict[str, Any] = {}
    for key in sorted(settings):
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"the key {key!r} lies under {part!r}, which holds a value")
            node = child
        if parts[-1] in node:
            raise ValueError(f"the key {key!r} is both a value and a prefix of other keys")
        node[parts[-1]] = settings[key]
    return nested
