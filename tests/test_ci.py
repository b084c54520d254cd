"""CI leaves nothing behind: everything it writes outside the clone is under one folder a trap removes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_removes_its_temp_folders_on_any_exit(tmp_path: Path) -> None:
    script = (REPO / ".ci" / "run").read_text()
    setup = script[script.index('CI_TMP="') : script.index("python3 -m venv")]
    # What the run does with those folders: the cache, temp files, a tool's own mktemp -d; then fail.
    probe = (
        'touch "$UCE_CACHE_DIR/model" "$TMPDIR/file"\nmkdir "$(mktemp -d)/bench"\n'
        'echo "$CI_TMP"\ntest "$HF_HUB_OFFLINE" = 1 && test -z "${UCE_DATA_MIRROR:-}"\nexit 3\n'
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "UCE_DATA_MIRROR": "/somewhere"}
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + setup + probe],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    ci_tmp = Path(done.stdout.strip())
    assert ci_tmp.parent == tmp_path
    assert not ci_tmp.exists() and list(tmp_path.iterdir()) == []
