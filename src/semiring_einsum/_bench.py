"""Benchmark harness: our functions against plain-torch baselines and the reference.

The command line lives in :mod:`semiring_einsum.__main__`; this module holds
the pieces it is built from, each usable on its own:

* **baselines** written only with torch: :func:`brute_force` (broadcast every
  operand into the joint index space and reduce it: the naive baseline, and in
  float64 the oracle) and :func:`log_matmul_exp` (the log-matmul-exp trick,
  applied pairwise);
* **workloads** (:data:`WORKLOADS`): an equation, a semiring, sizes per preset,
  forward or forward+backward, the contenders and the goals it is judged by;
* **measurement**: :func:`time_interleaved` (medians over rounds that
  interleave the contenders, with a time budget per contender) and
  :func:`measure_peak` (peak extra memory of one call, in a fresh subprocess);
* **reports**: :func:`format_report`, :func:`report_to_json`,
  :func:`write_plot`.

Contenders are named :data:`OURS` (``semiring_einsum.func`` at default
settings), :data:`TORCH` (``torch.einsum``, real semiring only), :data:`TRICK`,
:data:`NAIVE` and :data:`REFERENCE` (torch-semiring-einsum 1.2.0, when
installed).  Optional packages (tqdm, matplotlib, the reference) are imported
only when used, and their absence is reported, never fatal.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal, NamedTuple, Protocol

import torch

from . import func

Tensor = torch.Tensor
Call = Callable[[], tuple[Tensor, ...]]

OURS = "ours"
TORCH = "torch.einsum"
TRICK = "trick"
NAIVE = "naive"
REFERENCE = "reference"
CONTENDERS = (OURS, TORCH, TRICK, NAIVE, REFERENCE)
"""Every contender name, in the order tables show them."""

NAIVE_MAX_BYTES = 512 * 2**20
"""The naive baseline is skipped where its joint tensor would exceed this."""

_ORACLE_MAX_NUMEL = 2**22  # float64 oracle: joint space evaluated in chunks of at most this

Semiring = Literal["real", "log", "max", "min", "viterbi"]
Mode = Literal["fwd", "fwd+bwd"]
Metric = Literal["time_ratio", "speedup", "memory_ratio"]


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
class Goal:
    """A target a workload is judged against.

    Attributes:
        text: The goal as a reader should see it.
        metric: ``'time_ratio'`` (ours / baseline median time must be at most
            ``target``), ``'speedup'`` (baseline / ours at least ``target``) or
            ``'memory_ratio'`` (ours / baseline peak extra memory at most
            ``target``).
        baseline: The contender compared against.
        target: The threshold.
    """

    text: str
    metric: Metric
    baseline: str
    target: float

    def judge(self, ours: float | None, base: float | None) -> tuple[float | None, bool | None]:
        """The measured value and whether it meets the goal (``None``: not measured)."""
        if ours is None or base is None:
            return None, None
        if self.metric == "speedup":
            value = base / ours if ours > 0 else math.inf
            return value, value >= self.target
        value = ours / base if base > 0 else (0.0 if ours == 0 else math.inf)
        return value, ours <= self.target * base


MEMORY_GOAL = Goal("peak extra memory <= 1/2 of the reference's", "memory_ratio", REFERENCE, 0.5)


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
        goals: What the workload is judged against (at ``full`` sizes).
        spread: Standard deviation of the random inputs.
        slow_reference: The reference takes seconds per call here
            (``--skip-slow-reference`` leaves it out).
        rtol: Check tolerance relative to the oracle's largest magnitude.
    """

    key: str
    semiring: Semiring
    equation: str
    mode: Mode
    sizes: Mapping[str, Mapping[str, int]]
    contenders: tuple[str, ...]
    goals: tuple[Goal, ...] = ()
    spread: float = 1.0
    slow_reference: bool = False
    rtol: float = 1e-4

    def title(self, sizes: Mapping[str, int]) -> str:
        """Human-readable name, e.g. ``'log bij,bjk->bik b=8 i=j=k=128 fwd'``."""
        groups: dict[int, str] = {}
        for c in dict.fromkeys(self.equation.replace(",", "").replace("->", "")):
            groups[sizes[c]] = groups.get(sizes[c], "") + c
        dims = " ".join(f"{'='.join(cs)}={n}" for n, cs in groups.items())
        extra = " (+-1e3 nats)" if self.spread > 100 else ""
        return f"{self.semiring} {self.equation} {dims} {self.mode}{extra}"


def _bmm(b: int, n: int) -> dict[str, int]:
    return {"b": b, "i": n, "j": n, "k": n}


def _chain(n: int) -> dict[str, int]:
    return dict.fromkeys("abcd", n)


def _cky(b: int, s: int, x: int, k: int) -> dict[str, int]:
    return {"b": b, "s": s, "x": x, "y": x, "z": x, "k": k}


_LOG = (TRICK, NAIVE, REFERENCE)
_MAX = (NAIVE, REFERENCE)

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "real-bmm",
        "real",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(8, 128), "full": _bmm(8, 256)},
        (TORCH, REFERENCE),
        (Goal("<= 1.1x torch.einsum", "time_ratio", TORCH, 1.1), MEMORY_GOAL),
    ),
    Workload(
        "log-bmm",
        "log",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        _LOG,
        (Goal("<= 1.3x the trick", "time_ratio", TRICK, 1.3), MEMORY_GOAL),
    ),
    Workload(
        "log-bmm-bwd",
        "log",
        "bij,bjk->bik",
        "fwd+bwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        _LOG,
        (Goal("<= 1.3x the trick", "time_ratio", TRICK, 1.3), MEMORY_GOAL),
    ),
    Workload(
        "log-chain-64",
        "log",
        "ab,bc,cd->ad",
        "fwd",
        {"quick": _chain(16), "default": _chain(48), "full": _chain(64)},
        _LOG,
        (Goal("<= 1.3x the trick", "time_ratio", TRICK, 1.3), MEMORY_GOAL),
    ),
    Workload(
        "log-chain-128",
        "log",
        "ab,bc,cd->ad",
        "fwd",
        {"quick": _chain(24), "default": _chain(72), "full": _chain(128)},
        _LOG,
        (
            Goal("<= 1.3x the trick", "time_ratio", TRICK, 1.3),
            Goal(">= 500x faster than the reference", "speedup", REFERENCE, 500.0),
            MEMORY_GOAL,
        ),
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
        (Goal("<= 1.5x the trick", "time_ratio", TRICK, 1.5), MEMORY_GOAL),
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
        (Goal("<= 1.5x the trick", "time_ratio", TRICK, 1.5), MEMORY_GOAL),
    ),
    Workload(
        "log-cky-bwd",
        "log",
        "bsxk,bsyk,xyz->bsz",
        "fwd+bwd",
        {"quick": _cky(2, 4, 6, 3), "default": _cky(2, 16, 24, 8), "full": _cky(4, 32, 24, 8)},
        _LOG,
        (Goal("<= 1.5x the trick", "time_ratio", TRICK, 1.5), MEMORY_GOAL),
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
        (
            Goal("<= 0.6x naive broadcast amax (values only)", "time_ratio", NAIVE, 0.6),
            Goal(">= 4x faster than the reference", "speedup", REFERENCE, 4.0),
            MEMORY_GOAL,
        ),
    ),
    Workload(
        "max-bmm",
        "max",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 96), "full": _bmm(8, 128)},
        _MAX,
        (Goal("<= 0.5x naive broadcast amax", "time_ratio", NAIVE, 0.5), MEMORY_GOAL),
    ),
    Workload(
        "min-bmm",
        "min",
        "bij,bjk->bik",
        "fwd",
        {"quick": _bmm(2, 32), "default": _bmm(4, 64), "full": _bmm(8, 128)},
        (NAIVE,),
    ),
    Workload(
        "viterbi-cky",
        "viterbi",
        "bsxk,bsyk,xyz->bsz",
        "fwd",
        {"quick": _cky(2, 4, 6, 3), "default": _cky(2, 16, 24, 8), "full": _cky(4, 32, 24, 8)},
        _MAX,
        (Goal(">= 4x faster than the reference", "speedup", REFERENCE, 4.0), MEMORY_GOAL),
    ),
)
"""The built-in workloads; ``full`` sizes and goals are those of issue 4."""


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
    with torch.enable_grad():
        out = brute_force(reduce, w.equation, *xs, max_numel=_ORACLE_MAX_NUMEL)
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


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Timing of one contender: samples in ms, and the warm-up call's duration."""

    samples: list[float] = field(default_factory=list)
    warmup_ms: float = 0.0

    @property
    def median_ms(self) -> float:
        """Median of the samples."""
        return statistics.median(self.samples)


def _sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(
    calls: Mapping[str, Call],
    rounds: int,
    budget_s: float,
    device: str = "cpu",
) -> tuple[dict[str, Timing], dict[str, tuple[Tensor, ...]]]:
    """Time calls round by round, interleaved, within a time budget per call.

    Each call first runs once untimed (warm-up; its output is returned for
    checking).  Then, for up to ``rounds`` rounds (at least one), every
    still-active call runs once per round, in a fresh random order each
    round (seeded, so runs repeat): a call's time depends on what ran just
    before it (a contender that streams tens of MiB leaves the caches cold
    and the allocator's memory unmapped), and a fixed or merely rotated
    order would always put the same contender before it.  A call drops out
    after a round once its time so far (warm-up included) exceeds
    ``budget_s``, so a call that takes seconds runs twice in all.

    Returns:
        Per call name: its :class:`Timing`, and the warm-up outputs.
    """
    sync = _sync(device)
    timings = {name: Timing() for name in calls}
    outputs: dict[str, tuple[Tensor, ...]] = {}
    spent = dict.fromkeys(calls, 0.0)
    for name, call in calls.items():
        sync()
        start = time.perf_counter()
        outputs[name] = call()
        sync()
        spent[name] = time.perf_counter() - start
        timings[name].warmup_ms = spent[name] * 1e3
    active = list(calls)
    shuffle = random.Random(0).shuffle
    for _ in range(max(1, rounds)):
        if not active:
            break
        order = list(active)
        shuffle(order)
        for name in order:
            sync()
            start = time.perf_counter()
            calls[name]()
            sync()
            elapsed = time.perf_counter() - start
            timings[name].samples.append(elapsed * 1e3)
            spent[name] += elapsed
        active = [name for name in active if spent[name] <= budget_s]
    return timings, outputs


def _maxrss_bytes() -> int:
    import resource  # POSIX only; imported here so the module loads everywhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def memory_child(argv: Sequence[str] | None = None) -> None:
    """Entry point of the memory subprocess; prints ``{"peak_bytes": n}``.

    Reads a JSON spec (workload key, contender, sizes, device) from the first
    argument.  Imports everything, creates the inputs and warms the code path
    up on tiny inputs, then takes the baseline; the result is the growth of
    the process's peak resident memory (``ru_maxrss``; on CUDA, of
    ``torch.cuda.max_memory_allocated``) over one call at full size.
    """
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    w = workload(spec["key"])
    reference = load_reference() if spec["contender"] == REFERENCE else None
    fn = contender_function(w, spec["contender"], reference)
    device: str = spec["device"]
    tiny = {c: min(n, 4) for c, n in spec["sizes"].items()}
    make_call(fn, make_inputs(w, tiny, device), w.mode)()  # warm-up: imports, kernels, pools
    call = make_call(fn, make_inputs(w, spec["sizes"], device), w.mode)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _maxrss_bytes()
        call()
        peak = _maxrss_bytes() - base
    print(json.dumps({"peak_bytes": max(0, peak)}))


_CHILD = "from semiring_einsum._bench import memory_child; memory_child()"
# On Linux a process's ru_maxrss starts at its parent's resident size at fork
# time (exec keeps the high-water mark of the memory image it replaces), so a
# child started straight from this process, already large after the timings,
# would see no growth below that size.  A bare interpreter (`-S`, a few MiB)
# in between starts the measuring process from a small image instead.
_LAUNCHER = (
    "import subprocess, sys; "
    "sys.exit(subprocess.run([sys.executable, '-c', *sys.argv[1:]]).returncode)"
)


def measure_peak(
    key: str,
    contender: str,
    sizes: Mapping[str, int],
    device: str = "cpu",
    timeout_s: float = 600.0,
) -> tuple[int | None, str]:
    """Peak extra memory of one call, measured in a fresh Python subprocess.

    Returns:
        ``(bytes, note)``: bytes is ``None`` when the subprocess failed or
        timed out, and the note says why.
    """
    spec = json.dumps({"key": key, "contender": contender, "sizes": dict(sizes), "device": device})
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, _CHILD, spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so a timeout ends the child too
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"memory subprocess timed out after {timeout_s:g} s"
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory subprocess failed: {tail}"
    return int(json.loads(lines[-1])["peak_bytes"]), ""


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress(Protocol):
    """The part of tqdm's interface the harness uses."""

    def set_description_str(self, desc: str) -> None: ...

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """A dependency-free progress bar on stderr (used when tqdm is missing).

    On a terminal it redraws one line; otherwise it prints a line per step.
    """

    def __init__(self, total: int, width: int = 24) -> None:
        self.total, self.width, self.done, self.desc = max(total, 1), width, 0, ""
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def set_description_str(self, desc: str) -> None:
        """Show what runs now."""
        self.desc = desc
        if self.tty:
            self._draw()

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self) -> None:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.start:5.1f}s {self.desc}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:119].ljust(119))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Silent:
    def set_description_str(self, desc: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool = True) -> Progress:
    """A tqdm bar on stderr if tqdm is installed, else a :class:`PlainProgress`."""
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(total)
    bar: Progress = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
    return bar


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


@dataclass
class ContenderResult:
    """What one contender did on one case (``None`` where not measured)."""

    name: str
    median_ms: float | None = None
    rounds: int = 0
    max_error: float | None = None
    peak_bytes: int | None = None
    note: str = ""
    memory_note: str = ""


@dataclass
class GoalResult:
    """A goal, the measured value and the verdict (``met`` is ``None`` if unmeasured)."""

    text: str
    metric: str
    baseline: str
    target: float
    value: float | None
    met: bool | None


@dataclass
class CaseResult:
    """One workload's outcome: the self-check, every contender, every goal."""

    key: str
    title: str
    semiring: str
    equation: str
    mode: str
    sizes: dict[str, int]
    max_error: float
    tolerance: float
    argmax_ok: bool | None
    contenders: dict[str, ContenderResult]
    goals: list[GoalResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Our result matches the oracle (and the argmax is consistent)."""
        return self.max_error <= self.tolerance and self.argmax_ok is not False


@dataclass
class Report:
    """A whole run: metadata, one :class:`CaseResult` per workload, extra checks."""

    meta: dict[str, Any]
    cases: list[CaseResult]
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        """Names of failed self-checks."""
        bad = [f"{c.key} (result)" for c in self.cases if not c.ok]
        return bad + [name for name, ok in self.checks.items() if not ok]

    @property
    def ok(self) -> bool:
        """Every self-check passed (goals are reported, not enforced)."""
        return not self.failures


@dataclass(frozen=True)
class Settings:
    """How to run.

    Attributes:
        preset: Which sizes of each workload: ``'quick'``, ``'default'`` or ``'full'``.
        rounds: Most timing rounds per contender.
        budget_s: Time budget per contender and workload (see :func:`time_interleaved`).
        memory: Peak-memory subprocesses for every contender (``'all'``), for
            those a goal compares (``'goals'``), or none (``'off'``).
        jobs: Memory subprocesses run at once.
        device: ``'cpu'`` or ``'cuda'``.
        skip_slow_reference: Leave the reference out where ``slow_reference``.
        memory_timeout_s: Give up on one memory subprocess after this long.
        only: Run only workloads whose key contains one of these.
    """

    preset: str = "default"
    rounds: int = 5
    budget_s: float = 0.3
    memory: Literal["all", "goals", "off"] = "goals"
    jobs: int = 2
    device: str = "cpu"
    skip_slow_reference: bool = False
    memory_timeout_s: float = 600.0
    only: tuple[str, ...] = ()


PRESETS: dict[str, Settings] = {
    "quick": Settings(preset="quick", rounds=3, budget_s=0.1, memory="off"),
    "default": Settings(preset="default", rounds=5, budget_s=0.3, memory="goals"),
    "full": Settings(preset="full", rounds=15, budget_s=2.0, memory="all"),
}
"""Settings per preset: ``full`` is issue 4's table (minutes), ``default`` a
scaled-down run (under a minute on two cores), ``quick`` a smoke test."""


class _CasePlan(NamedTuple):
    workload: Workload
    sizes: dict[str, int]
    contenders: list[str]  # the ones that run, OURS first
    skipped: dict[str, str]  # contender -> why it does not run
    memory: list[str]  # contenders measured in a memory subprocess


def selected(only: Sequence[str]) -> list[Workload]:
    """The workloads whose key contains one of ``only`` (all if it is empty)."""
    if not only:
        return list(WORKLOADS)
    return [w for w in WORKLOADS if any(s in w.key for s in only)]


def _plan(w: Workload, s: Settings, reference: ModuleType | None) -> _CasePlan:
    """Which contenders run on ``w`` (and why the others do not), which get measured."""
    sizes = dict(w.sizes[s.preset])
    run, skipped = [OURS], {}
    joint_bytes = 4 * math.prod(sizes.values())
    for name in w.contenders:
        if name == REFERENCE and reference is None:
            skipped[name] = "not installed"
        elif name == REFERENCE and w.slow_reference and s.skip_slow_reference:
            skipped[name] = "skipped (--skip-slow-reference)"
        elif name == NAIVE and joint_bytes > NAIVE_MAX_BYTES:
            skipped[name] = f"skipped (joint tensor {joint_bytes / 2**30:.1f} GiB)"
        else:
            run.append(name)
    compared = [g.baseline for g in w.goals if g.metric == "memory_ratio"]
    if s.memory == "all":
        memory = list(run)
    elif s.memory == "goals" and compared:
        memory = [name for name in run if name == OURS or name in compared]
    else:
        memory = []
    return _CasePlan(w, sizes, run, skipped, memory)


def _viterbi_ties_ok() -> bool:
    """Small tie-free check: the argmax points at maximising terms, with windows of 2."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 6, generator=g), torch.randn(3, 6, 4, generator=g)
    values, argmax = func.viterbi_einsum("bij,bjk->bik", a, b, block_size=2)
    return argmax_consistent("bij,bjk->bik", [a, b], values, argmax)


def run(settings: Settings, progress: bool = True) -> Report:
    """Run the selected workloads: check, time, measure memory, judge the goals."""
    s = settings
    reference = load_reference()
    plans = [_plan(w, s, reference) for w in selected(s.only)]
    bar = progress_bar(len(plans) + sum(len(p.memory) for p in plans), progress)
    cases: list[CaseResult] = []
    try:
        for plan in plans:
            bar.set_description_str(f"timing {plan.workload.key}")
            cases.append(_time_case(plan, s, reference))
            bar.update()
        jobs = [(case, name) for case, plan in zip(cases, plans) for name in plan.memory]
        with ThreadPoolExecutor(max_workers=max(1, s.jobs)) as pool:
            futures = {
                pool.submit(
                    measure_peak, case.key, name, case.sizes, s.device, s.memory_timeout_s
                ): (case, name)
                for case, name in jobs
            }
            for fut in as_completed(futures):
                case, name = futures[fut]
                bar.set_description_str(f"memory {case.key} {name}")
                r = case.contenders[name]
                r.peak_bytes, r.memory_note = fut.result()
                bar.update()
    finally:
        bar.close()
    for case, plan in zip(cases, plans):
        case.goals = [_judge(g, case) for g in plan.workload.goals]
    meta = {
        "preset": s.preset,
        "device": s.device,
        "rounds": s.rounds,
        "budget_s": s.budget_s,
        "memory": s.memory,
        "skip_slow_reference": s.skip_slow_reference,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "reference": reference_version(reference),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return Report(meta, cases, {"viterbi argmax (windows of 2)": _viterbi_ties_ok()})


def _time_case(plan: _CasePlan, s: Settings, reference: ModuleType | None) -> CaseResult:
    """Check and time one workload (memory is measured afterwards)."""
    w, sizes = plan.workload, plan.sizes
    inputs = make_inputs(w, sizes, s.device)
    expected = oracle(w, inputs)
    calls = {
        name: make_call(contender_function(w, name, reference), inputs, w.mode)
        for name in plan.contenders
    }
    timings, outputs = time_interleaved(calls, s.rounds, s.budget_s, s.device)
    results = {name: ContenderResult(name, note=why) for name, why in plan.skipped.items()}
    for name in plan.contenders:
        t = timings[name]
        results[name] = ContenderResult(
            name, t.median_ms, len(t.samples), max_error(outputs[name], expected)
        )
    error = max_error(outputs[OURS], expected)
    argmax_ok = None
    if w.semiring == "viterbi":
        values, argmax = outputs[OURS][:2]
        argmax_ok = argmax_consistent(w.equation, inputs, values, argmax)
    return CaseResult(
        key=w.key,
        title=w.title(sizes),
        semiring=w.semiring,
        equation=w.equation,
        mode=w.mode,
        sizes=sizes,
        max_error=error,
        tolerance=tolerance(w, expected),
        argmax_ok=argmax_ok,
        contenders={name: results[name] for name in CONTENDERS if name in results},
    )


def _judge(goal: Goal, case: CaseResult) -> GoalResult:
    ours, base = case.contenders[OURS], case.contenders.get(goal.baseline)
    if goal.metric == "memory_ratio":
        a = None if ours.peak_bytes is None else float(ours.peak_bytes)
        b = None if base is None or base.peak_bytes is None else float(base.peak_bytes)
    else:
        a, b = ours.median_ms, None if base is None else base.median_ms
    value, met = goal.judge(a, b)
    return GoalResult(goal.text, goal.metric, goal.baseline, goal.target, value, met)


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` if either is unknown or ``b`` is 0."""
    return a / b if a is not None and b else None


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}x"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _time_cell(case: CaseResult, name: str) -> str:
    r, ours = case.contenders[name], case.contenders[OURS]
    if r.median_ms is None:
        return r.note or "-"
    cell = _fmt_ms(r.median_ms)
    ratio = _ratio(ours.median_ms, r.median_ms)
    if name != OURS and ratio is not None:
        cell += f" ({ratio:.2f}x)"
    if r.max_error is not None and math.isinf(r.max_error):
        cell += " WRONG"
    return cell


def _memory_cell(case: CaseResult, name: str) -> str:
    r, ours = case.contenders[name], case.contenders[OURS]
    if r.peak_bytes is None:
        return r.memory_note or (r.note if r.median_ms is None else "-")
    cell = f"{r.peak_bytes / 2**20:.1f}"
    ratio = _ratio(ours.peak_bytes, r.peak_bytes)
    if name != OURS and ratio is not None:
        cell += f" ({ratio:.2f}x)"
    return cell


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(n) for h, n in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * n for n in widths))
    lines += ["  ".join(c.ljust(n) for c, n in zip(row, widths)).rstrip() for row in rows]
    return lines


def format_report(report: Report) -> str:
    """The report as plain-text tables: times, memory, goals, checks."""
    m = report.meta
    names = [n for n in CONTENDERS if any(n in c.contenders for c in report.cases)]
    lines = [
        f"semiring_einsum benchmark: preset {m['preset']}, device {m['device']}, "
        f"torch {m['torch']}, {m['threads']} threads, reference "
        + (f"torch-semiring-einsum {m['reference']}" if m["reference"] else "not installed"),
    ]
    if m["preset"] != "full":
        lines.append(
            "  (sizes scaled down: the goals are stated for the full sizes, "
            "`python -m semiring_einsum --full`)"
        )
    lines += [
        "",
        "Time: median ms over interleaved rounds; (Nx) = ours / that contender; "
        "WRONG = disagrees with the float64 oracle",
    ]
    rows = []
    for c in report.cases:
        check = "ok" if c.ok else "FAIL"
        cells = [_time_cell(c, n) if n in c.contenders else "" for n in names]
        rows.append([c.title, f"{check} {c.max_error:.1e}", *cells])
    lines += _table(["workload", "check (err)", *names], rows)
    if any(r.peak_bytes is not None for c in report.cases for r in c.contenders.values()):
        how = "max_memory_allocated" if m["device"] == "cuda" else "ru_maxrss"
        lines += [
            "",
            f"Peak extra memory: MiB ({how} growth in a fresh subprocess per case x "
            "contender); (Nx) = ours / that contender",
        ]
        rows = [
            [c.title, *[_memory_cell(c, n) if n in c.contenders else "" for n in names]]
            for c in report.cases
        ]
        lines += _table(["workload", *names], rows)
    goal_rows = []
    for c in report.cases:
        for g in c.goals:
            if g.value is None:
                measured, status = "-", "not measured"
            else:
                measured = _fmt_ratio(g.value)
                status = "met" if g.met else "NOT MET"
            goal_rows.append([c.title, g.text, measured, status])
    if goal_rows:
        lines += ["", "Goals (ratio = ours / baseline; speedup = baseline / ours)"]
        lines += _table(["workload", "goal", "measured", "status"], goal_rows)
        met = sum(1 for c in report.cases for g in c.goals if g.met)
        scaled = "" if m["preset"] == "full" else " at these scaled-down sizes (indicative only)"
        lines.append(f"{met} of {len(goal_rows)} goals met{scaled}")
    lines.append("")
    for name, ok in report.checks.items():
        lines.append(f"check {name}: {'ok' if ok else 'FAIL'}")
    lines.append("self-check: " + ("ok" if report.ok else "FAILED: " + ", ".join(report.failures)))
    return "\n".join(lines)


def _jsonable(x: float | None) -> float | str | None:
    if x is not None and not math.isfinite(x):
        return str(x)  # JSON has no inf/nan
    return x


def report_to_json(report: Report) -> dict[str, Any]:
    """The report as a JSON-serialisable dict (``inf``/``nan`` become strings)."""
    cases = []
    for c in report.cases:
        contenders = {
            name: {
                "median_ms": r.median_ms,
                "rounds": r.rounds,
                "time_ratio": _ratio(c.contenders[OURS].median_ms, r.median_ms),
                "max_error": _jsonable(r.max_error),
                "peak_bytes": r.peak_bytes,
                "memory_ratio": _ratio(c.contenders[OURS].peak_bytes, r.peak_bytes),
                "note": r.note,
                "memory_note": r.memory_note,
            }
            for name, r in c.contenders.items()
        }
        cases.append(
            {
                "key": c.key,
                "title": c.title,
                "semiring": c.semiring,
                "equation": c.equation,
                "mode": c.mode,
                "sizes": c.sizes,
                "check": {
                    "ok": c.ok,
                    "max_error": _jsonable(c.max_error),
                    "tolerance": c.tolerance,
                    "argmax_ok": c.argmax_ok,
                },
                "contenders": contenders,
                "goals": [
                    {
                        "text": g.text,
                        "metric": g.metric,
                        "baseline": g.baseline,
                        "target": g.target,
                        "value": _jsonable(g.value),
                        "met": g.met,
                    }
                    for g in c.goals
                ],
            }
        )
    return {
        "meta": report.meta,
        "cases": cases,
        "checks": report.checks,
        "ok": report.ok,
        "failures": report.failures,
    }


def write_json(report: Report, path: str) -> None:
    """Write :func:`report_to_json` to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report_to_json(report), f, indent=2)
        f.write("\n")


def write_plot(report: Report, path: str) -> str | None:
    """Plot each case to a PNG: time ratios (left), peak extra memory (right).

    Left: ours / contender median time per baseline, log scale, with a tick
    at each time goal's threshold on the bar it concerns.  Right: every
    contender's peak extra memory in MiB (symmetric-log scale, so 0 shows).

    Returns:
        ``None`` on success, else why no plot was written (e.g. matplotlib
        is not installed).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written"
    cases = report.cases
    baselines = [n for n in CONTENDERS if n != OURS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 1.0 + 0.55 * len(cases)), sharey=True)

    def offset(j: int, count: int) -> float:
        return (j - (count - 1) / 2) * 0.8 / count

    height = 0.8 / len(baselines)
    for j, name in enumerate(baselines):
        ys, xs = [], []
        for i, c in enumerate(cases):
            r = c.contenders.get(name)
            ratio = _ratio(c.contenders[OURS].median_ms, None if r is None else r.median_ms)
            if ratio is not None:
                ys.append(i + offset(j, len(baselines)))
                xs.append(ratio)
            for g in c.goals:
                if g.baseline == name and g.metric != "memory_ratio":
                    target = 1 / g.target if g.metric == "speedup" else g.target
                    left.plot([target], [i + offset(j, len(baselines))], "k|", markersize=12)
        if xs:  # an empty bar set would still take a (wrongly coloured) legend entry
            left.barh(ys, xs, height=height, label=name, color=f"C{j + 1}")
    left.axvline(1.0, color="grey", linewidth=0.8)
    left.set_xscale("log")
    left.set_xlabel("median time, ours / contender (log; < 1: ours faster; | = goal)")
    height = 0.8 / len(CONTENDERS)
    for j, name in enumerate(CONTENDERS):
        ys, xs = [], []
        for i, c in enumerate(cases):
            r = c.contenders.get(name)
            if r is not None and r.peak_bytes is not None:
                ys.append(i + offset(j, len(CONTENDERS)))
                xs.append(r.peak_bytes / 2**20)
        if xs:
            right.barh(ys, xs, height=height, label=name, color=f"C{j}")
    right.set_xscale("symlog", linthresh=1.0)
    right.set_xlabel("peak extra memory, MiB (fresh subprocess per contender)")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:  # memory may not have been measured
            ax.legend(fontsize="small")
    left.set_yticks(range(len(cases)))
    left.set_yticklabels([c.key for c in cases])
    left.invert_yaxis()
    m = report.meta
    fig.suptitle(f"semiring_einsum: preset {m['preset']}, {m['device']}, torch {m['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
