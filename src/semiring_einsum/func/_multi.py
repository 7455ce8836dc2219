"""Several outputs of one equation (``"bij,bjk->,bij,bjk"``), sharing the work.

The outputs are contracted together by the inside-outside algorithm of the
pairwise plan, valid in every commutative semiring:

1. *inside*: the plan for the indices common to every output ``C`` runs once,
   keeping every intermediate ("node"): an operand or a step's result;
2. *outside*: walking the steps backwards, the outside value of a step's
   operand is the ⊕-sum over what the step does not keep of the ⊗-product of
   the result's outside value and the step's other operands -- one more
   contraction of the same shape as the step, in the same semiring (the last
   result's outside value is the semiring's one);
3. an output ``O`` is read off the smallest node whose indices include ``O``:
   ``node ⊗ outside`` holds, for every assignment of the node's indices, the
   ⊕-sum of all terms that agree with it (the node's marginal), and
   ⊕-reducing the node's other indices gives ``O``.  An output no node covers
   (its indices meet only in the joint space) is contracted on its own.

So the log partition function and the marginals of every factor cost one
forward and about one backward-style pass, with the semiring's own kernels
(log BLAS, the native tropical kernel) and the memory bound of the plans.
Everything is built from the differentiable contractions, so every output is
differentiable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from . import _kernels as K
from ._errors import fail
from ._parse import analyze, apply_recipe, check_operands, parse_subscripts
from ._plan import Plan, along_path
from ._semiring import Semiring

Tensor = torch.Tensor
Contract = Callable[[Semiring, str, Sequence[Tensor]], Tensor]
Planner = Callable[[Semiring, str, Sequence[Tensor]], Plan]


def split_outputs(equation: object) -> tuple[str, list[str]] | None:
    """``(inputs, outputs)`` of an equation with several comma-separated outputs, else ``None``."""
    if not isinstance(equation, str) or "->" not in equation:
        return None
    lhs, _, rhs = equation.partition("->")
    if "," not in rhs:
        return None
    return lhs, rhs.split(",")


def several(
    semiring: Semiring,
    equation: str,
    operands: Sequence[Tensor],
    contract: Contract,
    planner: Planner,
) -> tuple[Tensor, ...]:
    """The outputs of ``lhs->o1,o2,...``, one tensor each, by inside-outside over one plan.

    ``contract(semiring, equation, operands)`` runs one single-output contraction
    (the caller's options bound); ``planner`` plans one.
    """
    split = split_outputs(equation)
    assert split is not None
    lhs, outputs = split
    singles = [f"{lhs}->{o}" for o in outputs]
    shapes, dtypes = check_operands(equation, operands)
    element = semiring.shape
    named = [analyze(eq, shapes, dtypes, element) for eq in singles]  # validates each output
    tokens = [parse_subscripts(eq).output or () for eq in singles]
    common = [t for t in tokens[0] if all(t in other for other in tokens[1:])]
    base_eq = f"{lhs}->{''.join(common)}"
    recipe = analyze(base_eq, shapes, dtypes, element)
    c = recipe.contraction
    symbols = list(dict.fromkeys("".join(c.inputs) + c.output))
    if element or len(symbols) > len(K.LETTERS) or 0 in c.size.values():
        # Element dimensions (the reductions below would need to skip them), more
        # indices than torch.einsum letters, or empty sums (nothing to share):
        # each output on its own.
        return tuple(contract(semiring, eq, operands) for eq in singles)
    letter = dict(zip(symbols, K.LETTERS))

    def spell(terms: Sequence[str], out: str) -> str:
        return (
            ",".join("".join(letter[s] for s in t) for t in terms)
            + "->"
            + "".join(letter[s] for s in out)
        )

    plan = planner(semiring, base_eq, operands)
    steps = plan.steps
    clean = apply_recipe(recipe, operands)
    # Inside: every node's indices and value; node k < n is operand k, then one per step.
    n = len(clean)
    node_terms: list[str] = list(c.inputs)
    node_values: list[Tensor] = list(clean)
    made: list[tuple[int, list[int]]] = []  # per step: its result's node and its operand nodes

    def inside(k: int, step: object, ids: list[int]) -> int:
        s = steps[k]
        value = contract(semiring, spell(s.inputs, s.output), [node_values[i] for i in ids])
        node_terms.append(s.output)
        node_values.append(value)
        made.append((len(node_terms) - 1, ids))
        return len(node_terms) - 1

    root = along_path(steps, list(range(n)), inside) if steps else 0
    # Which node each output is read from: the smallest that has all its indices.
    wanted: list[int | None] = []
    for r in named:
        wants = set(r.contraction.output)
        fits = [i for i, t in enumerate(node_terms) if wants <= set(t)]
        sizes = c.size
        wanted.append(
            min(fits, key=lambda i: math.prod(sizes[s] for s in node_terms[i])) if fits else None
        )
    # Outside: only towards the nodes that are read.
    parent: dict[int, tuple[int, list[int]]] = {}
    for result, ids in made:
        for i in ids:
            parent[i] = (result, ids)
    needed: set[int] = set()
    for read in wanted:
        node = read
        while node is not None and node not in needed:
            needed.add(node)
            node = parent[node][0] if node in parent else None
    outside: dict[int, Tensor] = {
        root: K.filled(node_values[root], list(node_values[root].shape), semiring.one)
    }
    for result, ids in reversed(made):
        if result not in outside:
            continue
        for i in ids:
            if i not in needed:
                continue
            others = [j for j in ids if j != i]
            terms = [node_terms[result]] + [node_terms[j] for j in others]
            present = set("".join(terms))
            target = node_terms[i]
            kept = "".join(s for s in target if s in present)
            factors = [outside[result]] + [node_values[j] for j in others]
            if present <= set(kept):  # nothing to sum: the product, laid out as the node
                value = functools.reduce(
                    semiring.mul, [K.laid_out(f, t, kept) for f, t in zip(factors, terms)]
                )
                value = value.expand([c.size[s] for s in kept])
            else:
                value = contract(semiring, spell(terms, kept), factors)
            # Laid out as the node, expanded along the indices it does not depend on.
            outside[i] = K.laid_out(value, kept, target).expand([c.size[s] for s in target])
    results = []
    for eq, r, read in zip(singles, named, wanted):
        if read is None:
            results.append(contract(semiring, eq, operands))
            continue
        term = node_terms[read]
        marginal = semiring.mul(node_values[read], outside[read])
        out = r.contraction.output
        dims = tuple(d for d, s in enumerate(term) if s not in out)
        reduced = semiring.sum(marginal, dims) if dims else marginal
        rest = [s for s in term if s in out]
        value = reduced.permute([rest.index(s) for s in out]) if out else reduced
        results.append(value.to(recipe.dtype) if value.dtype != recipe.dtype else value)
    return tuple(results)


def reject(equation: str, function: str) -> None:
    """Raise for a function that takes one output only."""
    if split_outputs(equation) is not None:
        raise fail(
            equation,
            f"{function} returns one output; several comma-separated outputs are "
            "supported by einsum, log_einsum, max_einsum, min_einsum, bool_einsum and "
            "semiring_einsum",
        )
