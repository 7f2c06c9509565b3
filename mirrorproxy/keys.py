"""Every typed application key, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from mirrorproxy.config import Config
    from mirrorproxy.metrics import Metrics
    from mirrorproxy.pullthrough import PullThrough

CONFIG: web.AppKey[Config] = web.AppKey("config")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
PULLTHROUGH: web.AppKey[PullThrough] = web.AppKey("pullthrough")
