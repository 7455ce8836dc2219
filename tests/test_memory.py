"""Memory bounds (DESIGN §3.1 "Budgets"), observed op by op.

A :class:`TorchDispatchMode` records the bytes of every tensor that every
aten op returns while a contraction (and its backward) runs.  With
``block_size=AutomaticBlockSize(max_cpu_bytes=B)`` no recorded tensor may be
larger than ``B`` bytes, except tensors the size of an input or of the output
(which DESIGN §3.1 does not count) and the int64 argmax of ``viterbi_einsum``.
A second mode follows the *live* temporaries (a storage is live from the op that
makes it until the last tensor on it is freed): their peak must stay within a
few budgets, so windows are freed as the loop goes, not kept.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from semiring_einsum import func

Tensor = torch.Tensor

BUDGET = 16 * 1024  # bytes: far below every joint space below, so many windows are needed
BLOCK = func.AutomaticBlockSize(max_cpu_bytes=BUDGET)


class TensorSizeRecorder(TorchDispatchMode):
    """Record ``(op, numel, bytes, dtype)`` for every tensor output of every op.

    Outputs of view ops are recorded too (``view``) so that a failure message
    can say whether a tensor was a fresh allocation; views of inputs have an
    input's numel and are allowed by that rule anyway.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, int, torch.dtype, bool]] = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = op(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                nbytes = t.numel() * t.element_size()
                self.records.append((str(op), t.numel(), nbytes, t.dtype, op.is_view))
        return out

    def offenders(self, limit: int, allowed_numels: set[int]) -> list[tuple[object, ...]]:
        return [r for r in self.records if r[2] > limit and r[1] not in allowed_numels]


class LiveBytesRecorder(TorchDispatchMode):
    """The peak, over a forward call, of the bytes of all live storages that ops made.

    Each op output's storage is counted once, from the op that makes it until the
    last Python tensor on it is freed (views share their base's storage).  Only for
    calls that record no autograd graph: storages that autograd saves outlive their
    Python tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[int, int] = {}  # storage address -> live tensors on it
        self.sizes: dict[int, int] = {}  # storage address -> bytes
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = op(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not storage.nbytes():
            return
        if key not in self.tensors:
            self.tensors[key] = 0
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.tensors[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.tensors[key] -= 1
        if not self.tensors[key]:
            del self.tensors[key]
            self.live -= self.sizes.pop(key)


def _inputs(shapes: Sequence[tuple[int, ...]], requires_grad: bool = False) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(s, generator=g, dtype=torch.float32).requires_grad_(requires_grad)
        for s in shapes
    ]


def _allowed(xs: Sequence[Tensor], outs: Sequence[Tensor]) -> set[int]:
    return {x.numel() for x in xs} | {o.numel() for o in outs}


def _einsum_joint(eq: str, *xs: Tensor) -> Tensor:
    return func.einsum(eq, *xs, block_size=BLOCK, optimize=False)


def _log(eq: str, *xs: Tensor) -> Tensor:
    return func.log_einsum(eq, *xs, block_size=BLOCK)


def _log_joint(eq: str, *xs: Tensor) -> Tensor:
    return func.log_einsum(eq, *xs, block_size=BLOCK, optimize=False)


def _max(eq: str, *xs: Tensor) -> Tensor:
    return func.max_einsum(eq, *xs, block_size=BLOCK)


def _max_joint(eq: str, *xs: Tensor) -> Tensor:
    return func.max_einsum(eq, *xs, block_size=BLOCK, optimize=False)


def _min(eq: str, *xs: Tensor) -> Tensor:
    return func.min_einsum(eq, *xs, block_size=BLOCK)


def _viterbi_values(eq: str, *xs: Tensor) -> Tensor:
    return func.viterbi_einsum(eq, *xs, block_size=BLOCK)[0]


PLAIN = func.Semiring(
    "plain", torch.add, torch.mul, lambda x, dims: x.sum(dims) if dims else x, 0.0, 1.0
)


def _custom(eq: str, *xs: Tensor) -> Tensor:
    return func.semiring_einsum(PLAIN, eq, *xs, block_size=BLOCK)


CASES = {
    "batched": ("bij,bjk->bik", [(4, 24, 24), (4, 24, 24)]),
    "chain3": ("ab,bc,cd->ad", [(32, 32), (32, 32), (32, 32)]),
}


def _entropy(eq: str, *xs: Tensor) -> Tensor:
    return func.entropy_einsum(eq, *xs, block_size=BLOCK)[1]


def _expectation(eq: str, *xs: Tensor) -> Tensor:
    return func.expectation_einsum(eq, xs, xs, block_size=BLOCK)[1]


def _vector_semiring(eq: str, *xs: Tensor) -> Tensor:
    pairs = [torch.stack([x, x], dim=-1) for x in xs]
    return func.semiring_einsum(func.EXPECTATION, eq, *pairs, block_size=BLOCK)


def _several_outputs(eq: str, *xs: Tensor) -> Tensor:
    lhs = eq.split("->")[0]
    return func.log_einsum(f"{lhs}->{eq.split('->')[1]},{lhs}", *xs, block_size=BLOCK)[0]


def _sample(eq: str, *xs: Tensor) -> Tensor:
    return func.sample_einsum(eq, *xs, num_samples=2, block_size=BLOCK)


FUNCTIONS: dict[str, tuple[Callable[..., Tensor], func.Semiring, object]] = {
    # name: (call, semiring for plan(), optimize for plan())
    "einsum_joint": (_einsum_joint, func.REAL, False),
    "log_einsum": (_log, func.LOG, "auto"),
    "log_einsum_joint": (_log_joint, func.LOG, False),
    "max_einsum": (_max, func.MAX_PLUS, "auto"),
    "max_einsum_joint": (_max_joint, func.MAX_PLUS, False),
    "min_einsum": (_min, func.MIN_PLUS, "auto"),
    "viterbi_einsum": (_viterbi_values, func.MAX_PLUS, "auto"),
    "custom_semiring": (_custom, PLAIN, "auto"),
    "entropy_einsum": (_entropy, func.LOG, "auto"),
    "expectation_einsum": (_expectation, func.LOG, "auto"),
    "several_outputs": (_several_outputs, func.LOG, "auto"),
}


def _joint_bytes(eq: str, shapes: Sequence[tuple[int, ...]]) -> int:
    sizes: dict[str, int] = {}
    for term, shape in zip(eq.split("->")[0].split(","), shapes):
        sizes.update(zip(term, shape))
    return 4 * math.prod(sizes.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_cases_need_many_windows(case: str) -> None:
    eq, shapes = CASES[case]
    assert _joint_bytes(eq, shapes) >= 8 * BUDGET


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_forward_tensors_within_budget(name: str, case: str) -> None:
    fn, _, _ = FUNCTIONS[name]
    eq, shapes = CASES[case]
    xs = _inputs(shapes)
    rec = TensorSizeRecorder()
    with rec:
        out = fn(eq, *xs)
    assert rec.records, "the recorder saw no ops"
    bad = rec.offenders(BUDGET, _allowed(xs, [out]))
    assert not bad, f"{name} on {eq!r}: tensors over {BUDGET} bytes: {bad[:5]}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_viterbi_tensors_within_budget(case: str) -> None:
    eq, shapes = CASES[case]
    xs = _inputs(shapes)
    rec = TensorSizeRecorder()
    with rec:
        values, argmax = func.viterbi_einsum(eq, *xs, block_size=BLOCK)
    assert argmax.dtype == torch.int64
    bad = rec.offenders(BUDGET, _allowed(xs, [values, argmax]))
    assert not bad, f"viterbi_einsum on {eq!r}: tensors over {BUDGET} bytes: {bad[:5]}"


BACKWARD = [
    "einsum_joint",
    "log_einsum",
    "log_einsum_joint",
    "max_einsum",
    "max_einsum_joint",
    "min_einsum",
    "custom_semiring",
]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", BACKWARD)
def test_backward_tensors_within_budget(name: str, case: str) -> None:
    fn, _, _ = FUNCTIONS[name]
    eq, shapes = CASES[case]
    xs = _inputs(shapes, requires_grad=True)
    rec = TensorSizeRecorder()
    with rec:
        out = fn(eq, *xs)
        n_forward = len(rec.records)
        out.backward(torch.ones_like(out))
    assert all(x.grad is not None for x in xs)
    assert len(rec.records) > n_forward + len(xs), "the mode did not see the backward"
    bad = rec.offenders(BUDGET, _allowed(xs, [out]))
    assert not bad, f"{name} backward on {eq!r}: tensors over {BUDGET} bytes: {bad[:5]}"


@pytest.mark.parametrize("fn", [func.log_einsum, func.max_einsum])
def test_recorder_sees_oversized_windows(fn: Callable[..., Tensor]) -> None:
    """Sanity check of the harness: with the default 1 GiB budget the joint
    window of 'ab,bc,cd->ad' (32**4 floats = 4 MiB) is recorded as an offender."""
    eq, shapes = CASES["chain3"]
    xs = _inputs(shapes)
    rec = TensorSizeRecorder()
    with rec:
        out = fn(eq, *xs, optimize=False)
    assert rec.offenders(BUDGET, _allowed(xs, [out]))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_plan_estimate_within_budget(name: str, case: str) -> None:
    _, semiring, optimize = FUNCTIONS[name]
    eq, shapes = CASES[case]
    p = func.plan(eq, *shapes, semiring=semiring, block_size=BLOCK, optimize=optimize)
    assert p.peak_bytes <= BUDGET
    # and the windows really are cut: some summed index is split
    size = p.contraction.size
    assert any(w < size[c] for bs in p.block_sizes for c, w in bs.items())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    "semiring,optimize",
    [
        (func.REAL, False),
        (func.REAL, "auto"),
        (func.LOG, "auto"),
        (func.LOG, False),
        (func.MAX_PLUS, False),
        (func.MIN_PLUS, "greedy"),
        (PLAIN, "auto"),
    ],
)
def test_int_block_size_one_gives_unit_windows(
    case: str, semiring: func.Semiring, optimize: object
) -> None:
    eq, shapes = CASES[case]
    p = func.plan(eq, *shapes, semiring=semiring, block_size=1, optimize=optimize)
    assert p.block_sizes
    assert all(p.block_sizes), "every step of these equations sums some index"
    for bs in p.block_sizes:
        assert set(bs.values()) == {1}, p.block_sizes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [func.log_einsum, func.max_einsum], ids=["log", "max"])
def test_other_dtypes_within_budget(fn: Callable[..., Tensor], dtype: torch.dtype) -> None:
    """The budget is in bytes of the accumulation dtype (float32 for 16-bit inputs).

    48 KiB: above the float64 output (18 KiB), so the budget is attainable,
    and far below the joint space (442 KiB in float64).
    """
    budget = 48 * 1024
    block = func.AutomaticBlockSize(max_cpu_bytes=budget)
    eq, shapes = CASES["batched"]
    xs = [x.to(dtype).requires_grad_() for x in _inputs(shapes)]
    rec = TensorSizeRecorder()
    with rec:
        out = fn(eq, *xs, block_size=block)
        out.backward(torch.ones_like(out))
    bad = rec.offenders(budget, _allowed(xs, [out]))
    assert not bad, f"{dtype}: tensors over {budget} bytes: {bad[:5]}"
    itemsize = 4 if dtype in (torch.float16, torch.bfloat16) else dtype.itemsize
    p = func.plan(eq, *xs, semiring=func.LOG, block_size=block)
    assert p.itemsize == itemsize
    assert p.peak_bytes <= budget
    assert any(w < p.contraction.size[c] for bs in p.block_sizes for c, w in bs.items())


@pytest.mark.parametrize("extent", [1, 5])
def test_int_block_size_caps_window_tensors(extent: int) -> None:
    """An int block_size bounds every window: output dims times extent**summed."""
    eq, shapes = CASES["chain3"]
    xs = _inputs(shapes, requires_grad=True)
    rec = TensorSizeRecorder()
    with rec:
        out = func.log_einsum(eq, *xs, block_size=extent, optimize=False)
        out.backward(torch.ones_like(out))
    out_bytes = out.numel() * out.element_size()
    limit = out_bytes * extent**2  # two summed indices, b and c
    bad = rec.offenders(limit, _allowed(xs, [out]))
    assert not bad, f"block_size={extent}: tensors over {limit} bytes: {bad[:5]}"


# Window-sized temporaries a kernel keeps at once (a window, its mask or weights, a
# running result...): the live peak may hold this many budgets, plus the tensors the
# budget does not count (input-sized copies, results and intermediates).
LIVE_WINDOWS = 4


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_live_temporaries_peak_within_budget(name: str, case: str) -> None:
    fn, semiring, optimize = FUNCTIONS[name]
    eq, shapes = CASES[case]
    xs = _inputs(shapes)
    plan = func.plan(eq, *shapes, semiring=semiring, block_size=BLOCK, optimize=optimize)
    sized = sum(x.numel() * x.element_size() for x in xs)  # copies of inputs, at most
    results = sum(  # every step's result (int64 argmax beside each, for Viterbi)
        12 * math.prod(s.size[c] for c in s.output) for s in plan.steps
    )
    gc.collect()
    rec = LiveBytesRecorder()
    with rec:
        out = fn(eq, *xs)
    del out
    bound = LIVE_WINDOWS * BUDGET + sized + results
    assert rec.peak, "the recorder saw no allocation"
    assert rec.peak <= bound, f"{name} on {eq!r}: live peak {rec.peak} > {bound}"


def test_live_recorder_sees_windows_kept_alive() -> None:
    """Sanity check of the harness: a loop that keeps every window exceeds the bound."""
    eq, shapes = CASES["chain3"]
    xs = _inputs(shapes)
    rec = LiveBytesRecorder()
    with rec:
        kept = [x.unsqueeze(-1) + xs[1] for x in xs[0].split(4)]  # the whole joint space
    assert rec.peak >= 8 * BUDGET
    del kept


def test_vector_semiring_live_peak_counts_its_operations() -> None:
    """A semiring with element dimensions stays within windows too.

    Its windows carry the element dims (the planner counts them), and its own
    operations make their temporaries per window: the expectation semiring's
    ⊕-reduce makes about four half-window tensors (the shifted log weights, their
    exponentials, the masked weights, the weighted values) beside the window
    itself, so the bound allows twice the kernels' LIVE_WINDOWS.
    """
    eq, shapes = CASES["chain3"]
    xs = _inputs(shapes)
    plan = func.plan(eq, *[s + (2,) for s in shapes], semiring=func.EXPECTATION, block_size=BLOCK)
    assert plan.steps[0].windows[0][1] < 32  # really windowed
    sized = 2 * sum(x.numel() * x.element_size() for x in xs)  # the stacked pairs
    results = sum(8 * math.prod(s.size[c] for c in s.output) for s in plan.steps)
    pairs = [torch.stack([x, x], dim=-1) for x in xs]
    gc.collect()
    rec = LiveBytesRecorder()
    with rec:
        out = _vector_semiring(eq, *xs)
    del out
    bound = 2 * LIVE_WINDOWS * BUDGET + sized + results
    assert rec.peak <= bound, f"live peak {rec.peak} > {bound}"
    del pairs


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_live_peak_is_windows_plus_row_indices(case: str) -> None:
    """Sampling keeps windows of candidates within the budget; besides them it holds one
    int64 per (cell, sample) row for every index (the output's coordinates, the indices
    drawn) and per operand (its row offsets): the result's own size, not counted."""
    eq, shapes = CASES[case]
    xs = _inputs(shapes)
    plan = func.plan(eq, *shapes, semiring=func.LOG, block_size=BLOCK)
    samples = 2
    out_cells = math.prod(plan.contraction.size[c] for c in plan.contraction.output)
    rows = out_cells * samples
    indices = len(plan.contraction.size) + len(xs) + 2  # coordinates, offsets, a stack
    sized = sum(x.numel() * x.element_size() for x in xs)
    results = sum(4 * math.prod(s.size[c] for c in s.output) for s in plan.steps)
    gc.collect()
    rec = LiveBytesRecorder()
    with rec:
        out = _sample(eq, *xs)
    del out
    bound = LIVE_WINDOWS * BUDGET + sized + results + 8 * rows * indices
    assert rec.peak <= bound, f"live peak {rec.peak} > {bound}"


def test_clear_caches_forgets_the_free_cuda_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AutomaticBlockSize reads the free CUDA memory once per device and keeps it;
    func.clear_caches() makes every one read it again (AUTOMATIC_BLOCK_SIZE, one of the
    user's, an unpickled copy).  No GPU needed: the query is replaced."""
    import pickle

    from semiring_einsum.func import _budget

    free = [1000]
    monkeypatch.setattr(_budget, "_free_cuda_bytes", lambda device: free[0])
    cuda = torch.device("cuda", 0)
    mine = func.AutomaticBlockSize(cuda_memory_proportion=0.5)
    copied = pickle.loads(pickle.dumps(func.AutomaticBlockSize(cuda_memory_proportion=0.25)))
    func.clear_caches()
    automatic = func.AUTOMATIC_BLOCK_SIZE
    first = [b.budget_bytes(cuda) for b in (automatic, mine, copied)]
    free[0] = 2000
    assert [b.budget_bytes(cuda) for b in (automatic, mine, copied)] == first  # kept
    func.clear_caches()
    again = [b.budget_bytes(cuda) for b in (automatic, mine, copied)]
    assert again == [2 * x for x in first] and again[1:] == [1000, 500]
