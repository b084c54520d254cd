"""CPU threads: counted from the affinity mask and the cgroup quota, set once when a command starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ERASE_RECIPE, write_recipe
from uce_cli import threads
from uce_cli.threads import THREAD_VARS, cgroup_cpu_limit, usable_cpus

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_read_from_v2_or_v1(
    tmp_path: Path, files: dict[str, str], limit: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


@pytest.mark.parametrize(
    ("affinity", "quota", "expected"),
    [(16, None, 16), (16, "250000 100000", 3), (2, "800000 100000", 2), (8, "10000 100000", 1)],
)
def test_usable_cpus_is_affinity_capped_by_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, affinity: int, quota: str | None, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    if quota is not None:
        (tmp_path / "cpu.max").write_text(quota)
    assert usable_cpus(tmp_path) == expected


def run_in_child(args: list[str], env: dict[str, str]) -> list[str]:
    """Run the CLI in a child; print what torch and the environment say afterwards."""
    code = (
        "import os, sys\nfrom uce_cli.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "import torch\n"
        "print(code, torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'), "
        "os.environ.get('MKL_NUM_THREADS'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].split()  # the last line: after the command's own output


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_VARS, "UCE_THREADS")}
    return {**env, **extra}


@pytest.mark.parametrize("command", ["apply", "sample", "eval"])
def test_threads_option_sets_torch_and_the_environment(
    command: str, tiny_model: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_model}\n{ERASE_RECIPE}")
    args = {
        "apply": ["apply", str(recipe), "--dry-run"],
        "sample": ["sample", "--model", str(tmp_path / "missing"), "--prompt", "x"],
        "eval": ["eval", str(tmp_path / "missing")],
    }[command]
    # torch caps an environment count at the cores it sees: 1 is meaningful on any machine
    code, torch_threads, omp, mkl = run_in_child([*args, "--threads", "1"], child_env())
    assert (torch_threads, omp, mkl) == ("1", "1", "1")
    assert code == ("0" if command == "apply" else "1")


def test_default_threads_are_the_usable_cpus(tiny_model: Path, tmp_path: Path) -> None:
    """No --threads, no OMP_NUM_THREADS: the CPUs this process may use (here: taskset to one)."""
    recipe = write_recipe(tmp_path, f"model: {tiny_model}\n{ERASE_RECIPE}")
    code = f"""
import os
os.sched_setaffinity(0, {{sorted(os.sched_getaffinity(0))[0]}})
from uce_cli.cli import app
try:
    app(['apply', {str(recipe)!r}, '--dry-run'])
except SystemExit:
    pass
import torch
print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.stdout.splitlines()[-1].split() == ["1", "1"], done.stderr


def test_omp_num_threads_in_the_environment_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    assert threads.default_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert threads.default_threads() == 2


def test_threads_zero_is_a_usage_error(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: m\n{ERASE_RECIPE}")
    done = subprocess.run(
        [sys.executable, "-m", "uce_cli", "apply", str(recipe), "--threads", "0"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--threads" in done.stderr and "Traceback" not in done.stderr


def test_a_process_with_torch_loaded_keeps_its_threads_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Running a command in a process that set its own count (tests, a host program) changes
    neither that count nor the environment its later children inherit; --threads still applies."""
    import torch

    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads.use_threads(None) == 1 and torch.get_num_threads() == 1
        assert not any(name in os.environ for name in THREAD_VARS)
        if (os.cpu_count() or 1) > 1:
            assert threads.use_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
