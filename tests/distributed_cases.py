"""The distributed test cases, and the worker that runs them on a gloo process group.

``python tests/distributed_cases.py WORLD OUT`` spawns ``WORLD`` processes (gloo on CPU, a
``FileStore`` under ``OUT``: no network), runs every case of that world on DTensor operands
with forward and backward passes under ``CommDebugMode``, and saves rank 0's results (the full
values, argmax and gradients, the placements, the collectives counted) to ``OUT/results.pt``.
``tests/test_distributed.py`` runs it once per world and compares every case with the
single-process answer.  Each case builds its operands from its own seed, the same in the
workers and in the test.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from semiring_einsum import func

Tensor = torch.Tensor

# A user semiring (log-sum-exp from its operations: the generic route) and one with element
# dimensions (the 2 best scores): both combine across ranks by an all-gather and their ⊕.
USER_LOG = func.Semiring(
    "user-log",
    torch.logaddexp,
    torch.add,
    lambda x, dims: torch.logsumexp(x, dims) if dims else x,
    -math.inf,
    0.0,
)
KBEST2 = func.kbest_semiring(2)

SEMIRINGS = ("real", "log", "max", "min", "viterbi", "user")


@dataclass(frozen=True)
class Layout:
    """An equation with its operands' placements (see :class:`Case`).

    ``reduced`` and ``gathered`` count the backward collectives DTensor runs to bring the
    gradients back to the operands' placements: an all-reduce for each (operand, mesh
    dimension) where a replicated operand lacks the sharded index (its local gradient is a
    partial sum), an all-gather for each replicated operand that was sliced to its shard.
    """

    name: str
    equation: str
    shapes: tuple[tuple[int, ...], ...]
    placements: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]
    combines: int
    clean: bool = True
    reduced: int = 0
    gathered: int = 0
    brute: bool = True  # one output, small enough for the brute-force oracle
    several: tuple[tuple[str, ...], ...] = ()  # several outputs: each one's placements


M = ((6, 8), (8, 5))
HMM = ((3, 8), (8, 8), (3, 8))
LAYOUTS_1D = [
    Layout("matmul-out", "ij,jk->ik", M, (("S0",), ("R",)), ("S0",), 0, reduced=1),
    Layout("matmul-sum", "ij,jk->ik", M, (("S1",), ("S0",)), ("R",), 1),
    Layout("matmul-sum-slice", "ij,jk->ik", M, (("S1",), ("R",)), ("R",), 1, gathered=1),
    Layout("matmul-conflict", "ij,jk->ik", M, (("S0",), ("S1",)), ("S0",), 0, clean=False),
    Layout("uneven-sum", "ij,jk->ik", ((5, 7), (7, 3)), (("S1",), ("S0",)), ("R",), 1),
    Layout("tiny-sum", "ij,jk->ik", ((4, 3), (3, 2)), (("S1",), ("S0",)), ("R",), 1),
    Layout("hmm-step", "bi,ij,bj->bj", HMM, (("S1",), ("S0",), ("R",)), ("R",), 1, reduced=1),
    Layout("hmm-out", "bi,ij,bj->bj", HMM, (("R",), ("S1",), ("S1",)), ("S1",), 0, reduced=1),
    Layout(
        "cky-rule-x",
        "bsxk,bsyk,xyz->bsz",
        ((2, 3, 8, 2), (2, 3, 6, 2), (8, 6, 4)),
        (("S2",), ("R",), ("S0",)),
        ("R",),
        1,
        reduced=1,
    ),
    Layout(
        "cky-rule-z",
        "bsxk,bsyk,xyz->bsz",
        ((2, 3, 4, 2), (2, 3, 6, 2), (4, 6, 8)),
        (("R",), ("R",), ("S2",)),
        ("S2",),
        0,
        reduced=2,
    ),
    Layout(
        "ellipsis", "...ij,...jk->...ik", ((4, 3, 5), (4, 5, 2)), (("S0",), ("S0",)), ("S0",), 0
    ),
    Layout("diagonal", "ii,ij->j", ((6, 6), (6, 4)), (("R",), ("S0",)), ("R",), 0, clean=False),
    Layout("scalar", "ij,ij->", ((6, 4), (6, 4)), (("S0",), ("S0",)), ("R",), 1),
    Layout("partial-input", "ij,jk->ik", M, (("P",), ("S0",)), ("R",), 1, clean=False),
]

# The summed-sharded layouts that meet the nasty values (-inf, NaN, ties).
NASTY_LAYOUTS = (LAYOUTS_1D[1], LAYOUTS_1D[6])

# 2-D meshes (world 4 as 2 x 2): an output index on one mesh dimension and a summed one on
# the other; two summed indices, one per mesh dimension.
LAYOUTS_2D = [
    Layout(
        "mesh2d-out-sum", "ij,jk->ik", M, (("S0", "S1"), ("R", "S0")), ("S0", "R"), 1, reduced=1
    ),
    Layout(
        "mesh2d-sum-sum",
        "ijk,jkl->il",
        ((3, 4, 6), (4, 6, 2)),
        (("S1", "S2"), ("S0", "S1")),
        ("R", "R"),
        2,
    ),
    # One index sharded over both mesh dimensions (nested shards).
    Layout("mesh2d-nested", "ij,jk->ik", M, (("S1", "S1"), ("S0", "S0")), ("R", "R"), 2),
]
# Several outputs (log Z and the marginals of both factors): one distributed call each.
SEVERAL = Layout(
    "several",
    "ij,jk->,ij,jk",
    M,
    (("S1",), ("S0",)),
    ("R",),
    1,  # j is summed in the first output only
    brute=False,
    several=(("R",), ("S1",), ("S0",)),
)

# A chain of 23 matrices of 8 states: 8**22 assignments of the summed indices, past int64
# ranks, so Viterbi's tie-break between ranks runs column by column.
_CHAIN = "abcdefghijklmnopqrstuvwx"
LONG_CHAIN = Layout(
    "long-chain",
    ",".join(_CHAIN[i : i + 2] for i in range(23)) + "->ax",
    ((8, 8),) * 23,
    (("S1",), ("S0",)) + (("R",),) * 21,
    ("R",),
    1,
    reduced=21,
    brute=False,
)
KBEST_LAYOUTS = [
    Layout("kbest-sum", "ij,jk->ik", ((6, 8, 2), (8, 5, 2)), (("S1",), ("S0",)), ("R",), 1),
    Layout(
        "kbest-out", "ij,jk->ik", ((6, 8, 2), (8, 5, 2)), (("S0",), ("R",)), ("S0",), 0, reduced=1
    ),
]


@dataclass(frozen=True)
class Case:
    """One distributed call: a semiring on a layout, on a mesh, with some data.

    ``data`` is ``'float'``, ``'int'`` (small integers: ties across ranks), ``'neginf'``
    (-inf entries: dead cells), ``'neginf-nancot'`` (the same, with a NaN cotangent at the
    dead cells) or ``'nan'`` (a NaN entry; values only, no gradients).
    """

    name: str
    semiring: str
    layout: Layout
    mesh: tuple[int, ...]
    data: str = "float"

    @property
    def grads(self) -> bool:
        # A user's ⊕ differentiated at its zero (logsumexp of all -inf) gives NaN: where a
        # rank's partial is zero, as where a pairwise plan's intermediate is zero on one
        # device (documented); gradients with -inf data are compared for the built-ins.
        return self.data not in ("nan", "posinf") and not (
            self.semiring == "user" and self.data == "neginf"
        )


# Set (to "1") by conftest.py under --full, read by the spawned worlds too.
FULL = "SEMIRING_EINSUM_DISTRIBUTED_FULL"


def cases(world: int) -> list[Case]:
    """The cases of a world of ``world`` processes.

    The full run (``--full``) runs every case in both worlds.  The default run gives the
    world of 4 only what the world of 2 cannot test, its 2 x 2 meshes: the 1-D layouts and the
    nasty values are the same code on 2 processes and on 4; and the world of 2 meets the
    nasty values on one summed-sharded layout instead of two.
    """
    out = _every_case(world)
    if os.environ.get(FULL) != "1":
        if world == 4:
            out = [case for case in out if len(case.mesh) == 2]
        else:
            second = NASTY_LAYOUTS[1].name
            out = [c for c in out if not (c.layout.name == second and c.data != "float")]
    return out


def _every_case(world: int) -> list[Case]:
    out: list[Case] = []
    layouts = [(lay, (world,)) for lay in LAYOUTS_1D]
    if world == 4:
        layouts += [(lay, (2, 2)) for lay in LAYOUTS_2D]
    for layout, mesh in layouts:
        out += [Case(f"{layout.name}-{s}", s, layout, mesh) for s in SEMIRINGS]
    for layout in NASTY_LAYOUTS:
        for semiring, data in [
            ("max", "int"),
            ("min", "int"),
            ("viterbi", "int"),
            ("minviterbi", "int"),
            ("log", "neginf"),
            ("max", "neginf"),
            ("viterbi", "neginf"),
            ("user", "neginf"),
            ("log:uniform", "neginf"),
            ("log:0.5", "neginf"),
            ("log:0.0", "neginf-nancot"),
            ("max", "nan"),
            ("min", "nan"),
            ("viterbi", "nan"),
            ("minviterbi", "nan"),
            ("log", "nan"),
            ("log", "posinf"),
            ("max", "posinf"),
            ("viterbi", "posinf"),
            ("max", "bfloat16"),
            ("viterbi", "bfloat16"),
            ("log", "bfloat16"),
            ("log", "float32"),
        ]:
            name = f"{layout.name}-{semiring}-{data}"
            out.append(Case(name, semiring, layout, (world,), data))
    if world == 4:  # ties across both mesh dimensions; dead cells' uniform weights
        for layout in LAYOUTS_2D[1:]:
            for semiring in ("max", "min", "viterbi", "minviterbi"):
                out.append(Case(f"{layout.name}-{semiring}-int", semiring, layout, (2, 2), "int"))
            name = f"{layout.name}-log:uniform-neginf"
            out.append(Case(name, "log:uniform", layout, (2, 2), "neginf"))
    out += [Case(f"{lay.name}-kbest2", "kbest2", lay, (world,)) for lay in KBEST_LAYOUTS]
    out += [
        Case(f"several-{s}", s, SEVERAL, (world,)) for s in ("real", "log", "max", "min", "user")
    ]
    # Dyadic values: sums exact in any order (the local plan may associate them differently
    # from one process's), ties unlikely.
    out += [Case(f"long-chain-{s}", s, LONG_CHAIN, (world,), "dyadic") for s in ("max", "viterbi")]
    # Ties across ranks past int64 ranks: max's backward breaks them column by column.
    out.append(Case("long-chain-max-int", "max", LONG_CHAIN, (world,), "int"))
    return out


def is_viterbi(case: Case) -> bool:
    """Whether the case's function returns values and an argmax."""
    return case.semiring in ("viterbi", "minviterbi")


def operands(case: Case) -> list[Tensor]:
    """The case's full operands (float64), the same in every process."""
    seed = sum(map(ord, case.name)) * 7919 % 2**31
    g = torch.Generator().manual_seed(seed)
    xs = []
    for shape in case.layout.shapes:
        if case.data == "int":
            x = torch.randint(-2, 3, shape, generator=g).double()
        elif case.data == "dyadic":
            x = torch.randint(-(2**20), 2**20, shape, generator=g).double() / 1024
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64)
        if case.data.startswith("neginf"):
            x = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.4, -math.inf, x)
        xs.append(x)
    if case.semiring == "kbest2":  # each element a sorted list of 2 scores
        xs = [x.sort(-1, descending=True).values for x in xs]
    if case.data == "nan":
        xs[0].view(-1)[1] = math.nan
    if case.data == "posinf":  # +inf terms, tied within a cell and across ranks
        xs[0][1] = math.inf
    if case.data.startswith("neginf") and xs[0].dim() == 2:  # a dead row of the first operand
        xs[0][0] = -math.inf
    if case.data in ("bfloat16", "float32"):  # low precision: the combine widens exactly
        xs = [x.to(getattr(torch, case.data)) for x in xs]
    return xs


def cotangent(case: Case, values: Tensor) -> Tensor:
    """The output gradient: random, but 0 where a max/min/Viterbi cell is all -inf (+inf).

    Such a cell's terms all tie; its gradient goes to one of them, which one following the
    plan (on one device too), so those cells are not compared.
    """
    g = torch.Generator().manual_seed(12345)
    w = torch.randn(values.shape, generator=g, dtype=torch.float64).to(values.dtype)
    if case.semiring in ("max", "min", "viterbi", "minviterbi", "kbest2"):
        w = torch.where(torch.isinf(values), 0.0, w)
    if case.data == "neginf-nancot":  # as a later logsumexp over dead cells sends back
        w = torch.where(torch.isneginf(values), math.nan, w)
    return w


def call(case: Case, xs: list[Any]) -> Any:
    """The case's function on ``xs`` (plain tensors or DTensors)."""
    eq = case.layout.equation
    if case.semiring == "real":
        return func.einsum(eq, *xs)
    if case.semiring.startswith("log"):
        _, _, policy = case.semiring.partition(":")
        weight: float | str = math.nan if not policy else policy
        if policy not in ("uniform", ""):
            weight = float(policy)
        return func.log_einsum(eq, *xs, grad_of_neg_inf=weight)
    if case.semiring == "max":
        return func.max_einsum(eq, *xs)
    if case.semiring == "min":
        return func.min_einsum(eq, *xs)
    if case.semiring == "viterbi":
        return func.viterbi_einsum(eq, *xs)
    if case.semiring == "minviterbi":
        return func.viterbi_einsum(eq, *xs, semiring=func.MIN_PLUS)
    if case.semiring == "user":
        return func.semiring_einsum(USER_LOG, eq, *xs)
    return func.semiring_einsum(KBEST2, eq, *xs)


def _placement(spec: str) -> Any:
    from torch.distributed.tensor import Partial, Replicate, Shard

    if spec == "R":
        return Replicate()
    if spec == "P":
        return Partial()
    return Shard(int(spec[1:]))


def _spec(placement: Any) -> str:
    from torch.distributed.tensor import Partial, Replicate, Shard

    if isinstance(placement, Replicate):
        return "R"
    if isinstance(placement, Partial):
        return "P"
    assert isinstance(placement, Shard)
    return f"S{placement.dim}"


def _counts(mode: Any) -> dict[str, int]:
    return {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items() if n}


def run_case(case: Case, meshes: dict[tuple[int, ...], Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = meshes[case.mesh]
    full = operands(case)
    dts = []
    for x, specs in zip(full, case.layout.placements):
        placements = [_placement(s) for s in specs]
        if "P" in specs:  # a partial sum: every rank holds x / world
            local = x / mesh.size()
            dt = DTensor.from_local(local, mesh, placements, run_check=False)
        else:
            dt = distribute_tensor(x, mesh, placements, src_data_rank=None)
        dts.append(dt.requires_grad_(case.grads))
    leaves = dts
    with CommDebugMode() as forward:
        result = call(case, dts)
    values, argmax = result if is_viterbi(case) else (result, None)
    outputs = list(values) if isinstance(values, tuple) else [values]  # several outputs
    out: dict[str, Any] = {
        "values": [v.full_tensor() for v in outputs],
        "placements": [[_spec(p) for p in v.placements] for v in outputs],
        "forward": _counts(forward),
    }
    if argmax is not None:
        out["argmax"] = argmax.full_tensor()
        out["argmax_placements"] = [_spec(p) for p in argmax.placements]
    if case.grads:
        ws = [
            distribute_tensor(cotangent(case, full), mesh, v.placements, src_data_rank=None)
            for v, full in zip(outputs, out["values"])
        ]
        with CommDebugMode() as backward:
            torch.autograd.backward([v.to_local() for v in outputs], [w.to_local() for w in ws])
        out["backward"] = _counts(backward)
        grads, grad_placements = [], []
        for leaf in leaves:
            assert leaf is not None and leaf.grad is not None
            grads.append(leaf.grad.full_tensor())
            grad_placements.append([_spec(p) for p in leaf.grad.placements])
        out["grads"] = grads
        out["grad_placements"] = grad_placements
    return out


def _worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    store = os.path.join(out, "store")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        meshes = {(world,): init_device_mesh("cpu", (world,))}
        if world == 4:
            meshes[(2, 2)] = init_device_mesh("cpu", (2, 2))
        results: dict[str, Any] = {}
        for case in cases(world):
            try:
                results[case.name] = run_case(case, meshes)
            except Exception:  # reported by the test for this case
                results[case.name] = {"error": traceback.format_exc()}
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(world: int, out: str) -> None:
    """Run every case of ``world`` processes; ``OUT/status`` says ``ok`` or the error, last."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    status = "ok"
    try:
        mp.spawn(_worker, args=(world, out), nprocs=world, join=True)
    except BaseException:
        status = traceback.format_exc()
        raise
    finally:
        Path(out, "status.tmp").write_text(status)
        Path(out, "status.tmp").rename(Path(out, "status"))  # atomic: readers see it whole


# The folder the test session shares between its pytest-xdist workers (set by conftest.py).
FOLDER = "SEMIRING_EINSUM_DISTRIBUTED_RUNS"


# The runs this process started (kept: a Popen collected while running warns).
_RUNNING: list[subprocess.Popen[bytes]] = []


def shared_folder() -> Path:
    """Where this test session's distributed runs write (one per world size)."""
    return Path(os.environ[FOLDER])


def launch(world: int, root: Path) -> bool:
    """Start the run of ``world`` processes in the background, once per ``root``.

    Returns whether this call started it (another pytest-xdist worker may have).
    """
    out = root / f"world{world}"
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        return False
    with open(out / "stderr", "w") as stderr:
        run = subprocess.Popen(
            [sys.executable, __file__, str(world), str(out)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    _RUNNING.append(run)
    (out / "pid").write_text(str(run.pid))  # for stop_all, in whichever process ends last
    return True


def stop_all(root: Path) -> None:
    """End every run started under ``root`` that is still going, with its spawned ranks.

    Called when the test session ends (by its first process, after every xdist worker):
    a run whose tests were not selected, or that hung, would otherwise outlive it.
    """
    if not hasattr(os, "killpg"):  # (not on Windows)
        return
    for pid_file in root.glob("world*/pid"):
        if (pid_file.parent / "status").exists():
            continue  # it finished (and its process group may be gone, its id reused)
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGKILL)  # its own session: the run and its ranks
        except (ProcessLookupError, PermissionError):
            pass  # finished already


def results(world: int, root: Path, timeout: float = 900.0) -> dict[str, Any]:
    """The results of the run of ``world`` processes (started here if nobody has)."""
    launch(world, root)
    out = root / f"world{world}"
    deadline = time.monotonic() + timeout
    while not (out / "status").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {world}-process run did not finish in {timeout} s")
        time.sleep(0.2)
    status = (out / "status").read_text()
    if status != "ok":
        stderr = (out / "stderr").read_text()
        raise RuntimeError(f"the {world}-process run failed:\n{status}\n{stderr[-4000:]}")
    loaded: dict[str, Any] = torch.load(out / "results.pt", weights_only=False)
    return loaded


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(int(sys.argv[1]), sys.argv[2])
