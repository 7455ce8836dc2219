"""A log step against one exp pass over its largest operand plus its BLAS product.

    python benchmarks/log_layout.py

For a stack-RNN-like update (a 7-index operand of 2.2M elements) with the two summed
indices in several positions (trailing, leading, in the middle, apart), prints the median
time of ``func.log_einsum`` and of ``torch.exp`` over the big operand plus ``torch.einsum`` of
the same equation (the real product), and their ratio.  float32, the machine's threads,
medians of interleaved rounds.
"""

from __future__ import annotations

import torch
from _timing import medians_ms

from semiring_einsum import func

SIZES = {"a": 4, "b": 6, "c": 16, "d": 6, "e": 16, "f": 6, "g": 10, "h": 16}
# (the big operand's indices, the output); c and e are summed with "ceh"
CASES = {
    "summed last": ("abdfgce", "abdfgh"),
    "summed first": ("ceabdfg", "abdfgh"),
    "summed in the middle": ("abcdefg", "abdfgh"),
    "summed apart": ("cabdfge", "abdfgh"),
}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn([SIZES[c] for c in "ceh"], generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median ms")
    print(f"{'case':<22} {'ours':>7} {'exp':>7} {'einsum':>7} {'ours / (exp + einsum)':>22}")
    for name, (term, out) in CASES.items():
        a = torch.randn([SIZES[c] for c in term], generator=g)
        eq = f"{term},ceh->{out}"
        ours, exp, blas = medians_ms(
            [
                lambda eq=eq, a=a: func.log_einsum(eq, a, b),
                lambda a=a: torch.exp(a),
                lambda eq=eq, a=a: torch.einsum(eq, a, b),
            ]
        )
        print(f"{name:<22} {ours:>7.2f} {exp:>7.2f} {blas:>7.2f} {ours / (exp + blas):>21.2f}x")


if __name__ == "__main__":
    main()
