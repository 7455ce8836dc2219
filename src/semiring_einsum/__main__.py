"""``python -m semiring_einsum``: self-check and benchmark report on built-in workloads.

Each workload runs our function (``semiring_einsum.func`` at default settings)
and its baselines on the same float32 inputs, checks every result against a
float64 brute-force answer (and the Viterbi argmax for consistency), times the
contenders in one process (interleaved rounds, medians) and measures peak extra
memory in a fresh subprocess per workload and contender.  Exits non-zero if a
self-check fails.  The machinery is in :mod:`semiring_einsum.bench`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

import torch

from . import bench

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
  output  tables on stdout, then the checks and `self-check: ok` or the failures;
          --json writes everything (settings, sizes, per contender: median, rounds,
          ratios, error, peak bytes; the checks); --plot draws the ratios and the
          memory; progress goes to stderr (tqdm if installed)

checks (exit status 1 if one fails):
  every workload's result (and, for fwd+bwd, its gradients) against a float64
  brute-force answer, including an adversarial log input spread over +-1e3 nats
  where the trick underflows; Viterbi argmax consistency (the term at the argmax
  equals the max), on the Viterbi workloads and on a small case with windows of 2.

sizes:
  default  scaled down, under a minute on two CPU cores
  --quick  tiny, a smoke test (no memory measurement unless --memory is given)
  --full   the full sizes (minutes)

exit status: 0 all self-checks passed, 1 a self-check failed, 2 bad usage.
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The command line's options (``benchmarks/run.py`` reuses them)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Self-check and benchmark: check semiring_einsum against a float64 oracle and "
            "time it against torch.einsum, the naive broadcast baseline, the log-matmul-exp "
            "trick and torch-semiring-einsum on built-in workloads; report median times, "
            "ratios (ours / baseline) and peak extra memory."
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
        choices=("all", "reference", "off"),
        help="peak-memory subprocesses: every contender, only ours and the reference "
        "(where it is a contender), or none (quick/default/full: off/reference/all)",
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


def list_workloads() -> str:
    """Every built-in workload: key, title at full sizes, contenders."""
    lines = []
    for w in bench.WORKLOADS:
        lines.append(f"{w.key:<16} {w.title(w.sizes['full'])}")
        lines.append(f"{'':<16}   contenders: {', '.join((bench.OURS, *w.contenders))}")
    return "\n".join(lines)


def settings_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, preset: str = "default"
) -> bench.Settings:
    """The settings ``args`` ask for (``preset`` unless --quick or --full is given).

    Calls ``parser.error`` (exit status 2) on a CUDA device that is not
    available or an ``--only`` that selects nothing.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'})"
        )
    preset = "quick" if args.quick else "full" if args.full else preset
    base = bench.PRESETS[preset]
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
    if args.only and not bench.selected(settings.only):
        parser.error(f"--only {' '.join(args.only)}: no such workload (see --list)")
    return settings


def main(argv: Sequence[str] | None = None, prog: str = "python -m semiring_einsum") -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list:
        print(list_workloads())
        return 0
    settings = settings_from_args(parser, args)
    report = bench.run(settings, progress=not args.no_progress)
    print(bench.format_report(report))
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        why = bench.write_plot(report, args.plot)
        print(f"--plot: {why}" if why else f"wrote {args.plot}", file=sys.stderr if why else None)
    if not report.ok:
        print("FAILED: " + ", ".join(report.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
