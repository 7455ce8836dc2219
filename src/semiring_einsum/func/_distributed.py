"""Contractions over distributed tensors (``torch.distributed.tensor.DTensor``).

The route is *local shards at the API boundary*: a call whose operands are
DTensors is laid out once from their global metadata (shapes and placements,
the same on every rank), each rank contracts its local shards with the
single-device code, and the partial results of a sharded summed index are
combined with the semiring's ⊕ as a collective:

* each mesh dimension shards at most one index of the equation (chosen from the
  operands' own placements: the index whose shards cover the most bytes);
  an operand that has that index is brought to ``Shard`` of it on that mesh
  dimension, every other operand to ``Replicate`` (DTensor's own redistribution,
  which is free when the placement already matches and a local slice for a
  replicated operand); an index an operand holds twice (a diagonal) is never
  sharded;
* an **output** index sharded: each rank holds its slice of the output; no
  communication forward;
* a **summed** index sharded: each rank's partial result (the sum over its slice
  of that index) is combined over the mesh dimension: one SUM all-reduce (real),
  one MAX or MIN all-reduce (max-plus, min-plus), MAX then SUM of exp (log), MAX
  then a MIN over global row-major ranks (Viterbi, so the argmax is the first
  maximiser, as on one device), an all-gather reduced with ⊕ (any other
  semiring).

Why not sharding rules on the step operators: a call is a plan of several steps
whose kernels branch on values and run native loops on raw pointers, and the
partial results of a summed index need the semiring's own ⊕ (log-sum-exp, a tie
rule, a user's operation), which DTensor's ``Partial`` placements cannot express;
contracting the local shards whole and combining once per mesh dimension is
also the least communication (one combine per call, not per step).

MAX and MIN are exact, NaN included, because they run on an order-preserving
integer image of the floats (same volume as the floats).  Every combine is an
``autograd.Function`` whose backward is exact for its semiring: SUM passes the
gradient through; MAX and MIN route it to the one rank holding the winning term
(the first in row-major order on ties, as on one device); log weights each
rank's partial by ``exp(partial - out)``; the gathered ⊕ takes its own slice.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._multi import reject, split_outputs
from ._parse import analyze
from ._rules import Combine, family_of
from ._semiring import Semiring
from ._ties import rankable, row_major_strides
from ._torch_compat import all_gather_tensor, functional_collectives, is_functorch_wrapped_tensor

Tensor = torch.Tensor


def involved(operands: Sequence[object]) -> bool:
    """Whether any operand is a DTensor, bare or under a ``torch.func`` transform's wrapper.

    Free when DTensor was never imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    dtensor = module.DTensor
    unwrap = not torch.compiler.is_compiling()  # (no transform wrappers in a graph)
    for x in operands:
        if unwrap and isinstance(x, Tensor) and is_functorch_wrapped_tensor(x):
            x = torch.func.debug_unwrap(x)  # (only its type is read)
        if isinstance(x, dtensor):
            return True
    return False


def refuse(operands: Sequence[object], function: str) -> None:
    """A clear error for a function that does not take DTensor operands."""
    if involved(operands):
        raise TypeError(
            f"{function} does not take DTensor operands; einsum, log_einsum, max_einsum, "
            "min_einsum, viterbi_einsum and semiring_einsum do (see the 'Past one device' "
            "docs page). Call .full_tensor() on the operands to run it on every rank."
        )


@dataclass(frozen=True)
class _Layout:
    """How one call's operands are laid out on the mesh (global metadata only).

    Attributes:
        chosen: Per mesh dimension, the index sharded on it, or ``None``.
        targets: Per operand, its placements for the local contraction.
        grads: Per operand, the placements of its local gradient (``Partial``
            where an operand is replicated on a mesh dimension that shards an
            index: its local gradient is then a partial sum over ranks).
        output: The output's placements.
        combine: The mesh dimensions whose index is summed, in order.
        sizes: Global size of every index.
        summed: The summed indices, in the order of Viterbi's argmax.
        strides: Each summed index's weight in the global row-major rank of an assignment,
            or ``None`` where those ranks do not fit an int64.
        output_shape: Global shape of the output.
    """

    chosen: tuple[str | None, ...]
    targets: tuple[tuple[Any, ...], ...]
    grads: tuple[tuple[Any, ...], ...]
    output: tuple[Any, ...]
    combine: tuple[int, ...]
    sizes: dict[str, int]
    summed: str
    output_shape: tuple[int, ...]
    strides: dict[str, int] | None


def _layout(equation: str, operands: Sequence[Any], semiring: Semiring) -> _Layout:
    """Choose the sharded index of every mesh dimension; validate the call."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    shapes = tuple(tuple(x.shape) for x in operands)
    recipe = analyze(equation, shapes, tuple(x.dtype for x in operands), semiring.shape)
    eq, sizes = recipe.equation, recipe.contraction.size
    element = len(semiring.shape)
    terms = [term[: len(term) - element] if element else term for term in eq.inputs]
    output = eq.output[: len(eq.output) - element] if element else eq.output
    mesh = operands[0].device_mesh
    # Indices an operand holds at full size exactly once (no diagonal, no broadcast).
    repeated = {c for term in terms for c in term if term.count(c) > 1}
    order = {c: k for k, c in enumerate(dict.fromkeys("".join(terms)))}  # first appearance
    chosen: list[str | None] = []
    for d in range(mesh.ndim):
        covered: dict[str, int] = {}
        if mesh.size(d) == 1:  # every shard is whole: nothing to split, nothing to combine
            chosen.append(None)
            continue
        for x, term in zip(operands, terms):
            p = x.placements[d]
            if isinstance(p, Shard) and p.dim < len(term):
                c = term[p.dim]
                if c not in repeated and x.shape[p.dim] == sizes[c] and sizes[c] > 1:
                    covered[c] = covered.get(c, 0) + x.numel() * x.element_size()
        # Most bytes sharded; ties go to the index that appears first (same on every rank).
        chosen.append(min(covered, key=lambda c: (-covered[c], order[c])) if covered else None)
    targets: list[tuple[Any, ...]] = []
    grads: list[tuple[Any, ...]] = []
    for x, term in zip(operands, terms):
        target: list[Any] = []
        grad: list[Any] = []
        for d, index in enumerate(chosen):
            p = x.placements[d]
            if mesh.size(d) == 1 and isinstance(p, (Shard, Replicate)):  # already whole
                target.append(p)
                grad.append(p)
            elif index is not None and index in term and x.shape[term.index(index)] == sizes[index]:
                target.append(Shard(term.index(index)))
                grad.append(Shard(term.index(index)))
            else:
                target.append(Replicate())
                grad.append(Replicate() if index is None else Partial())
        targets.append(tuple(target))
        grads.append(tuple(grad))
    out_placements = tuple(
        Shard(output.index(c)) if c is not None and c in output else Replicate() for c in chosen
    )
    combine = tuple(d for d, c in enumerate(chosen) if c is not None and c not in output)
    summed = eq.summed
    out_shape = tuple(sizes[c] for c in output) + tuple(semiring.shape)
    ranked = rankable(recipe.contraction, summed)
    return _Layout(
        tuple(chosen),
        tuple(targets),
        tuple(grads),
        out_placements,
        combine,
        sizes,
        summed,
        out_shape,
        row_major_strides(sizes, summed) if ranked else None,
    )


def _check(operands: Sequence[object], equation: object) -> Any:
    """The common mesh of the operands; a clear error for plain tensors or two meshes."""
    from torch.distributed.tensor import DTensor

    meshes = []
    for k, x in enumerate(operands):
        if not isinstance(x, DTensor):
            if isinstance(x, Tensor) and is_functorch_wrapped_tensor(x):
                raise NotImplementedError(
                    f"torch.func transforms (grad, vjp, vmap, ...) over DTensor operands are "
                    f"not supported (operand {k}, equation {equation!r}); autograd is: call "
                    ".backward() or torch.autograd.grad"
                )
            raise TypeError(
                f"operand {k} is a {type(x).__name__}, not a DTensor, while other operands "
                f"are DTensors (equation {equation!r}): make it one, e.g. with "
                "distribute_tensor(x, mesh, [Replicate()]) or DTensor.from_local"
            )
        meshes.append(x.device_mesh)
    if any(m != meshes[0] for m in meshes):
        raise ValueError(f"the DTensor operands live on different meshes (equation {equation!r})")
    return meshes[0]


def _shares(layout: _Layout, mesh: Any) -> list[tuple[int, int, int]]:
    """Per mesh dimension, ``(start, extent, of)``: this rank's part of its index there.

    Shards split like :func:`torch.chunk`, mesh dimension after mesh dimension, so an index
    sharded on two mesh dimensions is split again within the first one's part (``of`` is
    the size being split; ``(0, 1, 1)`` for a mesh dimension that shards nothing).
    """
    shares = []
    extents: dict[str, int] = {}
    for d, c in enumerate(layout.chosen):
        if c is None:
            shares.append((0, 1, 1))
            continue
        size = extents.get(c, layout.sizes[c])
        chunk = -(-size // mesh.size(d))
        start = min(mesh.get_local_rank(d) * chunk, size)
        extents[c] = min(chunk, size - start)
        shares.append((start, extents[c], size))
    return shares


def _global_argmax(argmax: Tensor, layout: _Layout, mesh: Any) -> Tensor:
    """A local argmax (coordinates in this rank's shards) in global coordinates."""
    offsets: dict[str, int] = {}
    for c, (start, _, _) in zip(layout.chosen, _shares(layout, mesh)):
        if c is not None:
            offsets[c] = offsets.get(c, 0) + start
    shift = [offsets.get(c, 0) for c in layout.summed]
    if not any(shift):
        return argmax
    return argmax + torch.tensor(shift, dtype=argmax.dtype, device=argmax.device)


def contract(
    semiring: Semiring,
    equation: str,
    operands: Sequence[Any],
    local: Callable[..., Any],
    *,
    viterbi: bool = False,
    policy: float | str = "nan",
    local_argmax: Callable[..., Tensor] | None = None,
) -> Any:
    """Contract DTensor operands; ``local(equation, *tensors)`` contracts one rank's shards.

    ``local_argmax(equation, *tensors)`` gives the local argmax of the max-plus
    (or, for min-plus, min-plus) contraction; MAX and MIN use it to break ties
    between ranks in the backward pass.
    """
    from torch.distributed.tensor import Partial

    mesh = _check(operands, equation)
    if viterbi:
        reject(equation, "viterbi_einsum")
    split = split_outputs(equation)
    if split is not None:  # several outputs: one distributed call per output
        lhs, outs = split
        return tuple(
            contract(
                semiring,
                f"{lhs}->{out}",
                operands,
                local,
                viterbi=viterbi,
                policy=policy,
                local_argmax=local_argmax,
            )
            for out in outs
        )
    layout = _layout(equation, operands, semiring)
    shards = []
    for x, target, grad in zip(operands, layout.targets, layout.grads):
        if tuple(x.placements) != target:
            x = x.redistribute(mesh, target)  # DTensor's backward restores the placements
        elif any(isinstance(p, Partial) for p in grad):
            x = _GradLike.apply(x)  # a partial-sum gradient goes back as the operand's placements
        shards.append(x.to_local(grad_placements=grad))
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in shards))
    if dtype in _LOW_PRECISION:
        # One device accumulates these in float32 and rounds once, at the end; so do the
        # ranks: their partials and the combine stay in float32 (same values, and the
        # gradient weights of the combine are not computed from rounded partials).
        shards = [x.float() if x.dtype in _LOW_PRECISION else x for x in shards]
    result = local(equation, *shards)
    values, argmax = result if viterbi else (result, None)
    if argmax is not None:
        argmax = _global_argmax(argmax, layout, mesh)
    groups = [(mesh, d) for d in layout.combine]
    family = family_of(semiring)
    flip = _negated if family.negate else _same  # -max(-x), as on one device: NaN wins too
    if groups and family.combine is Combine.MAX and not viterbi:
        ties = _ties(equation, shards, layout, mesh, local_argmax)
        values = flip(_MaxAll.apply(flip(values), groups, layout, ties))
        groups = []
    for d, group in zip(layout.combine, groups):
        if viterbi:
            assert argmax is not None
            values, argmax = _combine_viterbi(flip(values), argmax, group, layout)
            values = flip(values)
        elif family.combine is Combine.SUM:
            values = _SumAll.apply(values, group)
        elif family.combine is Combine.LOG_SUM_EXP:
            values = _LogAll.apply(values, group, _dead_weight(policy, layout, mesh, d))
        else:
            gathered = _GatherAll.apply(values, group, mesh.get_local_rank(d))
            values = semiring.sum(gathered, (0,))
    out = _global(values.to(dtype), mesh, layout.output, layout.output_shape)
    if argmax is None:
        return out
    return out, _global(argmax, mesh, layout.output, (*layout.output_shape, argmax.shape[-1]))


def _negated(x: Tensor) -> Tensor:
    return -x


def _same(x: Tensor) -> Tensor:
    return x


def _global(local: Tensor, mesh: Any, placements: Sequence[Any], shape: Sequence[int]) -> Any:
    """A DTensor of the given global (contiguous) shape from this rank's part."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous(shape),
    )


def _contiguous(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _GradLike(torch.autograd.Function):
    """The identity on a DTensor whose gradient is brought to the DTensor's own placements."""

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        ctx.mesh, ctx.placements = x.device_mesh, tuple(x.placements)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        if tuple(grad.placements) != ctx.placements:
            grad = grad.redistribute(ctx.mesh, ctx.placements)
        return grad


# -- exact MAX and MIN: an order-preserving integer image of the floats ---------------------

# Values reach the combines in float32 or float64 (float16 and bfloat16 partials are kept in
# float32, see contract).
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _key(x: Tensor) -> Tensor:
    """Integers ordered as the floats are, with every NaN above +inf and -0.0 equal to +0.0."""
    x = x.detach()
    x = torch.where(torch.isnan(x), torch.full_like(x, math.nan).abs(), x)  # one positive NaN
    x = torch.where(x == 0, 0.0, x)  # -0.0 ties with +0.0
    i = x.view(_INT_OF[x.dtype])
    flip = torch.iinfo(i.dtype).max
    return torch.where(i < 0, i ^ flip, i)


def _unkey(k: Tensor) -> Tensor:
    """The floats of :func:`_key`'s integers."""
    flip = torch.iinfo(k.dtype).max
    i = torch.where(k < 0, k ^ flip, k)
    return i.view(torch.float32 if k.dtype == torch.int32 else torch.float64)


def _all_reduce(x: Tensor, op: str, group: Any) -> Tensor:
    funcol = functional_collectives()
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), op, group))


class _SumAll(torch.autograd.Function):
    """⊕ of the real semiring over a mesh dimension; the gradient passes through."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, group: Any) -> Tensor:
        return _all_reduce(values, "sum", group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _MaxAll(torch.autograd.Function):
    """MAX over the summed-sharded mesh dimensions; the gradient goes to one rank only.

    The forward is one all-reduce per mesh dimension, on the integer image.  The backward
    counts the ranks holding each cell's maximum (one SUM all-reduce per mesh dimension);
    where several do, it asks ``ties`` for each rank's first maximiser (in global
    coordinates) and keeps the rank whose one comes first in row-major order
    (:func:`_first`): the single-device rule.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: Tensor,
        groups: list[Any],
        layout: _Layout,
        ties: Callable[[], Tensor],
    ) -> Tensor:
        key = _key(values)
        best = key
        for group in groups:
            best = _all_reduce(best, "max", group)
        ctx.save_for_backward(key == best)
        ctx.groups, ctx.layout, ctx.ties = groups, layout, ties
        return _unkey(best)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (winner,) = ctx.saved_tensors
        count = winner.to(torch.int32)
        for group in ctx.groups:
            count = _all_reduce(count, "sum", group)
        if bool((count > 1).any()):  # the same answer on every rank
            winner, _ = _first(winner, ctx.ties(), ctx.groups, ctx.layout, gather=False)
        return grad * winner, None, None, None


def _ties(
    equation: str,
    shards: Sequence[Tensor],
    layout: _Layout,
    mesh: Any,
    local_argmax: Callable[..., Tensor] | None,
) -> Callable[[], Tensor]:
    """This rank's first optimiser of each cell, in global coordinates (computed lazily)."""

    def first() -> Tensor:
        assert local_argmax is not None
        argmax = local_argmax(equation, *(x.detach() for x in shards))
        return _global_argmax(argmax, layout, mesh)

    return first


_NEVER = torch.iinfo(torch.int64).max


def _first(
    winner: Tensor, argmax: Tensor, groups: Sequence[Any], layout: _Layout, *, gather: bool
) -> tuple[Tensor, Tensor | None]:
    """Of the ranks where ``winner`` holds, the one whose ``argmax`` is first in row-major order.

    Returns that rank's mask and, with ``gather``, its argmax on every rank.  One MIN
    all-reduce per group, of the global row-major rank; where ranks do not fit an int64,
    one per summed index, column by column (and a SUM to gather the argmax).
    """
    strides = layout.strides
    if strides is not None:
        rank = torch.zeros(argmax.shape[:-1], dtype=torch.int64, device=argmax.device)
        for k, c in enumerate(layout.summed):
            rank = rank + argmax[..., k] * strides[c]
        mine = first = torch.where(winner, rank, _NEVER)
        for group in groups:
            first = _all_reduce(first, "min", group)
        if not gather:
            return winner & (mine == first), None
        columns = [first // strides[c] % layout.sizes[c] for c in layout.summed]
        return winner & (mine == first), torch.stack(columns, dim=-1)
    for k in range(argmax.shape[-1]):
        mine = first = torch.where(winner, argmax[..., k], _NEVER)
        for group in groups:
            first = _all_reduce(first, "min", group)
        winner = winner & (mine == first)
    if not gather:
        return winner, None
    found = torch.where(winner.unsqueeze(-1), argmax, 0)
    for group in groups:
        found = _all_reduce(found, "sum", group)
    return winner, found


def _combine_viterbi(
    values: Tensor, argmax: Tensor, group: Any, layout: _Layout
) -> tuple[Tensor, Tensor]:
    key = _key(values)
    best_key = _all_reduce(key, "max", group)
    winner, found = _first(key == best_key, argmax, [group], layout, gather=True)
    assert found is not None
    best = _Route.apply(values, _unkey(best_key), winner)
    return best, found


class _Route(torch.autograd.Function):
    """``best`` as the value, with the gradient to ``values`` where ``winner`` holds."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, best: Tensor, winner: Tensor) -> Tensor:
        ctx.save_for_backward(winner)
        return best

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (winner,) = ctx.saved_tensors
        return grad * winner, None, None


def _dead_weight(policy: float | str, layout: _Layout, mesh: Any, d: int) -> float:
    """The backward weight of a rank's partial in a cell whose terms are all -inf."""
    if policy == "nan":
        return math.nan
    if policy == "uniform":  # each term 1/N: the partial holds this rank's share of the terms
        _, extent, of = _shares(layout, mesh)[d]
        return extent / of
    return 1.0  # a constant weight per term: the local pass gave it already


class _LogAll(torch.autograd.Function):
    """log-sum-exp over a mesh dimension: MAX (exact, NaN-aware), then SUM of exp."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, group: Any, dead: float) -> Tensor:
        top = _unkey(_all_reduce(_key(values), "max", group))
        shift = torch.where(torch.isfinite(top), top, 0.0)
        total = _all_reduce(torch.exp(values - shift), "sum", group)
        out = shift + torch.log(total)
        ctx.save_for_backward(values, out)
        ctx.dead = dead
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        values, out = ctx.saved_tensors
        weight = torch.exp(values - out)
        weight = torch.where(out == -math.inf, ctx.dead, weight)
        return grad * weight, None, None


class _GatherAll(torch.autograd.Function):
    """Every rank's partial, stacked on a new leading dimension (for a user's ⊕)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, group: Any, index: int) -> Tensor:
        funcol = functional_collectives()
        ctx.index = index
        gather = all_gather_tensor()
        return funcol.wait_tensor(gather(values.unsqueeze(0).contiguous(), 0, group))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every rank computes the same ⊕ of the same stack from the same (replicated)
        # output gradient, so the gradient of this rank's own partial is its own slice.
        return grad[ctx.index], None, None
