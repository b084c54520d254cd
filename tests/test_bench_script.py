"""scripts/bench_apply.py cleans up after itself: its temporary folder goes on every kind of exit."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_apply.py"


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_apply", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR


def test_temporary_folder_is_removed_after_an_error(bench, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(RuntimeError), bench.work_folder(None) as work:
        (work / "model.bin").write_bytes(b"x" * 4096)
        assert work.parent == tmp_path
        raise RuntimeError("boom")
    assert not work.exists() and list(tmp_path.iterdir()) == []


def test_temporary_folder_is_removed_on_sigterm(bench, tmp_path: Path) -> None:  # noqa: ANN001
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info, bench.work_folder(None) as work:
        (work / "out").mkdir()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # Python runs the handler between bytecodes
            pass
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not work.exists()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_given_work_folder_is_kept(bench, tmp_path: Path) -> None:  # noqa: ANN001
    with bench.work_folder(tmp_path / "keep") as work:
        (work / "model").mkdir()
    assert (tmp_path / "keep" / "model").is_dir()


def test_disk_usage_counts_allocated_bytes(bench, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "a").write_bytes(os.urandom(1 << 20))
    os.link(tmp_path / "a", tmp_path / "b")  # counted once
    assert (1 << 20) <= bench.disk_usage(tmp_path) < (1 << 20) + (1 << 16)
