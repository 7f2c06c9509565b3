"""The report of blob use one cluster member sends another: its wire format.

Pure. ``POST /_mirrorproxy/touches`` with ``X-Mirrorproxy-Forwarded`` and a JSON
body ``{"served": [digest, ...], "reading": [digest, ...]}``: the blobs the sender
served since its last report, and those it is reading from the shared bucket now.
Bounded: a body over ``MAX_BODY`` bytes or ``MAX_DIGESTS`` digests is refused.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

from mirrorproxy.core.errors import DigestInvalid
from mirrorproxy.core.oci import parse_digest

TOUCHES_PATH = "/_mirrorproxy/touches"
MAX_DIGESTS = 4096  # per report, both lists together
MAX_BODY = MAX_DIGESTS * 140 + 1024  # a sha512 digest is 135 characters, quoted 137


@dataclass(frozen=True, slots=True)
class TouchReport:
    served: frozenset[str]
    reading: frozenset[str]


def encode_report(served: Collection[str], reading: Collection[str]) -> bytes:
    return json.dumps({"served": sorted(served), "reading": sorted(reading)}).encode()


def decode_report(body: bytes) -> TouchReport:
    """The report in ``body``.

    Raises:
        ValueError: not JSON, not that shape, a digest that is not one, or too many.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(data, dict) or not set(data) <= {"served", "reading"}:
        raise ValueError('expected an object with "served" and "reading" lists')
    lists = []
    for key in ("served", "reading"):
        items = data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(d, str) for d in items):
            raise ValueError(f"{key}: expected a list of digests")
        try:
            lists.append(frozenset(str(parse_digest(d)) for d in items))
        except DigestInvalid as err:
            raise ValueError(f"{key}: {err.message}") from None
    if sum(len(x) for x in lists) > MAX_DIGESTS:
        raise ValueError(f"more than {MAX_DIGESTS} digests in one report")
    return TouchReport(served=lists[0], reading=lists[1])
