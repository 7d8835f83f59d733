"""Canonical JSON and the content hash, exactly as docs/protocol.md defines them.

Canonical JSON is RFC 8785 (JCS) with one deviation: integers that fit 64 bits keep their exact
digits. The content hash is a SHA-256 over a domain prefix and each setting, length-prefixed, in
the order of the keys' UTF-8 bytes. Both are pinned by the golden vectors in ``sdk/spec/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any, Mapping

__all__ = ["canonical_json", "content_hash", "parse_json", "CONTENT_HASH_DOMAIN", "INT_MIN", "INT_MAX"]

#: The content hash's domain prefix (22 bytes).
CONTENT_HASH_DOMAIN = b"konor-content-hash-v2\n"

#: The smallest and largest integers held as integers (64 bits, signed or unsigned).
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (``None``, ``bool``, ``int``, ``float``, ``str``,
    lists and dicts with string keys). Raises ``ValueError`` for what JSON cannot hold."""
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def content_hash(settings: Mapping[str, Any]) -> str:
    """The content hash of a group's settings: 64 lowercase hex digits."""
    digest = hashlib.sha256(CONTENT_HASH_DOMAIN)
    for key, encoded in sorted((key.encode("utf-8"), canonical_json(value).encode("utf-8")) for key, value in settings.items()):
        digest.update(struct.pack("<Q", len(key)))
        digest.update(key)
        digest.update(struct.pack("<Q", len(encoded)))
        digest.update(encoded)
    return digest.hexdigest()


def parse_json(text: str | bytes) -> Any:
    """Reads JSON as konord does: integer literals that fit 64 bits as ``int``, other numbers as
    ``float``; an object that gives a key twice is refused (``ValueError``)."""
    return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, object_pairs_hook=_unique_pairs,
                      parse_constant=_no_constant)


def _parse_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"the number {text} is out of range for a double")
    return number


def _parse_int(text: str) -> int | float:
    number = int(text)
    return number if INT_MIN <= number <= INT_MAX else float(text)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} is given twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _write(value: Any, parts: list[str]) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError(f"the integer {value} does not fit in 64 bits; write it as a string")
        parts.append(str(int(value)))
    elif isinstance(value, float):
        parts.append(number_text(value))
    elif isinstance(value, str):
        parts.append(_string(value))
    elif isinstance(value, (list, tuple)):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _write(item, parts)
        parts.append("]")
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"object keys must be strings, not {type(key).__name__}")
        parts.append("{")
        for index, key in enumerate(sorted(value, key=_utf16_units)):
            if index:
                parts.append(",")
            parts.append(_string(key))
            parts.append(":")
            _write(value[key], parts)
        parts.append("}")
    else:
        raise ValueError(f"{type(value).__name__} is not a JSON value")


def _utf16_units(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare as the sequence of code units (RFC 8785 section 3.2.3).
    return key.encode("utf-16-be", "surrogatepass")


def _string(text: str) -> str:
    out = ['"']
    for char in text:
        escaped = _ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char < " ":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def number_text(number: float) -> str:
    """A double as ECMAScript's ``Number.prototype.toString`` prints it (RFC 8785 3.2.2.3)."""
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{number} is not a JSON number")
    if number == 0:
        return "0"
    if number < 0:
        return "-" + number_text(-number)
    # repr gives the shortest digits that read back as the same double, the closest of them.
    mantissa, _, exponent_text = repr(number).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # n: the position of the decimal point relative to the first significant digit.
    exponent = int(exponent_text) if exponent_text else 0
    leading_zeros = len(whole + fraction) - len((whole + fraction).lstrip("0"))
    n = len(whole) + exponent - leading_zeros
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    sign = "+" if n - 1 >= 0 else "-"
    head = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{head}e{sign}{abs(n - 1)}"
