"""Results: series of measurements per server, medians, ratios, the markdown report.

Knows nothing about servers or scenarios' mechanics; scenarios fill ``Series`` and
return an ``Outcome`` with their verdict, and ``render`` turns a run into markdown.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Series:
    """Repeated measurements of one server in one scenario."""

    label: str  # e.g. "mirrorproxy", "docker-registry proxy", "nginx sendfile"
    unit: str  # e.g. "GB/s", "req/s", "s", "MiB"
    values: list[float] = field(default_factory=list)
    client_cores: list[float] = field(default_factory=list)
    server_cores: list[float] = field(default_factory=list)
    extras: dict[str, list[float]] = field(default_factory=dict)

    def add(
        self,
        value: float,
        *,
        client: float | None = None,
        server: float | None = None,
        **extras: float,
    ) -> None:
        """Record one repetition's value, the cores client and server used, and extras."""
        self.values.append(value)
        if client is not None:
            self.client_cores.append(client)
        if server is not None:
            self.server_cores.append(server)
        for name, extra in extras.items():
            self.extras.setdefault(name, []).append(extra)

    @property
    def median(self) -> float:
        """Median value (nan when nothing was measured)."""
        return statistics.median(self.values) if self.values else float("nan")

    def figure(self, name: str) -> float:
        """Median of one extra figure (nan when absent)."""
        values = self.extras.get(name)
        return statistics.median(values) if values else float("nan")


@dataclass
class Outcome:
    """One scenario's series and its verdict against the issue's target."""

    number: int
    title: str
    target: str
    series: list[Series]
    headline: str = ""  # the mirror's figure, for the summary
    reference: str = ""  # what it is compared with
    ratio: float | None = None
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    background: float = 0.0  # cores busy outside the run's processes meanwhile


def ratio(numerator: Series, denominator: Series) -> float | None:
    """Median / median, or None when either is missing."""
    num, den = numerator.median, denominator.median
    if not numerator.values or not denominator.values or den == 0:
        return None
    return num / den


def fmt(value: float, unit: str = "") -> str:
    """A number with sensible precision, and its unit."""
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def _spread(s: Series) -> str:
    if len(s.values) < 2:
        return ""
    return f" ({fmt(min(s.values))}-{fmt(max(s.values))})"


def _cores(values: Sequence[float]) -> str:
    return fmt(statistics.median(values)) if values else "-"


def _extras(s: Series) -> str:
    return ", ".join(f"{name} {fmt(s.figure(name))}" for name in s.extras)


def _met(o: Outcome) -> str:
    if o.met is None:
        return "-"
    return "yes" if o.met else "**no**"


def summary_table(outcomes: Sequence[Outcome]) -> list[str]:
    """The one-line-per-scenario table with targets and ratios."""
    lines = [
        "| # | scenario | target | mirrorproxy | compared with | ratio | met | background |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        r = "-" if o.ratio is None else f"{o.ratio:.2f}x"
        lines.append(
            f"| {o.number} | {o.title} | {o.target} | {o.headline} | {o.reference} "
            f"| {r} | {_met(o)} | {o.background:.2f} |"
        )
    return lines


def detail_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Every series: median (min-max over repeats), CPU of client and server, extras."""
    lines = [
        "| # | server | median (min-max) | client CPU | server CPU | other medians |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        for s in o.series:
            lines.append(
                f"| {o.number} | {s.label} | {fmt(s.median, s.unit)}{_spread(s)} "
                f"| {_cores(s.client_cores)} | {_cores(s.server_cores)} | {_extras(s)} |"
            )
    return lines


def render(
    outcomes: Sequence[Outcome], *, title: str, machine: Sequence[str], preamble: Sequence[str]
) -> str:
    """The full markdown report of one run."""
    lines = [f"## {title}", "", *machine, "", *preamble, ""]
    lines += summary_table(outcomes)
    lines += ["", "Per server (CPU in cores: CPU seconds / wall seconds):", ""]
    lines += detail_table(outcomes)
    notes = [(o.number, n) for o in outcomes for n in o.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- ({number}) {note}" for number, note in notes]
    return "\n".join(lines) + "\n"
