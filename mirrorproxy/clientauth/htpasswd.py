"""The htpasswd file: bcrypt entries only (``htpasswd -B``), checked off the event loop.

Owns parsing the file (one ``user:$2y$...`` per line), noticing when it changes
(re-read on the next login at most every ``reload_interval`` seconds, so users can
be added without a restart), and verifying a password. bcrypt is slow on purpose:
it runs in a small executor of its own, so a burst of logins cannot hold up the
event loop or the threads that serve cache files. A verified (user, password) is
remembered for ``cache_ttl`` seconds as an HMAC under a per-process key, never as
the password. Failure counting and rate limiting are ``ratelimit``'s business.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from pathlib import Path

import bcrypt

logger = logging.getLogger(__name__)

BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
_BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# Checked for unknown users, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=5))


def parse_htpasswd(text: str) -> dict[str, bytes]:
    """Map user -> bcrypt hash.

    Raises:
        ValueError: a line that is not ``user:<bcrypt hash>``, naming its number.
    """
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"line {number}: not 'user:hash'")
        if not hashed.startswith(BCRYPT_PREFIXES):
            raise ValueError(
                f"line {number}: user {user[:64]!r} has no bcrypt hash "
                "(make entries with htpasswd -B)"
            )
        if not _BCRYPT_RE.fullmatch(hashed):
            raise ValueError(f"line {number}: user {user[:64]!r}: malformed bcrypt hash")
        users[user] = hashed.encode("ascii")
    return users


def read_htpasswd(path: Path) -> dict[str, bytes]:
    """Read and parse the file.

    Raises:
        ValueError: unreadable or malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    return parse_htpasswd(text)


class Htpasswd:
    """Verify Basic credentials against an htpasswd file."""

    def __init__(
        self,
        path: Path,
        *,
        executor: Executor,
        cache_ttl: float,
        cache_max: int,
        reload_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._executor = executor
        self._cache_ttl = cache_ttl
        self._cache_max = cache_max
        self._reload_interval = reload_interval
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}  # HMAC of user+password -> expiry
        self._pending: dict[bytes, asyncio.Future[bool]] = {}  # checks running now
        self._users: Mapping[str, bytes] = read_htpasswd(path)
        self._stamp = self._file_stamp()
        self._next_check = clock() + reload_interval

    def remembered(self, user: str, password: str) -> bool:
        """Whether these credentials were verified a short while ago (no bcrypt)."""
        self._maybe_reload()
        expiry = self._verified.get(self._mac(user, password))
        return expiry is not None and expiry > self._clock()

    def checking(self, user: str, password: str) -> asyncio.Future[bool] | None:
        """The check of these very credentials already running, to share its outcome."""
        return self._pending.get(self._mac(user, password))

    async def verify(self, user: str, password: str) -> bool:
        """Check a password (bcrypt in the executor); remember a success for a while.

        Concurrent checks of the same credentials share one bcrypt run.
        """
        if self.remembered(user, password):
            return True
        mac = self._mac(user, password)
        running = self._pending.get(mac)
        if running is not None:
            return await asyncio.shield(running)
        hashed = self._users.get(user)
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, _check, password.encode("utf-8"), hashed or _DUMMY_HASH
        )
        self._pending[mac] = fut
        try:
            ok = await asyncio.shield(fut)
        finally:
            self._pending.pop(mac, None)
        ok = ok and hashed is not None
        if ok:
            self._remember(user, password)
        return ok

    def _mac(self, user: str, password: str) -> bytes:
        msg = user.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def _remember(self, user: str, password: str) -> None:
        if len(self._verified) >= self._cache_max:
            now = self._clock()
            self._verified = {k: v for k, v in self._verified.items() if v > now}
            while len(self._verified) >= self._cache_max:
                del self._verified[next(iter(self._verified))]
        self._verified[self._mac(user, password)] = self._clock() + self._cache_ttl

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        """Re-read the file if it changed; keep the old users if it became unreadable."""
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._reload_interval
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            users = read_htpasswd(self._path)
        except ValueError as err:
            logger.error("keeping the previous htpasswd users: %s", err)
            return
        self._users, self._stamp = users, stamp
        self._verified.clear()  # a changed or removed password must not stay valid
        logger.info("reloaded %s: %d users", self._path, len(users))


def _check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False
