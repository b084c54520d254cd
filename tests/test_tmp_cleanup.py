"""The test suite leaves nothing in the system temp folder after a passing run: tmp_path folders,
the session's base folder (uce cache, tiny models) and what the processes tests start put in their
TMPDIR all go."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

INNER = """
import subprocess, sys
from pathlib import Path

def test_writes_and_starts_a_process(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"x" * 1_000_000)
    subprocess.run([sys.executable, "-c",
                    "import tempfile; tempfile.mkdtemp(prefix='left-by-a-child-')"], check=True)
"""


def test_a_passing_session_leaves_the_temp_folder_empty(tmp_path: Path) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {**os.environ, "TMPDIR": str(system_tmp), "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_DEBUG_TEMPROOT", None)
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-p", "tests.conftest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    left = [p for p in system_tmp.rglob("*") if p.is_file() or p.name.startswith("left-by")]
    assert left == [], left
