"""The README's examples run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert "Peak temporary" in capsys.readouterr().out


def test_readme_gives_the_two_commands() -> None:
    text = README.read_text()
    assert "pip install torch==2.13.0" in text
    assert "python -m semiring_einsum" in text
    assert "python -m pytest" in text


def test_the_two_commands_are_the_readmes_only_bash_blocks() -> None:
    """.ci/run runs exactly these blocks, in order, in a fresh virtual environment."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert [b.strip() for b in blocks] == [
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m semiring_einsum',
        "python -m pytest",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "README.md" in ci
