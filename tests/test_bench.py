"""The benchmark harness (``semiring_einsum._bench``) and ``python -m semiring_einsum``.

Fast checks of the pieces, never of timings: the baselines agree with brute
force, the report writers produce the documented keys, the command line runs,
the memory subprocess measures something, and missing optional packages
(tqdm, matplotlib, torch-semiring-einsum) fall back cleanly.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from semiring_einsum import _bench as B
from semiring_einsum import func
from semiring_einsum.__main__ import main

LOG_EQUATIONS = sorted({w.equation for w in B.WORKLOADS if w.semiring == "log"})


def _operands(equation: str, size: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    terms, _ = B.parse(equation)
    sizes = {c: size + k for k, c in enumerate(dict.fromkeys("".join(terms)))}
    return [torch.randn([sizes[c] for c in t], generator=g, dtype=torch.float64) for t in terms]


def _quick(only: tuple[str, ...]) -> B.Settings:
    return B.Settings(preset="quick", rounds=1, budget_s=0.0, memory="off", jobs=1, only=only)


@pytest.fixture(scope="module")
def report() -> B.Report:
    return B.run(_quick(only=("log-bmm", "viterbi-bmm", "real-bmm")), progress=False)


@pytest.mark.parametrize("equation", LOG_EQUATIONS)
def test_trick_matches_brute_force(equation: str) -> None:
    xs = _operands(equation)
    expected = B.brute_force("logsumexp", equation, *xs)
    torch.testing.assert_close(B.log_matmul_exp(equation, *xs), expected)


def test_trick_gradient_matches_brute_force() -> None:
    eq = "bsxk,bsyk,xyz->bsz"
    xs = [x.requires_grad_() for x in _operands(eq, size=3)]
    got = torch.autograd.grad(B.log_matmul_exp(eq, *xs).sum(), xs)
    expected = torch.autograd.grad(B.brute_force("logsumexp", eq, *xs).sum(), xs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_trick_underflows_where_ours_is_exact() -> None:
    eq = "bij,bjk->bik"
    xs = [x * 300.0 for x in _operands(eq, size=16)]
    expected = B.brute_force("logsumexp", eq, *xs)
    assert B.max_error([B.log_matmul_exp(eq, *[x.float() for x in xs])], [expected]) == math.inf
    ours = func.log_einsum(eq, *[x.float() for x in xs])
    assert B.max_error([ours], [expected]) < 1e-2


@pytest.mark.parametrize("reduce", ["sum", "logsumexp", "amax", "amin"])
def test_chunked_brute_force_matches_unchunked(reduce: str) -> None:
    eq = "ab,bc,cd->ad"
    xs = _operands(eq)
    whole = B.brute_force(reduce, eq, *xs)
    torch.testing.assert_close(B.brute_force(reduce, eq, *xs, max_numel=7), whole)
    if reduce == "sum":
        torch.testing.assert_close(whole, torch.einsum(eq, *xs))


def test_argmax_consistent() -> None:
    eq = "bsxk,bsyk,xyz->bsz"
    xs = [x.float() for x in _operands(eq, size=3)]
    values, argmax = func.viterbi_einsum(eq, *xs)
    assert B.argmax_consistent(eq, xs, values, argmax)
    assert not B.argmax_consistent(eq, xs, values, (argmax + 1) % 3)
    assert not B.argmax_consistent(eq, xs, values, argmax[..., :2])


def test_goal_judgement() -> None:
    ratio = B.Goal("<= 1.3x the trick", "time_ratio", B.TRICK, 1.3)
    assert ratio.judge(1.2, 1.0) == (1.2, True)
    assert ratio.judge(1.4, 1.0) == (1.4, False)
    assert ratio.judge(None, 1.0) == (None, None)
    speedup = B.Goal(">= 4x faster than the reference", "speedup", B.REFERENCE, 4.0)
    assert speedup.judge(1.0, 5.0) == (5.0, True)
    assert B.MEMORY_GOAL.judge(0.0, 0.0)[1] is True


def test_time_interleaved_budget() -> None:
    calls = {"fast": lambda: (torch.zeros(1),), "slow": lambda: (torch.ones(1),)}
    timings, outputs = B.time_interleaved(calls, rounds=3, budget_s=1e9)
    assert [len(t.samples) for t in timings.values()] == [3, 3]
    assert outputs["slow"][0].item() == 1.0
    timings, _ = B.time_interleaved(calls, rounds=3, budget_s=0.0)
    assert [len(t.samples) for t in timings.values()] == [1, 1]  # over budget: one round


def test_report_keys(report: B.Report) -> None:
    assert report.ok, report.failures
    data = B.report_to_json(report)
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
        "goals",
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
    goal = case["goals"][0]
    assert set(goal) == {"text", "metric", "baseline", "target", "value", "met"}
    viterbi = next(c for c in data["cases"] if c["key"] == "viterbi-bmm")
    assert viterbi["check"]["argmax_ok"] is True


def test_table(report: B.Report) -> None:
    text = B.format_report(report)
    for piece in ("workload", "ours", "trick", "naive", "<= 1.3x the trick", "self-check: ok"):
        assert piece in text
    assert "Peak extra memory" not in text  # memory was off


def test_main_quick_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["meta"]["preset"] == "quick"
    assert {c["key"] for c in data["cases"]} == {w.key for w in B.WORKLOADS}
    assert "self-check: ok" in capsys.readouterr().out


def test_main_reports_a_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "_viterbi_ties_ok", lambda: False)
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


def test_memory_subprocess_measures_growth() -> None:
    sizes = {"b": 4, "i": 64, "j": 64, "k": 64}  # naive: a 4 MiB joint tensor
    peak, note = B.measure_peak("log-bmm", B.NAIVE, sizes)
    assert note == ""
    assert peak is not None and peak > 0


def test_memory_subprocess_failure_is_reported() -> None:
    peak, note = B.measure_peak("log-bmm", "no-such-contender", {"b": 1, "i": 1, "j": 1, "k": 1})
    assert peak is None and "failed" in note


def test_without_tqdm(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = B.progress_bar(2)
    assert isinstance(bar, B.PlainProgress)
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


def test_plot_written(report: B.Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    assert B.write_plot(report, str(png)) is None
    assert png.read_bytes().startswith(b"\x89PNG")


def test_without_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_semiring_einsum", None)
    assert B.load_reference() is None
    rep = B.run(_quick(only=("viterbi-cky",)), progress=False)
    (case,) = rep.cases
    assert rep.ok
    assert case.contenders[B.REFERENCE].note == "not installed"
    assert case.contenders[B.REFERENCE].median_ms is None
    speedup = next(g for g in case.goals if g.metric == "speedup")
    assert speedup.met is None
    assert "not installed" in B.format_report(rep)


def test_memory_selection() -> None:
    reference = B.load_reference()
    goals = B.Settings(memory="goals")
    with_goal = B._plan(B.workload("log-bmm"), goals, reference)
    assert with_goal.memory == ([B.OURS, B.REFERENCE] if reference else [B.OURS])
    assert B._plan(B.workload("log-adversarial"), goals, reference).memory == []
    everything = B._plan(B.workload("log-bmm"), B.Settings(memory="all"), reference)
    assert everything.memory == everything.contenders
    big = B._plan(B.workload("log-chain-128"), B.Settings(preset="full"), reference)
    assert B.NAIVE in big.skipped  # its joint tensor would be 1 GiB
