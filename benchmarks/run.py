"""The full benchmark table (issue 4): every workload at full size, against every baseline.

    python benchmarks/run.py                       # full sizes, table + JSON + PNG
    python benchmarks/run.py --skip-slow-reference # without the reference's multi-second rows
    python benchmarks/run.py --only log-chain      # a subset (see --list)

A thin wrapper over ``python -m semiring_einsum --full`` (same options, see
``--help``) that also writes ``benchmarks/results/latest.json`` and, when
matplotlib is installed, ``benchmarks/results/latest.png`` unless ``--json`` /
``--plot`` name other paths (``--quick`` replaces ``--full``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from semiring_einsum.__main__ import main

RESULTS = Path(__file__).resolve().parent / "results"


def _with_defaults(argv: list[str]) -> list[str]:
    """``argv`` with ``--full`` and the default output paths added where not given."""
    given = {a.split("=", 1)[0] for a in argv}
    extra = []
    if not given & {"--quick", "--full", "-h", "--help", "--list"}:
        extra.append("--full")
    if "--json" not in given:
        extra += ["--json", str(RESULTS / "latest.json")]
    if "--plot" not in given:
        extra += ["--plot", str(RESULTS / "latest.png")]
    return extra + argv


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    sys.exit(main(_with_defaults(sys.argv[1:]), prog="python benchmarks/run.py"))
