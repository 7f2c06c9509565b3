"""What a test does when this machine lacks something it needs (a binary, root, mounts).

Locally it skips with the reason; CI sets ``MIRRORPROXY_REQUIRE_E2E=1`` so that a
broken image fails instead of silently skipping.
"""

from __future__ import annotations

REQUIRE_E2E_ENV = "MIRRORPROXY_REQUIRE_E2E"
