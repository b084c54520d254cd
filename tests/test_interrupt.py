"""Ctrl-C at any moment — while the CLI loads, while torch is imported, while it works — is
``error: interrupted`` with exit code 130: never an internal error, a traceback or a hang."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uce_cli.interrupt import interrupted

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 600  # a run that does not end by then is a hang, not a slow machine

# Runs `python -m uce_cli ARGS` after arranging a SIGINT to itself at the moment MODULE starts
# to be imported: a Ctrl-C that lands exactly there, deterministically.
SIGINT_AT_IMPORT = """
import importlib.abc, os, runpy, signal, sys
module = sys.argv[1]
class Trip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Trip())
sys.argv = ["uce", *sys.argv[2:]]
runpy.run_module("uce_cli", run_name="__main__", alter_sys=True)
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def sample_args(out: Path) -> list[str]:
    return ["sample", "--model", "builtin:tiny-sd", "--prompt", "x", "--out", str(out)]


def assert_interrupted(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 130, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert lines and lines[-1].startswith("error: interrupted"), done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "module",
    [
        "uce_cli.cli",  # uce's first module: before its handler is installed
        "typer",  # while the CLI loads
        "torch",  # the start of torch's import
        "torch.functional",  # the middle of it, after its C extension is loaded
        "numpy.linalg",  # a module later imported again through numpy's lazy attributes
        "diffusers.models.autoencoders.autoencoder_kl",  # inside diffusers' lazy import
    ],
)
def test_sigint_during_an_import_is_interrupted(module: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGINT_AT_IMPORT, module, *sample_args(tmp_path / "s")],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert_interrupted(done)


def test_sigint_immediately_after_start(tmp_path: Path) -> None:
    """At once after the process starts: interrupted, or (if it lands before Python runs any uce
    code) killed by the signal like any program — never an internal error, never a hang."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uce_cli", *sample_args(tmp_path / "s")],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, stderr)
    assert "internal error" not in stderr, stderr
    if proc.returncode == 130 and "Traceback" not in stderr:
        assert stderr.splitlines()[-1].startswith("error: interrupted"), stderr


def test_sigint_during_work_keeps_the_images_written(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    with prompts.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed"])
        writer.writerows([i, f"a photo {i}", i] for i in range(500))
    out = tmp_path / "s"
    args = ["sample", "--model", "builtin:tiny-sd", "--prompts-file", str(prompts)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uce_cli", *args, "--out", str(out), "--steps", "2", "--quiet"],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # wait (on the file system, not the clock) until the first image is written
        while proc.poll() is None and not any(out.rglob("*.png")):
            time.sleep(0.05)  # a poll interval, not a bound: it waits as long as it takes
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_interrupted(done)
    assert "the images already written stay in" in stderr
    assert 0 < len(list(out.rglob("*.png"))) < 500


def test_an_import_error_raised_while_handling_ctrl_c_is_the_interruption() -> None:
    """In-process (no handler of uce's): the exception's context says it came from a Ctrl-C."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("cannot load module more than once per process") from None
    except ImportError as exc:
        assert exc.__context__ is not None and interrupted(exc)
    assert not interrupted(ModuleNotFoundError("No module named 'x'"))


def test_importing_and_running_in_process_keeps_the_callers_ctrl_c(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the uce program installs its handler: a process that imports uce (here pytest) keeps
    its own, also after a command in it was interrupted."""
    from typer.testing import CliRunner

    import uce_cli.cli._common as common
    from uce_cli.cli import app

    before = signal.getsignal(signal.SIGINT)

    def interrupted_check(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "warnings_as_lines", interrupted_check)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 130 and result.stderr.strip() == "error: interrupted"
    assert signal.getsignal(signal.SIGINT) is before
