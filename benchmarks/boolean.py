"""Boolean einsum (reachability): ``bool_einsum`` against float32 BLAS and a generic semiring.

    python benchmarks/boolean.py [--rounds 7] [--generic-max-n 1024] [--threads N]

Cases: ``ij,jk->ik`` on n x n boolean matrices, n = 256, 1024, 2048, and ``bij,bjk->bik``
with b = 16, n = 128 and b = 4, n = 1024, each at density 0.01 and 0.5.  Columns (median ms
over ``--rounds`` interleaved rounds, after a warm-up):

* ``bool``: ``func.bool_einsum`` on the ``torch.bool`` operands;
* ``f32+conv``: ``torch.einsum`` on float32 copies of the operands, then ``> 0``, the two
  conversions included; ``f32``: the same on float32 copies made beforehand;
* ``generic``: ``func.semiring_einsum`` with a user-defined boolean semiring over float32
  0/1 values (``max`` for or, ``min`` for and), run once; only where ``b n**3`` is at most
  ``(--generic-max-n)**3`` (about 2 s at n = 1024 on this machine, some 15 s at n = 2048).

The ratios are each column's time over ``bool`` (above 1: ``bool_einsum`` is faster).  Every
result is checked against the float32 one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from semiring_einsum.func import Semiring, bool_einsum, semiring_einsum

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import medians_ms  # noqa: E402

BOOLEAN = Semiring(
    "bool", torch.maximum, torch.minimum, lambda x, d: x.amax(d) if d else x, 0.0, 1.0
)
CASES = [
    ("ij,jk->ik", (), 256),
    ("ij,jk->ik", (), 1024),
    ("ij,jk->ik", (), 2048),
    ("bij,bjk->bik", (16,), 128),
    ("bij,bjk->bik", (4,), 1024),
]
DENSITIES = (0.01, 0.5)


def _time(
    eq: str, a: torch.Tensor, b: torch.Tensor, af: torch.Tensor, bf: torch.Tensor, rounds: int
) -> list[float]:
    """Median ms of bool_einsum, float32 with the conversions, float32 without."""
    return medians_ms(
        [
            lambda: bool_einsum(eq, a, b),
            lambda: torch.einsum(eq, a.float(), b.float()) > 0,
            lambda: torch.einsum(eq, af, bf) > 0,
        ],
        rounds=rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--generic-max-n", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median ms")
    header = (
        f"{'case':<26} {'dens':>5} {'bool':>8} {'f32+conv':>9} {'f32':>8} {'generic':>9}"
        f" {'conv/bool':>9} {'f32/bool':>8} {'gen/bool':>8}"
    )
    print(header)
    print("-" * len(header))
    g = torch.Generator().manual_seed(0)
    for eq, batch, n in CASES:
        for density in DENSITIES:
            a = torch.rand(*batch, n, n, generator=g) < density
            b = torch.rand(*batch, n, n, generator=g) < density
            af, bf = a.float(), b.float()
            want = torch.einsum(eq, af, bf) > 0
            assert torch.equal(bool_einsum(eq, a, b), want), (eq, n, density)
            ours, conv, f32 = _time(eq, a, b, af, bf, args.rounds)
            generic = gen_ratio = "-"
            if (batch[0] if batch else 1) * n**3 <= args.generic_max_n**3:
                start = time.perf_counter()
                got = semiring_einsum(BOOLEAN, eq, af, bf) > 0
                ms = (time.perf_counter() - start) * 1e3
                assert torch.equal(got, want), (eq, n, density)
                generic, gen_ratio = f"{ms:9.1f}", f"{ms / ours:8.1f}"
            label = f"{eq} " + (f"b={batch[0]} " if batch else "") + f"n={n}"
            print(
                f"{label:<26} {density:>5} {ours:8.2f} {conv:9.2f} {f32:8.2f} {generic:>9}"
                f" {conv / ours:9.2f} {f32 / ours:8.2f} {gen_ratio:>8}"
            )


if __name__ == "__main__":
    main()
