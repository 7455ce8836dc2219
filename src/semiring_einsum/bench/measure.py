"""Measurement: interleaved timing in this process, peak memory in a fresh one.

* :func:`time_interleaved`: medians over rounds that interleave the
  contenders, in a seeded random order, with a time budget per contender;
* :func:`measure_peak`: peak extra memory of one call, measured in a fresh
  Python subprocess (:func:`memory_child` is its entry point).
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .workloads import (
    REFERENCE,
    Call,
    Tensor,
    contender_function,
    load_reference,
    make_call,
    make_inputs,
    workload,
)


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


_CHILD = "from semiring_einsum.bench.measure import memory_child; memory_child()"
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
    # this file is src/semiring_einsum/bench/measure.py: the child imports from src/
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
