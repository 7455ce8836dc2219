"""Benchmark harness behind ``python -m semiring_einsum``: our functions against baselines.

Split by concern: :mod:`~semiring_einsum.bench.workloads` (the workloads, their
inputs, the float64 oracle and the contenders), :mod:`~semiring_einsum.bench.measure`
(interleaved timing, peak memory in a fresh subprocess),
:mod:`~semiring_einsum.bench.runner` (settings, running the cases, the self-checks)
and :mod:`~semiring_einsum.bench.report` (tables, JSON, an optional plot).  Optional
packages (tqdm, matplotlib, torch-semiring-einsum, tropical-gemm) are imported only when used, and
their absence is reported, never fatal.
"""

from .report import format_report, format_table, jsonable, report_to_json, write_json, write_plot
from .runner import (
    PRESETS,
    CaseResult,
    ContenderResult,
    Report,
    Settings,
    run,
    selected,
)
from .workloads import (
    CONTENDERS,
    NAIVE,
    OURS,
    REFERENCE,
    TORCH,
    TRICK,
    TROPICAL,
    WORKLOADS,
    Workload,
    workload,
)

__all__ = [
    "CONTENDERS",
    "OURS",
    "TORCH",
    "TRICK",
    "NAIVE",
    "REFERENCE",
    "TROPICAL",
    "Workload",
    "WORKLOADS",
    "workload",
    "Settings",
    "PRESETS",
    "ContenderResult",
    "CaseResult",
    "Report",
    "run",
    "selected",
    "format_report",
    "format_table",
    "jsonable",
    "report_to_json",
    "write_json",
    "write_plot",
]
