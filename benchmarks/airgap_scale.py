"""The air-gap workflow at the scale of a real site (not part of CI).

``python -m benchmarks.airgap_scale`` pushes 1,000 images (900 single-platform, 100
two-platform indexes; 20 shared base layers) to a docker-registry, then runs each
step as the operator would, as a separate ``mirrorproxy`` process, and measures its
wall time, CPU (user + system) and peak RSS (``wait4``):

1. ``preload`` of the 1,000 references (amd64) into cache A, from the registry;
2. the same ``preload`` again (everything cached: no upstream request expected);
3. 99,000 more tag records written into cache A (aliases, as a long-lived site
   accumulates them), to reach 100,000;
4. ``export`` of cache A (every tag);
5. ``import`` into an empty cache B, then 6. ``import`` again (idempotent);
7. ``cache verify`` of cache B;
8. ``serve --offline`` on cache B and 20 ``ctr images pull`` of random references.

Upstream requests are counted in the registry's access log. The report is printed
and replaces the air-gap section of ``benchmarks/results.md`` (``--no-write``: only
printed). Run as root from the repository root (containerd for step 8).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.measure import peak_rss_bytes
from mirrorproxy.bundle import CONTAINERD_KEY
from mirrorproxy.cache import TagEntry
from mirrorproxy.cache.stores import open_stores
from mirrorproxy.config import CacheConfig
from mirrorproxy.core.oci import OCI_INDEX, OCI_MANIFEST, parse_digest
from tests.support.images import Layer, make_layer, put_manifest, request, sha256_digest
from tests.support.procs import Containerd, MirrorProcess, Registry, free_port, mirror_config

RESULTS = Path(__file__).resolve().parent / "results.md"
BEGIN = "<!-- BEGIN AIR-GAP SCALE (written by benchmarks/airgap_scale.py) -->"
END = "<!-- END AIR-GAP SCALE -->"
MiB = 1024 * 1024
DEAD_PROXY = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


@dataclass(frozen=True, slots=True)
class Pushed:
    ref: str  # docker.io/bench/appNNN:vT
    repo: str
    tag: str
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    wall: float
    cpu: float
    rss_mib: float
    code: int
    note: str


class Builder:
    """Images over shared base layers, pushed with each blob uploaded once per repository."""

    def __init__(self, url: str, bases: int, base_size: int, own_size: int) -> None:
        self.url = url
        self.rng = random.Random(19)
        self.bases = [make_layer(base_size, self.rng, name=f"base{i}") for i in range(bases)]
        self.own_size = own_size
        self._uploaded: set[tuple[str, str]] = set()

    def _blob(self, repo: str, digest: str, data: bytes) -> None:
        if (repo, digest) in self._uploaded:
            return
        resp = request("POST", f"{self.url}/v2/{repo}/blobs/uploads/", timeout=30)
        location = resp.headers["location"]
        sep = "&" if "?" in location else "?"
        target = location if location.startswith("http") else f"{self.url}{location}"
        octets = {"Content-Type": "application/octet-stream"}
        request("PUT", f"{target}{sep}digest={digest}", data=data, headers=octets, timeout=30)
        self._uploaded.add((repo, digest))

    def _manifest(self, repo: str, ref: str | None, base: Layer, arch: str) -> tuple[str, bytes]:
        """Push one image (by ``ref``, or by its digest when None)."""
        own = make_layer(self.own_size, self.rng, name="app")
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Cmd": ["/bin/true"]},
                "rootfs": {"type": "layers", "diff_ids": [base.diff_id, own.diff_id]},
            },
            sort_keys=True,
        ).encode()
        cdigest = sha256_digest(config)
        for digest, data in ((base.digest, base.blob), (own.digest, own.blob), (cdigest, config)):
            self._blob(repo, digest, data)
        layer = "application/vnd.oci.image.layer.v1.tar+gzip"
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": cdigest,
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": layer, "digest": la.digest, "size": la.size}
                    for la in (base, own)
                ],
            }
        ).encode()
        digest = sha256_digest(body)
        put_manifest(self.url, repo, ref or digest, OCI_MANIFEST, body)
        return digest, body

    def repository(self, r: int, tags: int, index_every: int) -> list[Pushed]:
        """Push ``tags`` images into ``bench/appNNN``; every ``index_every``-th an index."""
        repo, base = f"bench/app{r:03d}", self.bases[r % len(self.bases)]
        out = []
        for t in range(tags):
            tag = f"v{t}"
            if (r * tags + t) % index_every == index_every - 1:
                children = []
                for arch in ("amd64", "arm64"):
                    digest, body = self._manifest(repo, None, base, arch)
                    children.append(
                        {
                            "mediaType": OCI_MANIFEST,
                            "digest": digest,
                            "size": len(body),
                            "platform": {"os": "linux", "architecture": arch},
                        }
                    )
                body = json.dumps(
                    {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
                ).encode()
                put_manifest(self.url, repo, tag, OCI_INDEX, body)
                pushed = Pushed("", repo, tag, sha256_digest(body), OCI_INDEX, len(body))
            else:
                digest, body = self._manifest(repo, tag, base, "amd64")
                pushed = Pushed("", repo, tag, digest, OCI_MANIFEST, len(body))
            out.append(
                Pushed(
                    f"docker.io/{repo}:{tag}",
                    repo,
                    tag,
                    pushed.digest,
                    pushed.media_type,
                    pushed.size,
                )
            )
        return out


def measured(name: str, argv: Sequence[str], log: Path, *, timeout: float = 1800) -> Step:
    """Run one step as its own process: wall time, CPU from ``wait4``, peak RSS (VmHWM).

    The peak is the step's own ``VmHWM``, polled every 20 ms: ``ru_maxrss`` would
    include this (much larger) benchmark process, copied by the fork before the exec.
    """
    t0 = time.perf_counter()
    peak = 0
    with open(log, "w") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            peak = max(peak, peak_rss_bytes(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return Step(name, wall, usage.ru_utime + usage.ru_stime, peak / MiB, proc.returncode, "")


def _with_note(step: Step, note: str) -> Step:
    return Step(step.name, step.wall, step.cpu, step.rss_mib, step.code, note)


def _upstream_counts(reg: Registry, since: int) -> tuple[int, str]:
    reqs = reg.requests()[since:]
    blobs = sum(1 for m, p in reqs if m == "GET" and "/blobs/sha256:" in p)
    manifests = sum(1 for m, p in reqs if m == "GET" and "/manifests/" in p)
    heads = sum(1 for m, _ in reqs if m == "HEAD")
    return len(reqs), f"upstream: {blobs} blob GETs, {manifests} manifest GETs, {heads} HEADs"


def _last_lines(log: Path, n: int) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return "; ".join(lines[-n:])


def seed_tags(cache: Path, pushed: Sequence[Pushed], total: int) -> float:
    """Alias tags until the cache holds ``total`` tag records; return seconds taken."""
    t0 = time.perf_counter()
    now = time.time()
    store = open_stores(CacheConfig(dir=cache)).manifests
    items = []
    for n in range(total - len(pushed)):
        p = pushed[n % len(pushed)]
        entry = TagEntry(parse_digest(p.digest), p.media_type, p.size, now)
        items.append(
            (
                (("docker.io", p.repo, f"{p.tag}-build{n // len(pushed):03d}")),
                CONTAINERD_KEY,
                entry,
            )
        )
        if len(items) >= 10_000:
            store.put_tags(items)
            items.clear()
    store.put_tags(items)
    return time.perf_counter() - t0


def offline_pulls(work: Path, cache_b: Path, refs: Sequence[str], mp: list[str]) -> Step:
    """``serve --offline`` on cache B, then ``ctr images pull`` of each reference."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        return Step("offline pulls", 0, 0, 0, 0, "skipped: containerd/ctr not installed")
    port = free_port()
    config = mirror_config(port, cache_b, {"docker.io": ["http://127.0.0.1:9"]})
    hosts = work / "certs.d" / "docker.io"
    hosts.mkdir(parents=True)
    hosts.joinpath("hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        f'[host."http://127.0.0.1:{port}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    env = dict(os.environ) | DEAD_PROXY | {"NO_PROXY": "127.0.0.1,localhost"}
    ok, t0, cpu0 = 0, time.perf_counter(), _children_cpu()
    failures: list[str] = []
    with MirrorProcess(work / "mirror", config, port, args=["--offline"]), Containerd() as ctd:
        for ref in refs:
            proc = subprocess.run(
                [
                    "ctr",
                    "--address",
                    ctd.address,
                    "images",
                    "pull",
                    "--hosts-dir",
                    str(work / "certs.d"),
                    ref,
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
            if proc.returncode == 0:
                ok += 1
            else:
                failures.append(f"{ref}: {proc.stderr.strip()[-200:]}")
    wall = time.perf_counter() - t0
    note = f"{ok} of {len(refs)} pulls succeeded" + (
        f"; first failure {failures[0]}" if failures else ""
    )
    return Step(
        "offline pulls (ctr, 20 random tags)",
        wall,
        _children_cpu() - cpu0,
        0,
        0 if ok == len(refs) else 1,
        note,
    )


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def render(steps: Sequence[Step], facts: Sequence[str]) -> str:
    lines = [
        "## Air-gap workflow at site scale",
        "",
        *[f"- {fact}" for fact in facts],
        "",
        "| step | wall s | CPU s | peak RSS MiB | exit | what it said / saw |",
        "|---|---|---|---|---|---|",
    ]
    for s in steps:
        rss = f"{s.rss_mib:.0f}" if s.rss_mib else "-"
        lines.append(f"| {s.name} | {s.wall:.1f} | {s.cpu:.1f} | {rss} | {s.code} | {s.note} |")
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    text = RESULTS.read_text()
    block = f"{BEGIN}\n{section}{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.airgap_scale")
    parser.add_argument("--repos", type=int, default=100)
    parser.add_argument("--tags-per-repo", type=int, default=10)
    parser.add_argument("--tag-records", type=int, default=100_000)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mpairgap", dir="/tmp"))
    mp = [sys.executable, "-m", "mirrorproxy"]
    steps: list[Step] = []
    try:
        with Registry(work / "upstream") as reg:
            builder = Builder(reg.url, bases=20, base_size=MiB, own_size=12 * 1024)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                per_repo = pool.map(
                    lambda r: builder.repository(r, args.tags_per_repo, 10), range(args.repos)
                )
                pushed = [p for repo in per_repo for p in repo]
            push_s = time.perf_counter() - t0
            images = work / "images.txt"
            images.write_text("".join(f"{p.ref}\n" for p in pushed))
            cache_a, cache_b = work / "a", work / "b"
            for name, cache in (("a", cache_a), ("b", cache_b)):
                (work / f"{name}.toml").write_text(
                    mirror_config(free_port(), cache, {"docker.io": [reg.url]})
                )
            conf_a, conf_b = str(work / "a.toml"), str(work / "b.toml")
            preload = [
                *mp,
                "preload",
                "-c",
                conf_a,
                str(images),
                "--platform",
                "linux/amd64",
                "--jobs",
                "8",
            ]
            first = f"preload ({len(pushed):,} images)"
            for label in (first, "preload again (all cached)"):
                since = len(reg.requests())
                log = work / f"{len(steps)}.log"
                step = measured(label, preload, log)
                _, seen = _upstream_counts(reg, since)
                steps.append(_with_note(step, f"{_last_lines(log, 4)}; {seen}"))
            seed_s = seed_tags(cache_a, pushed, args.tag_records)
            bundle = work / "site.tar"
            log = work / "export.log"
            step = measured(
                f"export ({args.tag_records:,} tags)",
                [*mp, "export", "-c", conf_a, "--out", str(bundle)],
                log,
            )
            size = bundle.stat().st_size / MiB if bundle.exists() else 0
            steps.append(_with_note(step, f"{_last_lines(log, 2)}; bundle {size:.1f} MiB"))
            for label in ("import into an empty cache", "import again"):
                log = work / f"{len(steps)}.log"
                step = measured(label, [*mp, "import", "-c", conf_b, str(bundle)], log)
                steps.append(_with_note(step, _last_lines(log, 1)))
            log = work / "verify.log"
            step = measured("cache verify (B)", [*mp, "cache", "verify", "-c", conf_b], log)
            steps.append(_with_note(step, _last_lines(log, 1)))
        rng = random.Random(7)
        all_refs = [p.ref for p in pushed]
        rounds = max((args.tag_records - len(pushed)) // len(pushed), 1)
        all_refs += [f"{p.ref}-build{rng.randrange(rounds):03d}" for p in rng.sample(pushed, 10)]
        steps.append(offline_pulls(work, cache_b, rng.sample(all_refs, 20), mp))
        facts = [
            f"when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores",
            f"upstream: docker-registry with {len(pushed)} images in {args.repos} repositories "
            f"({sum(1 for p in pushed if p.media_type == OCI_INDEX)} amd64+arm64 indexes), "
            f"20 shared 1 MiB base layers, 12 KiB own layer each; pushed in {push_s:.0f} s",
            f"{args.tag_records - len(pushed):,} alias tag records written into cache A in "
            f"{seed_s:.1f} s (not a step of the workflow)",
        ]
        report = render(steps, facts)
        print(report)
        if not args.no_write:
            write_results(report)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0 if all(s.code == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
