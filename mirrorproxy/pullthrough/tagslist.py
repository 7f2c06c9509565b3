"""Tag lists: live data, passed through from upstream and never cached."""

from __future__ import annotations

from collections.abc import Mapping

from yarl import URL

from mirrorproxy.config import Config
from mirrorproxy.core.errors import BadGateway, NameUnknown, Unavailable
from mirrorproxy.pullthrough.answers import OFFLINE, TagList, Target
from mirrorproxy.upstream.client import TooLarge, UpstreamClient, UpstreamError
from mirrorproxy.upstream.response import next_page


class TagLists:
    """Asks the upstream for a repository's tags and points its paging at this mirror.

    It must not cache a list (tags move) nor pass on upstream paging keys other than
    ``n`` and ``last``.
    """

    def __init__(self, config: Config, *, client: UpstreamClient) -> None:
        self._config = config
        self._client = client

    async def tags_list(self, t: Target, params: Mapping[str, str]) -> TagList:
        """Tag listing is live data: passed through, never cached.

        ``params``: the checked ``n`` and ``last`` (``oci.parse_tags_query``).
        """
        if self._config.cache.offline:
            raise Unavailable(f"tag lists are not cached and {OFFLINE}")
        try:
            resp = await self._client.fetch(
                t.ns,
                t.ns_name,
                f"{t.repo}/tags/list",
                what=f"tags of {t.repo}",
                limit=self._config.cache.max_manifest_size,
                query=params,
            )
        except UpstreamError as err:
            raise err.registry_error(NameUnknown) from None
        except TooLarge as err:
            raise BadGateway(str(err)) from None
        return TagList(
            resp.body,
            resp.headers.get("Content-Type", "application/json"),
            _next_link(resp.headers.get("Link"), t),
        )


def _next_link(header: str | None, t: Target) -> str | None:
    """Point an upstream's pagination Link at this mirror (same n/last, our ns)."""
    page = next_page(header)
    if not page:
        return None
    url = URL.build(path=f"/v2/{t.repo}/tags/list", query={**page, "ns": t.ns_name})
    return f'<{url}>; rel="next"'
