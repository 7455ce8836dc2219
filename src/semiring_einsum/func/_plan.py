"""Plan stage: contraction order, windows and byte estimates.

A :class:`Plan` is immutable and hashable.  Plans are cached (bounded) on the
clean contraction, the dtype's item size, the resolved budget and the
``optimize`` option; :func:`clear_caches` empties every cache of the package.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import product
from typing import Any, TypeVar

import opt_einsum
import torch

from ._budget import Budget
from ._cache import cached
from ._errors import fail
from ._parse import Contraction

# On CPU, a window tensor that stays well inside the cache hierarchy (and well
# under glibc's 32 MiB mmap threshold, beyond which every fresh allocation is
# returned to the OS and page-faulted back) is faster than a bigger one.
T = TypeVar("T")

CPU_WINDOW_TARGET_BYTES = 4 << 20


class Kernel:
    """A way to compute a step: a value that plans name, compared by identity.

    Each semiring family (see :mod:`._rules`) owns its kernels and says, in order, when
    each applies; a :class:`Step` of a plan holds the one chosen.  Two kernels of
    different families may share a name (``windows``); ``qualname``
    (``"<family>.<name>"``) is unique, and a kernel pickles as it, so a plan sent to
    another process holds that process's kernel.

    Attributes:
        family: The family that owns the kernel (``"any"`` for :data:`EMPTY`).
        name: The kernel's name, as plans show it.
        doc: What the kernel does, in one line.
        windowed: Whether the kernel makes window-sized temporaries (counted in
            :attr:`Plan.peak_bytes`); BLAS, native and unsummed kernels do not.
        applies: ``applies(step, choice) -> bool``: whether the kernel can and should
            run ``step`` (the family tries its kernels in order; see
            :class:`KernelChoice`).
        forward, vjp, jvp: The kernel's part of its family's rule, with the
            signatures of :class:`._rules.Rule` (a ``vjp`` or ``jvp`` of ``None``: the
            family's own).
        operator: The registered torch operator that runs the kernel, if any (a device
            implementation is registered on it: :meth:`register`).

    Example:
        >>> from semiring_einsum import func
        >>> k = func.plan("ab,bc->ac", (4, 100), (100, 5), semiring=func.LOG).steps[0].kernel
        >>> k.name, k.qualname, k.windowed
        ('log_blas', 'log.log_blas', True)
    """

    __slots__ = (
        "family", "name", "doc", "windowed", "applies", "forward", "vjp", "jvp", "operator",
        "vjp_operator", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        family: str,
        name: str,
        doc: str,
        *,
        windowed: bool = True,
        applies: Callable[[Step, KernelChoice], bool] | None = None,
        forward: Callable[..., Any] | None = None,
        vjp: Callable[..., Any] | None = None,
        jvp: Callable[..., Any] | None = None,
        operator: Any = None,
        vjp_operator: Any = None,
    ) -> None:
        qualname = f"{family}.{name}"
        if qualname in KERNELS:
            raise ValueError(f"a kernel named {qualname!r} is already registered")
        self.family = family
        self.name = name
        self.doc = doc
        self.windowed = windowed
        self.applies = applies
        self.forward: Callable[..., Any] = forward if forward is not None else self._no_forward
        self.vjp = vjp
        self.jvp = jvp
        self.operator = operator
        self.vjp_operator = vjp_operator
        KERNELS[qualname] = self

    def _no_forward(self, spec: Any, *args: Any) -> Any:
        raise NotImplementedError(f"the kernel {self.qualname} has no forward of its own")

    @property
    def qualname(self) -> str:
        return f"{self.family}.{self.name}"

    @property
    def devices(self) -> frozenset[str]:
        """The device types with an implementation registered (see :meth:`register`)."""
        return frozenset(self.operator.devices) if self.operator is not None else frozenset()

    @property
    def schema(self) -> str | None:
        """The arguments and results of the kernel's operator (what a device implementation
        takes and returns: :meth:`register`), or ``None`` for a kernel without one."""
        if self.operator is None:
            return None
        return self.operator.schema.replace("str step", "Step step", 1)

    def register(
        self,
        device_type: str,
        forward: Callable[..., Any],
        *,
        vjp: Callable[..., Any] | None = None,
    ) -> KernelRegistration:
        """Run ``forward`` (and ``vjp``) for this kernel's steps on ``device_type``.

        ``forward`` takes the :class:`Step` and then the operator's other arguments, and
        returns what the built-in kernel returns (see :attr:`schema`), with contiguous
        outputs; it runs whenever the operands live on ``device_type``, eagerly and
        under ``torch.compile``, never while autograd records.  ``vjp``, for the kernels
        with a first-order backward operator (``log.log_blas``, ``max_plus.tropical``),
        takes the step and that operator's arguments.  See "Adding a device kernel" in
        the internals guide.

        Returns:
            The registration: ``remove()`` it (or use it as a context manager) to go
            back to the built-in kernel.  One registration per kernel and device type.
        """
        if not isinstance(device_type, str) or not device_type:
            raise TypeError(
                f"device_type must be a device type such as 'cuda', got {device_type!r}"
            )
        if self.operator is None:
            raise ValueError(
                f"the kernel {self.qualname} has no operator: it runs torch operations, "
                "which run on every device already"
            )
        if vjp is not None and self.vjp_operator is None:
            raise ValueError(f"the kernel {self.qualname} has no backward operator")
        if vjp is not None and device_type in self.vjp_operator.devices:
            raise ValueError(f"{self.qualname} already has a backward for {device_type!r}")
        handles = [self.operator.register_kernel(device_type, _on_steps(forward))]
        if vjp is not None:
            handles.append(self.vjp_operator.register_kernel(device_type, _on_steps(vjp)))
        return KernelRegistration(self, device_type, handles)

    def __repr__(self) -> str:
        return f"<kernel {self.qualname}>"

    def __str__(self) -> str:
        return self.name

    def __reduce__(self) -> tuple[Callable[[str], Kernel], tuple[str]]:
        return kernel_named, (self.qualname,)


class KernelRegistration:
    """A device implementation of a kernel (:meth:`Kernel.register`); ``remove()`` it, or
    leave its ``with`` block, to go back to the built-in kernel."""

    def __init__(self, kernel: Kernel, device_type: str, handles: Sequence[Any]) -> None:
        self.kernel = kernel
        self.device_type = device_type
        self._handles = list(handles)

    def remove(self) -> None:
        """Unregister (again: nothing)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> KernelRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "registered" if self._handles else "removed"
        return f"<{self.kernel.qualname} on {self.device_type}: {state}>"


def _on_steps(implementation: Callable[..., Any]) -> Callable[..., Any]:
    """An operator's implementation (a step key first) from one that takes the step."""

    @functools.wraps(implementation)
    def on_key(key: str, *args: Any) -> Any:
        return implementation(decode(key).step, *args)

    return on_key


KERNELS: dict[str, Kernel] = {}
"""Every kernel, by :attr:`Kernel.qualname`."""


def kernel_named(qualname: str) -> Kernel:
    """The kernel called ``qualname`` (``"<family>.<name>"``, e.g. ``"max_plus.rows"``)."""
    try:
        return KERNELS[qualname]
    except KeyError:
        known = ", ".join(sorted(KERNELS))
        raise ValueError(f"no kernel named {qualname!r}; the kernels are: {known}") from None


def kernels() -> types.MappingProxyType[str, Kernel]:
    """Every kernel, by qualified name (``"<family>.<name>"``), read-only.

    Example:
        >>> from semiring_einsum import func
        >>> func.kernels()["max_plus.rows"].schema
        '(Step step, bool argmax, Tensor[] xs) -> (Tensor, Tensor)'
    """
    return types.MappingProxyType(KERNELS)


def register_kernel(
    kernel: Kernel | str,
    device_type: str,
    forward: Callable[..., Any],
    *,
    vjp: Callable[..., Any] | None = None,
) -> KernelRegistration:
    """Run ``forward`` for the steps of ``kernel`` whose operands live on ``device_type``.

    ``kernel`` is a :class:`Kernel` or its qualified name (see :func:`kernels`);
    ``forward`` takes the :class:`Step` and the kernel's other arguments
    (:attr:`Kernel.schema`) and returns what the built-in kernel returns.  See
    :meth:`Kernel.register`.
    """
    chosen = kernel if isinstance(kernel, Kernel) else kernel_named(kernel)
    return chosen.register(device_type, forward, vjp=vjp)


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """What a family's kernels are chosen for, besides the step.

    Attributes:
        dtype: The accumulation dtype.
        device_type: The operands' device type.
        traced: Whether the call is being traced (``torch.compile``).
        extras: Whether the log step must also return its per-cell max and sum.
    """

    dtype: torch.dtype
    device_type: str
    traced: bool = False
    extras: bool = False


EMPTY = Kernel(
    "any",
    "empty",
    "a summed index of size 0: the semiring's zero (in every family)",
    windowed=False,
    applies=lambda step, choice: step.terms == 0,
)
"""The kernel of a step that sums an index of size 0 (every family's; see
:func:`._rules.empty_outputs`)."""

UNCHOSEN = Kernel("any", "-", "no kernel chosen yet: a plan's steps before their family chose")
"""The kernel of a step whose family has not chosen one (see :func:`with_kernels`)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One contraction step: some operands in, one tensor out.

    Attributes:
        operands: Positions of the step's operands in the current operand list
            (opt_einsum's path form: they are removed, the result is appended).
        inputs: Index string of each operand of the step.
        output: Index string of the result.
        sizes: ``(index, size)`` for every index of the step.
        windows: ``(index, extent)`` for every summed index, in order of first
            appearance; the kernel loops over windows of these extents.
        kernel: The :class:`Kernel` that computes the step (:data:`UNCHOSEN` in a
            step whose family has not chosen yet: plans made by :func:`make_plan`).

    Example:
        >>> from semiring_einsum import func
        >>> step = func.plan("ab,bc->ac", (4, 100), (100, 5), block_size=32).steps[0]
        >>> step.inputs, step.output, step.windows, step.kernel.name
        (('ab', 'bc'), 'ac', (('b', 32),), 'blas')
    """

    operands: tuple[int, ...]
    inputs: tuple[str, ...]
    output: str
    sizes: tuple[tuple[str, int], ...]
    windows: tuple[tuple[str, int], ...]
    kernel: Kernel = UNCHOSEN

    @property
    def size(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def summed(self) -> str:
        return "".join(c for c, _ in self.windows)

    @property
    def window_elements(self) -> int:
        """Elements of the largest window tensor (output dims included)."""
        size = self.size
        return math.prod(size[c] for c in self.output) * math.prod(w for _, w in self.windows)

    @property
    def terms(self) -> int:
        """Number of terms summed into each output cell."""
        size = self.size
        return math.prod(size[c] for c in self.summed)

    def ranges(self) -> Iterator[tuple[tuple[int, int], ...]]:
        """All windows, as ``(start, stop)`` per summed index, in row-major order."""
        size = self.size
        axes = [
            [(lo, min(lo + w, size[c])) for lo in range(0, size[c], w)] for c, w in self.windows
        ]
        return product(*axes)

    def equation(self) -> str:
        return ",".join(self.inputs) + "->" + self.output

    def key(self, budget: Budget, itemsize: int, device_type: str) -> str:
        """The step and how its windows were sized, as one string (for operators).

        Operators take no Python objects, so a step travels as, e.g.,
        ``"ab,bc->ac;a4b100c5;b32;real.blas;0,4194304,4,cpu"``: the equation, each
        index with its size, each summed index with its window extent, the
        kernel's qualified name, and the budget (extent, bytes; 0 where unset), item size and
        device type the windows were sized for.  :func:`decode` reads it back.
        (Index symbols are letters, never digits or ``,;->``.)
        """
        sizes = "".join(f"{c}{n}" for c, n in self.sizes)
        windows = "".join(f"{c}{w}" for c, w in self.windows)
        extent, nbytes = budget.as_ints()
        sizing = f"{extent},{nbytes},{itemsize},{device_type}"
        return f"{self.equation()};{sizes};{windows};{self.kernel.qualname};{sizing}"


def _pairs(text: str) -> tuple[tuple[str, int], ...]:
    """``"a4b100"`` -> ``(("a", 4), ("b", 100))``."""
    out: list[tuple[str, int]] = []
    digits = ""
    letter = ""
    for ch in text:
        if ch in "0123456789":
            digits += ch
        else:
            if letter:
                out.append((letter, int(digits)))
            letter, digits = ch, ""
    if letter:
        out.append((letter, int(digits)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Sized:
    """A step with what its windows were sized for (see :meth:`Step.key`)."""

    step: Step
    budget: Budget
    itemsize: int
    device_type: str


@cached(maxsize=4096)
def decode(key: str) -> Sized:
    """The step of :meth:`Step.key` (its ``operands`` are ``0, ..., n-1``) and its sizing."""
    equation, sizes, windows, kernel, sizing = key.split(";")
    lhs, output = equation.split("->")
    inputs = tuple(lhs.split(","))
    chosen = kernel_named(kernel)
    step = Step(tuple(range(len(inputs))), inputs, output, _pairs(sizes), _pairs(windows), chosen)
    extent, nbytes, itemsize, device_type = sizing.split(",")
    budget = Budget(int(extent) or None, int(nbytes) or None)
    return Sized(step, budget, int(itemsize), device_type)


def fold(sized: Sized, batch: int, batched: Sequence[bool], letter: str | None = None) -> Step:
    """The step with a batch of ``batch`` as a new leading output index.

    Operands marked in ``batched`` get the new index first; the others
    broadcast along it.  The windows are sized anew with the batch in view.
    """
    step = sized.step
    if letter is None:
        used = set("".join(step.inputs))
        letter = next(
            opt_einsum.get_symbol(i)
            for i in range(len(used) + 1)
            if opt_einsum.get_symbol(i) not in used
        )
    inputs = tuple(letter + t if b else t for t, b in zip(step.inputs, batched))
    output = letter + step.output
    sizes = ((letter, batch),) + step.sizes
    windows = window_extents(inputs, output, sizes, sized.budget, sized.itemsize, sized.device_type)
    return Step(step.operands, inputs, output, sizes, windows, step.kernel)


@dataclass(frozen=True, slots=True)
class Plan:
    """How a contraction will run: its steps, windows and estimated peak bytes.

    Attributes:
        equation: The equation as given.
        semiring: Name of the semiring the plan was made for.
        contraction: The clean contraction (after ``...``, diagonals, broadcasting).
        path: The steps in opt_einsum's operand-index form.
        steps: The steps themselves.
        itemsize: Bytes per element of the accumulation dtype.
        peak_bytes: Estimated bytes of the largest temporary tensor (a window
            tensor, or an intermediate result); input- and output-sized tensors
            are not counted.

    Example:
        >>> from semiring_einsum import func
        >>> p = func.plan("ab,bc->ac", (4, 100), (100, 5), semiring=func.LOG, block_size=32)
        >>> p.block_sizes
        ({'b': 32},)
        >>> p.peak_bytes  # a 4 x 5 output times a window of 32, in float32
        2560
    """

    equation: str
    semiring: str
    contraction: Contraction
    path: tuple[tuple[int, ...], ...]
    steps: tuple[Step, ...]
    itemsize: int
    peak_bytes: int
    runner: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    def __call__(self, *operands: Any) -> Any:
        """Run the planned call on operands of the planned shapes and dtype (see
        :func:`~semiring_einsum.func.plan`): the function and options it was planned for,
        differentiable and composable as that function is."""
        if self.runner is None:
            raise TypeError(
                "this plan cannot run: only plans made by semiring_einsum.func.plan() do"
            )
        return self.runner(*operands)

    @property
    def block_sizes(self) -> tuple[dict[str, int], ...]:
        """Window extent per summed index, for each step."""
        return tuple(dict(s.windows) for s in self.steps)

    def __str__(self) -> str:
        rows = [
            f"  Equation:       {self.equation}",
            f"  Semiring:       {self.semiring}",
            f"  Steps:          {len(self.steps)}",
            f"  Peak temporary: {self.peak_bytes} bytes (estimate)",
            "-" * 78,
            f"{'step':>4}  {'contraction':<30} {'kernel':<8} {'windows':<20} {'bytes':>10}",
            "-" * 78,
        ]
        for i, s in enumerate(self.steps):
            windows = ",".join(f"{_show(c)}:{w}" for c, w in s.windows) or "-"
            nbytes = _window_bytes(s, self.itemsize)
            eq, kernel = _show_eq(s.equation()), s.kernel.name
            rows.append(f"{i:>4}  {eq:<30} {kernel:<8} {windows:<20} {nbytes:>10}")
        return "\n".join(rows)


def _window_bytes(step: Step, itemsize: int) -> int:
    """Bytes of the largest window-sized temporary the step's kernel makes."""
    if not step.kernel.windowed:
        return 0
    return step.window_elements * itemsize


def _peak(steps: Sequence[Step], itemsize: int) -> int:
    """The largest window temporary or intermediate result of the steps."""
    peak = 0
    for k, step in enumerate(steps):
        peak = max(peak, _window_bytes(step, itemsize))
        if k < len(steps) - 1:  # an intermediate result
            size = step.size
            peak = max(peak, itemsize * math.prod(size[c] for c in step.output))
    return peak


def along_path(
    steps: Sequence[Step], items: Sequence[T], combine: Callable[[int, Step, list[T]], T]
) -> T:
    """opt_einsum's path convention over ``items``: step ``k`` takes its operands out of the
    list (by position) and ``combine(k, step, operands)`` is appended; the last result."""
    current = list(items)
    for k, step in enumerate(steps):
        taken = [current[i] for i in step.operands]
        for i in sorted(step.operands, reverse=True):
            del current[i]
        current.append(combine(k, step, taken))
    return current[0]


def with_kernels(plan: Plan, choose: Callable[[Step], Kernel]) -> Plan:
    """``plan`` with the kernel of every step chosen by ``choose``."""
    steps = tuple(replace(s, kernel=choose(s)) for s in plan.steps)
    return replace(plan, steps=steps, peak_bytes=_peak(steps, plan.itemsize))


def _show(c: str) -> str:
    return c if c.isascii() else "…"


def _show_eq(eq: str) -> str:
    return "".join(_show(c) for c in eq)


@cached(maxsize=4096)
def window_extents(
    inputs: tuple[str, ...],
    output: str,
    sizes: tuple[tuple[str, int], ...],
    budget: Budget,
    itemsize: int,
    device_type: str,
) -> tuple[tuple[str, int], ...]:
    """Choose the window extent of each summed index of one step.

    With a fixed extent every summed index is cut at that extent.  With a
    byte budget, the window tensor -- output dims times window extents --
    stays within the budget (and within the CPU cache target); innermost
    indices get full extents first, and an extent never drops below 1, so a
    window can always be built (one that is output-sized is allowed).
    """
    size = dict(sizes)
    present = set("".join(inputs))
    # Summed indices in the order of ``sizes`` (the equation's order of first
    # appearance): the window loop, and so tie-breaking, follows it.
    summed = [c for c, _ in sizes if c in present and c not in output]
    if budget.extent is not None:
        return tuple((c, max(1, min(size[c], budget.extent))) for c in summed)
    assert budget.bytes is not None
    cap = budget.bytes
    if device_type == "cpu":
        cap = min(cap, CPU_WINDOW_TARGET_BYTES)
    out_bytes = itemsize * math.prod(size[c] for c in output)
    room = cap // max(out_bytes, 1)
    extents: dict[str, int] = {}
    for c in reversed(summed):
        n = max(size[c], 1)
        if room >= n:
            extents[c] = n
            room //= n
        else:
            extents[c] = max(room, 1)
            room = 1
    return tuple((c, extents[c]) for c in summed)


def optimize_key(equation: str, optimize: object, n: int) -> object:
    """A hashable form of ``optimize``; explicit paths are validated here."""
    if isinstance(optimize, str) or optimize is None or isinstance(optimize, bool):
        return optimize
    if not isinstance(optimize, (list, tuple)):
        try:
            hash(optimize)
        except TypeError:
            raise TypeError(
                f"optimize must be a strategy name, a path (sequence of index tuples) or "
                f"False, got {type(optimize).__name__} (equation {equation!r})"
            ) from None
        return optimize  # an opt_einsum PathOptimizer, say
    path = []
    remaining = n
    for k, step in enumerate(optimize):
        if (
            isinstance(step, (str, bytes))
            or not isinstance(step, (list, tuple))
            or not step
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in step)
        ):
            raise fail(
                equation,
                f"invalid contraction path {list(optimize)!r}: step {k} must be a non-empty "
                f"tuple of operand positions (ints)",
            )
        if len(set(step)) != len(step):
            raise fail(
                equation,
                f"invalid contraction path {list(optimize)!r}: step {k} names an operand twice",
            )
        if any(i < 0 or i >= remaining for i in step):
            raise fail(
                equation,
                f"invalid contraction path {list(optimize)!r}: step {k} refers to an operand "
                f"outside 0..{remaining - 1}",
            )
        remaining -= len(step) - 1
        path.append(tuple(step))
    if remaining != 1:
        raise fail(
            equation,
            f"invalid contraction path {list(optimize)!r}: it leaves {remaining} operands, not 1",
        )
    return tuple(path)


def make_plan(
    equation: str,
    contraction: Contraction,
    *,
    semiring: str,
    joint: bool,
    itemsize: int,
    budget: Budget,
    optimize: object,
    device_type: str,
    ties: str | None = None,
) -> Plan:
    """Plan a clean contraction (cached).

    Args:
        equation: The user's equation, for messages.
        contraction: The clean contraction.
        semiring: Semiring name (recorded in the plan).
        joint: Force one step over all operands (``optimize=False``).
        itemsize: Bytes per element of the accumulation dtype.
        budget: The resolved block size.
        optimize: opt_einsum strategy, explicit path, or ``False``.
        device_type: ``'cpu'``, ``'cuda'``, ...
        ties: For a max-plus argmax under the joint tie rule, the summed indices in
            its (row-major) order: among paths of the least cost, one that sums from
            the last index out is taken where there is one (its steps need no ranks:
            see ``_viterbi.outer_first``).
    """
    key = optimize_key(equation, optimize, len(contraction.inputs))
    return _make_plan(
        equation, contraction, semiring, joint, itemsize, budget, key, device_type, ties
    )


@cached(maxsize=1024)
def _make_plan(
    equation: str,
    contraction: Contraction,
    semiring: str,
    joint: bool,
    itemsize: int,
    budget: Budget,
    optimize: object,
    device_type: str,
    ties: str | None = None,
) -> Plan:
    path = _path(equation, contraction, joint, itemsize, budget, optimize, ties)
    current = list(contraction.inputs)
    # The output's trailing indices that every operand has (a semiring's element
    # dimensions, see _parse.analyze) stay last in every intermediate, in order.
    tail = ""
    for c in reversed(contraction.output):
        if not all(c in term for term in contraction.inputs):
            break
        tail = c + tail
    steps: list[Step] = []
    for k, ids in enumerate(path):
        taken = [current[i] for i in ids]
        for i in sorted(ids, reverse=True):
            del current[i]
        if k == len(path) - 1:
            out = contraction.output
        else:
            later = set("".join(current)) | set(contraction.output)
            kept = [c for c in dict.fromkeys("".join(taken)) if c in later and c not in tail]
            out = "".join(kept) + "".join(c for c in tail if c in later)
        letters = set("".join(taken))
        step_sizes = tuple((c, n) for c, n in contraction.sizes if c in letters)
        windows = window_extents(tuple(taken), out, step_sizes, budget, itemsize, device_type)
        steps.append(Step(tuple(ids), tuple(taken), out, step_sizes, windows))
        current.append(out)
    peak = _peak(steps, itemsize)
    return Plan(equation, semiring, contraction, tuple(path), tuple(steps), itemsize, peak)


def _path(
    equation: str,
    contraction: Contraction,
    joint: bool,
    itemsize: int,
    budget: Budget,
    optimize: object,
    ties: str | None = None,
) -> list[tuple[int, ...]]:
    n = len(contraction.inputs)
    size = contraction.size
    if joint or optimize is False or any(size[c] == 0 for c in contraction.summed):
        # With a size-0 summed index every output cell is an empty sum: one
        # joint step computes nothing and gives every input a zero gradient,
        # where pairwise steps would see -inf terms instead of no terms.
        return [tuple(range(n))]
    if isinstance(optimize, tuple):  # validated by optimize_key
        return list(optimize)
    if n <= 2:
        return [tuple(range(n))]
    shapes = [tuple(size[c] for c in term) for term in contraction.inputs]
    memory_limit = None if budget.bytes is None else max(budget.bytes // itemsize, 1)
    spec = ",".join(contraction.inputs) + "->" + contraction.output
    try:
        path, info = opt_einsum.contract_path(
            spec, *shapes, shapes=True, optimize=optimize, memory_limit=memory_limit
        )
    except (ValueError, KeyError, TypeError) as e:
        raise fail(equation, f"opt_einsum could not plan optimize={optimize!r}: {e}") from e
    chosen = [tuple(step) for step in path]
    if (
        ties is not None
        and n <= _TIES_MAX_OPERANDS
        and not outer_first_path(contraction, chosen, ties)
    ):
        for other in _pairwise_paths(n):
            if not outer_first_path(contraction, other, ties):
                continue
            _, cost = opt_einsum.contract_path(
                spec, *shapes, shapes=True, optimize=other, memory_limit=memory_limit
            )
            if cost.opt_cost <= info.opt_cost:
                return other
    return chosen


# Operands up to which a max-plus argmax looks for a path of equal cost that needs no
# ranks (3 operands: 3 paths; 4: 18).  (A chain ab,bc,cd->ad at 16: 205 -> 176 us.)
_TIES_MAX_OPERANDS = 4


def _pairwise_paths(n: int) -> Iterator[list[tuple[int, ...]]]:
    """Every path that contracts ``n`` operands two at a time (opt_einsum's convention)."""
    if n <= 1:
        yield []
        return
    for i in range(n):
        for j in range(i + 1, n):
            for rest in _pairwise_paths(n - 1):
                yield [(i, j), *rest]


def outer_first_path(contraction: Contraction, path: Sequence[tuple[int, ...]], order: str) -> bool:
    """Whether every step of ``path`` sums indices that all come before, in ``order``,
    every index summed earlier in its operands (see ``_viterbi.outer_first``)."""
    rank = {c: i for i, c in enumerate(order)}
    current = [(term, frozenset[str]()) for term in contraction.inputs]
    for ids in path:
        taken = [current[i] for i in ids]
        for i in sorted(ids, reverse=True):
            del current[i]
        later = set("".join(t for t, _ in current)) | set(contraction.output)
        letters = "".join(dict.fromkeys("".join(t for t, _ in taken)))
        own = [c for c in letters if c not in later and c in rank]
        earlier = frozenset[str]().union(*(h for _, h in taken))
        if own and earlier and max(rank[c] for c in own) > min(rank[c] for c in earlier):
            return False
        current.append(("".join(c for c in letters if c in later), earlier | frozenset(own)))
    return True


def joint_step(
    contraction: Contraction,
    budget: Budget,
    itemsize: int,
    device_type: str,
    summed_order: str,
) -> Step:
    """One step over every operand, its windows listed in ``summed_order``."""
    windows = dict(
        window_extents(
            contraction.inputs,
            contraction.output,
            contraction.sizes,
            budget,
            itemsize,
            device_type,
        )
    )
    return Step(
        tuple(range(len(contraction.inputs))),
        contraction.inputs,
        contraction.output,
        contraction.sizes,
        tuple((c, windows[c]) for c in summed_order),
    )
