"""Reading an ``Authorization`` header: Basic user and password, or a Bearer token.

Pure. Never logs or returns the raw header; a malformed one is reported without
its content.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

MAX_TOKEN = 16 * 1024  # the listener caps a header line anyway


@dataclass(frozen=True, slots=True)
class Basic:
    user: str
    password: str

    def __repr__(self) -> str:
        return f"Basic(user={self.user[:64]!r}, password='***')"


@dataclass(frozen=True, slots=True)
class Bearer:
    token: str

    def __repr__(self) -> str:
        return "Bearer('***')"


@dataclass(frozen=True, slots=True)
class Malformed:
    scheme: str  # "basic", "bearer" or "other"
    reason: str


Credentials = Basic | Bearer | Malformed


def parse_authorization(value: str | None) -> Credentials | None:
    """The credentials in a header value; None when there are none (anonymous).

    An empty Basic pair (``Basic Og==``, which some clients send when they have no
    credentials for a host) counts as anonymous.
    """
    if value is None or not value.strip():
        return None
    scheme, _, param = value.strip().partition(" ")
    scheme, param = scheme.lower(), param.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(param, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return Malformed("basic", "Basic credentials are not base64 of user:password")
        user, sep, password = decoded.partition(":")
        if not sep:
            return Malformed("basic", "Basic credentials are not user:password")
        if not user and not password:
            return None
        return Basic(user, password)
    if scheme == "bearer":
        if not param or len(param) > MAX_TOKEN:
            return Malformed("bearer", "empty or oversized Bearer token")
        return Bearer(param)
    return Malformed("other", "unsupported Authorization scheme")
