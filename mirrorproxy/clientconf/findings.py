"""What every ``mirrorproxy doctor`` check returns: a problem and the way to fix it.

Checks return Findings instead of printing, so each one can be tested against real
files; only the doctor command turns them into lines.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Finding:
    problem: str
    fix: str

    def line(self) -> str:
        return f"PROBLEM {self.problem} -> fix: {self.fix}"
