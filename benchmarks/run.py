"""The full benchmark table and the project's goals (issue 4): every workload at full size.

    python benchmarks/run.py                       # full sizes: report, goals, JSON + PNG
    python benchmarks/run.py --skip-slow-reference # without the reference's multi-second rows
    python benchmarks/run.py --only log-chain      # a subset (see --list)

Runs the package's benchmark (:mod:`semiring_einsum.bench`, the machinery of
``python -m semiring_einsum``, with the same options, see ``--help``) at the full
sizes (``--quick`` replaces them), prints its report, then the goals table of
``benchmarks/goals.py``, and writes ``benchmarks/results/latest.json`` (the report
and the goal verdicts) and, when matplotlib is installed,
``benchmarks/results/latest.png``, unless ``--json`` / ``--plot`` name other paths.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import goals  # benchmarks/goals.py: this script's folder is on sys.path

from semiring_einsum import bench
from semiring_einsum.__main__ import build_parser, list_workloads, settings_from_args

RESULTS = Path(__file__).resolve().parent / "results"
PROG = "python benchmarks/run.py"

_EPILOG = """\
defaults here (unlike python -m semiring_einsum):
  sizes   --full (the sizes the goals are stated for; --quick for a smoke test)
  --json  benchmarks/results/latest.json: the report, and per workload its goals with
          the measured value and verdict, and the count of goals met
  --plot  benchmarks/results/latest.png, when matplotlib is installed: time ratios with a
          tick at each time goal's threshold (| = goal), and peak extra memory

output: the report of python -m semiring_einsum (times, ratios, peak memory, the checks,
`self-check: ok` or the failures), then the goals table (benchmarks/goals.py) and
`N of M goals met`.  Goals are reported (met / NOT MET), never enforced.  Contenders,
measurements and checks: python -m semiring_einsum --help.

exit status: 0 all self-checks passed, 1 a self-check failed, 2 bad usage.
"""


def build_run_parser() -> argparse.ArgumentParser:
    """The package's options, with this script's description and defaults."""
    parser = build_parser(PROG)
    parser.description = (
        "The full benchmark: run every built-in workload at full size against every "
        "baseline (python -m semiring_einsum --full), then judge the project's goals; "
        "write the results as JSON and PNG."
    )
    parser.epilog = _EPILOG
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the full benchmark and judge the goals; returns the exit status."""
    parser = build_run_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(list_workloads())
        print("\nGoals (at full sizes):")
        print(goals.list_goals())
        return 0
    settings = settings_from_args(parser, args, preset="full")
    json_path = args.json or str(RESULTS / "latest.json")
    plot_path = args.plot or str(RESULTS / "latest.png")
    report = bench.run(settings, progress=not args.no_progress)
    verdicts = goals.judge_report(report)
    print(bench.format_report(report))
    table = goals.format_goals(report, verdicts)
    if table:
        print("\n" + table)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    bench.write_json(goals.add_to_json(bench.report_to_json(report), report, verdicts), json_path)
    print(f"wrote {json_path}")
    why = bench.write_plot(report, plot_path, goals.plot_marks(report), marks_label="goal")
    print(f"--plot: {why}" if why else f"wrote {plot_path}", file=sys.stderr if why else None)
    if not report.ok:
        print("FAILED: " + ", ".join(report.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
