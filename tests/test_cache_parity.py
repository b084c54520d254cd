"""A cached run and a ``--no-cache`` run write the same bytes (issue 19 item 15): the preserve
prompts are encoded in the same batches and G_p is summed in the same order either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ERASE_RECIPE, write_recipe
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl", "tiny_sd3"])
def test_cached_and_uncached_runs_are_bit_identical(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fixture: str,
) -> None:
    monkeypatch.setenv("UCE_CACHE_DIR", str(tmp_path / "cache"))  # a cold cache: a real miss
    model = request.getfixturevalue(fixture)
    plan = plan_recipe(write_recipe(tmp_path, f"model: {model}\n{ERASE_RECIPE}"))
    runs = {}
    for name, use_cache in (("miss", True), ("off", False), ("hit", True)):
        result = run_apply(plan, out=tmp_path / name, device="cpu", use_cache=use_cache)
        assert result.log["plan"]["preserve_cache"] == name
        runs[name] = (result.log, load_file(str(result.out / "edit.safetensors")))
    miss_log, miss = runs["miss"]
    for name in ("off", "hit"):
        log, tensors = runs[name]
        assert set(tensors) == set(miss)
        differ = [k for k in miss if not torch.equal(miss[k], tensors[k])]
        assert not differ, (name, differ[:3])
        assert log["fingerprint"] == miss_log["fingerprint"], name
