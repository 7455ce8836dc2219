"""vmap overhead: one vmapped call against a Python loop over the batch.

    python benchmarks/vmap_overhead.py

Times (median of interleaved rounds) ``torch.func.vmap(f)(X)`` against
``torch.stack([f(x) for x in X])`` for our log and max-plus einsum, forward
and per-example gradients (``vmap(grad(f))`` against a loop of ``grad(f)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _timing import medians_ms
from torch.func import grad, vmap

from semiring_einsum import func


def _case(fn: Callable[..., torch.Tensor], xs: torch.Tensor, w: torch.Tensor) -> list[float]:
    def f(x: torch.Tensor) -> torch.Tensor:
        return fn("ij,jk->ik", x, w)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return f(x).sum()

    return medians_ms(
        [
            lambda: vmap(f)(xs),
            lambda: torch.stack([f(x) for x in xs]),
            lambda: vmap(grad(loss))(xs),
            lambda: torch.stack([grad(loss)(x) for x in xs]),
        ]
    )


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms")
    head = ("case", "vmap", "loop", "speedup", "vmap(grad)", "loop", "speedup")
    print("{:<24} {:>8} {:>8} {:>8} {:>11} {:>8} {:>8}".format(*head))
    for n_batch, n in [(64, 8), (256, 4), (32, 32)]:
        xs = torch.randn(n_batch, n, 2 * n)
        w = torch.randn(2 * n, n)
        for name, fn in [("log", func.log_einsum), ("max", func.max_einsum)]:
            vm, loop, vg, gloop = _case(fn, xs, w)
            case = f"{name} N={n_batch} {n}x{2 * n}x{n}"
            print(
                f"{case:<24} {vm:>8.2f} {loop:>8.2f} {loop / vm:>7.1f}x "
                f"{vg:>11.2f} {gloop:>8.2f} {gloop / vg:>7.1f}x"
            )


if __name__ == "__main__":
    main()
