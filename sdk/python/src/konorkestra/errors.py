"""Everything that can go wrong talking to konord. Every exception is a ``KonorError``; the
daemon's refusals are ``DaemonError`` subclasses named after the protocol's error codes
(docs/protocol.md, "Errors"), each carrying ``code`` and ``message``."""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "KonorError",
    "ConnectError",
    "SocketUnsetError",
    "UntrustedDaemonError",
    "ProtocolError",
    "KonorTimeoutError",
    "ConnectionClosedError",
    "DaemonError",
    "BadRequestError",
    "UnknownGroupError",
    "AlreadyExistsError",
    "NotFoundError",
    "UnchangedError",
    "ForbiddenError",
    "UnavailableError",
    "InternalError",
    "ProtocolRefusedError",
    "NotCommittedError",
    "AbortedError",
    "BusyError",
    "ConditionFailedError",
    "SchemaViolationError",
    "OutcomeUnknownError",
    "NotDurableError",
    "IdleError",
    "daemon_error",
]


class KonorError(Exception):
    """Base of every error this package raises."""


class ConnectError(KonorError):
    """The socket could not be opened (konord not running, a wrong path, no permission)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"cannot connect to konord at {path}: {detail}; is konord running? set KONOR_SOCKET or pass the path"
        )
        self.path = path
        self.detail = detail


class SocketUnsetError(KonorError):
    """No socket path was given and ``KONOR_SOCKET`` is not set."""

    def __init__(self) -> None:
        super().__init__(
            "KONOR_SOCKET is not set: set it to konord's socket path (<data-dir>/konord.sock) "
            "or pass the path to Client(socket_path)"
        )


class UntrustedDaemonError(KonorError):
    """The process listening on the socket runs as a user this client does not accept as konord;
    nothing was sent to it."""

    def __init__(self, path: str, uid: int, own: int, also: Optional[int]) -> None:
        named = f", nor as uid {also} named as konord's" if also is not None else ""
        super().__init__(
            f"the process listening on {path} runs as uid {uid}, not as root or as this process's uid {own}{named}, "
            f"so it may not be konord and nothing was sent to it; if konord does run as uid {uid}, set "
            f"KONOR_DAEMON_UID={uid} (or pass daemon_uid=)"
        )
        self.path = path
        self.uid = uid


class ProtocolError(KonorError):
    """The daemon's bytes did not follow the protocol (a malformed frame, an answer of the wrong
    type, a protocol version this client does not speak)."""


class KonorTimeoutError(KonorError, TimeoutError):
    """No answer within the client's timeout; a write may or may not have been applied."""

    def __init__(self, waited: float) -> None:
        super().__init__(f"no answer from konord within {waited * 1000:.0f} ms; a write may or may not have been applied")
        self.waited = waited


class ConnectionClosedError(KonorError):
    """The connection closed before the answer came; a write may or may not have been applied."""


class DaemonError(KonorError):
    """konord refused the request. ``code`` is the protocol's error code (branch on it, not on
    ``message``, which is for people)."""

    code: str = ""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"konord refused the request ({code}): {message}")
        self.code = code
        self.message = message


class BadRequestError(DaemonError):
    """``bad_request``: malformed, invalid or out of bounds."""


class UnknownGroupError(DaemonError):
    """``unknown_group``: the group does not exist on this node."""


class AlreadyExistsError(DaemonError):
    """``already_exists``: the group exists, or a join of it is running."""


class NotFoundError(DaemonError):
    """``not_found``: a key or version that does not exist."""


class UnchangedError(DaemonError):
    """``unchanged``: the write changes nothing; no version was created. Not a failure: a
    caller that writes idempotently treats it as success."""


class ForbiddenError(DaemonError):
    """``forbidden``: a wrong group key, or a member refused the join."""


class UnavailableError(DaemonError):
    """``unavailable``: no peer could serve it in time, or the node is not (yet) in the strong
    group's configuration, or the daemon is stopping. Retrying later may succeed."""


class InternalError(DaemonError):
    """``internal``: the daemon failed internally, or has too many connections."""


class ProtocolRefusedError(DaemonError):
    """``protocol``: the daemon refused this client's hello (another protocol version)."""


class NotCommittedError(DaemonError):
    """``not_committed``: an eventual write is applied on this node but no live quorum
    acknowledged it in time; it is not undone and keeps spreading."""


class AbortedError(DaemonError):
    """``aborted``: a strong write's round aborted; nothing became visible, and never will."""


class BusyError(DaemonError):
    """``busy``: another strong round of the group is in flight on this node; retry."""


class OutcomeUnknownError(DaemonError):
    """``outcome_unknown``: a strong write is committed everywhere or nowhere; read before
    retrying."""


class NotDurableError(DaemonError):
    """``not_durable``: the node could not save the change (disk full, I/O error)."""


class ConditionFailedError(DaemonError):
    """``condition_failed``: a conditional write's ``if_version`` / ``if_content`` no longer
    holds (the group moved on); nothing was written."""


class SchemaViolationError(DaemonError):
    """``schema_violation``: the write would break the group's schema (the message names the
    key, the value and the rule); nothing was written."""


class IdleError(DaemonError):
    """``idle``: the daemon closed a connection idle for 5 minutes (the client reconnects and
    sends again on its own)."""


_BY_CODE: Dict[str, Type[DaemonError]] = {
    "bad_request": BadRequestError,
    "unknown_group": UnknownGroupError,
    "already_exists": AlreadyExistsError,
    "not_found": NotFoundError,
    "unchanged": UnchangedError,
    "forbidden": ForbiddenError,
    "unavailable": UnavailableError,
    "internal": InternalError,
    "protocol": ProtocolRefusedError,
    "not_committed": NotCommittedError,
    "aborted": AbortedError,
    "busy": BusyError,
    "condition_failed": ConditionFailedError,
    "schema_violation": SchemaViolationError,
    "outcome_unknown": OutcomeUnknownError,
    "not_durable": NotDurableError,
    "idle": IdleError,
}


def daemon_error(code: str, message: str) -> DaemonError:
    """The exception for an ``error`` answer; a code this client does not know (a newer
    daemon) is a plain ``DaemonError`` carrying it."""
    return _BY_CODE.get(code, DaemonError)(code, message)
