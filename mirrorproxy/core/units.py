"""Parsing of human-written durations ("90s", "5m") and sizes ("512MiB").

Pure functions; they raise ValueError with a message fit to show a user, and the
config loader adds the file and key to it.
"""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP]i?B|[KMGTP]|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KIB": 1024,
    "KB": 1000,
    "M": 1024**2,
    "MIB": 1024**2,
    "MB": 1000**2,
    "G": 1024**3,
    "GIB": 1024**3,
    "GB": 1000**3,
    "T": 1024**4,
    "TIB": 1024**4,
    "TB": 1000**4,
    "P": 1024**5,
    "PIB": 1024**5,
    "PB": 1000**5,
}


def parse_duration(text: str) -> float:
    """Return seconds for "90s", "5m", "1h30m", "250ms", "7d" (or a bare number of seconds).

    Raises:
        ValueError: the text is not a non-negative duration.
    """
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    if re.fullmatch(r"-\d+(?:\.\d+)?", s):
        raise ValueError(f"negative duration {text!r}")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        value = float(s)
        return value
    total = 0.0
    pos = 0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(
            f"bad duration {text!r} (use a number with ms, s, m, h or d, e.g. '90s', '5m')"
        )
    return total


def parse_size(text: str) -> int:
    """Return bytes for "512MiB", "50GiB", "10GB", "4096" (binary K/M/G without B).

    Raises:
        ValueError: the text is not a non-negative size.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad size {text!r} (use e.g. '512MiB', '50GiB', '10GB')")
    unit = (m.group(2) or "").upper()
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def format_size(n: float) -> str:
    """Render bytes for people: 1536 -> '1.5KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")
