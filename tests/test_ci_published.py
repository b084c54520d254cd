"""scripts/ci_published.py checks something on a fresh clone offline: recipes whose prompt sets uce
ships report, and only COCO-30k/I2P may be missing (`needs-data`); a recipe that should report and
wrote none fails the run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ci_published.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_published", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No mirror, a fresh cache, and every download refused at once (a dead proxy)."""
    env = {k: v for k, v in os.environ.items() if k != "UCE_DATA_MIRROR"}
    dead = "http://127.0.0.1:9"
    env.update(UCE_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", https_proxy=dead,
               http_proxy=dead, HTTPS_PROXY=dead, HTTP_PROXY=dead, PYTHONPATH=str(REPO))  # fmt: skip
    return env


def test_an_imagenette_recipe_reports_offline_with_no_mirror(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path / "w"), "--only",
         "erase-imagenette-church"],
        capture_output=True, text=True, env=offline_env(tmp_path), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    (result,) = summary["results"]
    assert result["status"] == "ok", result
    assert 0 < result["figures"]["efficacy"] <= 1
    assert (tmp_path / "w" / "erase-imagenette-church" / "eval" / "eval.json").is_file()


@pytest.mark.parametrize(
    ("last", "status"),
    [
        ("error: cannot download upstream data file 'coco_30k.csv' (offline)", "needs-data"),
        (
            "error: evaluate.heldout.0: cannot download upstream data file 'unsafe-prompts4703.csv' "
            "(x)",
            "needs-data",
        ),  # fmt: skip
        ("error: cannot download upstream data file 'imagenette.csv' (offline)", "FAIL"),
        ("error: cannot download upstream data file 'holdout100_prompts.csv' (x)", "FAIL"),
        ("error: something else", "FAIL"),
    ],
)
def test_only_the_fetched_prompt_sets_may_be_missing(last: str, status: str) -> None:
    assert load_script().failure("eval", last)[0] == status


def test_a_recipe_whose_eval_wrote_no_report_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script()

    def silent_uce(*args: str) -> subprocess.CompletedProcess:
        """Every step "succeeds" and writes nothing (a report that never came)."""
        return subprocess.CompletedProcess(args, 0, stdout='{"figures": {}}', stderr="")

    monkeypatch.setattr(script, "uce", silent_uce)
    monkeypatch.setattr(
        sys, "argv", ["ci_published.py", "--work", str(tmp_path), "--only", "erase-artists-5"]
    )
    with pytest.raises(SystemExit) as exc:
        script.main()
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "wrote no report" in out
