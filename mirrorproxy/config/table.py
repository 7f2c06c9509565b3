"""Reading one TOML table: typed access, key paths in errors, unknown keys caught."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mirrorproxy.config.model import ConfigError

T = TypeVar("T")


class Table:
    """A TOML table being read: typed access, key paths in errors, unknown keys caught."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        source: str,
        *,
        base_dir: Path = Path("."),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.data = data
        self.path = path
        self.source = source
        self.base_dir = base_dir
        self.environ: Mapping[str, str] = environ or {}
        self.seen: set[str] = set()

    def sub(self, key: str) -> str:
        k = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
        return f"{self.path}.{k}" if self.path else k

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.sub(key), message)

    def table(self, key: str, *, required: bool = False) -> Table:
        self.seen.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "missing")
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {tname(value)}")
        return self.child(value, self.sub(key))

    def child(self, data: Mapping[str, Any], path: str) -> Table:
        return Table(data, path, self.source, base_dir=self.base_dir, environ=self.environ)

    def file(self, key: str) -> Path | None:
        """A path to an existing readable file, relative to the config's directory."""
        raw = self.take(key, str, "")
        if not raw:
            return None
        path = (self.base_dir / Path(raw).expanduser()).resolve()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise self.error(key, f"no readable file at {str(path)!r}")
        return path

    def take(self, key: str, kind: type[T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int in Python; a float key should still accept 5.
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"expected {kind.__name__}, got {tname(value)}")
        return value  # type: ignore[no-any-return]

    def convert(self, key: str, parse: Callable[[str], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {tname(value)}")
        try:
            return parse(value)
        except ValueError as err:
            raise self.error(key, str(err)) from None

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            raise self.error(unknown[0], "unknown key")


def tname(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
