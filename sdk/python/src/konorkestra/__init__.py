"""Konorkestra's Python SDK: read live configuration from the local konord over its Unix
socket, watch it change, report what the application applied, and write.

    from konorkestra import Client

    client = Client()                      # KONOR_SOCKET, or Client("/path/konord.sock")
    pool = client.get("checkout", "db.pool")
    for event in client.watch("checkout"):
        ...

The protocol is docs/protocol.md; ``konorkestra.aio`` has the same calls for asyncio.
"""

from .canon import canonical_json, content_hash
from .client import CachedGroup, ChangeHandle, Client, Watch
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _error_names
from .wire import MASKED, PROTOCOL_VERSION, UNSET, Change, Committed, Freshness, Resync, Snapshot, WatchEvent, nest

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Watch",
    "ChangeHandle",
    "CachedGroup",
    "Snapshot",
    "Freshness",
    "Committed",
    "Change",
    "Resync",
    "WatchEvent",
    "UNSET",
    "MASKED",
    "PROTOCOL_VERSION",
    "canonical_json",
    "content_hash",
    "nest",
    *_error_names,
]
