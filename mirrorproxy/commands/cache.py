"""``mirrorproxy cache ls|du|verify|prune``: look after the cache from the command line.

Every subcommand is safe while the server runs. ``ls`` and ``du`` only read: they
open the index read-only and never reconcile it with the files (only the server
does that, at start: next to a running server a reconcile would record blobs just
renamed into place or just evicted). ``verify`` and ``prune`` remove an entry and
its file under the index's write lock, and only if the entry is still the one they
looked at; the server picks up the new totals within seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sqlite3
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mirrorproxy.cache.index import BLOB, MANIFEST, CacheIndex, Entry
from mirrorproxy.cache.walk import content_path, manifest_doc, tag_records
from mirrorproxy.commands.errors import EXIT_USAGE, CliError
from mirrorproxy.config import Config, load_config, with_overrides
from mirrorproxy.core.oci import DOCKER_V1_SIGNED, manifest_digest
from mirrorproxy.core.units import format_size, parse_duration, parse_size

HASH_CHUNK = 4 * 1024 * 1024
INDEX_FILE = "index.db"


@dataclass(frozen=True, slots=True)
class TagRow:
    namespace: str
    repository: str
    tag: str
    digest: str
    media_type: str
    size: int | None  # manifest plus everything it references, when known
    last_used: float | None


def open_index(config: Config, *, read_only: bool) -> CacheIndex:
    """Open the index as it is (no reconcile: that is the server's job at start).

    Raises:
        FileNotFoundError: no cache, or (``read_only``) no index in it yet.
    """
    root = config.cache.dir
    if not root.is_dir():
        raise FileNotFoundError(f"no cache at {root}")
    path = root / INDEX_FILE
    if read_only and not path.exists():
        raise FileNotFoundError(f"no cache index at {path} (the server creates it)")
    return CacheIndex(path, read_only=read_only)


def tag_rows(config: Config, index: CacheIndex, namespace: str | None) -> list[TagRow]:
    """Every cached tag (per Accept variant), newest knowledge first."""
    root = config.cache.dir
    entries = {(e.kind, e.digest): e for e in index.entries()}
    rows: list[TagRow] = []
    for record in tag_records(root):
        ns, repo, tag = record.namespace, record.repository, record.tag
        variants = record.entries.values()
        if namespace is not None and ns != namespace:
            continue
        seen: set[str] = set()
        for v in variants:
            digest = str(v.get("digest", ""))
            if digest in seen:
                continue
            seen.add(digest)
            size = _image_size(root, digest, entries)
            # No manifest file: not in the cache, whatever the index still says.
            used = entries.get((MANIFEST, digest)) if size is not None else None
            rows.append(
                TagRow(
                    ns,
                    repo,
                    tag,
                    digest,
                    str(v.get("media_type", "")),
                    size,
                    used.last_used if used else None,
                )
            )
    return rows


def _image_size(root: Path, digest: str, entries: dict[tuple[str, str], Entry]) -> int | None:
    """Bytes of a manifest and what it references that is in the cache."""
    doc = manifest_doc(root, digest)
    if doc is None:
        return None
    total = entries[(MANIFEST, digest)].size if (MANIFEST, digest) in entries else 0
    for child in doc.get("manifests", []) if isinstance(doc.get("manifests"), list) else []:
        sub = _image_size(root, str(child.get("digest", "")), entries)
        total += sub or 0
    refs = [doc.get("config")] + (doc.get("layers") or [])
    for ref in refs:
        if isinstance(ref, dict) and (BLOB, str(ref.get("digest"))) in entries:
            total += entries[(BLOB, str(ref.get("digest")))].size
    return total


def cmd_ls(config: Config, namespace: str | None, out: TextIO) -> int:
    index = open_index(config, read_only=True)
    try:
        rows = tag_rows(config, index, namespace)
    finally:
        index.close()
    out.write(
        f"{'NAMESPACE':<20} {'REPOSITORY':<32} {'TAG':<16} {'DIGEST':<19} {'SIZE':>10} LAST USED\n"
    )
    for r in sorted(rows, key=lambda r: (r.namespace, r.repository, r.tag)):
        size = format_size(r.size) if r.size is not None else "-"
        used = _when(r.last_used)
        out.write(
            f"{r.namespace:<20} {r.repository:<32} {r.tag:<16} {r.digest[:19]:<19} "
            f"{size:>10} {used}\n"
        )
    return 0


def cmd_du(config: Config, out: TextIO) -> int:
    index = open_index(config, read_only=True)
    try:
        entries = index.entries()
    finally:
        index.close()
    sums: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in entries:
        ns = e.namespace or "(unknown)"
        sums[ns][e.kind] += e.size
        sums[ns][e.kind + "s"] += 1
    out.write(
        f"{'NAMESPACE':<24} {'BLOBS':>7} {'BLOB BYTES':>11} {'MANIFESTS':>9} {'TOTAL':>11}\n"
    )
    total = 0
    for ns in sorted(sums):
        s = sums[ns]
        ns_total = s[BLOB] + s[MANIFEST]
        total += ns_total
        out.write(
            f"{ns:<24} {s[BLOB + 's']:>7} {format_size(s[BLOB]):>11} "
            f"{s[MANIFEST + 's']:>9} {format_size(ns_total):>11}\n"
        )
    budget = config.cache.max_size
    out.write(
        f"total {format_size(total)}"
        + (f" of max_size {format_size(budget)}" if budget else " (no max_size)")
        + "\n"
    )
    return 0


def cmd_verify(config: Config, out: TextIO) -> int:
    """Re-hash every entry; move mismatches to ``quarantine/``. Exit 1 if any."""
    root = config.cache.dir
    index = open_index(config, read_only=False)
    bad = checked = 0
    try:
        for e in index.entries():
            path = content_path(root, e.kind, e.digest)
            try:
                ok = _hash_matches(path, e.kind, e.digest)
            except FileNotFoundError:
                continue  # evicted or pruned meanwhile
            checked += 1
            if ok:
                continue
            target = root / "quarantine" / f"{e.kind}-{e.digest.replace(':', '-')}"
            target.parent.mkdir(exist_ok=True)

            def quarantine(path: Path = path, target: Path = target) -> None:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, target)

            if not index.drop(e, then=quarantine):
                continue  # evicted (and maybe fetched again) while it was hashed
            bad += 1
            out.write(f"MISMATCH {e.kind} {e.digest}: moved to {target}\n")
    finally:
        index.close()
    out.write(f"verified {checked} entries, {bad} bad\n")
    return 1 if bad else 0


def _hash_matches(path: Path, kind: str, digest: str) -> bool:
    alg, _, expected = digest.partition(":")
    h = hashlib.new(alg)
    with open(path, "rb") as f:
        if kind == MANIFEST:
            media_type = f.readline().decode(errors="replace").strip()
            if media_type == DOCKER_V1_SIGNED:  # small, and hashed without its signatures
                return manifest_digest(f.read(), media_type, alg).hex == expected
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest() == expected


def cmd_prune(
    config: Config, *, older_than: float | None, to_size: int | None, out: TextIO
) -> int:
    root = config.cache.dir
    index = open_index(config, read_only=False)
    removed = freed = 0
    try:
        entries = sorted(index.entries(), key=lambda e: (e.kind == MANIFEST, e.last_used))
        total = sum(e.size for e in entries)
        cutoff = time.time() - older_than if older_than is not None else None
        for e in entries:
            too_old = cutoff is not None and e.last_used < cutoff
            too_big = to_size is not None and total > to_size
            if not (too_old or too_big):
                continue
            path = content_path(root, e.kind, e.digest)

            def unlink(path: Path = path) -> None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

            # A server may have evicted it meanwhile, or fetched it again: then
            # the entry is not the one looked at, and stays.
            if not index.drop(e, then=unlink):
                continue
            removed += 1
            freed += e.size
            total -= e.size
    finally:
        index.close()
    out.write(f"pruned {removed} entries, freed {format_size(freed)}, {format_size(total)} left\n")
    return 0


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def run(args: argparse.Namespace) -> int:
    """The ``cache`` verb: dispatch its action; disk and index errors become one line."""
    config = with_overrides(load_config(args.config), cache_dir=args.cache_dir)
    action = args.cache_command
    try:
        if action == "ls":
            return cmd_ls(config, args.namespace, sys.stdout)
        if action == "du":
            return cmd_du(config, sys.stdout)
        if action == "verify":
            return cmd_verify(config, sys.stdout)
        if args.older_than is None and args.to_size is None:
            raise CliError("cache prune: give --older-than and/or --to", EXIT_USAGE)
        try:
            older = parse_duration(args.older_than) if args.older_than is not None else None
            to_size = parse_size(args.to_size) if args.to_size is not None else None
        except ValueError as err:
            raise CliError(f"cache prune: {err}", EXIT_USAGE) from None
        return cmd_prune(config, older_than=older, to_size=to_size, out=sys.stdout)
    except (OSError, sqlite3.Error) as err:
        raise CliError(f"cache {action}: {err}") from None
