"""A base for objects that hold a resource until ``close()``: ``with`` closes them."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Gives ``with`` support to a class whose ``close()`` is idempotent.

    Owns nothing itself; the subclass owns the resource and its ``close``.
    """

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
