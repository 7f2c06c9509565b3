"""``mirrorproxy export``: cached images (or a chosen list) to a bundle tar.

Reads the cache only through its files (tag records, manifests, blobs) and never
writes to it, so it runs beside a serving mirror. This module chooses the tags
(every cached one, or the requested images, best digest first), has the ``Plan``
judge them, ``layoutwriter`` write the tar, and words the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mirrorproxy.bundle import CONTAINERD_KEY, PAGE_ENTRIES, BundleError
from mirrorproxy.bundle.layoutwriter import write_layout
from mirrorproxy.bundle.plan import ExportResult, Plan
from mirrorproxy.cache.walk import TagRecord, referrers_records, tag_records
from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import DOCKER_LIST, OCI_INDEX, Digest, parse_digest
from mirrorproxy.core.reference import ImageRef
from mirrorproxy.core.units import format_size

__all__ = ["ExportResult", "describe", "export_bundle"]


def export_bundle(
    root: Path,
    out: Path,
    images: Sequence[ImageRef] | None,
    *,
    keep_going: bool = False,
    page_entries: int = PAGE_ENTRIES,
) -> ExportResult:
    """Write the bundle to ``out`` (via a temp file next to it and a rename).

    Args:
        root: the cache directory.
        out: the tar to write; replaced only when complete.
        images: exactly these references; None for every cached tag.
        keep_going: leave out (and report) requested images that are not completely
            cached instead of refusing.
        page_entries: tags per index document (see ``mirrorproxy.bundle``).

    Returns:
        What went into the bundle and what was left out.

    Raises:
        BundleError: a requested image is not (completely) cached (without
            ``keep_going``), or a cache file is corrupt or vanished meanwhile;
            ``out`` is untouched.
        OSError: ``out`` could not be written.
    """
    if not root.is_dir():
        raise BundleError(f"no cache at {root}")
    result = ExportResult()
    plan = Plan(root, result)
    try:
        if images is None:
            for rec in tag_records(root):
                ref = f"{rec.namespace}/{rec.repository}:{rec.tag}"
                why = plan.add_top(ref, _candidates(rec))
                if why:
                    result.left_out.append(f"{ref}: {why}")
        else:
            _plan_images(root, plan, images, result)
            if result.left_out and not keep_going:
                shown = "; ".join(result.left_out[:5])
                more = len(result.left_out) - 5
                tail = f"; and {more} more" if more > 0 else ""
                raise BundleError(f"not completely in the cache: {shown}{tail}")
        plan.add_referrers(referrers_records(root))
        plan.count()
        write_layout(root, out, plan, page_entries)
    finally:
        plan.close()
    return result


def _candidates(rec: TagRecord) -> list[Digest]:
    """A tag's digests, best first: containerd's answer, then an index, then the newest."""
    ranked = sorted(
        rec.entries.items(),
        key=lambda kv: (
            kv[0] == CONTAINERD_KEY,
            kv[1].get("media_type") in (OCI_INDEX, DOCKER_LIST),
            float(kv[1].get("fetched") or 0),
        ),
        reverse=True,
    )
    out: list[Digest] = []
    for _, entry in ranked:
        try:
            digest = parse_digest(str(entry.get("digest", "")))
        except RegistryError:
            continue
        if digest not in out:
            out.append(digest)
    return out


def _plan_images(root: Path, plan: Plan, images: Sequence[ImageRef], result: ExportResult) -> None:
    """Plan each requested image; note those not completely in the cache."""
    wanted = {(i.registry, i.repository, i.tag or "latest") for i in images if i.digest is None}
    found: dict[tuple[str, str, str], list[Digest]] = {}
    if wanted:
        for rec in tag_records(root):
            key = (rec.namespace, rec.repository, rec.tag)
            if key in wanted:
                found[key] = _candidates(rec)
    for image in images:
        if image.digest is not None:
            digests = [image.digest]
        else:
            digests = found.get((image.registry, image.repository, image.tag or "latest"), [])
        why = plan.add_top(str(image), digests) if digests else "the tag is not in the cache"
        if why:
            result.left_out.append(f"{image}: {why}")


def describe(result: ExportResult, out: Path, *, shown: int = 20) -> tuple[list[str], list[str]]:
    """(report lines, warning lines) telling what was exported and what was left out, why."""
    pages = f"; tags in {result.pages} nested indexes" if result.pages else ""
    lines = [
        f"exported {result.tags} tags ({result.images} images) to {out}: {result.blobs} blobs "
        f"({format_size(result.blob_bytes)}), {result.manifests} manifests{pages}"
    ]
    platforms = result.platforms_left_out
    if platforms:
        n = sum(platforms.values())
        which = ", ".join(f"{p} x{c}" for p, c in sorted(platforms.items()))
        lines.append(
            f"left out {n} platform manifests of multi-platform images ({which}): not in the "
            "cache (preload fetches only the platforms it is given)"
        )
    warnings = [f"{line}, left out" for line in result.left_out[:shown]]
    if len(result.left_out) > shown:
        warnings.append(f"... and {len(result.left_out) - shown} more references left out")
    if result.referrers:
        lines.append(f"with the referrers (signatures, SBOMs) of {result.referrers} manifests")
    if result.left_out:
        lines.append(f"left out {len(result.left_out)} references not completely in the cache")
    return lines, warnings
