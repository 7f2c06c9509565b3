"""Where ``preload``, ``export`` and ``images`` get their references: lists and manifests.

A source is a file, a directory or ``-`` (standard input). Files named ``*.yaml``,
``*.yml`` or ``*.json`` are Kubernetes manifests (``mirrorproxy.core.kubeimages``), and
so is any other file or input with a line that starts with ``apiVersion:``,
``kind:``, ``---`` or ``{``; the rest are image lists: one reference per line, ``#`` comments. A
directory contributes its manifest files, recursively, as ``kubectl apply -f``
would. Every reference is normalised as containerd does; every bad line is kept as
a ``file:line: why`` problem instead of stopping at the first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mirrorproxy.core.kubeimages import images_in_yaml
from mirrorproxy.core.reference import ImageRef, parse_image_reference

STDIN = "-"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
_YAML_STARTS = ("apiVersion:", "kind:", "---", "{")  # "{": kubectl's JSON


@dataclass(slots=True)
class ImageList:
    refs: list[ImageRef] = field(default_factory=list)  # first-seen order, no repeats
    problems: list[str] = field(default_factory=list)  # "file:line: why"
    _seen: set[ImageRef] = field(default_factory=set)

    def add(self, ref: ImageRef) -> None:
        if ref not in self._seen:
            self._seen.add(ref)
            self.refs.append(ref)


def read_sources(sources: Sequence[str], stdin: TextIO) -> ImageList:
    """Every reference in ``sources``, and every problem found reading them."""
    out = ImageList()
    for source in sources:
        if source == STDIN:
            _read_text(stdin.read(), "<stdin>", None, out)
            continue
        path = Path(source)
        if path.is_dir():
            files = _manifest_files(path)
            if not files:
                out.problems.append(f"{path}: no {', '.join(MANIFEST_SUFFIXES)} files in it")
            for f in files:
                _read_file(f, True, out)
        else:
            _read_file(path, path.suffix.lower() in MANIFEST_SUFFIXES or None, out)
    return out


def _manifest_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath, name)
            for name in sorted(filenames)
            if name.lower().endswith(MANIFEST_SUFFIXES) and not name.startswith(".")
        ]
    return sorted(found)


def _read_file(path: Path, manifests: bool | None, out: ImageList) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        out.problems.append(f"{path}: not UTF-8 text")
        return
    except OSError as err:
        out.problems.append(f"{path}: cannot read: {err.strerror or err}")
        return
    _read_text(text, str(path), manifests, out)


def _read_text(text: str, source: str, manifests: bool | None, out: ImageList) -> None:
    """Read ``text`` as manifests or as a list (None: tell by its lines)."""
    if manifests is None:
        manifests = any(line.startswith(_YAML_STARTS) for line in text.splitlines())
    if manifests:
        findings = images_in_yaml(text)
        problems = findings.problems
        items = [(f.line, f.image) for f in findings.images]
    else:
        problems, items = [], []
        for number, raw in enumerate(text.splitlines(), 1):
            item = raw.split("#", 1)[0].strip()
            if item:
                items.append((number, item))
    for number, item in items:
        try:
            out.add(parse_image_reference(item))
        except ValueError as err:
            problems.append((number, str(err)))
    out.problems += [f"{source}:{line}: {why}" for line, why in sorted(problems)]
