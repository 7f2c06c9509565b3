"""What a test reads in the log records pytest captured (``caplog``)."""

from __future__ import annotations

import logging

import pytest


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR or above, or carrying a traceback (an unexpected failure)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
