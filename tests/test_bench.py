"""The benchmark harness (``semiring_einsum.bench``), ``python -m semiring_einsum``
and the project's goals (``benchmarks/goals.py``, ``benchmarks/run.py``).

Fast checks of the pieces, never of timings: the baselines agree with brute
force, the report writers produce the documented keys, the command line runs,
the memory subprocess measures something, missing optional packages
(tqdm, matplotlib, torch-semiring-einsum) fall back cleanly, the goals are
judged outside the package, and the package itself says nothing of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import semiring_einsum
from semiring_einsum import bench, func
from semiring_einsum.__main__ import main
from semiring_einsum.bench import measure, runner
from semiring_einsum.bench import report as R
from semiring_einsum.bench import workloads as W

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # benchmarks/run.py imports goals.py from its own folder
goals = importlib.import_module("goals")


def _load_run_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOG_EQUATIONS = sorted({w.equation for w in W.WORKLOADS if w.semiring == "log"})


def _operands(equation: str, size: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    terms, _ = W.parse(equation)
    sizes = {c: size + k for k, c in enumerate(dict.fromkeys("".join(terms)))}
    return [torch.randn([sizes[c] for c in t], generator=g, dtype=torch.float64) for t in terms]


def _quick(only: tuple[str, ...]) -> bench.Settings:
    return bench.Settings(preset="quick", rounds=1, budget_s=0.0, memory="off", jobs=1, only=only)


@pytest.fixture(scope="module")
def report() -> bench.Report:
    return bench.run(_quick(only=("log-bmm", "viterbi-bmm", "real-bmm")), progress=False)


@pytest.mark.parametrize("equation", LOG_EQUATIONS)
def test_trick_matches_brute_force(equation: str) -> None:
    xs = _operands(equation)
    expected = W.brute_force("logsumexp", equation, *xs)
    torch.testing.assert_close(W.log_matmul_exp(equation, *xs), expected)


def test_trick_gradient_matches_brute_force() -> None:
    eq = "bsxk,bsyk,xyz->bsz"
    xs = [x.requires_grad_() for x in _operands(eq, size=3)]
    got = torch.autograd.grad(W.log_matmul_exp(eq, *xs).sum(), xs)
    expected = torch.autograd.grad(W.brute_force("logsumexp", eq, *xs).sum(), xs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_trick_underflows_where_ours_is_exact() -> None:
    eq = "bij,bjk->bik"
    xs = [x * 300.0 for x in _operands(eq, size=16)]
    expected = W.brute_force("logsumexp", eq, *xs)
    assert W.max_error([W.log_matmul_exp(eq, *[x.float() for x in xs])], [expected]) == math.inf
    ours = func.log_einsum(eq, *[x.float() for x in xs])
    assert W.max_error([ours], [expected]) < 1e-2


@pytest.mark.parametrize("reduce", ["sum", "logsumexp", "amax", "amin"])
def test_chunked_brute_force_matches_unchunked(reduce: str) -> None:
    eq = "ab,bc,cd->ad"
    xs = _operands(eq)
    whole = W.brute_force(reduce, eq, *xs)
    torch.testing.assert_close(W.brute_force(reduce, eq, *xs, max_numel=7), whole)
    if reduce == "sum":
        torch.testing.assert_close(whole, torch.einsum(eq, *xs))


def test_argmax_consistent() -> None:
    eq = "bsxk,bsyk,xyz->bsz"
    xs = [x.float() for x in _operands(eq, size=3)]
    values, argmax = func.viterbi_einsum(eq, *xs)
    assert W.argmax_consistent(eq, xs, values, argmax)
    assert not W.argmax_consistent(eq, xs, values, (argmax + 1) % 3)
    assert not W.argmax_consistent(eq, xs, values, argmax[..., :2])


def test_goal_judgement() -> None:
    ratio = goals.Goal("<= 1.3x the trick", "time_ratio", W.TRICK, 1.3)
    assert ratio.judge(1.2, 1.0) == (1.2, True)
    assert ratio.judge(1.4, 1.0) == (1.4, False)
    assert ratio.judge(None, 1.0) == (None, None)
    speedup = goals.Goal(">= 4x faster than the reference", "speedup", W.REFERENCE, 4.0)
    assert speedup.judge(1.0, 5.0) == (5.0, True)
    assert goals.MEMORY_GOAL.judge(0.0, 0.0)[1] is True


def test_time_interleaved_budget() -> None:
    calls = {"fast": lambda: (torch.zeros(1),), "slow": lambda: (torch.ones(1),)}
    timings, outputs = measure.time_interleaved(calls, rounds=3, budget_s=1e9)
    assert [len(t.samples) for t in timings.values()] == [3, 3]
    assert outputs["slow"][0].item() == 1.0
    timings, _ = measure.time_interleaved(calls, rounds=3, budget_s=0.0)
    assert [len(t.samples) for t in timings.values()] == [1, 1]  # over budget: one round


def test_report_keys(report: bench.Report) -> None:
    assert report.ok, report.failures
    data = R.report_to_json(report)
    json.dumps(data)  # serialisable
    assert set(data) == {"meta", "cases", "checks", "ok", "failures"}
    assert {"preset", "device", "torch", "threads", "reference"} <= set(data["meta"])
    case = data["cases"][0]
    assert set(case) == {
        "key",
        "title",
        "semiring",
        "equation",
        "mode",
        "sizes",
        "check",
        "contenders",
    }
    assert set(case["check"]) == {"ok", "max_error", "tolerance", "argmax_ok"}
    assert set(case["contenders"]["ours"]) == {
        "median_ms",
        "rounds",
        "time_ratio",
        "max_error",
        "peak_bytes",
        "memory_ratio",
        "note",
        "memory_note",
    }
    viterbi = next(c for c in data["cases"] if c["key"] == "viterbi-bmm")
    assert viterbi["check"]["argmax_ok"] is True


def test_table(report: bench.Report) -> None:
    text = R.format_report(report)
    for piece in ("workload", "ours", "trick", "naive", "self-check: ok"):
        assert piece in text
    n = len(report.cases)
    assert f"check results against the float64 oracle: ok ({n} of {n} workloads" in text
    assert "check viterbi argmax consistency" in text and "(viterbi-bmm)" in text
    assert "check viterbi argmax (windows of 2): ok" in text
    assert text.splitlines()[-1] == "self-check: ok"
    assert "Peak extra memory" not in text  # memory was off
    assert "goal" not in text.lower()


def test_goals_json_and_table(report: bench.Report) -> None:
    verdicts = goals.judge_report(report)
    data = goals.add_to_json(R.report_to_json(report), report, verdicts)
    json.dumps(data)  # serialisable
    assert set(data["goals"]) == {"met", "total", "not_measured", "summary"}
    case = data["cases"][0]
    goal = case["goals"][0]
    assert set(goal) == {"text", "metric", "baseline", "target", "value", "met"}
    text = goals.format_goals(report, verdicts)
    assert "<= 1.3x the trick" in text
    assert "not measured" in text  # memory was off: the memory goals
    last = text.splitlines()[-1]
    assert re.fullmatch(
        r"\d+ of \d+ goals met at these scaled-down sizes \(indicative only\)", last
    )
    assert data["goals"]["summary"] == last
    marks = goals.plot_marks(report)
    assert ("trick", 1.3) in marks["log-bmm"] and ("reference", 0.25) in marks["viterbi-bmm"]


def test_goals_name_builtin_workloads() -> None:
    keys = {w.key for w in W.WORKLOADS}
    assert set(goals.GOALS) <= keys
    assert keys - set(goals.GOALS) == {"log-adversarial"}  # a self-check only
    for gs in goals.GOALS.values():
        for g in gs:
            assert g.baseline in W.CONTENDERS and g.baseline != W.OURS
    assert sum(len(gs) for gs in goals.GOALS.values()) == 29


def test_package_source_says_nothing_of_goals() -> None:
    package = Path(semiring_einsum.__file__).resolve().parent
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert any(p.parent.name == "bench" for p in files)
    assert not (package / "_bench.py").exists()
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for phrase in ("goals met", "NOT MET", "Goal(", "MEMORY_GOAL", "GoalResult"):
            assert phrase not in text, f"{path} mentions {phrase!r}"
        assert not re.search(r"\bissue\s*#?\d", text, re.I), f"{path} cites an issue number"
    for path in [package / "__main__.py", *(package / "bench").glob("*.py")]:
        assert "goal" not in path.read_text().lower(), f"{path} speaks of goals"


@pytest.mark.full
def test_main_quick_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["meta"]["preset"] == "quick"
    assert {c["key"] for c in data["cases"]} == {w.key for w in W.WORKLOADS}
    assert "goals" not in data["cases"][0] and "goals" not in data
    text = capsys.readouterr().out
    assert "self-check: ok" in text
    assert "goal" not in text.lower()


@pytest.mark.full
def test_run_script_help() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "python benchmarks/run.py" in done.stdout and "goals" in done.stdout


def test_run_script_judges_the_goals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_script = _load_run_script()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plot is optional
    out, png = tmp_path / "latest.json", tmp_path / "latest.png"
    argv = ["--quick", "--only", "log-adversarial", "max-bmm", "--no-progress"]
    assert run_script.main([*argv, "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr()
    report_part, _, goals_part = text.out.partition("self-check: ok")
    assert "goal" not in report_part.lower()
    assert "Goals (ratio = ours / baseline" in goals_part
    assert "of 4 goals met at these scaled-down sizes (indicative only)" in goals_part
    assert "matplotlib is not installed" in text.err and not png.exists()
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["meta"]["preset"] == "quick"
    assert data["goals"]["total"] == 4  # max-bmm and max-bmm-bwd
    by_key = {c["key"]: c for c in data["cases"]}
    assert by_key["log-adversarial"]["goals"] == []
    assert [g["text"] for g in by_key["max-bmm"]["goals"]] == [
        "<= 0.5x naive broadcast amax",
        "<= 1.0x tropical-gemm",
        "peak extra memory <= 1/2 of the reference's",
    ]
    assert run_script.main(["--list"]) == 0
    assert "(self-check only)" in capsys.readouterr().out


def test_main_reports_a_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_viterbi_ties_ok", lambda: False)
    assert main(["--quick", "--only", "min-bmm", "--no-progress"]) == 1


def test_main_list_and_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    assert "log-cky-bwd" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--only", "no-such-workload"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", "--quick"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.full
def test_memory_subprocess_measures_growth() -> None:
    sizes = {"b": 4, "i": 64, "j": 64, "k": 64}  # naive: a 4 MiB joint tensor
    peak, note = measure.measure_peak("log-bmm", W.NAIVE, sizes)
    assert note == ""
    assert peak is not None and peak > 0


@pytest.mark.full
def test_memory_subprocess_failure_is_reported() -> None:
    peak, note = measure.measure_peak(
        "log-bmm", "no-such-contender", {"b": 1, "i": 1, "j": 1, "k": 1}
    )
    assert peak is None and "failed" in note


def test_without_tqdm(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = runner.progress_bar(2)
    assert isinstance(bar, runner.PlainProgress)
    bar.set_description_str("step")
    bar.update()
    bar.update()
    bar.close()
    assert "2/2" in capsys.readouterr().err


def test_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "plot.png"
    assert main(["--quick", "--only", "min-bmm", "--no-progress", "--plot", str(png)]) == 0
    assert not png.exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.full
def test_plot_written(report: bench.Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    assert R.write_plot(report, str(png)) is None
    assert png.read_bytes().startswith(b"\x89PNG")


def test_without_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_semiring_einsum", None)
    assert W.load_reference() is None
    rep = bench.run(_quick(only=("viterbi-cky",)), progress=False)
    (case,) = rep.cases
    assert rep.ok
    assert case.contenders[W.REFERENCE].note == "not installed"
    assert case.contenders[W.REFERENCE].median_ms is None
    (verdicts,) = goals.judge_report(rep).values()
    speedup = next(g for g in verdicts if g.metric == "speedup")
    assert speedup.met is None
    assert "not installed" in R.format_report(rep)


def test_memory_selection() -> None:
    reference, tropical = W.load_reference(), W.load_tropical()

    def plan(key: str, settings: bench.Settings) -> runner._CasePlan:
        return runner._plan(W.workload(key), settings, reference, tropical)

    ours_and_reference = bench.Settings(memory="reference")
    with_reference = plan("log-bmm", ours_and_reference)
    assert with_reference.memory == ([W.OURS, W.REFERENCE] if reference else [W.OURS])
    assert plan("log-adversarial", ours_and_reference).memory == []
    everything = plan("log-bmm", bench.Settings(memory="all"))
    assert everything.memory == everything.contenders
    big = plan("log-chain-128", bench.Settings(preset="full"))
    assert W.NAIVE in big.skipped  # its joint tensor would be 1 GiB
