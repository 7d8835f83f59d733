"""The golden vectors every SDK must reproduce (sdk/spec/README.md)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from konorkestra.canon import canonical_json, content_hash, number_text, parse_json

SPEC = Path(__file__).resolve().parents[2] / "spec"


def _load(name: str) -> Any:
    return json.loads((SPEC / name).read_text(encoding="utf-8"))


CANONICAL = _load("canonical_json.json")
HASHES = _load("content_hash.json")


@pytest.mark.parametrize("case", CANONICAL["cases"], ids=lambda case: str(case["name"]))
def test_canonical_json(case: dict[str, str]) -> None:
    assert canonical_json(parse_json(case["input"])) == case["canonical"]


def test_doubles() -> None:
    failures = []
    for case in CANONICAL["doubles"]:
        (double,) = struct.unpack(">d", bytes.fromhex(case["bits"]))
        if number_text(double) != case["canonical"]:
            failures.append((case["bits"], number_text(double), case["canonical"]))
    assert not failures, failures[:10]
    assert len(CANONICAL["doubles"]) > 100


@pytest.mark.parametrize("case", HASHES["cases"], ids=lambda case: str(case["name"]))
def test_content_hash(case: dict[str, Any]) -> None:
    settings = {key: parse_json(value) for key, value in case["entries"]}
    assert content_hash(settings) == case["hash"]


def test_domain_matches_the_spec() -> None:
    from konorkestra.canon import CONTENT_HASH_DOMAIN

    assert CONTENT_HASH_DOMAIN.decode() == HASHES["domain"]


def test_strict_reading_refuses_repeated_keys_and_keeps_64_bit_integers() -> None:
    with pytest.raises(ValueError, match="given twice"):
        parse_json('{"a": 1, "a": 2}')
    assert parse_json("18446744073709551615") == 18446744073709551615
    assert isinstance(parse_json("18446744073709551616"), float)
    with pytest.raises(ValueError, match="does not fit in 64 bits"):
        canonical_json(2**64)
