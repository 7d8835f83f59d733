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

_CRED = struct.Struct("3i")


class Connection:
    """A connected, greeted socket. ``node_id`` is the daemon's, from its welcome."""

    def __init__(self, path: str, timeout: float, daemon_uid: DaemonUid, process: Optional[str]) -> None:
        self.path = path
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as error:
            sock.close()
            raise ConnectError(path, error.strerror or str(error)) from None
        self._sock = sock
        self._buffer = bytearray()
        self._next_id = 1
        try:
            check_daemon(sock, path, daemon_uid)
            answer = self.exchange(hello(process))
            self.node_id = check_welcome(answer)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def send(self, request: Mapping[str, Any]) -> int:
        """Sends ``request`` under a fresh id and returns the id. A closed peer raises
        ConnectionClosedError with ``sent=False`` semantics (nothing reached the daemon)."""
        request_id = self._next_id
        self._next_id += 1
        frame = encode_frame(request_id, request)
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(frame)
        except socket.timeout:
            raise KonorTimeoutError(self.timeout) from None
        except OSError as error:
            raise NotSent(f"the connection to konord is closed ({error.strerror or error})") from None
        return request_id

    def exchange(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """Sends ``request`` and returns its answer's body (an ``error`` body included; an
        error about the connection itself, on id 0, is raised)."""
        request_id = self.send(request)
        deadline = time.monotonic() + self.timeout
        while True:
            kind, answer_id, body = self.read_frame(deadline)
            if kind != "response":
                continue
            if answer_id == request_id:
                return body
            if answer_id == 0:
                raise connection_error(body)

    def read_frame(self, deadline: Optional[float]) -> ServerFrame:
        """The next frame; ``deadline`` (monotonic seconds) or ``None`` to wait for ever. A
        timeout keeps what was read, so the next call goes on where this one stopped."""
        header = self._read_exactly(4, deadline)
        length = frame_length(header)
        payload = self._read_exactly(4 + length, deadline)[4:]
        del self._buffer[: 4 + length]
        return read_server_frame(bytes(payload))

    def _read_exactly(self, count: int, deadline: Optional[float]) -> bytes:
        while len(self._buffer) < count:
            if deadline is None:
                self._sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KonorTimeoutError(self.timeout)
                self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(max(65536, count - len(self._buffer)))
            except socket.timeout:
                raise KonorTimeoutError(self.timeout) from None
            except OSError as error:
                raise ConnectionClosedError(f"connection to konord closed: {error.strerror or error}") from None
            if not chunk:
                where = "in the middle of a frame" if self._buffer else "before the answer"
                raise ConnectionClosedError(f"connection to konord closed {where}")
            self._buffer.extend(chunk)
        return bytes(self._buffer[:count])

    def shutdown(self) -> None:
        """Unblocks a reader in another thread (it sees the connection closed)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class NotSent(ConnectionClosedError):
    """The request never reached the daemon (the connection was already closed): safe to send
    again on a new connection."""


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

