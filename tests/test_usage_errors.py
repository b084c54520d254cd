"""A usage error (bad option value, unknown option or command, missing argument) is one
``error:`` line naming what is wrong, and exit code 2 — not Typer's multi-line usage block."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uce_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

CASES = [
    (["apply", "r.yaml", "--format", "bogus"], ["'--format'", "'bogus' is not one of"]),
    (["apply", "r.yaml", "--threads", "0"], ["'--threads'", "greater than or equal to 1"]),
    (["apply", "r.yaml", "--device", "tpu"], ["'--device'", "'tpu'"]),
    (["apply", "r.yaml", "--bogus"], ["no such option: --bogus"]),
    (["apply"], ["missing argument 'RECIPE'"]),
    (["sample", "--model", "m", "--prompt", "p", "--steps", "abc"], ["'--steps'", "integer"]),
    (["verify", "a", "--rtol", "-1"], ["'--rtol'"]),
    (["frobnicate"], ["no such command 'frobnicate'"]),
]


def assert_one_usage_line(code: int, stderr: str, needles: list[str]) -> None:
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Value error," not in stderr and "Usage:" not in stderr and "Error:" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert " -h'" in lines[0]  # where the help is


@pytest.mark.parametrize(("args", "needles"), CASES)
def test_usage_error_is_one_line(args: list[str], needles: list[str]) -> None:
    result = runner.invoke(app, args)
    assert_one_usage_line(result.exit_code, result.stderr, needles)
    assert result.stdout == ""


def test_usage_error_from_the_command_line(tmp_path: Path) -> None:
    args, needles = CASES[0]
    done = subprocess.run(
        [sys.executable, "-m", "uce_cli", *args], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600,
    )  # fmt: skip
    assert_one_usage_line(done.returncode, done.stderr, needles)


def test_help_and_bare_uce_unchanged() -> None:
    """-h prints the help on stdout (exit 0); `uce` alone prints it on stderr (exit 2)."""
    help_ = runner.invoke(app, ["apply", "-h"])
    assert help_.exit_code == 0 and help_.stdout.startswith("Usage: ")
    bare = runner.invoke(app, [])
    assert bare.exit_code == 2 and "Usage: " in bare.stderr and "Commands" in bare.stderr
