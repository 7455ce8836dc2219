"""``python -m semiring_einsum``: self-check and benchmark report on built-in workloads.

Each workload runs our function (``semiring_einsum.func`` at default settings)
and its baselines on the same float32 inputs, checks every result against a
float64 brute-force answer, times the contenders in one process (interleaved
rounds, medians), measures peak extra memory in a fresh subprocess per
workload and contender, and judges the goals.  Exits non-zero if a self-check
fails.  The machinery is in :mod:`semiring_einsum._bench`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

import torch

from . import _bench

_EPILOG = """\
contenders:
  ours          semiring_einsum.func (einsum, log_einsum, max_einsum, min_einsum,
                viterbi_einsum) at default settings
  torch.einsum  real semiring only
  trick         log-matmul-exp: per pairwise step, subtract each operand's max over the
                summed indices, exp, torch.einsum (BLAS), log, add the maxima back
  naive         broadcast every operand into the joint index space, then logsumexp /
                amax / amin / sum over the summed indices (skipped above 512 MiB)
  reference     torch-semiring-einsum 1.2.0 at AUTOMATIC_BLOCK_SIZE, if installed
                (its Viterbi function stands in for max-plus values)

measurements:
  time    median of interleaved rounds in one process (each contender runs once per
          round, in a seeded random order); ratio = ours / contender, so < 1 means ours is faster
  memory  peak extra memory of one call: growth of ru_maxrss (CUDA: of
          max_memory_allocated) in a fresh subprocess per workload x contender, over a
          baseline taken after the imports, the inputs and a warm-up on tiny inputs
  output  tables on stdout; --json writes everything (settings, sizes, per contender:
          median, rounds, ratios, error, peak bytes; goals with value and verdict);
          --plot draws the ratios; progress goes to stderr (tqdm if installed)

checks (exit status 1 if one fails):
  every workload's result (and, for fwd+bwd, its gradients) against a float64
  brute-force answer, including an adversarial log input spread over +-1e3 nats
  where the trick underflows; Viterbi argmax consistency (the term at the argmax
  equals the max).  Goals are reported (met / NOT MET), never enforced.

sizes:
  default  scaled down, under a minute on two CPU cores
  --quick  tiny, a smoke test (no memory measurement unless --memory is given)
  --full   the sizes the goals are stated for (minutes; benchmarks/run.py runs this)

exit status: 0 all self-checks passed, 1 a self-check failed, 2 bad usage.
"""


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Self-check and benchmark: time semiring_einsum against torch.einsum, the "
            "naive broadcast baseline, the log-matmul-exp trick and torch-semiring-einsum "
            "on built-in workloads; report median times, ratios (ours / baseline), peak "
            "extra memory and whether each goal is met."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    size.add_argument("--full", action="store_true", help="full benchmark sizes (minutes)")
    p.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="most timing rounds per contender (quick/default/full: 3/5/15)",
    )
    p.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="time budget per contender and workload: a contender stops after its rounds "
        "add up to this; one whose first call alone exceeds it is timed by that call "
        "(quick/default/full: 0.1/0.3/2)",
    )
    p.add_argument(
        "--memory",
        choices=("all", "goals", "off"),
        help="peak-memory subprocesses: every contender, only those a goal compares "
        "(ours and the reference), or none (quick/default/full: off/goals/all)",
    )
    p.add_argument(
        "--jobs", type=int, default=2, metavar="N", help="memory subprocesses run at once (2)"
    )
    p.add_argument(
        "--memory-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up on one memory subprocess after this long (600)",
    )
    p.add_argument(
        "--skip-slow-reference",
        action="store_true",
        help="leave out the reference where it takes seconds per call (the log chain at n=128)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="KEY",
        default=(),
        help="run only workloads whose key contains one of these (see --list)",
    )
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device (cpu); cuda exits with an error where CUDA is not available",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="also plot the ratios (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _list_workloads() -> str:
    lines = []
    for w in _bench.WORKLOADS:
        goals = "; ".join(g.text for g in w.goals) or "(self-check only)"
        lines.append(f"{w.key:<16} {w.title(w.sizes['full'])}")
        lines.append(f"{'':<16}   contenders: {', '.join((_bench.OURS, *w.contenders))}")
        lines.append(f"{'':<16}   goals: {goals}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m semiring_einsum") -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.list:
        print(_list_workloads())
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'})"
        )
    preset = "quick" if args.quick else "full" if args.full else "default"
    base = _bench.PRESETS[preset]
    settings = replace(
        base,
        rounds=base.rounds if args.rounds is None else args.rounds,
        budget_s=base.budget_s if args.budget is None else args.budget,
        memory=args.memory or base.memory,
        jobs=args.jobs,
        device=args.device,
        skip_slow_reference=args.skip_slow_reference,
        memory_timeout_s=args.memory_timeout,
        only=tuple(args.only),
    )
    if args.only and not _bench.selected(settings.only):
        parser.error(f"--only {' '.join(args.only)}: no such workload (see --list)")
    report = _bench.run(settings, progress=not args.no_progress)
    print(_bench.format_report(report))
    if args.json:
        _bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        why = _bench.write_plot(report, args.plot)
        print(f"--plot: {why}" if why else f"wrote {args.plot}", file=sys.stderr if why else None)
    if not report.ok:
        print("FAILED: " + ", ".join(report.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
