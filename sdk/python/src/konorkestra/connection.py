"""One blocking connection to konord: connect, check who listens, say hello, exchange frames.
Not thread-safe by itself: the Client serialises calls on it, a Watch owns its own."""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, Dict, Mapping, Optional, Union

from .errors import (
    ConnectError,
    ConnectionClosedError,
    DaemonError,
    KonorTimeoutError,
    ProtocolError,
    UntrustedDaemonError,
)
from .wire import ServerFrame, check_welcome, daemon_accepted, encode_frame, frame_length, hello, read_server_frame

DaemonUid = Optional[Union[int, str]]

#: struct ucred: pid (signed), uid and gid (unsigned: a uid of 2^31 or more is not negative).
_CRED = struct.Struct("iII")

#: Bytes asked of the kernel per read.
_READ_CHUNK = 65536


class Connection:
    """A connected, greeted socket. ``node_id`` is the daemon's, from its welcome. ``timeout``
    bounds connect, each exchange, and the rest of a frame once its first byte arrived."""

    def __init__(self, path: str, timeout: float, daemon_uid: DaemonUid, process: Optional[str]) -> None:
        self.path = path
        self.timeout = timeout
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as error:  # out of file descriptors, say
            raise ConnectError(path, error.strerror or str(error)) from None
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as error:
            sock.close()
            raise ConnectError(path, error.strerror or str(error)) from None
        self._sock = sock
        self._buffer = bytearray()
        # When the first byte of the frame now partly in the buffer arrived (monotonic s).
        self._frame_started: Optional[float] = None
        self._next_id = 1
        try:
            check_daemon(sock, path, daemon_uid)
            answer = self.exchange(hello(process), time.monotonic() + timeout)
            self.node_id = check_welcome(answer)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self.shutdown()
        self._sock.close()

    def send(self, request: Mapping[str, Any], deadline: float) -> int:
        """Sends ``request`` under a fresh id and returns the id. ``NotSent`` when the frame did
        not leave whole (the daemon handles no partial frame): safe to send again elsewhere."""
        request_id = self._next_id
        self._next_id += 1
        frame = encode_frame(request_id, request)
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self._sock.sendall(frame)
        except socket.timeout:
            # Part of it may be in the daemon's buffer: that frame is cut short, never handled,
            # but the stream is unusable.
            raise NotSent(f"konord did not take the request within {self.timeout:.1f} s") from None
        except OSError as error:
            raise NotSent(f"the connection to konord is closed ({error.strerror or error})") from None
        return request_id

    def exchange(self, request: Mapping[str, Any], deadline: float) -> Dict[str, Any]:
        """Sends ``request`` and returns its answer's body (an ``error`` body included; an
        error about the connection itself, on id 0, is raised). All by ``deadline``."""
        request_id = self.send(request, deadline)
        while True:
            kind, answer_id, body = self.read_frame(deadline)
            if kind != "response":
                continue
            if answer_id == request_id:
                return body
            if answer_id == 0:
                raise connection_error(body)

    def read_frame(self, deadline: Optional[float]) -> ServerFrame:
        """The next frame; ``deadline`` (monotonic seconds) or ``None`` to wait for ever for its
        first byte. Once that byte is here the rest must follow within ``timeout``, whatever
        the deadline (else ProtocolError: a truncated frame). A deadline reached between frames
        raises KonorTimeoutError and keeps what was read."""
        header = self._read_exactly(4, deadline)
        length = frame_length(header)
        payload = self._read_exactly(4 + length, deadline)[4:]
        del self._buffer[: 4 + length]
        self._frame_started = time.monotonic() if self._buffer else None
        return read_server_frame(bytes(payload))

    def _read_exactly(self, count: int, deadline: Optional[float]) -> bytes:
        while len(self._buffer) < count:
            if self._buffer and self._frame_started is None:
                self._frame_started = time.monotonic()
            limit = deadline
            if self._frame_started is not None:
                rest_by = self._frame_started + self.timeout
                limit = rest_by if limit is None else min(limit, rest_by)
            remaining = None if limit is None else limit - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise self._late(deadline)
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(max(_READ_CHUNK, count - len(self._buffer)))
            except socket.timeout:
                raise self._late(deadline) from None
            except OSError as error:
                raise ConnectionClosedError(f"connection to konord closed: {error.strerror or error}") from None
            if not chunk:
                where = "in the middle of a frame" if self._buffer else "before the answer"
                raise ConnectionClosedError(f"connection to konord closed {where}")
            self._buffer.extend(chunk)
        return bytes(self._buffer[:count])

    def _late(self, deadline: Optional[float]) -> Exception:
        started = self._frame_started
        if started is not None and time.monotonic() >= started + self.timeout:
            return ProtocolError(f"truncated frame: its rest did not arrive within {self.timeout:.1f} s")
        return KonorTimeoutError(self.timeout if deadline is None else self.timeout)

    def shutdown(self) -> None:
        """Unblocks a reader in another thread (it sees the connection closed)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class NotSent(ConnectionClosedError):
    """The request never reached the daemon whole: safe to send again on a new connection."""


def connection_error(body: Dict[str, Any]) -> DaemonError:
    """The daemon's id-0 error about the connection (it closes the connection after it)."""
    from .wire import expect

    try:
        expect(body, "error")
    except DaemonError as error:
        return error
    raise ProtocolError(f"the daemon sent a `{body['type']}` answer on id 0, which only carries errors")


def check_daemon(sock: socket.socket, path: str, accepted: DaemonUid) -> None:
    """Refuses the daemon unless it runs as root, as this process's user, or as the uid
    ``accepted`` names (``"any"``: no check). Nothing has been sent yet."""
    if accepted == "any":
        return
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except (OSError, AttributeError) as error:
        raise ConnectError(
            path,
            f"cannot read the peer credentials of the socket ({error}), so cannot tell who listens; "
            "set KONOR_DAEMON_UID=any to connect without checking",
        ) from None
    _pid, uid, _gid = _CRED.unpack(raw)
    own = os.geteuid()
    if not daemon_accepted(accepted, uid, own):
        raise UntrustedDaemonError(path, uid, own, accepted if isinstance(accepted, int) else None)
