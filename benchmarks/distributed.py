"""Distributed contractions (DTensor operands): peak memory per rank and collectives per call.

    python benchmarks/distributed.py [--size 256] [--states 4096] [--worlds 1 2 4] [--rounds 5]
                                     [--malloc fixed|default] [--workloads NAME ...]

The project's goals: with the big operand sharded over ``P`` processes, the peak memory of a
rank is about ``1/P`` of the single-process peak, and each call communicates what the design
says (``src/semiring_einsum/func/_distributed.py``): nothing for a sharded output index; for a
sharded summed index one all-reduce (real, max, min) or two (log: MAX of an int32 image of
the floats then SUM of exp; Viterbi: MAX then MIN of the int64 global rank of the argmax),
each of one element per output element.

Workloads, float32, the big operand sharded on a 1-D mesh of ``P`` processes, the small ones
replicated (built whole on every rank):

* ``cky x log`` / ``cky x viterbi``: the CKY binary-rule step ``bsxk,bsyk,xyz->bsz`` with the
  rule tensor ``xyz`` (``x = y = z = --size``; 256: 64 MiB) sharded on ``x``, a summed index;
  charts ``b=2, s=8, k=4``;
* ``cky z log``: the same rule tensor sharded on ``z``, an output index;
* ``hmm i log``: the HMM step ``bi,ij,bj->bj`` with the transition matrix ``ij``
  (``--states`` squared; 4096: 64 MiB) sharded on ``i``, a summed index; ``b=2``.

Every (workload, P) runs in a fresh set of ``P`` processes (``torch.multiprocessing.spawn``,
gloo over a ``FileStore`` in a temporary folder: no network; one torch thread per rank), so
that no earlier peak hides a later one.  A rank builds only its own shard of the big operand,
slice by slice along the rule's ``x`` (the matrix's ``i``) from a seed per slice, so the global
tensor is the same for every ``P``; it is wrapped with ``DTensor.from_local``.  Each rank
first runs the workload on tiny operands (lazy imports, gloo buffers, first-call caches), then
takes its baseline, builds its shard and runs the forward ``1 + 1 + --rounds`` times (one
plain, one under ``CommDebugMode``, the timed ones).  Row ``1 plain`` is the same call on plain
tensors in one process, the single-device library's own peak.

Columns:

* ``shard MiB``: bytes of the rank's local shard of the big operand;
* ``peak MiB``: the rank's peak resident memory above its baseline, the largest over ranks.
  The peak is the kernel's high-water mark of the resident set, reset at the baseline
  (``echo 5 > /proc/self/clear_refs``, Linux): ``VmHWM`` after the calls minus ``VmRSS`` at the
  baseline.  ``getrusage(RUSAGE_SELF).ru_maxrss`` is the same high-water mark, but it cannot be
  reset and a spawned worker's starts at its parent's peak (Linux carries the mark across
  ``exec``), so its increase (column ``maxrss``) is only a lower bound, exact while the
  baseline is the highest point so far; where ``/proc`` is missing, ``peak MiB`` falls back
  to it;
* ``ratio``: ``peak MiB`` over that of ``P = 1`` (the DTensor route on a one-rank mesh);
  the goal is at most ``1.25 / P``;
* ``fwd ms``: median forward time of the slowest rank (each timed call starts at a barrier).
  With one thread per rank, ``P = 4`` on fewer than 4 cores time-shares them;
* ``collectives``: those of one forward counted by ``CommDebugMode``, with the bytes of each
  one's tensor (``out KiB`` is the size of the rank's output);
* ``vs P=1``: the largest difference of the full output from that of ``P = 1`` (and, for
  Viterbi, the number of argmax entries that differ).

The allocator: glibc's ``malloc`` serves a block above its mmap threshold (128 KiB at start)
with its own ``mmap`` and unmaps it on free, but then raises the threshold to that block's
size (up to 32 MiB), so from the second call on a temporary of that size comes from the heap,
stays resident after it is freed, and with small allocations interleaved the heap can grow by a
second one: the same call's peak then varies by a temporary between runs (here those of
``P = 2`` and ``4``, under 32 MiB; the 64 MiB ones of ``P = 1`` are always mapped).
``--malloc fixed`` (the default) gives the workers ``MALLOC_MMAP_THRESHOLD_=131072`` (unless
it is set already), which fixes the threshold at its starting value, so that every large
tensor is mapped and unmapped and the peak is what the computation holds at once;
``--malloc default`` leaves glibc's dynamic threshold.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor.debug import CommDebugMode

from semiring_einsum import func

Tensor = torch.Tensor
MIB = 2**20


@dataclass(frozen=True)
class Workload:
    """One call: ``function`` on ``equation``, the operand ``big`` sharded on its dim ``dim``.

    ``design`` is the number of collectives of one forward the design prescribes.
    """

    name: str
    function: str
    equation: str
    big: int
    dim: int
    design: int


WORKLOADS = [
    Workload("cky x log", "log", "bsxk,bsyk,xyz->bsz", 2, 0, 2),
    Workload("cky x viterbi", "viterbi", "bsxk,bsyk,xyz->bsz", 2, 0, 2),
    Workload("cky z log", "log", "bsxk,bsyk,xyz->bsz", 2, 2, 0),
    Workload("hmm i log", "log", "bi,ij,bj->bj", 1, 0, 2),
]


@dataclass(frozen=True)
class Sizes:
    """The sizes of the operands: the rule's ``N``, the HMM's states and the charts."""

    size: int
    states: int
    batch: int = 2
    span: int = 8
    k: int = 4


class _Volume(CommDebugMode):
    """``CommDebugMode`` that also records the name and tensor bytes of each collective."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        before = self.get_total_counts()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.get_total_counts() > before:  # a collective on plain (local) tensors
            nbytes = sum(a.numel() * a.element_size() for a in args if isinstance(a, Tensor))
            self.calls.append((str(func._overloadpacket).split(".")[-1], nbytes))
        return out


# -- memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of the resident set to the current one (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_kib() -> int:
    """The process's peak resident set from ``getrusage`` (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- operands ---------------------------------------------------------------------------------


def _chunk(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of ``n`` as ``torch.chunk`` (and ``Shard``) split it."""
    step = -(-n // world)
    start = min(rank * step, n)
    return start, min(start + step, n)


def _rows(shape: tuple[int, ...], start: int, stop: int, seed: int) -> Tensor:
    """Rows ``start:stop`` of a tensor whose row ``r`` is drawn from seed ``seed + r``."""
    out = torch.empty((stop - start, *shape[1:]))
    for r in range(start, stop):
        g = torch.Generator().manual_seed(seed + r)
        out[r - start] = torch.randn(shape[1:], generator=g)
    return out


def _operands(
    w: Workload, sizes: Sizes, rank: int, world: int
) -> tuple[list[Tensor], tuple[int, ...]]:
    """The operands with only this rank's shard of the big one, and the big one's global shape.

    The big operand's row ``r`` (the rule's ``x``, the matrix's ``i``) comes from its own seed;
    a shard on another dim takes its columns from each row, so that only one row of the
    global tensor is ever held beyond the shard.
    """
    g = torch.Generator().manual_seed(1)
    b, n = sizes.batch, sizes.size
    if w.equation.startswith("bsxk"):
        chart = (b, sizes.span, n, sizes.k)
        small = [torch.randn(chart, generator=g), torch.randn(chart, generator=g)]
        shape: tuple[int, ...] = (n, n, n)
    else:
        small = [
            torch.randn(b, sizes.states, generator=g),
            torch.randn(b, sizes.states, generator=g),
        ]
        shape = (sizes.states, sizes.states)
    start, stop = _chunk(shape[w.dim], rank, world)
    if w.dim == 0:
        local = _rows(shape, start, stop, 1000)
    else:
        cut = [slice(None)] * (len(shape) - 1)
        cut[w.dim - 1] = slice(start, stop)
        local_shape = list(shape)
        local_shape[w.dim] = stop - start
        local = torch.empty(local_shape)
        for r in range(shape[0]):
            local[r] = _rows(shape, r, r + 1, 1000)[0][tuple(cut)]
    small.insert(w.big, local)
    return small, shape


def _distribute(xs: list[Tensor], w: Workload, shape: tuple[int, ...], mesh: Any) -> list[Any]:
    """DTensors: the big operand from its local shard, the others replicated."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    out = []
    for k, x in enumerate(xs):
        if k == w.big:
            dt = DTensor.from_local(
                x,
                mesh,
                [Shard(w.dim)],
                run_check=False,
                shape=torch.Size(shape),
                stride=tuple(reversed(strides)),
            )
        else:
            dt = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        out.append(dt)
    return out


def _call(w: Workload, xs: list[Any]) -> Any:
    if w.function == "viterbi":
        return func.viterbi_einsum(w.equation, *xs)
    return func.log_einsum(w.equation, *xs)


# -- one (workload, P) in P processes -----------------------------------------------------------


def _worker(
    rank: int, world: int, w: Workload, sizes: Sizes, rounds: int, plain: bool, out: str
) -> None:
    """One rank: warm up, take the baseline, build the shard, run and measure; save to ``out``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out, 'store')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        mesh = init_device_mesh("cpu", (world,))

        def operands(s: Sizes) -> list[Any]:
            xs, shape = _operands(w, s, rank, world)
            return xs if plain else _distribute(xs, w, shape, mesh)

        tiny = Sizes(size=8, states=16)
        _call(w, operands(tiny))  # lazy imports, gloo buffers, first-call caches
        with _Volume():
            _call(w, operands(tiny))
        gc.collect()
        dist.barrier()
        reset = _reset_peak()
        rss0 = _status_kib("VmRSS")
        maxrss0 = _maxrss_kib()

        xs = operands(sizes)
        big = xs[w.big] if plain else xs[w.big].to_local()
        result = _call(w, xs)
        with _Volume() as volume:
            result = _call(w, xs)
        times = []
        for _ in range(rounds):
            dist.barrier()
            start = time.perf_counter()
            result = _call(w, xs)
            times.append((time.perf_counter() - start) * 1e3)

        hwm, maxrss1 = _status_kib("VmHWM"), _maxrss_kib()
        if reset and hwm is not None and rss0 is not None:
            peak_kib = hwm - rss0
        else:
            peak_kib = maxrss1 - maxrss0
        values, argmax = result if w.function == "viterbi" else (result, None)
        local_out = values if plain else values.to_local()
        record = {
            "shard": big.numel() * big.element_size(),
            "peak_kib": peak_kib,
            "hwm": reset and hwm is not None,
            "maxrss_kib": maxrss1 - maxrss0,
            "ms": statistics.median(times),
            "counts": {str(op).split(".")[-1]: n for op, n in volume.get_comm_counts().items()},
            "calls": volume.calls,
            "out": local_out.numel() * local_out.element_size(),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
        full = values if plain else values.full_tensor()
        full_argmax = argmax if plain or argmax is None else argmax.full_tensor()
        if rank == 0:
            torch.save({"values": full, "argmax": full_argmax}, os.path.join(out, "out.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(w: Workload, world: int, sizes: Sizes, rounds: int, plain: bool) -> dict[str, Any]:
    """Spawn ``world`` fresh processes for one workload; their records, and rank 0's output."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, w, sizes, rounds, plain, out), nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
        output = torch.load(os.path.join(out, "out.pt"))
    return {"ranks": ranks, "output": output}


# -- report -----------------------------------------------------------------------------------


def _collectives(rank: dict[str, Any]) -> str:
    if not rank["calls"]:
        return "none"
    names = sorted({name for name, _ in rank["calls"]})
    kib = "+".join(f"{n / 1024:g}" for _, n in rank["calls"])
    return f"{','.join(names)} x{len(rank['calls'])} ({kib} KiB)"


def _difference(output: dict[str, Any], reference: dict[str, Any] | None) -> str:
    if reference is None:
        return "-"
    diff = (output["values"] - reference["values"]).abs().nan_to_num(nan=math.inf).max().item()
    text = f"{diff:.1e}"
    if output["argmax"] is not None:
        text += f", argmax {int((output['argmax'] != reference['argmax']).sum())} differ"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="CKY rule tensor N (N^3 floats)")
    parser.add_argument("--states", type=int, default=4096, help="HMM states (states^2 floats)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=5, help="timed forward calls")
    parser.add_argument(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="fixed: MALLOC_MMAP_THRESHOLD_=131072 in the workers (see the docstring)",
    )
    parser.add_argument(
        "--workloads", nargs="+", default=[w.name for w in WORKLOADS], metavar="NAME"
    )
    args = parser.parse_args()
    sizes = Sizes(size=args.size, states=args.states)
    if args.malloc == "fixed":  # read by glibc at the workers' start (spawn: a fresh process)
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    command = " ".join(shlex.quote(a) for a in sys.orig_argv)
    print(f"$ {command}")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, 1 thread per rank, float32, "
        f"rule {args.size}^3, HMM {args.states}^2, charts b={sizes.batch} s={sizes.span} "
        f"k={sizes.k}; workers' MALLOC_MMAP_THRESHOLD_="
        f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
        f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}"
    )
    head = ("workload", "P", "shard MiB", "peak MiB", "ratio", "1.25/P", "maxrss", "fwd ms")
    line = "{:<14} {:>7} {:>9} {:>8} {:>6} {:>6} {:>7} {:>8}  {:<36} {:>7}  {}"
    print(line.format(*head, "collectives (bytes each)", "out KiB", "vs P=1"))
    started = time.perf_counter()
    verdicts = []
    fallback = False
    chosen = [w for w in WORKLOADS if w.name in args.workloads]
    for w in chosen:
        runs = [(str(p), p, False) for p in sorted(set(args.worlds))]
        if 1 in args.worlds:  # after P = 1, the reference of the ratio and of the output
            runs.insert(1, ("1 plain", 1, True))
        reference: dict[str, Any] | None = None
        base: float | None = None
        ratios: dict[int, float] = {}
        counts_ok = True
        for label, world, plain in runs:
            got = _run(w, world, sizes, args.rounds, plain)
            ranks, output = got["ranks"], got["output"]
            peak = max(r["peak_kib"] for r in ranks) / 1024
            fallback |= not all(r["hwm"] for r in ranks)
            if world == 1 and not plain:
                base, reference = peak, output
            ratio = peak / base if base else math.nan
            if not plain:
                ratios[world] = ratio
                counts_ok &= world == 1 or all(len(r["calls"]) == w.design for r in ranks)
            print(
                line.format(
                    w.name,
                    label,
                    f"{max(r['shard'] for r in ranks) / MIB:.2f}",
                    f"{peak:.1f}" + ("" if all(r["hwm"] for r in ranks) else "*"),
                    f"{ratio:.2f}",
                    f"{1.25 / world:.2f}",
                    f"{max(r['maxrss_kib'] for r in ranks) / 1024:.1f}",
                    f"{max(r['ms'] for r in ranks):.1f}",
                    _collectives(ranks[0]),
                    f"{ranks[0]['out'] / 1024:g}",
                    _difference(output, reference) if (world > 1 or plain) else "-",
                ),
                flush=True,
            )
        within = [
            f"P={p} {r:.2f} {'<=' if r <= 1.25 / p else '>'} {1.25 / p:.2f}"
            for p, r in ratios.items()
            if p > 1
        ]
        ok = all(r <= 1.25 / p for p, r in ratios.items() if p > 1)
        verdicts.append(
            f"{w.name}: peak ratio within 1.25/P: {'yes' if ok else 'NO'} ({'; '.join(within)}); "
            f"collectives per call = design ({w.design} for P > 1): "
            f"{'yes' if counts_ok else 'NO'}"
        )
    print()
    for v in verdicts:
        print(v)
    if fallback:
        print("* peak from ru_maxrss (no /proc/self/clear_refs): a lower bound")
    print(f"wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
