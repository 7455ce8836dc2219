"""Reports: plain-text tables, JSON and an optional matplotlib plot.

* :func:`format_report`: what was checked and how fast ours ran against each
  baseline (median times, ratios, peak extra memory), ending with
  ``self-check: ok`` or the failures;
* :func:`report_to_json` / :func:`write_json`: everything, as JSON;
* :func:`write_plot`: time ratios and peak memory as a PNG, when matplotlib
  is installed (its absence is reported, never fatal).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .runner import CaseResult, Report
from .workloads import CONTENDERS, OURS


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` if either is unknown or ``b`` is 0."""
    return a / b if a is not None and b else None


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _time_cell(case: CaseResult, name: str) -> str:
    r, ours = case.contenders[name], case.contenders[OURS]
    if r.median_ms is None:
        return r.note or "-"
    cell = _fmt_ms(r.median_ms)
    ratio = _ratio(ours.median_ms, r.median_ms)
    if name != OURS and ratio is not None:
        cell += f" ({ratio:.2f}x)"
    if r.max_error is not None and math.isinf(r.max_error):
        cell += " WRONG"
    return cell


def _memory_cell(case: CaseResult, name: str) -> str:
    r, ours = case.contenders[name], case.contenders[OURS]
    if r.peak_bytes is None:
        return r.memory_note or (r.note if r.median_ms is None else "-")
    cell = f"{r.peak_bytes / 2**20:.1f}"
    ratio = _ratio(ours.peak_bytes, r.peak_bytes)
    if name != OURS and ratio is not None:
        cell += f" ({ratio:.2f}x)"
    return cell


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table with left-aligned columns.

    Example:
        >>> print("\\n".join(format_table(["a", "bb"], [["xyz", "1"]])))
        a    bb
        ---  --
        xyz  1
    """
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(n) for h, n in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * n for n in widths))
    lines += ["  ".join(c.ljust(n) for c, n in zip(row, widths)).rstrip() for row in rows]
    return lines


def _check_lines(report: Report) -> list[str]:
    """What was checked, and the verdicts."""
    cases = report.cases
    lines = []
    if cases:
        agree = [c for c in cases if c.max_error <= c.tolerance]
        status = "ok" if len(agree) == len(cases) else "FAIL"
        lines.append(
            f"check results against the float64 oracle: {status} ({len(agree)} of {len(cases)} "
            "workloads agree within tolerance; fwd+bwd: the result and every gradient)"
        )
    viterbi = [c for c in cases if c.argmax_ok is not None]
    if viterbi:
        status = "ok" if all(c.argmax_ok for c in viterbi) else "FAIL"
        keys = ", ".join(c.key for c in viterbi)
        lines.append(
            f"check viterbi argmax consistency (the term at each argmax equals the max): "
            f"{status} ({keys})"
        )
    for name, ok in report.checks.items():
        lines.append(f"check {name}: {'ok' if ok else 'FAIL'}")
    return lines


def format_report(report: Report) -> str:
    """The report as plain text: times, memory, the checks and the verdict.

    The last line is ``self-check: ok`` or ``self-check: FAILED: ...`` with
    the failed checks.
    """
    m = report.meta
    names = [n for n in CONTENDERS if any(n in c.contenders for c in report.cases)]
    lines = [
        f"semiring_einsum benchmark: preset {m['preset']}, device {m['device']}, "
        f"torch {m['torch']}, {m['threads']} threads, reference "
        + (f"torch-semiring-einsum {m['reference']}" if m["reference"] else "not installed"),
    ]
    if m["preset"] != "full":
        lines.append(
            "  (sizes scaled down; `python -m semiring_einsum --full` runs the full sizes)"
        )
    lines += [
        "",
        "Time: median ms over interleaved rounds; (Nx) = ours / that contender; "
        "WRONG = disagrees with the float64 oracle",
    ]
    rows = []
    for c in report.cases:
        check = "ok" if c.ok else "FAIL"
        cells = [_time_cell(c, n) if n in c.contenders else "" for n in names]
        rows.append([c.title, f"{check} {c.max_error:.1e}", *cells])
    lines += format_table(["workload", "check (err)", *names], rows)
    if any(r.peak_bytes is not None for c in report.cases for r in c.contenders.values()):
        how = "max_memory_allocated" if m["device"] == "cuda" else "ru_maxrss"
        lines += [
            "",
            f"Peak extra memory: MiB ({how} growth in a fresh subprocess per case x "
            "contender); (Nx) = ours / that contender",
        ]
        rows = [
            [c.title, *[_memory_cell(c, n) if n in c.contenders else "" for n in names]]
            for c in report.cases
        ]
        lines += format_table(["workload", *names], rows)
    lines.append("")
    lines += _check_lines(report)
    lines.append("self-check: " + ("ok" if report.ok else "FAILED: " + ", ".join(report.failures)))
    return "\n".join(lines)


def jsonable(x: float | None) -> float | str | None:
    """``x``, or its string where JSON has no number for it (``inf``, ``nan``).

    Example:
        >>> jsonable(1.5), jsonable(math.inf), jsonable(None)
        (1.5, 'inf', None)
    """
    if x is not None and not math.isfinite(x):
        return str(x)  # JSON has no inf/nan
    return x


def report_to_json(report: Report) -> dict[str, Any]:
    """The report as a JSON-serialisable dict (``inf``/``nan`` become strings)."""
    cases = []
    for c in report.cases:
        contenders = {
            name: {
                "median_ms": r.median_ms,
                "rounds": r.rounds,
                "time_ratio": _ratio(c.contenders[OURS].median_ms, r.median_ms),
                "max_error": jsonable(r.max_error),
                "peak_bytes": r.peak_bytes,
                "memory_ratio": _ratio(c.contenders[OURS].peak_bytes, r.peak_bytes),
                "note": r.note,
                "memory_note": r.memory_note,
            }
            for name, r in c.contenders.items()
        }
        cases.append(
            {
                "key": c.key,
                "title": c.title,
                "semiring": c.semiring,
                "equation": c.equation,
                "mode": c.mode,
                "sizes": c.sizes,
                "check": {
                    "ok": c.ok,
                    "max_error": jsonable(c.max_error),
                    "tolerance": c.tolerance,
                    "argmax_ok": c.argmax_ok,
                },
                "contenders": contenders,
            }
        )
    return {
        "meta": report.meta,
        "cases": cases,
        "checks": report.checks,
        "ok": report.ok,
        "failures": report.failures,
    }


def write_json(report: Report | Mapping[str, Any], path: str) -> None:
    """Write :func:`report_to_json` of ``report`` (or an already converted dict) to ``path``."""
    data = report_to_json(report) if isinstance(report, Report) else report
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_plot(
    report: Report,
    path: str,
    marks: Mapping[str, Sequence[tuple[str, float]]] | None = None,
    marks_label: str = "mark",
) -> str | None:
    """Plot each case to a PNG: time ratios (left), peak extra memory (right).

    Left: ours / contender median time per baseline, log scale.  Right: every
    contender's peak extra memory in MiB (symmetric-log scale, so 0 shows).

    Args:
        report: What to plot.
        path: The PNG to write.
        marks: Optional ticks on the left panel: per case key, ``(contender,
            time ratio)`` pairs, each drawn as ``|`` on that contender's bar.
        marks_label: What the ticks are, for the axis label.

    Returns:
        ``None`` on success, else why no plot was written (e.g. matplotlib
        is not installed).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written"
    cases = report.cases
    marks = marks or {}
    baselines = [n for n in CONTENDERS if n != OURS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 1.0 + 0.55 * len(cases)), sharey=True)

    def offset(j: int, count: int) -> float:
        return (j - (count - 1) / 2) * 0.8 / count

    height = 0.8 / len(baselines)
    for j, name in enumerate(baselines):
        ys, xs = [], []
        for i, c in enumerate(cases):
            r = c.contenders.get(name)
            ratio = _ratio(c.contenders[OURS].median_ms, None if r is None else r.median_ms)
            if ratio is not None:
                ys.append(i + offset(j, len(baselines)))
                xs.append(ratio)
            for contender, at in marks.get(c.key, ()):
                if contender == name:
                    left.plot([at], [i + offset(j, len(baselines))], "k|", markersize=12)
        if xs:  # an empty bar set would still take a (wrongly coloured) legend entry
            left.barh(ys, xs, height=height, label=name, color=f"C{j + 1}")
    left.axvline(1.0, color="grey", linewidth=0.8)
    left.set_xscale("log")
    legend = f"; | = {marks_label}" if marks else ""
    left.set_xlabel(f"median time, ours / contender (log; < 1: ours faster{legend})")
    height = 0.8 / len(CONTENDERS)
    for j, name in enumerate(CONTENDERS):
        ys, xs = [], []
        for i, c in enumerate(cases):
            r = c.contenders.get(name)
            if r is not None and r.peak_bytes is not None:
                ys.append(i + offset(j, len(CONTENDERS)))
                xs.append(r.peak_bytes / 2**20)
        if xs:
            right.barh(ys, xs, height=height, label=name, color=f"C{j}")
    right.set_xscale("symlog", linthresh=1.0)
    right.set_xlabel("peak extra memory, MiB (fresh subprocess per contender)")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:  # memory may not have been measured
            ax.legend(fontsize="small")
    left.set_yticks(range(len(cases)))
    left.set_yticklabels([c.key for c in cases])
    left.invert_yaxis()
    m = report.meta
    fig.suptitle(f"semiring_einsum: preset {m['preset']}, {m['device']}, torch {m['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
