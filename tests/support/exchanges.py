"""What a client sent the mirror and what the mirror answered, as tests judge it.

An ``Exchange`` pairs a request recorded by the header tap (every header line as
sent) with the mirror's JSON access-log line for it (status, namespace, cache
result). The helpers here turn a pull's exchanges into problems ("no manifest
request answered 200", "blob not served"), readable failure messages, and rows
of the client matrix printed after the run. Nothing here starts a process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from tests.support import images
from tests.support.headertap import TappedRequest

#: Short names for manifest media types, for readable failure messages and the matrix.
SHORT_TYPES = {
    images.OCI_MANIFEST: "oci",
    images.OCI_INDEX: "oci-index",
    images.DOCKER_MANIFEST: "v2s2",
    images.DOCKER_MANIFEST_LIST: "list",
    "application/vnd.docker.distribution.manifest.v1+prettyjws": "v1-signed",
    "application/vnd.docker.distribution.manifest.v1+json": "v1",
    "application/json": "json",
}


@dataclass(frozen=True, slots=True)
class AccessLine:
    """One line of the mirror's JSON access log."""

    method: str
    path: str  # with ?ns= when the client sent one
    status: int
    ns: str | None
    cache: str | None
    upstream: str | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class Exchange:
    """A request as the client sent it, with the mirror's access-log line for it."""

    request: TappedRequest
    access: AccessLine | None

    @property
    def status(self) -> int | None:
        """The mirror's answer, None when it logged none."""
        return self.access.status if self.access is not None else None

    def describe(self) -> str:
        """One line: what was sent, what came back."""
        req = self.request
        accept = accept_summary(req.accept_lines)
        got = "no access line"
        if self.access is not None:
            a = self.access
            got = f"{a.status} ns={a.ns or '-'} cache={a.cache or '-'}"
        return f"{req.method} {req.target} [Accept: {accept}] -> {got}"


def accept_summary(lines: Sequence[str]) -> str:
    """Say how a client sent ``Accept``: number of lines and types in order."""
    if not lines:
        return "none"
    types = [t.split(";")[0].strip() for line in lines for t in line.split(",")]
    short = ",".join(SHORT_TYPES.get(t, t) for t in types if t)
    return f"{len(lines)} line{'s' if len(lines) != 1 else ''}: {short}"


def parse_access_log(text: str) -> list[AccessLine]:
    """The ``mirrorproxy.access`` lines of a ``--log-format json`` log."""
    out: list[AccessLine] = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") != "mirrorproxy.access":
            continue
        out.append(
            AccessLine(
                method=rec["method"],
                path=rec["path"],
                status=int(rec["status"]),
                ns=rec.get("ns"),
                cache=rec.get("cache"),
                upstream=rec.get("upstream"),
                request_id=rec.get("request_id"),
            )
        )
    return out


def manifest_exchanges(exchanges: Sequence[Exchange], repo: str) -> list[Exchange]:
    """The manifest requests for ``repo`` (the path may carry a registry prefix)."""
    return [e for e in exchanges if f"/{repo}/manifests/" in e.request.path]


def blob_statuses(exchanges: Sequence[Exchange]) -> dict[str, list[int | None]]:
    """Blob digest -> the mirror's answers to GETs for it, in order."""
    out: dict[str, list[int | None]] = {}
    for e in exchanges:
        if e.request.method == "GET" and "/blobs/" in e.request.path:
            digest = e.request.path.rsplit("/blobs/", 1)[1]
            out.setdefault(digest, []).append(e.status)
    return out


def served_problems(
    exchanges: Sequence[Exchange],
    repo: str,
    blobs: set[str] | frozenset[str] = frozenset(),
    *,
    ns: str | None = None,
) -> list[str]:
    """What says the mirror did not serve a pull of ``repo`` (empty when it did).

    The mirror served it when it answered a manifest request for the repository
    with 200 (routed to namespace ``ns`` when given), and a GET of every blob in
    ``blobs`` with 200 or 206.
    """
    problems: list[str] = []
    manifests = manifest_exchanges(exchanges, repo)
    if not any(e.status == 200 for e in manifests):
        problems.append(f"no manifest request for {repo} answered 200 by the mirror")
    if ns is not None:
        routed = {e.access.ns for e in manifests if e.access is not None}
        if routed - {ns}:
            problems.append(f"{repo} routed to namespace(s) {sorted(map(str, routed))}, not {ns}")
    statuses = blob_statuses(exchanges)
    for digest in sorted(blobs):
        if not any(s in (200, 206) for s in statuses.get(digest, [])):
            problems.append(
                f"blob {digest[:19]} not served (mirror answers: {statuses.get(digest)})"
            )
    return problems


def last_error(output: str, limit: int = 400) -> str:
    """The last non-empty line of a client's output: where CLIs put the final error."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    line = lines[-1].strip() if lines else "(no output)"
    return line if len(line) <= limit else "..." + line[-limit:]


def describe_all(exchanges: Sequence[Exchange], limit: int = 40) -> str:
    """The exchanges as lines, for an assertion message."""
    lines = [e.describe() for e in exchanges[-limit:]]
    return "\n".join(["what the client sent and got:", *lines])


def _first_line(text: str, limit: int = 140) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class MatrixRow:
    """One cell of the client matrix."""

    client: str
    kind: str
    ok: bool
    sent: str
    got: str


class ClientMatrix:
    """Client x image kind results, printed at the end of the run."""

    def __init__(self) -> None:
        self.rows: list[MatrixRow] = []

    def add(
        self, client: str, kind: str, exchanges: Sequence[Exchange], problems: Sequence[str]
    ) -> None:
        """Record one cell from what the client sent and the problems found."""
        manifests = [
            e
            for e in exchanges
            if "/manifests/" in e.request.path or "/referrers/" in e.request.path
        ]
        sent = sorted(
            {
                f"{e.request.method} {accept_summary(e.request.accept_lines)}"
                + (f" ns={e.access.ns}" if e.access and "ns=" in e.access.path else "")
                for e in manifests
            }
        )
        got = sorted({str(e.status) for e in manifests})
        self.rows.append(
            MatrixRow(
                client,
                kind,
                not problems,
                "; ".join(sent) or "-",
                ",".join(got) + ("" if not problems else f" ({_first_line(problems[0])})"),
            )
        )

    def render(self) -> list[str]:
        """The rows as aligned text lines."""
        out = []
        for r in self.rows:
            verdict = "PASS" if r.ok else "FAIL"
            out.append(f"{verdict} {r.client:<8} {r.kind:<12} sent: {r.sent} | got: {r.got}")
        return out
