"""The cluster's internal endpoint: members report the blobs they use to their owners.

``POST /_mirrorproxy/touches`` (``core.touches``): the owner counts what other
members served as used, and pins what they read for a while. Only from another
current member, bounded, and only about entries the index holds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp import web

from mirrorproxy.core.errors import BadRequest, BodyTooLarge, Denied, NotFound
from mirrorproxy.core.rendezvous import FORWARDED_HEADER
from mirrorproxy.core.touches import MAX_BODY, decode_report
from mirrorproxy.http import keys


async def touches(request: web.Request) -> web.Response:
    """Another member's report of the blobs it served and reads (``core.touches``):
    they count as used here, and those read are pinned for a while. Only from a
    member (the cluster marker), bounded, and about entries the index holds."""
    cluster, engine = request.app[keys.CONFIG].cluster, request.app[keys.ENGINE]
    if cluster is None or engine.members is None:
        raise NotFound("not a cluster member")
    others = [m for m in engine.members.current if m != cluster.self_url]
    if not _from_member(request, others):
        raise Denied("only cluster members report blob use")
    if (request.content_length or 0) > MAX_BODY:
        raise BodyTooLarge(f"a report is at most {MAX_BODY} bytes")
    body = bytearray()
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY:
            raise BodyTooLarge(f"a report is at most {MAX_BODY} bytes")
    try:
        report = decode_report(bytes(body))
    except ValueError as err:
        raise BadRequest(f"bad report: {err}") from None
    reading = set(report.reading)
    known = await engine.budget.used_elsewhere(
        set(report.served), reading, pin_for=engine.pullthrough.tuning.remote_pin
    )
    metrics = request.app[keys.METRICS]
    metrics.cluster_touches_received.labels("reading").inc(len(known & reading))
    metrics.cluster_touches_received.labels("served").inc(len(known - reading))
    return web.json_response({"known": len(known)})


def _from_member(request: web.Request, members: Sequence[str]) -> bool:
    """Whether the sender names itself as a current member and, where that member
    is an address (``members_dns`` lists addresses), connects from that address: a
    client that may reach the mirror cannot pin its blobs by claiming the marker."""
    sender = request.headers.get(FORWARDED_HEADER, "")
    if sender not in members:
        return False
    host = (urlsplit(sender).hostname or "").strip("[]")
    try:
        claimed = ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name: its addresses are not looked up here
    try:
        return ipaddress.ip_address(request.remote or "") == claimed
    except ValueError:
        return False
