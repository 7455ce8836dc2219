"""The tutorials in ``examples/`` run at small sizes and pass their own checks.

Each example checks its answers against an independent computation (brute force, a textbook
algorithm in plain torch, a Python loop) and exits non-zero on a mismatch; here each one runs
in-process with ``--small``.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_the_tutorials_are_all_there() -> None:
    assert set(NAMES) >= {
        "hmm.py",
        "cky.py",
        "shortest_paths.py",
        "per_example_grads.py",
        "custom_semiring.py",
        "kbest_hmm.py",
        "kbest_parses.py",
        "entropy_crf.py",
        "sample_parses.py",
        "reachability.py",
        "distributed_cky.py",
    }


# distributed_cky.py spawns two processes (about 24 s): in the full run only.
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.full) if n == "distributed_cky.py" else n for n in NAMES],
)
def test_example_passes_its_own_checks(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = EXAMPLES / name
    monkeypatch.setattr(sys, "argv", [str(path), "--small"])
    with torch.random.fork_rng():
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as stop:  # a failed check
            pytest.fail(f"{name} --small exited with {stop.code!r}")
    out = capsys.readouterr().out
    assert "ok: " in out
    assert "MISMATCH" not in out


@pytest.mark.parametrize("name", NAMES)
def test_a_failed_check_exits_non_zero(name: str) -> None:
    namespace = runpy.run_path(str(EXAMPLES / name))  # not __main__: defines, runs nothing
    with pytest.raises(SystemExit) as stop:
        namespace["check"](False, "a deliberate mismatch")
    assert stop.value.code not in (0, None)
    assert "MISMATCH" in str(stop.value.code)


@pytest.mark.full
def test_examples_run_as_scripts() -> None:
    """One real command line, for the exit status."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "shortest_paths.py"), "--small"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: one graph: Floyd–Warshall" in done.stdout
