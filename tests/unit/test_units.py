"""Unit tests for mirrorproxy.core.units: human-written durations and sizes."""

from __future__ import annotations

import pytest

from mirrorproxy.core.units import format_size, parse_duration, parse_size

KiB, MiB, GiB, TiB, PiB = 1024, 1024**2, 1024**3, 1024**4, 1024**5


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("7d", 7 * 86400.0),
        ("2h", 7200.0),
        ("1h1m1s", 3661.0),
        ("1d2h", 93600.0),
        ("1m500ms", 60.5),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("90", 90.0),
        ("12.5", 12.5),
        ("  5m  ", 300.0),
        ("1H", 3600.0),
        ("10MS", 0.01),
    ],
)
def test_parse_duration_valid(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "5x",
        "s",
        "ms",
        "m5",
        "5 m",
        "1h 30m",
        "5m30",
        "5mm",
        "5min",
        "5sec",
        "1y",
        "1.s",
        ".5s",
        "5s-",
        "abc",
        "1,5s",
        "-5s",
        "+5s",
        "5m-1s",
        "0x10",
    ],
)
def test_parse_duration_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_parse_duration_empty(text: str) -> None:
    with pytest.raises(ValueError, match="empty duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["-5", "-0.5", " -90 "])
def test_parse_duration_negative_number(text: str) -> None:
    with pytest.raises(ValueError, match="negative duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "1e3", "infinity"])
def test_durations_must_be_finite_numbers(text: str) -> None:
    """NaN, infinities and exponent forms are not durations (nor is a negative one)."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_parse_duration_message_names_the_input() -> None:
    with pytest.raises(ValueError, match=r"'5 minutes'.*e\.g\. '90s'"):
        parse_duration("5 minutes")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * MiB),
        ("50GiB", 50 * GiB),
        ("10GB", 10 * 1000**3),
        ("4096", 4096),
        ("0", 0),
        ("10B", 10),
        ("1K", KiB),
        ("1KiB", KiB),
        ("1KB", 1000),
        ("2M", 2 * MiB),
        ("2MB", 2 * 1000**2),
        ("1G", GiB),
        ("1T", TiB),
        ("1TiB", TiB),
        ("1TB", 1000**4),
        ("1P", PiB),
        ("1PiB", PiB),
        ("1PB", 1000**5),
        ("10 MiB", 10 * MiB),
        ("10mib", 10 * MiB),
        ("10mb", 10 * 1000**2),
        ("1.5GiB", int(1.5 * GiB)),
        ("  4096  ", 4096),
    ],
)
def test_parse_size_valid(text: str, size: int) -> None:
    result = parse_size(text)
    assert result == size
    assert isinstance(result, int)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "-1",
        "-1MiB",
        "1e3",
        "MiB",
        "10XB",
        "10Mi",
        "10iB",
        "10 MiB extra",
        "ten",
        "1,024",
        "0x10",
        "10MiBB",
        "1.5.5",
        ".5GiB",
    ],
)
def test_parse_size_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (1536, "1.5KiB"),
        (MiB, "1.0MiB"),
        (int(2.5 * GiB), "2.5GiB"),
        (5 * TiB, "5.0TiB"),
        (PiB, "1024.0TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
