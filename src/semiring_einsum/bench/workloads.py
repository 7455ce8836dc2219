"""Workloads, inputs, the float64 oracle and the contenders.

* **baselines** written only with torch: :func:`brute_force` (broadcast every
  operand into the joint index space and reduce it: the naive baseline, and in
  float64 the oracle) and :func:`log_matmul_exp` (the log-matmul-exp trick,
  applied pairwise);
* **workloads** (:data:`WORKLOADS`): an equation, a semiring, sizes per preset,
  forward or forward+backward, and the contenders it is run against;
* **contenders**: :data:`OURS` (``semiring_einsum.func`` at default settings),
  :data:`TORCH` (``torch.einsum``, real semiring only), :data:`TRICK`,
  :data:`NAIVE`, :data:`REFERENCE` (torch-semiring-einsum 1.2.0) and
  :data:`TROPICAL` (tropical-gemm's max-plus/min-plus matrix products), each of
  the last two when installed: imported only when used, its absence reported,
  never fatal;
* **checks**: :func:`oracle`, :func:`max_error`, :func:`tolerance` and
  :func:`argmax_consistent`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch

from .. import func

Tensor = torch.Tensor
Call = Callable[[], tuple[Tensor, ...]]

OURS = "ours"
TORCH = "torch.einsum"
TRICK = "trick"
NAIVE = "naive"
REFERENCE = "reference"
TROPICAL = "tropical-gemm"
CONTENDERS = (OURS, TORCH, TRICK, NAIVE, REFERENCE, TROPICAL)
"""Every contender name, in the order tables show them."""

NAIVE_MAX_BYTES = 512 * 2**20
"""The naive baseline is skipped where its joint tensor would exceed this."""

_ORACLE_MAX_NUMEL = 2**22  # float64 oracle: joint space evaluated in chunks of at most this

Semiring = Literal["real", "log", "max", "min", "viterbi"]
Mode = Literal["fwd", "fwd+bwd"]


# --------------------------------------------------------------------------------------------
# Baselines (plain torch; nothing here calls our contraction code)
# --------------------------------------------------------------------------------------------


def parse(equation: str) -> tuple[list[str], str]:
    """Split an explicit, letters-only equation into input terms and output.

    Example:
        >>> parse("bij,bjk->bik")
        (['bij', 'bjk'], 'bik')
    """
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow or not all(t.isalpha() for t in terms) or (out and not out.isalpha()):
        raise ValueError(f"baselines take explicit letters-only equations, got {equation!r}")
    return terms, out


def _summed(terms: Sequence[str], out: str) -> str:
    """Indices summed over, in order of first appearance."""
    return "".join(c for c in dict.fromkeys("".join(terms)) if c not in out)


def _align(x: Tensor, letters: str, target: str) -> Tensor:
    """View ``x`` (dims named ``letters``) so it broadcasts against dims ``target``."""
    present = [c for c in target if c in letters]
    x = x.permute([letters.index(c) for c in present])
    return x.reshape([x.shape[present.index(c)] if c in letters else 1 for c in target])


_REDUCE: dict[str, Callable[[Tensor, tuple[int, ...]], Tensor]] = {
    "sum": lambda x, d: x.sum(d),
    "logsumexp": lambda x, d: torch.logsumexp(x, d),
    "amax": lambda x, d: x.amax(d),
    "amin": lambda x, d: x.amin(d),
}


def brute_force(
    reduce: str, equation: str, *operands: Tensor, max_numel: int | None = None
) -> Tensor:
    """Broadcast-and-reduce: materialise the joint index space, then reduce it.

    The operands are combined with ``*`` (``reduce='sum'``, the real semiring)
    or ``+`` (``'logsumexp'``, ``'amax'``, ``'amin'``) and the summed indices
    reduced.  This is the naive baseline; in float64 it is the oracle.

    Args:
        reduce: ``'sum'``, ``'logsumexp'``, ``'amax'`` or ``'amin'``.
        equation: Explicit equation of letters, e.g. ``'bij,bjk->bik'``.
        *operands: The tensors.
        max_numel: If given, evaluate the joint space in chunks of at most
            this many elements (splitting output indices), to bound memory.

    Returns:
        The contraction (differentiable by autograd).

    Example:
        >>> a = torch.zeros(2, 3)
        >>> brute_force("logsumexp", "ij,jk->ik", a, a.T)  # log(3) everywhere
        tensor([[1.0986, 1.0986],
                [1.0986, 1.0986]])
    """
    terms, out = parse(equation)
    sizes = {c: n for t, x in zip(terms, operands) for c, n in zip(t, x.shape)}
    joint = out + _summed(terms, out)
    numel = math.prod(sizes[c] for c in joint)
    if max_numel is not None and numel > max_numel and any(sizes[c] > 1 for c in out):
        split = max(out, key=lambda c: sizes[c])
        pieces = min(sizes[split], -(-numel // max_numel))
        step = -(-sizes[split] // pieces)
        chunks = []
        for start in range(0, sizes[split], step):
            length = min(step, sizes[split] - start)
            part = [
                x.narrow(t.index(split), start, length) if split in t else x
                for t, x in zip(terms, operands)
            ]
            chunks.append(brute_force(reduce, equation, *part, max_numel=max_numel))
        return torch.cat(chunks, out.index(split))
    aligned = [_align(x, t, joint) for t, x in zip(terms, operands)]
    total = aligned[0]
    for x in aligned[1:]:
        total = total * x if reduce == "sum" else total + x
    total = total.expand([sizes[c] for c in joint])
    dims = tuple(range(len(out), len(joint)))
    return _REDUCE[reduce](total, dims) if dims else total.clone()


def _shift(x: Tensor, dims: list[int]) -> Tensor:
    """Per-slice max over ``dims`` (kept), detached, with non-finite maxima set to 0.

    The result of the trick does not depend on the shift, so its gradient may
    treat the shift as a constant; a -inf maximum (an all-zero-probability
    slice) would turn ``x - max`` into NaN, so it is replaced by 0.
    """
    m = x.detach().amax(dims, keepdim=True) if dims else x.detach()
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))


def _log_pair(a: Tensor, la: str, b: Tensor, lb: str, kept: str) -> Tensor:
    """One pairwise log contraction by the trick, to the indices ``kept``."""
    ca = [i for i, c in enumerate(la) if c not in kept]
    cb = [i for i, c in enumerate(lb) if c not in kept]
    if not ca and not cb:  # nothing to sum: a plain ⊗ (addition) of the two
        return _align(a, la, kept) + _align(b, lb, kept)
    ma, mb = _shift(a, ca), _shift(b, cb)
    s = torch.einsum(f"{la},{lb}->{kept}", torch.exp(a - ma), torch.exp(b - mb))
    ka = "".join(c for c in la if c in kept)
    kb = "".join(c for c in lb if c in kept)
    shift_a = _align(ma.squeeze(tuple(ca)), ka, kept)
    shift_b = _align(mb.squeeze(tuple(cb)), kb, kept)
    return torch.log(s) + shift_a + shift_b


def log_matmul_exp(equation: str, *operands: Tensor) -> Tensor:
    """Log-space einsum by the log-matmul-exp trick, contracting pairwise left to right.

    For each pair: subtract from each operand its max over the indices summed
    in that step, ``exp``, contract in real space with :func:`torch.einsum`
    (BLAS), ``log``, and add the maxima back.  Fast, and exact while the
    shifted exponentials do not underflow; it does underflow (to -inf) when an
    operand's entries spread over more than ~100 nats in float32, which is what
    our guarded log semiring handles.  Differentiable by autograd.

    Args:
        equation: Explicit equation of letters with at least two operands.
        *operands: Log-space tensors.

    Returns:
        The log-space contraction.

    Example:
        >>> a = torch.zeros(2, 3)
        >>> log_matmul_exp("ij,jk->ik", a, a.T)  # log(3) everywhere
        tensor([[1.0986, 1.0986],
                [1.0986, 1.0986]])
    """
    terms, out = parse(equation)
    if len(terms) < 2:
        raise ValueError(f"the trick needs at least two operands, got {equation!r}")
    acc, letters = operands[0], terms[0]
    for k in range(1, len(terms)):
        if k == len(terms) - 1:
            kept = out
        else:
            later = set(out).union(*terms[k + 1 :])
            kept = "".join(c for c in dict.fromkeys(letters + terms[k]) if c in later)
        acc = _log_pair(acc, letters, operands[k], terms[k], kept)
        letters = kept
    return acc


def argmax_consistent(
    equation: str, operands: Sequence[Tensor], values: Tensor, argmax: Tensor
) -> bool:
    """Whether each argmax picks a term whose value is the reported max.

    ``argmax[..., k]`` holds the k-th summed index (in order of first
    appearance); the term at those indices is gathered from the operands,
    summed, and compared with ``values``.
    """
    terms, out = parse(equation)
    summed = _summed(terms, out)
    if argmax.shape != values.shape + (len(summed),):
        return False
    coords: dict[str, Tensor] = {}
    for i, c in enumerate(out):
        shape = [1] * len(out)
        shape[i] = values.shape[i]
        coords[c] = torch.arange(values.shape[i], device=values.device).reshape(shape)
    for k, c in enumerate(summed):
        coords[c] = argmax[..., k]
    picked = sum(
        (x[tuple(coords[c] for c in t)] for t, x in zip(terms, operands)),
        torch.zeros((), dtype=values.dtype, device=values.device),
    )
    return bool(torch.allclose(picked.expand_as(values), values, equal_nan=True))


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark case.

    Attributes:
        key: Short unique name (used on the command line and in JSON).
        semiring: ``'real'``, ``'log'``, ``'max'``, ``'min'`` or ``'viterbi'``
            (max-plus with argmax).
        equation: Explicit letters-only equation.
        mode: ``'fwd'`` or ``'fwd+bwd'`` (the gradient of the sum of outputs).
        sizes: Index sizes per preset (``'quick'``, ``'default'``, ``'full'``).
        contenders: Contenders besides :data:`OURS`.
        spread: Standard deviation of the random inputs.
        slow_reference: The reference takes seconds per call here
            (``--skip-slow-reference`` leaves it out).
        rtol: Check tolerance relative to the oracle's largest magnitude.
        steps: Calls per measurement: with more than one, a recurrence whose
            output is fed back as the first operand (an HMM's forward pass).
    """

    key: str
    semiring: Semiring
    equation: str
    mode: Mode
    sizes: Mapping[str, Mapping[str, int]]
    contenders: tuple[str, ...]
    spread: float = 1.0
    slow_reference: bool = False
    rtol: float = 1e-4
    steps: int = 1

    def title(self, sizes: Mapping[str, int]) -> str:
        """Human-readable name, e.g. ``'log bij,bjk->bik b=8 i=j=k=128 fwd'``."""
        groups: dict[int, str] = {}
        for c in dict.fromkeys(self.equation.replace(",", "").replace("->", "")):
            groups[sizes[c]] = groups.get(sizes[c], "") + c
        dims = " ".join(f"{'='.join(cs)}={n}" for n, cs in groups.items())
        extra = " (+-1e3 nats)" if self.spread > 100 else ""
        extra += f" x{self.steps} steps" if self.steps > 1 else ""
        return f"{self.semiring} {self.equation} {dims} {self.mode}{extra}"


def _bmm(b: int, n: int) -> dict[str, int]:
    return {"b": b, "i": n, "j": n, "k": n}


def _chain(n: int) -> dict[str, int]:
    return dict.fromkeys("abcd", n)


def _cky(b: int, s: int, x: int, k: int) -> dict[str, int]:
    return {"b": b, "s": s, "x": x, "y": x, "z": x, "k": k}


_LOG = (TRICK, NAIVE, REFERENCE)
_MAX = (NAIVE, REFERENCE, TROPICAL)

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "real-bmm",
        "real",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(8, 128), "full": _bmm(8, 256)},
        (TORCH, REFERENCE),
    ),
    Workload(
        "log-bmm",
        "log",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        _LOG,
    ),
    Workload(
        "log-bmm-bwd",
        "log",
        "bij,bjk->bik",
        "fwd+bwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        _LOG,
    ),
    Workload(
        "log-chain-64",
        "log",
        "ab,bc,cd->ad",
        "fwd",
        {"quick": _chain(16), "default": _chain(48), "full": _chain(64)},
        _LOG,
    ),
    Workload(
        "log-chain-128",
        "log",
        "ab,bc,cd->ad",
        "fwd",
        {"quick": _chain(24), "default": _chain(72), "full": _chain(128)},
        _LOG,
        slow_reference=True,
    ),
    Workload(
        "log-hmm-bwd",
        "log",
        "bi,ij,bj->bj",
        "fwd+bwd",
        {
            "quick": {"b": 4, "i": 32, "j": 32},
            "default": {"b": 32, "i": 256, "j": 256},
            "full": {"b": 64, "i": 512, "j": 512},
        },
        _LOG,
    ),
    Workload(
        "log-bikl",
        "log",
        "bikl,bklj->bij",
        "fwd",
        {
            "quick": {"b": 2, "i": 8, "j": 8, "k": 4, "l": 4},
            "default": {"b": 4, "i": 48, "j": 48, "k": 16, "l": 16},
            "full": {"b": 8, "i": 64, "j": 64, "k": 32, "l": 32},
        },
        _LOG,
    ),
    Workload(
        "log-cky-bwd",
        "log",
        "bsxk,bsyk,xyz->bsz",
        "fwd+bwd",
        {"quick": _cky(2, 4, 6, 3), "default": _cky(2, 16, 24, 8), "full": _cky(4, 32, 24, 8)},
        _LOG,
    ),
    Workload(
        "log-adversarial",
        "log",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 64), "full": _bmm(8, 128)},
        (TRICK, NAIVE),
        spread=300.0,
        rtol=1e-5,
    ),
    Workload(
        "viterbi-bmm",
        "viterbi",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        _MAX,
    ),
    Workload(
        "max-bmm",
        "max",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        _MAX,
    ),
    Workload(
        "min-bmm",
        "min",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 64), "full": _bmm(8, 128)},
        (NAIVE, TROPICAL),
    ),
    Workload(
        "max-bmm-bwd",
        "max",
        "bij,bjk->bik",
        "fwd+bwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        (NAIVE, TROPICAL),
    ),
    Workload(
        "max-hmm-32",
        "max",
        "bi,ij,bj->bj",
        "fwd",
        {
            "quick": {"b": 4, "i": 16, "j": 16},
            "default": {"b": 16, "i": 64, "j": 64},
            "full": {"b": 16, "i": 128, "j": 128},
        },
        (NAIVE, TROPICAL),
        steps=32,
    ),
    Workload(
        "viterbi-cky",
        "viterbi",
        "bsxk,bsyk,xyz->bsz",
        "fwd",
        {"quick": _cky(2, 4, 6, 3), "default": _cky(2, 16, 24, 8), "full": _cky(4, 32, 24, 8)},
        _MAX,
    ),
)
"""The built-in workloads (``full``: the largest sizes, ``default``: scaled down to run
in under a minute on two CPU cores, ``quick``: a smoke test)."""


def workload(key: str) -> Workload:
    """The built-in workload named ``key``."""
    for w in WORKLOADS:
        if w.key == key:
            return w
    raise KeyError(f"no workload {key!r}; known: {', '.join(w.key for w in WORKLOADS)}")


def load_reference() -> ModuleType | None:
    """``torch_semiring_einsum`` if it is installed, else ``None``."""
    try:
        return importlib.import_module("torch_semiring_einsum")
    except ImportError:
        return None


def reference_version(reference: ModuleType | None) -> str | None:
    """The installed reference's version string, if known."""
    if reference is None:
        return None
    try:
        return importlib.metadata.version("torch-semiring-einsum")
    except importlib.metadata.PackageNotFoundError:  # importable but not installed as such
        return getattr(reference, "__version__", "unknown")


def load_tropical() -> ModuleType | None:
    """``tropical_gemm`` (with its torch layer) if it is installed, else ``None``."""
    try:
        importlib.import_module("tropical_gemm.pytorch")
        return importlib.import_module("tropical_gemm")
    except ImportError:
        return None


def tropical_applies(w: Workload) -> bool:
    """Whether tropical-gemm has a call for ``w`` (matrix products and the HMM step)."""
    if w.semiring not in ("max", "min", "viterbi"):
        return False
    return w.equation in _TROPICAL_SHAPES and (w.semiring != "viterbi" or w.mode == "fwd")


# Equation -> (batched, HMM step: the product plus the third operand)
_TROPICAL_SHAPES = {"bij,bjk->bik": (True, False), "ij,jk->ik": (False, False)}
_TROPICAL_SHAPES["bi,ij,bj->bj"] = (False, True)


def _tropical_function(w: Workload, tg: ModuleType) -> Callable[..., Any]:
    batched, hmm = _TROPICAL_SHAPES[w.equation]
    tgp = importlib.import_module("tropical_gemm.pytorch")
    kind = "minplus" if w.semiring == "min" else "maxplus"
    product = getattr(tgp, f"tropical_{kind}_matmul" + ("_batched" if batched else ""))
    if w.semiring == "viterbi":  # values and the winning index, as ours returns them
        name = "maxplus_matmul_batched_with_argmax" if batched else "maxplus_matmul_with_argmax"
        with_argmax = getattr(tg, name)

        def viterbi(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            values, index = with_argmax(a.numpy(), b.numpy())
            shape = [*a.shape[:-1], b.shape[-1]]
            argmax = torch.from_numpy(index).to(torch.int64).reshape([*shape, 1])
            return torch.from_numpy(values).reshape(shape), argmax

        return viterbi
    if hmm:
        return lambda a, t, e: product(a, t) + e
    return product


def make_inputs(
    w: Workload, sizes: Mapping[str, int], device: str = "cpu", seed: int = 0
) -> list[Tensor]:
    """The workload's float32 operands (random normal times ``w.spread``)."""
    g = torch.Generator().manual_seed(seed)
    terms, _ = parse(w.equation)
    xs = [torch.randn([sizes[c] for c in t], generator=g) * w.spread for t in terms]
    xs = [x.to(device) for x in xs]
    if w.mode == "fwd+bwd":
        xs = [x.requires_grad_() for x in xs]
    return xs


_OURS_FN: dict[str, Callable[..., Any]] = {
    "real": func.einsum,
    "log": func.log_einsum,
    "max": func.max_einsum,
    "min": func.min_einsum,
    "viterbi": func.viterbi_einsum,
}
_NAIVE_REDUCE = {"real": "sum", "log": "logsumexp", "max": "amax", "min": "amin", "viterbi": "amax"}


def contender_function(
    w: Workload, name: str, reference: ModuleType | None = None
) -> Callable[..., Any]:
    """The function ``name`` computes ``w`` with (operands in, result out).

    ``viterbi`` workloads: ours and the reference return ``(values, argmax)``,
    the naive baseline values only.  Max-plus values by the reference come
    from its Viterbi function, its only max-plus operation.
    """
    fn = _contender(w, name, reference)
    return fn if w.steps == 1 else _recurrence(fn, w.steps)


def _recurrence(fn: Callable[..., Any], steps: int) -> Callable[..., Any]:
    """``fn`` applied ``steps`` times, its output fed back as the first operand."""

    def recur(first: Tensor, *rest: Tensor) -> Any:
        out = first
        for _ in range(steps):
            out = fn(out, *rest)
        return out

    return recur


def _contender(w: Workload, name: str, reference: ModuleType | None) -> Callable[..., Any]:
    eq, s = w.equation, w.semiring
    if name == OURS:
        fn = _OURS_FN[s]
        return lambda *xs: fn(eq, *xs)
    if name == TORCH:
        return lambda *xs: torch.einsum(eq, *xs)
    if name == TRICK:
        return lambda *xs: log_matmul_exp(eq, *xs)
    if name == NAIVE:
        reduce = _NAIVE_REDUCE[s]
        return lambda *xs: brute_force(reduce, eq, *xs)
    if name == REFERENCE:
        if reference is None:
            raise RuntimeError("torch_semiring_einsum is not installed")
        compiled = reference.compile_equation(eq)
        block = reference.AUTOMATIC_BLOCK_SIZE
        ref_fn = {
            "real": reference.einsum,
            "log": reference.log_einsum,
            "max": reference.log_viterbi_einsum_forward,
            "viterbi": reference.log_viterbi_einsum_forward,
        }[s]
        return lambda *xs: ref_fn(compiled, *xs, block_size=block)
    if name == TROPICAL:
        tg = load_tropical()
        if tg is None or not tropical_applies(w):
            raise RuntimeError(f"tropical-gemm is not installed or has no call for {w.key}")
        return _tropical_function(w, tg)
    raise KeyError(f"unknown contender {name!r}")


def make_call(fn: Callable[..., Any], inputs: Sequence[Tensor], mode: Mode) -> Call:
    """A no-argument call running ``fn`` on ``inputs``, returning a tuple of tensors.

    ``fwd``: the outputs.  ``fwd+bwd``: the output (detached) followed by the
    gradients of its sum with respect to every input.
    """
    if mode == "fwd":

        def forward() -> tuple[Tensor, ...]:
            out = fn(*inputs)
            return tuple(out) if isinstance(out, tuple) else (out,)

        return forward

    def forward_backward() -> tuple[Tensor, ...]:
        out = fn(*inputs)
        grads = torch.autograd.grad(out, list(inputs), torch.ones_like(out))
        return (out.detach(), *grads)

    return forward_backward


def oracle(w: Workload, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The float64 brute-force answer (with gradients for ``fwd+bwd``)."""
    xs = [x.detach().double().requires_grad_(w.mode == "fwd+bwd") for x in inputs]
    reduce = _NAIVE_REDUCE[w.semiring]

    def step(*ys: Tensor) -> Tensor:
        return brute_force(reduce, w.equation, *ys, max_numel=_ORACLE_MAX_NUMEL)

    with torch.enable_grad():
        out = (step if w.steps == 1 else _recurrence(step, w.steps))(*xs)
        grads = torch.autograd.grad(out, xs, torch.ones_like(out)) if w.mode == "fwd+bwd" else ()
    return tuple(t.detach().cpu() for t in (out, *grads))


def max_error(got: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """Largest absolute difference over finite entries.

    ``inf`` if a shape, or which entries are finite (and their values), differ.
    """
    if len(got) < len(expected):
        return math.inf
    worst = 0.0
    for g, e in zip(got, expected):
        g = g.detach().to(torch.float64).cpu()
        if g.shape != e.shape:
            return math.inf
        finite = torch.isfinite(e)
        same_pattern = torch.equal(torch.isfinite(g), finite) and torch.equal(
            g[~finite].nan_to_num(nan=0.0), e[~finite].nan_to_num(nan=0.0)
        )
        if not same_pattern:
            return math.inf
        if finite.any():
            worst = max(worst, float((g - e)[finite].abs().max()))
    return worst


def tolerance(w: Workload, expected: Sequence[Tensor]) -> float:
    """``w.rtol`` times the oracle's largest finite magnitude (at least 1)."""
    scale = 1.0
    for e in expected:
        finite = e[torch.isfinite(e)]
        if finite.numel():
            scale = max(scale, float(finite.abs().max()))
    return w.rtol * scale
