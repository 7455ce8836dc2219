"""The structured-prediction functions against the contractions they extend.

    python benchmarks/structured.py [--rounds 9] [--preset default]

On the HMM step (``bi,ij,bj``) and CKY (``bsxk,bsyk,xyz``) workloads of ``python -m
semiring_einsum`` (float32, the preset's sizes), median ms of

* ``kbest_einsum(k=8)`` against ``viterbi_einsum`` (goal: at most 8x);
* ``entropy_einsum`` and ``expectation_einsum`` against ``log_einsum`` forward (goal: 3x);
* ``sample_einsum(num_samples=1)`` against ``log_einsum`` forward + backward (goal: 2x);
* several outputs, the log partition and the marginal of every factor
  (``bi,ij,bj->,bi,ij,bj``), against the single log forward ``bi,ij,bj->`` (goal: 2.5x).

Goals from issue 12; ``ratio`` is the call's median over its baseline's.

Every call is timed in the same interleaved rounds (benchmarks/_timing.py), so that each one
runs with its data out of cache, as between the other operations of a model; ``--hot`` times
each call on its own, repeated, caches warm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from semiring_einsum import func
from semiring_einsum.bench.workloads import workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import medians_ms  # noqa: E402

CASES = {"hmm": ("log-hmm-bwd", "bi,ij,bj->bj"), "cky": ("log-cky-bwd", "bsxk,bsyk,xyz->bsz")}


def _operands(key: str, preset: str, equation: str) -> list[torch.Tensor]:
    sizes = workload(key).sizes[preset]
    g = torch.Generator().manual_seed(0)
    lhs = equation.split("->")[0].split(",")
    return [torch.randn([sizes[c] for c in t], generator=g) for t in lhs]


def _measure(key: str, equation: str, preset: str, rounds: int, hot: bool) -> dict[str, float]:
    """Median ms of every call on one workload: interleaved (each call after the others, its
    data out of cache as in a model's step), or ``hot`` (each call repeated on its own)."""
    xs = _operands(key, preset, equation)
    lhs = equation.split("->")[0]
    grads = [x.clone().requires_grad_() for x in xs]

    def fwd_bwd() -> None:
        torch.autograd.grad(func.log_einsum(equation, *grads).sum(), grads)

    calls = {
        "viterbi_einsum": lambda: func.viterbi_einsum(equation, *xs),
        "kbest_einsum k=8": lambda: func.kbest_einsum(equation, *xs, k=8),
        "log_einsum": lambda: func.log_einsum(equation, *xs),
        "entropy_einsum": lambda: func.entropy_einsum(equation, *xs),
        "expectation_einsum": lambda: func.expectation_einsum(equation, xs, xs),
        "log_einsum fwd+bwd": fwd_bwd,
        "sample_einsum n=1": lambda: func.sample_einsum(equation, *xs, num_samples=1),
        "log_einsum ->": lambda: func.log_einsum(f"{lhs}->", *xs),
        "several outputs": lambda: func.log_einsum(f"{lhs}->,{lhs}", *xs),
    }
    if hot:
        return {name: medians_ms([fn], rounds=rounds)[0] for name, fn in calls.items()}
    return dict(zip(calls, medians_ms(list(calls.values()), rounds=rounds)))


ROWS = [
    ("kbest_einsum k=8", "viterbi_einsum", 8.0),
    ("entropy_einsum", "log_einsum", 3.0),
    ("expectation_einsum", "log_einsum", 3.0),
    ("sample_einsum n=1", "log_einsum fwd+bwd", 2.0),
    ("several outputs", "log_einsum ->", 2.5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--preset", default="default", choices=["quick", "default", "full"])
    parser.add_argument(
        "--hot", action="store_true", help="time each call on its own (caches warm) instead"
    )
    args = parser.parse_args()
    mode = "hot" if args.hot else "interleaved"
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, preset {args.preset}, {mode}")
    head = ("workload", "call", "ms", "baseline", "ms", "ratio", "goal")
    print("{:<6} {:<20} {:>9} {:<20} {:>9} {:>6} {:>5}".format(*head))
    for name, (key, equation) in CASES.items():
        ms = _measure(key, equation, args.preset, args.rounds, args.hot)
        for call, base, goal in ROWS:
            ratio = ms[call] / ms[base]
            print(
                f"{name:<6} {call:<20} {ms[call]:9.3f} {base:<20} {ms[base]:9.3f} "
                f"{ratio:6.2f} {goal:5.1f}"
            )


if __name__ == "__main__":
    main()
