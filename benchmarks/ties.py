"""Viterbi's tie rule on pairwise plans: the chain timings and the tie-mismatch count.

    python benchmarks/ties.py [--seeds 40]

1. ``viterbi_einsum("ab,bc,cd,de->ae")`` on float32 n x n matrices, n = 16, 32, 48: median ms
   of the default call (pairwise since the ranks made the tie rule exact there) and of
   ``optimize=False`` (one joint sum: the default before).
2. Tie mismatches against the brute-force float64 oracle (``tests/oracle.py``): five equations
   of 3 to 5 operands on integer data in {0, 1, 2} (ties in most cells), ``--seeds`` seeds each,
   ``optimize`` in auto / greedy / optimal: how many argmax tensors differ from the oracle's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from semiring_einsum import func

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import brute_viterbi  # noqa: E402

CHAIN = "ab,bc,cd,de->ae"
EQUATIONS = [
    ("ab,bc,cd->ad", [(3, 4), (4, 3), (3, 4)]),
    ("ab,bc,cd,de->ae", [(3, 3), (3, 4), (4, 3), (3, 2)]),
    ("bsxk,bsyk,xyz->bsz", [(2, 2, 3, 2), (2, 2, 3, 2), (3, 3, 2)]),
    ("ij,jk,kl,lm,mn->in", [(2, 3), (3, 2), (2, 3), (3, 2), (2, 2)]),
    ("abc,cd,db->a", [(3, 2, 3), (3, 2), (2, 2)]),
]


def _median_ms(call: object, reps: int) -> float:
    assert callable(call)
    call()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=40)
    args = parser.parse_args()
    print("chain ab,bc,cd,de->ae, float32, median ms: default (pairwise) / optimize=False")
    for n in (16, 32, 48):
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(n, n, generator=g) for _ in range(4)]
        pairwise = _median_ms(lambda xs=xs: func.viterbi_einsum(CHAIN, *xs), 7)
        joint = _median_ms(lambda xs=xs: func.viterbi_einsum(CHAIN, *xs, optimize=False), 3)
        print(f"n={n:<3} {pairwise:9.3f} / {joint:9.3f}")
    bad = total = 0
    for eq, shapes in EQUATIONS:
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            xs = [torch.randint(0, 3, s, generator=g).float() for s in shapes]
            _, want = brute_viterbi(eq, *[x.double() for x in xs])
            for optimize in ("auto", "greedy", "optimal"):
                _, got = func.viterbi_einsum(eq, *xs, optimize=optimize)
                total += 1
                bad += not torch.equal(got, want)
    print(f"tie mismatches against the oracle: {bad} of {total}")


if __name__ == "__main__":
    main()
