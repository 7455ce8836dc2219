"""The project's benchmark goals (issue 4), and how a run is judged against them.

The package's benchmark (:mod:`semiring_einsum.bench`, ``python -m semiring_einsum``)
reports what it checked and how fast ours ran against each baseline; the targets
those numbers are held to live here, outside the package, and
``benchmarks/run.py`` prints them as a table after the package's report:

* :data:`GOALS`: per workload key, the :class:`Goal` s it is judged by (stated for
  the ``full`` sizes; ``log-adversarial`` is a self-check only);
* :func:`judge_report`: a :class:`GoalResult` (measured value, verdict) per goal;
* :func:`format_goals`: the table and the summary line ``N of M goals met``;
* :func:`add_to_json` and :func:`plot_marks`: the verdicts in ``latest.json``
  and the thresholds on ``latest.png``.

Goals are reported, never enforced: a missed goal does not change the exit status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from semiring_einsum.bench import (
    NAIVE,
    OURS,
    REFERENCE,
    TORCH,
    TRICK,
    TROPICAL,
    WORKLOADS,
    CaseResult,
    Report,
    format_table,
    jsonable,
)

Metric = Literal["time_ratio", "speedup", "memory_ratio"]


@dataclass(frozen=True)
class Goal:
    """A target a workload is judged against.

    Attributes:
        text: The goal as a reader should see it.
        metric: ``'time_ratio'`` (ours / baseline median time must be at most
            ``target``), ``'speedup'`` (baseline / ours at least ``target``) or
            ``'memory_ratio'`` (ours / baseline peak extra memory at most
            ``target``).
        baseline: The contender compared against.
        target: The threshold.
    """

    text: str
    metric: Metric
    baseline: str
    target: float

    def judge(self, ours: float | None, base: float | None) -> tuple[float | None, bool | None]:
        """The measured value and whether it meets the goal (``None``: not measured)."""
        if ours is None or base is None:
            return None, None
        if self.metric == "speedup":
            value = base / ours if ours > 0 else math.inf
            return value, value >= self.target
        value = ours / base if base > 0 else (0.0 if ours == 0 else math.inf)
        return value, ours <= self.target * base


MEMORY_GOAL = Goal("peak extra memory <= 1/2 of the reference's", "memory_ratio", REFERENCE, 0.5)

_TRICK_1_3 = Goal("<= 1.3x the trick", "time_ratio", TRICK, 1.3)
_TRICK_1_5 = Goal("<= 1.5x the trick", "time_ratio", TRICK, 1.5)
_REFERENCE_4X = Goal(">= 4x faster than the reference", "speedup", REFERENCE, 4.0)
_TROPICAL_1X = Goal("<= 1.0x tropical-gemm", "time_ratio", TROPICAL, 1.0)

GOALS: dict[str, tuple[Goal, ...]] = {
    "real-bmm": (Goal("<= 1.1x torch.einsum", "time_ratio", TORCH, 1.1), MEMORY_GOAL),
    "log-bmm": (_TRICK_1_3, MEMORY_GOAL),
    "log-bmm-bwd": (_TRICK_1_3, MEMORY_GOAL),
    "log-chain-64": (_TRICK_1_3, MEMORY_GOAL),
    "log-chain-128": (
        _TRICK_1_3,
        Goal(">= 500x faster than the reference", "speedup", REFERENCE, 500.0),
        MEMORY_GOAL,
    ),
    "log-hmm-bwd": (_TRICK_1_5, MEMORY_GOAL),
    "log-bikl": (_TRICK_1_5, MEMORY_GOAL),
    "log-cky-bwd": (_TRICK_1_5, MEMORY_GOAL),
    "viterbi-bmm": (
        Goal("<= 0.6x naive broadcast amax (values only)", "time_ratio", NAIVE, 0.6),
        _REFERENCE_4X,
        _TROPICAL_1X,
        MEMORY_GOAL,
    ),
    "max-bmm": (
        Goal("<= 0.5x naive broadcast amax", "time_ratio", NAIVE, 0.5),
        _TROPICAL_1X,
        MEMORY_GOAL,
    ),
    "min-bmm": (_TROPICAL_1X,),
    "max-bmm-bwd": (_TROPICAL_1X,),
    "max-hmm-32": (Goal("<= 1.0x a broadcast amax loop", "time_ratio", NAIVE, 1.0),),
    "viterbi-cky": (_REFERENCE_4X, MEMORY_GOAL),
}
"""Goals per workload key (the package's built-in workloads), stated for ``full`` sizes."""


@dataclass
class GoalResult:
    """A goal, the measured value and the verdict (``met`` is ``None`` if unmeasured)."""

    text: str
    metric: str
    baseline: str
    target: float
    value: float | None
    met: bool | None


def judge(goal: Goal, case: CaseResult) -> GoalResult:
    """Judge one case's measurements against ``goal``."""
    ours, base = case.contenders[OURS], case.contenders.get(goal.baseline)
    if goal.metric == "memory_ratio":
        a = None if ours.peak_bytes is None else float(ours.peak_bytes)
        b = None if base is None or base.peak_bytes is None else float(base.peak_bytes)
    else:
        a, b = ours.median_ms, None if base is None else base.median_ms
    value, met = goal.judge(a, b)
    return GoalResult(goal.text, goal.metric, goal.baseline, goal.target, value, met)


def judge_report(report: Report) -> dict[str, list[GoalResult]]:
    """Every goal of every case in ``report``, per case key."""
    return {c.key: [judge(g, c) for g in GOALS.get(c.key, ())] for c in report.cases}


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}x"


def summary(report: Report, verdicts: Mapping[str, Sequence[GoalResult]]) -> str:
    """``'N of M goals met'``, marked as indicative below the full sizes."""
    results = [g for gs in verdicts.values() for g in gs]
    met = sum(1 for g in results if g.met)
    scaled = (
        "" if report.meta["preset"] == "full" else " at these scaled-down sizes (indicative only)"
    )
    return f"{met} of {len(results)} goals met{scaled}"


def format_goals(report: Report, verdicts: Mapping[str, Sequence[GoalResult]]) -> str:
    """The goals table and :func:`summary` (empty if no case has goals)."""
    rows = []
    for c in report.cases:
        for g in verdicts.get(c.key, ()):
            if g.value is None:
                measured, status = "-", "not measured"
            else:
                measured = _fmt_ratio(g.value)
                status = "met" if g.met else "NOT MET"
            rows.append([c.title, g.text, measured, status])
    if not rows:
        return ""
    lines = ["Goals (ratio = ours / baseline; speedup = baseline / ours)"]
    lines += format_table(["workload", "goal", "measured", "status"], rows)
    lines.append(summary(report, verdicts))
    return "\n".join(lines)


def add_to_json(
    data: dict[str, Any], report: Report, verdicts: Mapping[str, Sequence[GoalResult]]
) -> dict[str, Any]:
    """Add the verdicts to ``data`` (from ``report_to_json``): per case and in total."""
    for case in data["cases"]:
        case["goals"] = [
            {
                "text": g.text,
                "metric": g.metric,
                "baseline": g.baseline,
                "target": g.target,
                "value": jsonable(g.value),
                "met": g.met,
            }
            for g in verdicts.get(case["key"], ())
        ]
    results = [g for gs in verdicts.values() for g in gs]
    data["goals"] = {
        "met": sum(1 for g in results if g.met),
        "total": len(results),
        "not_measured": sum(1 for g in results if g.met is None),
        "summary": summary(report, verdicts),
    }
    return data


def plot_marks(report: Report) -> dict[str, list[tuple[str, float]]]:
    """Per case key, each time goal as ``(baseline, ours / baseline time at the threshold)``."""
    marks: dict[str, list[tuple[str, float]]] = {}
    for c in report.cases:
        for g in GOALS.get(c.key, ()):
            if g.metric != "memory_ratio":
                target = 1 / g.target if g.metric == "speedup" else g.target
                marks.setdefault(c.key, []).append((g.baseline, target))
    return marks


def list_goals() -> str:
    """Every built-in workload's goals, one workload a line."""
    return "\n".join(
        f"{w.key:<16} {'; '.join(g.text for g in GOALS.get(w.key, ())) or '(self-check only)'}"
        for w in WORKLOADS
    )
