"""An independent brute-force oracle for semiring einsum (float64).

Nothing here imports :mod:`semiring_einsum`.  The oracle materialises the whole
joint index space of all operands -- fine at test sizes -- so it is slow but
obviously right:

1. parse the equation (``torch.einsum`` string syntax: explicit or implicit
   output, ``...``, repeated indices inside an operand, spaces);
2. take diagonals for repeated indices inside an operand;
3. broadcast every operand into the joint tensor whose dims are all indices,
   output indices first, then the summed indices in order of first appearance
   (``...`` dimensions stand where ``...`` stands, right-aligned);
4. combine with ⊗ (``*`` for real, ``+`` otherwise) and ⊕-reduce the summed
   dims (sum / logsumexp / amax / amin), the semiring's zero for an empty sum.

Every step is an ordinary differentiable torch operation, so the oracle's
gradients (via ``torch.autograd``) are a reference for gradient tests too.
"""

from __future__ import annotations

import math
import string

import torch

Tensor = torch.Tensor

SEMIRINGS = ("real", "log", "max", "min")
ZERO = {"real": 0.0, "log": -math.inf, "max": -math.inf, "min": math.inf}
_LETTERS = frozenset(string.ascii_letters)
_ELLIPSIS = "..."


def _tokens(term: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(term):
        if term.startswith(_ELLIPSIS, i):
            out.append(_ELLIPSIS)
            i += 3
        elif term[i] in _LETTERS:
            out.append(term[i])
            i += 1
        else:
            raise ValueError(f"oracle: bad character {term[i]!r} in {term!r}")
    return out


def parse(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]]:
    """Resolve an equation against operand ranks.

    Returns one list of index names per operand (one name per dimension; names
    of ``...`` dims are ``'...0'``, ``'...1'``, ... right-aligned) and the list
    of output index names.  An implicit output is the ``...`` dims followed by
    the letters that occur exactly once in the whole equation, sorted (ASCII
    order, as ``torch.einsum`` does).
    """
    text = "".join(equation.split())
    lhs, arrow, rhs = text.partition("->")
    terms = [_tokens(t) for t in lhs.split(",")]
    if len(terms) != len(ranks):
        raise ValueError("oracle: operand count mismatch")
    ell_rank = 0
    for term, rank in zip(terms, ranks):
        if _ELLIPSIS in term:
            ell_rank = max(ell_rank, rank - (len(term) - 1))
        elif rank != len(term):
            raise ValueError("oracle: rank mismatch")
    dots = [f"...{i}" for i in range(ell_rank)]
    inputs: list[list[str]] = []
    for term, rank in zip(terms, ranks):
        expanded: list[str] = []
        for t in term:
            if t == _ELLIPSIS:
                width = rank - (len(term) - 1)
                expanded.extend(dots[ell_rank - width :])
            else:
                expanded.append(t)
        inputs.append(expanded)
    if arrow:
        output: list[str] = []
        for t in _tokens(rhs):
            output.extend(dots if t == _ELLIPSIS else [t])
    else:
        counts: dict[str, int] = {}
        for term in terms:
            for t in term:
                if t != _ELLIPSIS:
                    counts[t] = counts.get(t, 0) + 1
        output = dots + sorted(c for c, n in counts.items() if n == 1)
    return inputs, output


def _diagonalise(x: Tensor, term: list[str]) -> tuple[Tensor, list[str]]:
    """Take diagonals until every index of ``term`` is distinct."""
    term = list(term)
    while len(set(term)) < len(term):
        c = next(c for c in term if term.count(c) > 1)
        i = term.index(c)
        j = term.index(c, i + 1)
        x = torch.diagonal(x, dim1=i, dim2=j)  # removes i and j, appends the diagonal
        term = term[:i] + term[i + 1 : j] + term[j + 1 :] + [c]
    return x, term


def joint(equation: str, *operands: Tensor) -> tuple[list[Tensor], list[str], list[str], dict]:
    """The operands broadcast to the joint space (float64).

    Returns ``(tensors, output, summed, size)``: each tensor has one dim per
    index in ``output + summed`` order (size 1 where the operand lacks it or
    broadcasts it).
    """
    xs = [torch.as_tensor(x).to(torch.float64) if x.is_floating_point() else x for x in operands]
    inputs, output = parse(equation, [x.dim() for x in xs])
    clean: list[tuple[Tensor, list[str]]] = [_diagonalise(x, t) for x, t in zip(xs, inputs)]
    size: dict[str, int] = {}
    for x, term in clean:
        for c, n in zip(term, x.shape):
            if c not in size or size[c] == 1:
                size[c] = n
            elif n not in (1, size[c]):
                raise ValueError(f"oracle: size mismatch for {c!r}")
    summed: list[str] = []
    for term in inputs:
        for c in term:
            if c not in output and c not in summed:
                summed.append(c)
    order = output + summed
    tensors = []
    for x, term in clean:
        perm = sorted(range(len(term)), key=lambda i: order.index(term[i]))
        x = x.permute(perm)
        present = [term[i] for i in perm]
        shape = [x.shape[present.index(c)] if c in present else 1 for c in order]
        tensors.append(x.reshape(shape))
    return tensors, output, summed, size


def _terms(semiring: str, equation: str, operands: tuple[Tensor, ...]) -> tuple[Tensor, int]:
    """All terms, shaped ``output.shape + (number of terms,)``; and the output rank."""
    tensors, output, summed, size = joint(equation, *operands)
    full = [size[c] for c in output + summed]
    acc = tensors[0].expand(full)
    for t in tensors[1:]:
        acc = acc * t if semiring == "real" else acc + t
    acc = acc.expand(full)
    out_shape = [size[c] for c in output]
    return acc.reshape(out_shape + [math.prod(size[c] for c in summed)]), len(output)


def brute(semiring: str, equation: str, *operands: Tensor) -> Tensor:
    """The contraction in ``semiring`` ('real', 'log', 'max' or 'min'), float64."""
    if semiring not in SEMIRINGS:
        raise ValueError(f"oracle: unknown semiring {semiring!r}")
    terms, _ = _terms(semiring, equation, operands)
    if terms.shape[-1] == 0:  # the empty sum (kept connected to the inputs for autograd)
        return terms.sum(-1) + ZERO[semiring]
    if semiring == "real":
        return terms.sum(-1)
    if semiring == "log":
        return torch.logsumexp(terms, -1)
    if semiring == "max":
        return terms.amax(-1)
    return terms.amin(-1)


def brute_viterbi(equation: str, *operands: Tensor) -> tuple[Tensor, Tensor]:
    """Max-plus values and argmax (int64, shape ``values.shape + (k,)``).

    The argmax holds the summed indices (first-appearance order) of the first
    maximiser in row-major order of the summed indices; a NaN term wins (the
    first NaN); all terms -inf (or no terms at all) gives zeros.
    """
    tensors, output, summed, size = joint(equation, *operands)
    terms, _ = _terms("max", equation, operands)
    out_shape = list(terms.shape[:-1])
    k = len(summed)
    if terms.shape[-1] == 0:
        values = terms.new_full(out_shape, -math.inf)
        return values, torch.zeros(out_shape + [k], dtype=torch.int64)
    values = terms.amax(-1)
    flat = torch.argmax(terms, dim=-1)  # first maximiser; NaN counts as largest
    coords = []
    stride = 1
    for c in reversed(summed):
        coords.append(flat // stride % size[c])
        stride *= size[c]
    coords.reverse()
    if not coords:
        return values, torch.zeros(out_shape + [0], dtype=torch.int64)
    return values, torch.stack(coords, dim=-1).to(torch.int64)


def output_shape(equation: str, *operands: Tensor) -> list[int]:
    _, output, _, size = joint(equation, *operands)
    return [size[c] for c in output]


def log_vjp(
    equation: str, operands: list[Tensor], cotangent: Tensor, grad_of_neg_inf: float | str
) -> list[Tensor]:
    """Input gradients of the log-semiring contraction, per DESIGN §3.1.

    d(out cell)/d(term) is the term's softmax weight ``exp(term - out)``; in a
    cell whose terms are all -inf that weight is replaced by ``grad_of_neg_inf``
    (NaN: NaN; a float ``c``: ``c``; ``'uniform'``: ``1/N`` for ``N`` terms).
    The input gradients follow by the chain rule through the joint-space
    broadcast, so an input entry in ``m`` terms of such a cell gets
    ``m · weight · cotangent`` -- except that a weight of 0 does not use the
    cotangent at all (0, even where the cotangent is NaN or inf), as in
    torch-semiring-einsum.  Returned in float64.
    """
    xs = [x.detach().to(torch.float64).requires_grad_() for x in operands]
    terms, _ = _terms("log", equation, tuple(xs))
    n = terms.shape[-1]
    if n == 0:
        return [torch.zeros_like(x) for x in xs]
    out = torch.logsumexp(terms.detach(), -1, keepdim=True)
    weights = torch.exp(terms.detach() - out)
    dead = torch.isneginf(out).expand(weights.shape)
    if grad_of_neg_inf == "uniform":
        weights = torch.where(dead, 1.0 / n, weights)
    elif not math.isnan(float(grad_of_neg_inf)):
        weights = torch.where(dead, float(grad_of_neg_inf), weights)
    g = cotangent.to(torch.float64).unsqueeze(-1)
    if not isinstance(grad_of_neg_inf, str) and float(grad_of_neg_inf) == 0.0:
        g = torch.where(torch.isneginf(out), 0.0, g)
    grads = torch.autograd.grad(terms, xs, weights * g, allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs, grads)]
