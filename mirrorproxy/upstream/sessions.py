"""One aiohttp session per upstream endpoint, set up the way every request needs it.

It owns the session and connector settings (TLS, proxy from the environment, the
connection cap, no decompression); it must not send requests itself.
"""

from __future__ import annotations

import ssl

import aiohttp

from mirrorproxy import __version__
from mirrorproxy.config import Upstream

USER_AGENT = f"mirrorproxy/{__version__}"


def new_session(up: Upstream, max_fetches: int) -> aiohttp.ClientSession:
    """A session for ``up`` holding at most ``max_fetches`` requests in flight."""
    return aiohttp.ClientSession(
        auto_decompress=False,  # blob bytes must reach clients untouched
        # Blob and manifest bytes are passed on as they are: ask for
        # them as they are (we never decompress).
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        # max_fetches: an HTTP/1.1 request holds one connection of
        # its endpoint's connector from send until its body is read
        # or released (a streamed blob included), so `limit` caps the
        # requests in flight to this endpoint; more wait for a slot.
        connector=aiohttp.TCPConnector(
            limit=max_fetches,
            ttl_dns_cache=60,
            ssl=ssl_context(up),
        ),
        trust_env=True,  # HTTP(S)_PROXY and NO_PROXY; `proxy =` overrides
        read_bufsize=4 * 1024 * 1024,  # do not pause the socket per 64 KiB
    )


def ssl_context(up: Upstream) -> ssl.SSLContext | bool:
    """The TLS settings of one upstream: its CA, client certificate, or no checks."""
    if not up.origin.startswith("https:"):
        return True  # plain http: unused
    ctx = ssl.create_default_context(cafile=str(up.ca) if up.ca else None)
    if up.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if up.client_cert is not None:
        ctx.load_cert_chain(up.client_cert, up.client_key)
    return ctx
