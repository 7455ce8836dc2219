"""``python -m semiring_einsum``: a self-check and timing report on built-in workloads.

Each workload runs one of our functions and a plain-torch baseline on the same
inputs, checks our result against a float64 brute-force answer, and times
both (medians over interleaved rounds).  Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import func

Tensor = torch.Tensor


@dataclass
class Result:
    name: str
    baseline: str
    max_error: float
    tolerance: float
    ours_ms: float
    baseline_ms: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.baseline_ms if self.baseline_ms > 0 else float("nan")


def _time(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """Median milliseconds of each function, interleaving them round by round."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def _lse_bmm(a: Tensor, b: Tensor) -> Tensor:
    """Plain-torch log-space batched matmul by broadcasting (the naive baseline)."""
    return torch.logsumexp(a.unsqueeze(-1) + b.unsqueeze(-3), dim=-2)


def _workloads(
    quick: bool,
) -> list[tuple[str, str, Callable[[], Tensor], Callable[[], Tensor], Callable[[], Tensor], float]]:
    g = torch.Generator().manual_seed(0)
    n = 32 if quick else 128
    b = 4 if quick else 8
    x = torch.randn(b, n, n, generator=g)
    y = torch.randn(b, n, n, generator=g)
    x64, y64 = x.double(), y.double()
    chain = [torch.randn(n, n, generator=g) for _ in range(3)]
    chain64 = [c.double() for c in chain]
    spread = torch.randn(b, n, n, generator=g) * 300.0  # terms spread over ~1e3 nats
    spread64 = spread.double()

    def brute_chain() -> Tensor:
        a, c, d = chain64
        return torch.logsumexp(
            a[:, :, None, None] + c[None, :, :, None] + d[None, None, :, :], dim=(1, 2)
        )

    return [
        (
            "real  bij,bjk->bik",
            "torch.einsum",
            lambda: func.einsum("bij,bjk->bik", x, y),
            lambda: torch.einsum("bij,bjk->bik", x, y),
            lambda: torch.einsum("bij,bjk->bik", x64, y64),
            1e-3,
        ),
        (
            "log   bij,bjk->bik",
            "broadcast logsumexp",
            lambda: func.log_einsum("bij,bjk->bik", x, y),
            lambda: _lse_bmm(x, y),
            lambda: _lse_bmm(x64, y64),
            1e-4,
        ),
        (
            "log   ab,bc,cd->ad",
            "broadcast logsumexp",
            lambda: func.log_einsum("ab,bc,cd->ad", *chain),
            lambda: torch.logsumexp(
                chain[0][:, :, None, None] + chain[1][None, :, :, None] + chain[2][None, None],
                dim=(1, 2),
            ),
            brute_chain,
            1e-4,
        ),
        (
            "log   bij,bjk->bik (±1e3 nats)",
            "broadcast logsumexp",
            lambda: func.log_einsum("bij,bjk->bik", spread, spread),
            lambda: _lse_bmm(spread, spread),
            lambda: _lse_bmm(spread64, spread64),
            1e-2,
        ),
        (
            "max   bij,bjk->bik",
            "broadcast amax",
            lambda: func.max_einsum("bij,bjk->bik", x, y),
            lambda: (x.unsqueeze(-1) + y.unsqueeze(-3)).amax(-2),
            lambda: (x64.unsqueeze(-1) + y64.unsqueeze(-3)).amax(-2),
            1e-5,
        ),
        (
            "min   bij,bjk->bik",
            "broadcast amin",
            lambda: func.min_einsum("bij,bjk->bik", x, y),
            lambda: (x.unsqueeze(-1) + y.unsqueeze(-3)).amin(-2),
            lambda: (x64.unsqueeze(-1) + y64.unsqueeze(-3)).amin(-2),
            1e-5,
        ),
        (
            "viterbi bij,bjk->bik (values)",
            "broadcast max",
            lambda: func.viterbi_einsum("bij,bjk->bik", x, y)[0],
            lambda: (x.unsqueeze(-1) + y.unsqueeze(-3)).max(-2)[0],
            lambda: (x64.unsqueeze(-1) + y64.unsqueeze(-3)).amax(-2),
            1e-5,
        ),
    ]


def _viterbi_argmax_ok() -> bool:
    """The argmax points at terms that achieve the max (checked by gathering)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 6, generator=g), torch.randn(3, 6, 4, generator=g)
    values, argmax = func.viterbi_einsum("bij,bjk->bik", a, b, block_size=2)
    j = argmax[..., 0]
    picked = a.gather(2, j) + b.gather(1, j)
    return bool(torch.allclose(picked, values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semiring_einsum",
        description=(
            "Self-check and timing report: runs built-in workloads in every semiring, "
            "checks each result against a float64 brute-force answer, and times ours "
            "against a plain-torch baseline (medians of interleaved rounds, CPU)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per workload")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    torch.manual_seed(0)
    results = []
    for name, base, ours, baseline, oracle, tol in _workloads(args.quick):
        expected = oracle()
        got = ours().double()
        finite = torch.isfinite(expected)
        err = float((got - expected)[finite].abs().max()) if finite.any() else 0.0
        if not torch.equal(torch.isfinite(got), finite):
            err = float("inf")
        ours_ms, base_ms = _time([ours, baseline], rounds)
        results.append(Result(name, base, err, tol, ours_ms, base_ms))
    argmax_ok = _viterbi_argmax_ok()

    print(
        f"semiring_einsum self-check (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    header = (
        f"{'workload':<32} {'check':<6} {'max err':>9} {'ours ms':>9} {'base ms':>9} "
        f"{'ratio':>6}  baseline"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<32} {'ok' if r.ok else 'FAIL':<6} {r.max_error:>9.2e} "
            f"{r.ours_ms:>9.3f} {r.baseline_ms:>9.3f} {r.ratio:>6.2f}  {r.baseline}"
        )
    print(f"{'viterbi argmax consistent':<32} {'ok' if argmax_ok else 'FAIL':<6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "results": [asdict(r) | {"ok": r.ok, "ratio": r.ratio} for r in results],
                    "viterbi_argmax_ok": argmax_ok,
                },
                f,
                indent=2,
            )
    failed = [r.name for r in results if not r.ok] + ([] if argmax_ok else ["viterbi argmax"])
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
