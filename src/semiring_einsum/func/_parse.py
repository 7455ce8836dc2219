"""Parse stage: einsum strings into immutable, hashable equations.

Parsing happens in two cached steps, as in einops: the string alone
(:func:`parse_subscripts`), then the string with the operand ranks, which
resolves ``...`` into fresh index symbols (:func:`resolve`).  A third step,
:func:`canonicalize`, looks at the operands themselves: it takes diagonals
for repeated indices, broadcasts size-1 dimensions and promotes dtypes, so that
the planner and the kernels only ever see a *clean* contraction in which every
operand has distinct indices and every index one size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opt_einsum import get_symbol

from ._cache import cached
from ._errors import fail

ELLIPSIS = "..."
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Symbols for the dimensions covered by '...': opt_einsum's symbols past the
# 52 ASCII letters, so they can never clash with a user's index.
_FIRST_ELLIPSIS_SYMBOL = 52


@dataclass(frozen=True, slots=True)
class Subscripts:
    """An equation string parsed without looking at any operand.

    Attributes:
        source: The equation as the user wrote it.
        inputs: One tuple of tokens per operand; a token is a letter or ``'...'``.
        output: The output tokens, or ``None`` when the output is implicit.
    """

    source: str
    inputs: tuple[tuple[str, ...], ...]
    output: tuple[str, ...] | None


@cached(maxsize=4096)  # (read on every call of a Viterbi plan)
def summed_of(inputs: tuple[str, ...], output: str) -> str:
    seen: dict[str, None] = {}
    for term in inputs:
        for c in term:
            if c not in output:
                seen.setdefault(c)
    return "".join(seen)


@dataclass(frozen=True, slots=True)
class Equation:
    """An equation with ``...`` resolved: one symbol per operand dimension.

    Operands may still repeat an index (a diagonal).  Output symbols are
    distinct and each appears in some operand.
    """

    source: str
    inputs: tuple[str, ...]
    output: str

    @property
    def summed(self) -> str:
        """Indices that are summed out, in order of first appearance."""
        return summed_of(self.inputs, self.output)


def _tokens(source: str, term: str, where: str) -> tuple[str, ...]:
    tokens: list[str] = []
    i = 0
    while i < len(term):
        c = term[i]
        if c == ".":
            if term[i : i + 3] != ELLIPSIS:
                raise fail(source, f"a '.' in {where} that is not part of '...'")
            if ELLIPSIS in tokens:
                raise fail(source, f"'...' appears twice in {where}")
            tokens.append(ELLIPSIS)
            i += 3
            continue
        if c not in _LETTERS:
            raise fail(
                source,
                f"invalid character {c!r} in {where}: indices must be ASCII letters",
            )
        tokens.append(c)
        i += 1
    return tuple(tokens)


@cached(maxsize=1024)
def parse_subscripts(equation: str) -> Subscripts:
    """Parse an equation string (``torch.einsum`` syntax) without shapes.

    Raises:
        EquationError: on a syntax error, a repeated output index, or an
            output index that appears in no operand.
    """
    if not isinstance(equation, str):
        raise TypeError(f"the equation must be a str, got {type(equation).__name__}")
    text = "".join(equation.split())
    if text.count("->") > 1:
        raise fail(equation, "'->' appears more than once")
    lhs, arrow, rhs = text.partition("->")
    inputs = tuple(_tokens(equation, term, f"operand {k}") for k, term in enumerate(lhs.split(",")))
    if not arrow:
        return Subscripts(equation, inputs, None)
    output = _tokens(equation, rhs, "the output")
    present = {t for term in inputs for t in term}
    seen: set[str] = set()
    for t in output:
        if t in seen:
            raise fail(equation, f"output index {t!r} is repeated")
        seen.add(t)
        if t not in present:
            what = "'...'" if t == ELLIPSIS else f"index {t!r}"
            raise fail(equation, f"output {what} appears in no operand")
    return Subscripts(equation, inputs, output)


@cached(maxsize=4096)
def resolve(subscripts: Subscripts, ranks: tuple[int, ...]) -> Equation:
    """Resolve ``...`` and the implicit output against the operand ranks."""
    source = subscripts.source
    if len(ranks) != len(subscripts.inputs):
        raise fail(
            source,
            f"the equation has {len(subscripts.inputs)} operand(s) but {len(ranks)} were given",
        )
    ellipsis_rank = 0
    for k, (term, rank) in enumerate(zip(subscripts.inputs, ranks)):
        named = len(term) - (ELLIPSIS in term)
        if ELLIPSIS in term:
            if rank < named:
                raise fail(
                    source,
                    f"operand {k} has {rank} dimension(s) but its subscripts name at least {named}",
                )
            ellipsis_rank = max(ellipsis_rank, rank - named)
        elif rank != named:
            raise fail(
                source,
                f"operand {k} has {rank} dimension(s) but its subscripts name {named}",
            )
    dots = "".join(get_symbol(_FIRST_ELLIPSIS_SYMBOL + i) for i in range(ellipsis_rank))

    def expand(term: tuple[str, ...], rank: int) -> str:
        if ELLIPSIS not in term:
            return "".join(term)
        width = rank - (len(term) - 1)
        return "".join(dots[ellipsis_rank - width :] if t == ELLIPSIS else t for t in term)

    inputs = tuple(expand(term, rank) for term, rank in zip(subscripts.inputs, ranks))
    if subscripts.output is None:
        counts: dict[str, int] = {}
        for term in subscripts.inputs:
            for t in term:
                if t != ELLIPSIS:
                    counts[t] = counts.get(t, 0) + 1
        output = dots + "".join(sorted(c for c, n in counts.items() if n == 1))
    else:
        output = "".join(dots if t == ELLIPSIS else t for t in subscripts.output)
    return Equation(source, inputs, output)


@dataclass(frozen=True, slots=True)
class Contraction:
    """A clean contraction: distinct indices per operand, one size per index.

    Attributes:
        inputs: Index string of each operand (no index repeated).
        output: Output index string.
        sizes: ``(index, size)`` pairs for every index, in order of first
            appearance in the equation (this order drives tie-breaking).
    """

    inputs: tuple[str, ...]
    output: str
    sizes: tuple[tuple[str, int], ...]

    @property
    def size(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def summed(self) -> str:
        """Summed indices in order of first appearance."""
        return "".join(c for c, _ in self.sizes if c not in self.output)


@dataclass(frozen=True, slots=True)
class Recipe:
    """How to turn the user's operands into the clean ones (no tensors inside).

    Attributes:
        equation: The resolved equation.
        contraction: The clean contraction.
        diagonals: Per operand, the ``(dim1, dim2)`` pairs to take
            :func:`torch.diagonal` over, in order.
        shapes: Per operand, the shape to expand to (after the diagonals).
        dtype: The common dtype (:func:`torch.promote_types` of all operands).
        element_rank: How many trailing element dimensions every operand has
            (a semiring with element dimensions); a diagonal is moved back
            before them.
    """

    equation: Equation
    contraction: Contraction
    diagonals: tuple[tuple[tuple[int, int], ...], ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    element_rank: int = 0


# Symbols of a semiring's element dimensions: far past the ones '...' takes.
_FIRST_ELEMENT_SYMBOL = 2000


@cached(maxsize=4096)
def analyze(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[torch.dtype, ...],
    element: tuple[int, ...] = (),
) -> Recipe:
    """Validate an equation against operand shapes and plan its canonical form.

    Pure and cached: only shapes and dtypes go in, so every error is raised
    before any tensor is touched.  ``element`` is the element shape of a
    semiring with element dimensions: every operand ends with those dims, which
    the equation does not name; they become output indices that every operand
    has (last in the output), so the planner and the kernels carry them along
    like any output index.

    Raises:
        EquationError: for a wrong operand count, a rank mismatch, sizes
            that disagree, or operands that do not end with the element shape.
    """
    if element:
        n = len(element)
        for k, shape in enumerate(shapes):
            if len(shape) < n or tuple(shape[len(shape) - n :]) != element:
                raise fail(
                    equation,
                    f"operand {k} has shape {tuple(shape)}, but the semiring's elements "
                    f"have shape {element}: every operand must end with those dimensions",
                )
        named = tuple(shape[: len(shape) - n] for shape in shapes)
        recipe = analyze(equation, named, dtypes)
        extra = "".join(get_symbol(_FIRST_ELEMENT_SYMBOL + i) for i in range(n))
        eq = recipe.equation
        clean = recipe.contraction
        return Recipe(
            Equation(eq.source, tuple(t + extra for t in eq.inputs), eq.output + extra),
            Contraction(
                tuple(t + extra for t in clean.inputs),
                clean.output + extra,
                clean.sizes + tuple(zip(extra, element)),
            ),
            recipe.diagonals,
            tuple(shape + element for shape in recipe.shapes),
            recipe.dtype,
            n,
        )
    eq = resolve(parse_subscripts(equation), tuple(len(shape) for shape in shapes))
    source = eq.source
    sizes: dict[str, int] = {}
    where: dict[str, int] = {}
    terms: list[str] = []
    diagonals: list[tuple[tuple[int, int], ...]] = []
    for k, (term, shape) in enumerate(zip(eq.inputs, shapes)):
        dims = list(shape)
        pairs = []
        # torch.diagonal removes both dims and appends the diagonal at the end.
        while len(set(term)) < len(term):
            c = next(c for c in term if term.count(c) > 1)
            i = term.index(c)
            j = term.index(c, i + 1)
            if dims[i] != dims[j]:
                raise fail(
                    source,
                    f"index {c!r} is repeated in operand {k} with different sizes "
                    f"{dims[i]} and {dims[j]}",
                )
            pairs.append((i, j))
            dims = dims[:i] + dims[i + 1 : j] + dims[j + 1 :] + [dims[i]]
            term = term[:i] + term[i + 1 : j] + term[j + 1 :] + c
        for c, n in zip(term, dims):
            if c not in sizes or (sizes[c] == 1 and n != 1):
                sizes[c], where[c] = n, k
            elif n not in (1, sizes[c]):
                raise fail(
                    source,
                    f"index {_name(c)} has size {sizes[c]} in operand {where[c]} "
                    f"but {n} in operand {k}",
                )
        terms.append(term)
        diagonals.append(tuple(pairs))
    # Indices in order of first appearance in the equation as written (a
    # diagonal moves its index last in the clean operand, not here).
    order = [c for term in eq.inputs for c in term]
    clean = Contraction(tuple(terms), eq.output, tuple((c, sizes[c]) for c in dict.fromkeys(order)))
    return Recipe(
        eq,
        clean,
        tuple(diagonals),
        tuple(tuple(sizes[c] for c in term) for term in terms),
        functools.reduce(torch.promote_types, dtypes),
    )


def check_operands(
    equation: object, operands: Sequence[object]
) -> tuple[tuple[tuple[int, ...], ...], tuple[torch.dtype, ...]]:
    """Type-check the operands; their shapes and dtypes (the keys of :func:`analyze`)."""
    source = equation if isinstance(equation, str) else repr(equation)
    for k, x in enumerate(operands):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"operand {k} must be a torch.Tensor, got {type(x).__name__} (equation {source!r})"
            )
    tensors: Sequence[torch.Tensor] = operands  # type: ignore[assignment]
    if len(tensors) > 1:
        device = tensors[0].device
        if any(x.device != device for x in tensors):
            devices = sorted({str(x.device) for x in tensors})
            raise RuntimeError(
                f"Expected all operands to be on the same device, but found "
                f"{devices} (equation {source!r})"
            )
    if not isinstance(equation, str):
        raise TypeError(f"the equation must be a str, got {type(equation).__name__}")
    # int() specialises symbolic sizes when the compiler traces us: plans are
    # built for concrete shapes (the window loops need them anyway).
    shapes = tuple(tuple(int(n) for n in x.shape) for x in tensors)
    return shapes, tuple(x.dtype for x in tensors)


def apply_recipe(
    recipe: Recipe, operands: Sequence[torch.Tensor], dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """The clean operands: diagonals (views), broadcasts (views), dtype casts.

    Every step is an ordinary differentiable torch operation, so gradients
    flow back to the user's tensors through autograd and ``torch.func``.
    """
    target = dtype or recipe.dtype
    out = []
    for x, pairs, shape in zip(operands, recipe.diagonals, recipe.shapes):
        for i, j in pairs:
            x = torch.diagonal(x, dim1=i, dim2=j)
            if recipe.element_rank:  # torch puts the diagonal last: before the elements
                x = x.movedim(-1, -1 - recipe.element_rank)
        if tuple(x.shape) != shape:
            x = x.expand(shape)
        if x.dtype != target:
            x = x.to(target)
        out.append(x)
    return out


def canonicalize(
    equation: str, operands: Sequence[torch.Tensor]
) -> tuple[Equation, Contraction, list[torch.Tensor]]:
    """Validate, then turn an equation and its operands into a clean contraction."""
    recipe = analyze(equation, *check_operands(equation, operands))
    return recipe.equation, recipe.contraction, apply_recipe(recipe, operands)


def _name(c: str) -> str:
    """Readable name of an index symbol (ellipsis symbols are not ASCII)."""
    return repr(c) if c in _LETTERS else "'...'"
