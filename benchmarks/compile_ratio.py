"""Compiled against eager: every semiring, forward and forward+backward, three workloads.

    python benchmarks/compile_ratio.py                 # the whole table (a few minutes)
    python benchmarks/compile_ratio.py --only log      # semirings whose name contains "log"
    python benchmarks/compile_ratio.py --json out.json
    python benchmarks/compile_ratio.py --floor         # what torch.compile itself costs

For each case, ``f`` is the eager call and ``torch.compile(f, fullgraph=True)`` (inductor) the
compiled one; forward+backward is ``f(*xs).sum().backward()`` (compiled: the compiled loss, then
``.backward()``).  Times are medians over interleaved rounds in one process (float32, the
machine's threads).  The last columns are compiled / eager and the graph breaks seen.

``--floor`` times the same ratio for code that is not ours, to show what compiling costs by
itself on these workloads: :func:`torch.einsum` (the real semiring's own kernel), and the log
step's registered operator called alone (``torch.ops.semiring_einsum.log_blas``, the one node
of our compiled log graph).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from _timing import medians_ms
from torch._dynamo.utils import counters

from semiring_einsum import func

Tensor = torch.Tensor

WORKLOADS: dict[str, tuple[str, list[tuple[int, ...]]]] = {
    "bmm b=8 n=128": ("bij,bjk->bik", [(8, 128, 128), (8, 128, 128)]),
    "HMM step b=64 n=256": ("bi,ij,bj->bj", [(64, 256), (256, 256), (64, 256)]),
    "CKY b=2 s=16 x=y=z=24 k=8": (
        "bsxk,bsyk,xyz->bsz",
        [(2, 16, 24, 8), (2, 16, 24, 8), (24, 24, 24)],
    ),
}


def _viterbi_values(eq: str, *xs: Tensor) -> Tensor:
    return func.viterbi_einsum(eq, *xs)[0]


SEMIRINGS: dict[str, Callable[..., Tensor]] = {
    "real": func.einsum,
    "log": func.log_einsum,
    "max": func.max_einsum,
    "min": func.min_einsum,
    "viterbi": _viterbi_values,
}


def _inputs(shapes: list[tuple[int, ...]], grad: bool) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).requires_grad_(grad) for s in shapes]


def measure(semiring: str, workload: str, rounds: int) -> dict[str, Any]:
    eq, shapes = WORKLOADS[workload]
    op = SEMIRINGS[semiring]

    def f(*xs: Tensor) -> Tensor:
        return op(eq, *xs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True)
    row: dict[str, Any] = {"semiring": semiring, "workload": workload}
    plain = _inputs(shapes, grad=False)
    eager_fwd, compiled_fwd = medians_ms(
        [lambda: f(*plain), lambda: compiled(*plain)], rounds, warmup=2
    )
    leaves = _inputs(shapes, grad=True)

    def step(fn: Callable[..., Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn(*leaves).sum().backward()
            for x in leaves:
                x.grad = None

        return run

    eager_bwd, compiled_bwd = medians_ms([step(f), step(compiled)], rounds, warmup=2)
    row.update(
        eager_fwd=eager_fwd,
        compiled_fwd=compiled_fwd,
        eager_fwd_bwd=eager_bwd,
        compiled_fwd_bwd=compiled_bwd,
        graph_breaks=sum(counters["graph_break"].values()),
    )
    return row


def _floor(rounds: int) -> None:
    """compiled / eager of torch.einsum and of the lone log-BLAS operator (see the docstring)."""
    from semiring_einsum.func._budget import AUTOMATIC_BLOCK_SIZE, Budget

    def pair(name: str, fn: Callable[..., Tensor], xs: list[Tensor], backward: bool) -> None:
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)

        def call(f: Callable[..., Tensor]) -> Callable[[], None]:
            def run() -> None:
                out = f(*xs)
                if backward:
                    out.sum().backward()
                    for x in xs:
                        x.grad = None

            return run

        eager, comp = medians_ms([call(fn), call(compiled)], rounds, warmup=2)
        print(f"{name:<52} {eager:>8.3f} {comp:>9.3f} {comp / eager:>5.2f}x", flush=True)

    print(f"{'floor case':<52} {'eager':>8} {'compiled':>9} {'ratio':>6}")
    for workload, (eq, shapes) in WORKLOADS.items():

        def einsum(*xs: Tensor, eq: str = eq) -> Tensor:
            return torch.einsum(eq, *xs)

        pair(f"torch.einsum fwd, {workload}", einsum, _inputs(shapes, False), False)
        pair(f"torch.einsum fwd+bwd, {workload}", einsum, _inputs(shapes, True), True)
    eq, shapes = WORKLOADS["bmm b=8 n=128"]
    (step,) = func.plan(eq, *shapes, semiring=func.LOG).steps
    key = step.key(Budget(bytes=AUTOMATIC_BLOCK_SIZE.max_cpu_bytes), 4, "cpu")
    op = torch.ops.semiring_einsum.log_blas.default

    def log_blas(a: Tensor, b: Tensor) -> Tensor:
        return op(key, a, b)[0]

    pair("semiring_einsum::log_blas alone, bmm b=8 n=128", log_blas, _inputs(shapes, False), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="semirings whose name contains this")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--floor", action="store_true", help="compile's own cost (see above)")
    args = parser.parse_args()
    if args.floor:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median ms")
        _floor(args.rounds)
        return
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median ms")
    header = (
        f"{'semiring':<8} {'workload':<26} {'eager':>8} {'compiled':>9} {'ratio':>6}   "
        f"{'eager f+b':>9} {'compiled f+b':>12} {'ratio':>6}  breaks"
    )
    print(header)
    print("-" * len(header))
    for workload in WORKLOADS:
        for semiring in SEMIRINGS:
            if args.only not in semiring:
                continue
            r = measure(semiring, workload, args.rounds)
            rows.append(r)
            fwd = r["compiled_fwd"] / r["eager_fwd"]
            both = r["compiled_fwd_bwd"] / r["eager_fwd_bwd"]
            print(
                f"{semiring:<8} {workload:<26} {r['eager_fwd']:>8.3f} {r['compiled_fwd']:>9.3f} "
                f"{fwd:>5.2f}x   {r['eager_fwd_bwd']:>9.3f} {r['compiled_fwd_bwd']:>12.3f} "
                f"{both:>5.2f}x  {r['graph_breaks']}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
