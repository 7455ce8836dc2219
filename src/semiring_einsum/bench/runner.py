"""Running the workloads: settings, presets, progress, results and self-checks.

:func:`run` checks every selected workload against the float64 oracle (and
the Viterbi argmax for consistency), times the contenders
(:func:`~semiring_einsum.bench.measure.time_interleaved`) and, as the
settings ask, measures peak memory in subprocesses
(:func:`~semiring_einsum.bench.measure.measure_peak`).  The result is a
:class:`Report`; :mod:`semiring_einsum.bench.report` prints and saves it.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal, NamedTuple, Protocol

import torch

from .. import func
from .measure import measure_peak, time_interleaved
from .workloads import (
    CONTENDERS,
    NAIVE,
    NAIVE_MAX_BYTES,
    OURS,
    REFERENCE,
    TROPICAL,
    WORKLOADS,
    Workload,
    argmax_consistent,
    contender_function,
    load_reference,
    load_tropical,
    make_call,
    make_inputs,
    max_error,
    oracle,
    reference_version,
    tolerance,
    tropical_applies,
)

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
# Results and running
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
class CaseResult:
    """One workload's outcome: the self-check and every contender."""

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
        """Every self-check passed."""
        return not self.failures


@dataclass(frozen=True)
class Settings:
    """How to run.

    Attributes:
        preset: Which sizes of each workload: ``'quick'``, ``'default'`` or ``'full'``.
        rounds: Most timing rounds per contender.
        budget_s: Time budget per contender and workload (see :func:`time_interleaved`).
        memory: Peak-memory subprocesses for every contender (``'all'``), for
            ours and the reference where the reference is a contender
            (``'reference'``), or none (``'off'``).
        jobs: Memory subprocesses run at once.
        device: ``'cpu'`` or ``'cuda'``.
        skip_slow_reference: Leave the reference out where ``slow_reference``.
        memory_timeout_s: Give up on one memory subprocess after this long.
        only: Run only workloads whose key contains one of these.
    """

    preset: str = "default"
    rounds: int = 5
    budget_s: float = 0.3
    memory: Literal["all", "reference", "off"] = "reference"
    jobs: int = 2
    device: str = "cpu"
    skip_slow_reference: bool = False
    memory_timeout_s: float = 600.0
    only: tuple[str, ...] = ()


PRESETS: dict[str, Settings] = {
    "quick": Settings(preset="quick", rounds=3, budget_s=0.1, memory="off"),
    "default": Settings(preset="default", rounds=5, budget_s=0.3, memory="reference"),
    "full": Settings(preset="full", rounds=15, budget_s=2.0, memory="all"),
}
"""Settings per preset: ``full`` the largest sizes with every contender's memory
(minutes), ``default`` a scaled-down run (under a minute on two cores), ``quick`` a
smoke test."""


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


def _plan(
    w: Workload, s: Settings, reference: ModuleType | None, tropical: ModuleType | None
) -> _CasePlan:
    """Which contenders run on ``w`` (and why the others do not), which get measured."""
    sizes = dict(w.sizes[s.preset])
    run, skipped = [OURS], {}
    joint_bytes = 4 * math.prod(sizes.values())
    for name in w.contenders:
        if name == REFERENCE and reference is None:
            skipped[name] = "not installed"
        elif name == REFERENCE and w.slow_reference and s.skip_slow_reference:
            skipped[name] = "skipped (--skip-slow-reference)"
        elif name == TROPICAL and tropical is None:
            skipped[name] = "not installed"
        elif name == TROPICAL and not tropical_applies(w):
            skipped[name] = "no such call"
        elif name == NAIVE and joint_bytes > NAIVE_MAX_BYTES:
            skipped[name] = f"skipped (joint tensor {joint_bytes / 2**30:.1f} GiB)"
        else:
            run.append(name)
    if s.memory == "all":
        memory = list(run)
    elif s.memory == "reference" and REFERENCE in w.contenders:
        memory = [name for name in run if name in (OURS, REFERENCE)]
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
    """Run the selected workloads: check, time, measure memory."""
    s = settings
    reference = load_reference()
    tropical = load_tropical()
    plans = [_plan(w, s, reference, tropical) for w in selected(s.only)]
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
