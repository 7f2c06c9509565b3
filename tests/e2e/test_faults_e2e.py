"""Real clients pull a large layer through the mirror while things go wrong.

containerd's ``ctr`` and skopeo pull a 256 MiB layer through ``mirrorproxy serve``.
The upstreams are Debian's docker-registry, the first one behind ``FaultProxy``
(in-process) that flips one byte in the middle of the layer or slows it down. The
faults: a corrupting first upstream (the pull must succeed on the client's first or
second attempt, the corrupt endpoint is skipped, no client ever completes the corrupt
layer), a second client arriving mid-download with a ``Range``, and a cache on a
small tmpfs that fills up mid-download (the pull must still succeed at once). After
each: ``mirrorproxy cache verify`` finds nothing bad, no temp file is left, and the
cache still holds what it held before the fault.

Each test prints a ``FAULTS |`` line: fault, client, attempts, bytes the client
downloaded for the layer and from the upstreams, what the cache holds of it.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import images
from tests.support.clientlab import require_tools
from tests.support.containers import ContainersTools
from tests.support.faultproxy import FaultProxy, Relayed
from tests.support.mounts import Mounts
from tests.support.procs import (
    Containerd,
    MirrorProcess,
    Registry,
    ctr,
    ctr_pull,
    free_port,
    mirror_config,
    write_hosts_toml,
)

KiB = 1024
MiB = 1024 * KiB
LAYER = 256 * MiB  # payload of the large layer (the gzip is a little larger)
SLOW = 96 * MiB  # bytes per second of a slowed upstream: a pull takes ~3 s
MOST_ATTEMPTS = 3
SETTLE = 30.0  # seconds: upper bound for any wait on the mirror or containerd
POLL = 0.05
NS = "docker.io"
BIG, SMALL = "library/big:1", "library/small:1"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Lab:
    """The upstream registry with the images, and the fault proxy in front of it."""

    registry: Registry
    proxy: FaultProxy
    big: images.Image
    small: images.Image

    @property
    def layer(self) -> str:
        """The large layer's digest."""
        return max(self.big.blobs, key=lambda d: len(self.big.blobs[d]))

    @property
    def layer_size(self) -> int:
        return len(self.big.blobs[self.layer])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_tools("skopeo", package="skopeo")
    registry = Registry(tmp_path_factory.mktemp("upstream"))
    try:
        big = images.build_image([LAYER], seed=71)
        small = images.build_image([64 * KiB, 16 * KiB], seed=72)
        images.push(registry.url, "library/big", "1", big, timeout=120)
        images.push(registry.url, "library/small", "1", small)
        proxy = FaultProxy(registry.url)
        proxy.start()
        try:
            yield Lab(registry, proxy, big, small)
        finally:
            proxy.stop()
    finally:
        registry.stop()


@pytest.fixture
def fresh(lab: Lab) -> Lab:
    """The lab with its faults off (each test sets its own)."""
    lab.proxy.faults.flip.clear()
    lab.proxy.faults.rate = None
    return lab


class Run:
    """One mirror, with a cache of its own, in front of ``upstreams`` for one fault.

    It starts with the small image pulled through it: what the cache holds before the
    fault, which must still be there after.
    """

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        upstreams: Sequence[str],
        *,
        cache_dir: Path | None = None,
        cache: dict[str, str | bool | int | float] | None = None,
    ) -> None:
        self.lab = lab
        self.cache_dir = cache_dir or workdir / "cache"
        port = free_port()
        config = mirror_config(port, self.cache_dir, {NS: upstreams}, cache=cache)
        self.mirror = MirrorProcess(workdir, config, port, args=["--log-format", "json"])
        self.upstream_marks = (len(lab.proxy.log), len(lab.registry.log_text()))
        self._pull_small()
        self.before = self.entries()

    def _pull_small(self) -> None:
        accept = ", ".join(images.MANIFEST_MEDIA_TYPES)
        self.get(f"/v2/library/small/manifests/1?ns={NS}", {"Accept": accept})
        for digest in self.lab.small.blobs:
            self.get(f"/v2/library/small/blobs/{digest}?ns={NS}")
        self.get(
            f"/v2/library/small/manifests/{self.lab.small.digest}?ns={NS}", {"Accept": accept}
        )

    def get(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(self.mirror.url + path, headers=headers or {})  # noqa: S310
        with OPENER.open(req, timeout=SETTLE) as resp:
            body: bytes = resp.read()
            return body

    def entries(self) -> set[str]:
        """Committed cache files (blobs and manifests), relative to the cache dir."""
        return {
            str(p.relative_to(self.cache_dir))
            for kind in ("blobs", "manifests")
            for p in (self.cache_dir / kind).rglob("*")
            if p.is_file()
        }

    def has_layer(self) -> bool:
        alg, hex_ = self.lab.layer.split(":", 1)
        return (self.cache_dir / "blobs" / alg / hex_[:2] / hex_).is_file()

    def tmp_files(self) -> list[Path]:
        return sorted((self.cache_dir / "tmp").iterdir())

    def records(self) -> list[dict[str, object]]:
        out = []
        for line in self.mirror.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def layer_gets(self) -> list[tuple[int, int]]:
        """(status, body bytes) of every GET of the layer the mirror answered."""
        return [
            (int(str(r["status"])), int(str(r["bytes"])))
            for r in self.records()
            if r.get("logger") == "mirrorproxy.access"
            and r.get("method") == "GET"
            and self.lab.layer in str(r.get("path"))
        ]

    def proxied_layer(self) -> list[Relayed]:
        """The GETs of the layer the fault proxy relayed during this run."""
        return [
            r
            for r in self.lab.proxy.log[self.upstream_marks[0] :]
            if r.method == "GET" and r.path.endswith(self.lab.layer)
        ]

    def upstream_bytes(self) -> int:
        """Layer body bytes the mirror got from its upstreams during this run."""
        via_proxy = sum(r.sent for r in self.proxied_layer())
        registry_mark = self.upstream_marks[1]
        direct = 0
        for line in self.lab.registry.log_text()[registry_mark:].splitlines():
            if self.lab.layer in line and '"mirrorproxy/' in line:
                fields = line.split('" ', 1)[1].split()
                direct += int(fields[1]) if fields[1].isdigit() else 0
        return via_proxy + direct

    def cut_delay(self) -> float | None:
        """Seconds from the corrupt download's failure to its last client being cut."""
        failed: float | None = None
        cuts: list[float] = []
        for r in self.records():
            msg, ts = str(r.get("msg", "")), str(r.get("ts", ""))
            if self.lab.layer not in msg or not ts:
                continue
            at = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float(ts[19:-1])
            if "discarded" in msg and failed is None:
                failed = at
            elif "aborting blob" in msg and failed is not None:
                cuts.append(at)
        return max(cuts) - failed if failed is not None and cuts else None

    def wait_settled(self) -> None:
        """Until no temp file is left (a failed or finished download cleaned up)."""
        deadline = time.monotonic() + SETTLE
        while self.tmp_files() and time.monotonic() < deadline:
            time.sleep(POLL)

    def check_cache(self) -> str:
        """Assert the cache is intact after the fault; describe what it holds of the layer."""
        self.wait_settled()
        assert self.tmp_files() == []
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mirrorproxy",
                "cache",
                "verify",
                "--config",
                str(self.mirror.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=SETTLE * 4,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert " 0 bad" in proc.stdout
        assert self.before <= self.entries(), "the fault cost entries cached before it"
        assert "Traceback" not in self.mirror.log_text()
        return "layer cached, verified" if self.has_layer() else "layer not cached"

    def stop(self) -> None:
        self.mirror.stop()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    made: list[Run] = []
    yield made
    for run in made:
        run.stop()


def report(fault: str, client: str, attempts: int, run: Run, cache: str) -> None:
    got = sum(b for _, b in run.layer_gets())
    size = run.lab.layer_size
    delay = run.cut_delay()
    cut = f" | clients cut {delay * 1000:.0f} ms after the mismatch" if delay is not None else ""
    print(
        f"\nFAULTS | {fault} | {client} | {attempts} | client got {got / MiB:.0f} MiB"
        f" ({(got - size) / MiB:+.0f} MiB over one layer) | upstreams sent"
        f" {run.upstream_bytes() / MiB:.0f} MiB | {cache} | layer GETs {run.layer_gets()}{cut}"
    )


def until_success(attempt: Callable[[], subprocess.CompletedProcess[str]]) -> list[str]:
    """Run ``attempt`` until it succeeds (at most MOST_ATTEMPTS); return each outcome."""
    outcomes: list[str] = []
    for _ in range(MOST_ATTEMPTS):
        proc = attempt()
        outcomes.append("ok" if proc.returncode == 0 else proc.stderr.strip()[-300:])
        if proc.returncode == 0:
            break
    return outcomes


def pull_ctr(ctd: Containerd, hosts: Path) -> subprocess.CompletedProcess[str]:
    proc = ctr_pull(ctd, f"docker.io/{BIG}", hosts)
    if proc.returncode != 0:
        forget_partial(ctd)
    return proc


def forget_partial(ctd: Containerd) -> None:
    """Wait until containerd dropped a failed pull's partial download.

    containerd keeps it until its garbage collector runs after the pull's lease
    ends; a retry before that resumes it. kubelet retries a failed pull after 10 s
    or more, by when it is gone: wait for that instead of a fixed time.
    """
    began = time.monotonic()
    while time.monotonic() < began + SETTLE:
        active = ctr(ctd, "content", "active").stdout.strip().splitlines()
        if len(active) <= 1:  # the header line only
            print(
                f"\ncontainerd dropped the partial download after {time.monotonic() - began:.2f}s"
            )
            return
        time.sleep(POLL * 4)


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    return tmp_path / "certs.d"


def test_ctr_pull_with_a_corrupting_first_upstream(
    fresh: Lab, containerd: Containerd, hosts: Path, tmp_path: Path, runs: list[Run]
) -> None:
    lab = fresh
    lab.proxy.faults.flip.add(lab.layer)
    run = Run(lab, tmp_path / "mirror", [lab.proxy.url, lab.registry.url])
    runs.append(run)
    write_hosts_toml(hosts, NS, "https://registry-1.docker.io", run.mirror.url)

    outcomes = until_success(lambda: pull_ctr(containerd, hosts))
    assert outcomes[-1] == "ok", outcomes
    assert len(outcomes) <= 2, outcomes
    # The corrupt endpoint sent the layer once; the retry went to the good one.
    assert len(run.proxied_layer()) == 1
    gets = run.layer_gets()
    assert all(status in (200, 206, 409) for status, _ in gets), gets
    assert 409 in [status for status, _ in gets]  # ctr resumed at once, and was refused
    # No answer completed the corrupt layer: the first attempt's bytes stop short.
    assert gets[0][1] < lab.layer_size
    report("corrupting first upstream", "ctr", len(outcomes), run, run.check_cache())


def test_skopeo_copy_with_a_corrupting_first_upstream(
    fresh: Lab, tmp_path: Path, runs: list[Run]
) -> None:
    lab = fresh
    lab.proxy.faults.flip.add(lab.layer)
    run = Run(lab, tmp_path / "mirror", [lab.proxy.url, lab.registry.url])
    runs.append(run)
    tools = ContainersTools(tmp_path / "skopeo")
    dest = tmp_path / "copy"

    def copy() -> subprocess.CompletedProcess[str]:
        return tools.skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{run.mirror.url.removeprefix('http://')}/{BIG}",
            f"dir:{dest}",
        )

    outcomes = until_success(copy)
    assert outcomes[-1] == "ok", outcomes
    assert len(outcomes) <= 2, outcomes
    assert len(run.proxied_layer()) == 1
    assert (dest / lab.layer.split(":", 1)[1]).stat().st_size == lab.layer_size
    report("corrupting first upstream", "skopeo", len(outcomes), run, run.check_cache())


class Background:
    """One client attempt run in a thread, so the test can act while it runs."""

    def __init__(self, attempt: Callable[[], subprocess.CompletedProcess[str]]) -> None:
        self._result: list[subprocess.CompletedProcess[str]] = []
        self._thread = threading.Thread(target=lambda: self._result.append(attempt()))
        self._thread.start()

    def result(self) -> subprocess.CompletedProcess[str]:
        self._thread.join(SETTLE * 4)
        assert self._result, "the client attempt did not finish"
        return self._result[0]


def wait_for_temp_file(run: Run, size: int) -> None:
    """Until the mirror's temp file of a download in progress holds ``size`` bytes."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        if any(p.stat().st_size >= size for p in run.tmp_files() if p.exists()):
            return
        time.sleep(POLL / 5)
    raise AssertionError(f"no download reached {size} bytes on disk")


def range_get(run: Run, first: int, last: int) -> tuple[int, int, bool]:
    """GET the layer with ``Range: bytes=first-last``: (status, bytes received, cut)."""
    conn = http.client.HTTPConnection("127.0.0.1", run.mirror.port, timeout=SETTLE)
    try:
        conn.request(
            "GET",
            f"/v2/library/big/blobs/{run.lab.layer}?ns={NS}",
            headers={"Range": f"bytes={first}-{last}"},
        )
        resp = conn.getresponse()
        try:
            body = resp.read()
        except http.client.IncompleteRead as err:
            return resp.status, len(err.partial), True
        return resp.status, len(body), False
    finally:
        conn.close()


def test_a_range_client_mid_download_never_completes_unverified(
    fresh: Lab, containerd: Containerd, hosts: Path, tmp_path: Path, runs: list[Run]
) -> None:
    lab = fresh
    lab.proxy.faults.flip.add(lab.layer)
    lab.proxy.faults.rate = SLOW
    run = Run(lab, tmp_path / "mirror", [lab.proxy.url, lab.registry.url])
    runs.append(run)
    write_hosts_toml(hosts, NS, "https://registry-1.docker.io", run.mirror.url)

    first = Background(lambda: pull_ctr(containerd, hosts))
    wait_for_temp_file(run, 32 * MiB)
    # A second client asks for the first MiB, which is on disk already: it gets all
    # but the last byte, and once the download fails verification, a cut.
    status, got, cut = range_get(run, 0, MiB - 1)
    assert (status, cut) == (206, True)
    assert got < MiB
    outcomes = [first.result().returncode]
    assert outcomes[0] != 0  # the corrupt layer never completes for ctr either
    lab.proxy.faults.rate = None
    proc = pull_ctr(containerd, hosts)
    outcomes.append(proc.returncode)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The layer is cached now, from the good upstream: the range completes.
    assert range_get(run, 0, MiB - 1) == (206, MiB, False)
    report(
        f"range client mid-download (got {got} of {MiB} B, cut)",
        "ctr + http range",
        len(outcomes),
        run,
        run.check_cache(),
    )


def client_attempt(
    kind: str, run: Run, containerd: Containerd, hosts: Path, workdir: Path
) -> Callable[[], subprocess.CompletedProcess[str]]:
    """One pull of the large image by ``kind`` ("ctr" or "skopeo") through ``run``."""
    if kind == "ctr":
        write_hosts_toml(hosts, NS, "https://registry-1.docker.io", run.mirror.url)
        return lambda: pull_ctr(containerd, hosts)
    tools = ContainersTools(workdir / "skopeo")
    dest = workdir / "copy"
    source = f"docker://{run.mirror.url.removeprefix('http://')}/{BIG}"
    return lambda: tools.skopeo("copy", "--src-tls-verify=false", source, f"dir:{dest}")


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem is full."""
    block = b"\0" * MiB
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass


@pytest.mark.parametrize("kind", ["ctr", "skopeo"])
def test_a_cache_disk_filling_up_mid_pull_streams_the_rest(
    kind: str, fresh: Lab, containerd: Containerd, hosts: Path, tmp_path: Path
) -> None:
    lab = fresh
    lab.proxy.faults.rate = SLOW
    mounts = Mounts()
    disk = tmp_path / "disk"
    mounts.tmpfs(disk, "300m")
    try:
        run = Run(lab, tmp_path / "mirror", [lab.proxy.url], cache_dir=disk / "cache")
        try:
            pull = Background(client_attempt(kind, run, containerd, hosts, tmp_path))
            wait_for_temp_file(run, 64 * MiB)
            fill_disk(disk / "ballast")  # something else fills the disk meanwhile
            proc = pull.result()
            assert proc.returncode == 0, proc.stderr[-2000:]
            (disk / "ballast").unlink()
            cache = run.check_cache()
            assert not run.has_layer()
            assert "streaming it uncached" in run.mirror.log_text()
            report("cache disk full mid-download", kind, 1, run, cache)
        finally:
            run.stop()
    finally:
        mounts.undo_all()


@pytest.mark.parametrize("kind", ["ctr", "skopeo"])
def test_a_layer_that_cannot_fit_is_streamed_through_evicting_nothing(
    kind: str, fresh: Lab, containerd: Containerd, hosts: Path, tmp_path: Path
) -> None:
    lab = fresh
    mounts = Mounts()
    disk = tmp_path / "disk"
    mounts.tmpfs(disk, "300m")
    try:
        run = Run(lab, tmp_path / "mirror", [lab.proxy.url], cache_dir=disk / "cache")
        try:
            (disk / "ballast").write_bytes(b"\0" * (100 * MiB))  # less room than the layer
            proc = client_attempt(kind, run, containerd, hosts, tmp_path)()
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert [size for _, size in run.layer_gets()] == [lab.layer_size]
            cache = run.check_cache()
            assert not run.has_layer()
            report("layer larger than the free disk", kind, 1, run, cache)
        finally:
            run.stop()
    finally:
        mounts.undo_all()
