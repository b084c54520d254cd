"""Same recipe, same bytes: reproducible files, a stable fingerprint, paths relative to the recipe."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from tests.conftest import ERASE_RECIPE, write_recipe
from uce_cli.artifacts.formats import FORMATS
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe
from uce_cli.weights.tensorfile import save_tensors


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "edit_log.json"
    }


def header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def apply(recipe: Path, out: Path) -> dict:
    return run_apply(plan_recipe(recipe), out=out, device="cpu", use_cache=False).log


def test_two_identical_applies_write_identical_bytes(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\n{ERASE_RECIPE}output: {{formats: [{', '.join(FORMATS)}]}}\n",
    )
    first, second = apply(recipe, tmp_path / "one"), apply(recipe, tmp_path / "two")
    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert set(a) == set(b) and "edit.safetensors" in a and "model.safetensors" in a
    assert [name for name in a if a[name] != b[name]] == []
    assert first["outputs"] == second["outputs"]
    assert len(first["fingerprint"]) == 64 and first["fingerprint"] == second["fingerprint"]
    for name in ("edit.safetensors", "operator.safetensors", "pytorch_lora_weights.safetensors"):
        meta = header(tmp_path / "one" / name)["__metadata__"]
        assert list(meta) == sorted(meta), name


def test_fingerprint_ignores_where_things_live(tiny_model: Path, tmp_path: Path) -> None:
    """Two hosts: the same recipe next to its own copy of the model, written elsewhere."""
    logs = []
    for host in ("host-a", "host-b"):
        shutil.copytree(tiny_model, tmp_path / host / "tiny")
        recipe = write_recipe(
            tmp_path / host,
            f"model: tiny\n{ERASE_RECIPE}output: {{formats: [delta, lora, operator]}}\n",
        )
        logs.append(apply(recipe, tmp_path / f"out-{host}"))
    a, b = logs
    assert a["base_model"]["path"] != b["base_model"]["path"]
    assert a["outputs"]["edit.safetensors"] != b["outputs"]["edit.safetensors"]  # metadata
    assert a["fingerprint"] == b["fingerprint"]


def test_fingerprint_changes_with_the_edit(tiny_model: Path, tmp_path: Path) -> None:
    body = ERASE_RECIPE + "output: {formats: [delta]}\n"
    a = apply(write_recipe(tmp_path / "a", f"model: {tiny_model}\n{body}"), tmp_path / "oa")
    b = apply(
        write_recipe(tmp_path / "b", f"model: {tiny_model}\n{body.replace('Rembrandt', 'a cat')}"),
        tmp_path / "ob",
    )
    assert a["fingerprint"] != b["fingerprint"]


def test_save_tensors_is_byte_stable_and_loadable(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.ones(3, dtype=torch.float16),
        "k": torch.eye(2, dtype=torch.float64),
        "alpha": torch.tensor(4.0),
    }
    meta = {"z": "1", "format": "x", "a": "é"}
    first = save_tensors(tensors, tmp_path / "1.safetensors", meta)
    second = save_tensors(dict(reversed(tensors.items())), tmp_path / "2.safetensors", meta)
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    assert first == second
    other = save_tensors(tensors, tmp_path / "3.safetensors", {"other": "metadata"})
    assert other.content_sha256 == first.content_sha256 and other.sha256 != first.sha256
    with safe_open(str(tmp_path / "1.safetensors"), "pt") as f:
        assert f.metadata() == meta
        for name, t in tensors.items():
            loaded = f.get_tensor(name)
            assert loaded.dtype == t.dtype and torch.equal(loaded, t)


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_log_records_recipe_paths_relative_to_the_recipe(
    tiny_model: Path, tmp_path: Path, where: str
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("Claude Monet\nRembrandt\n")
    (tmp_path / "data" / "more.txt").write_text("a cat\n")
    if where == "outside":  # ../ paths, and one written as an absolute path
        files_ = ["../data/keep.txt", str(tmp_path / "data" / "more.txt")]
        out_dir, expected_out = "../runs/x", "../runs/x"
    else:
        (tmp_path / "recipes" / "data").mkdir(parents=True)
        for name in ("keep.txt", "more.txt"):
            shutil.copy(tmp_path / "data" / name, tmp_path / "recipes" / "data" / name)
        files_ = ["data/keep.txt", "data/more.txt"]
        out_dir, expected_out = "runs/x", "runs/x"
    recipe = write_recipe(
        tmp_path / "recipes",
        f"model: {tiny_model}\nerase:\n  - concepts: [Kinkade]\npreserve:\n"
        f"  - concepts_file: {files_[0]}\n  - concepts_file: {files_[1]}\n"
        f"output: {{dir: {out_dir}, formats: [delta]}}\n",
    )
    plan = plan_recipe(recipe)
    log = run_apply(plan, device="cpu", use_cache=False).log
    prefix = "../" if where == "outside" else ""
    assert log["paths"] == {
        "recipe_file": "recipe.yaml",
        "model": Path(os.path.relpath(tiny_model, tmp_path / "recipes")).as_posix(),
        "preserve.0.concepts_file": f"{prefix}data/keep.txt",
        "preserve.1.concepts_file": f"{prefix}data/more.txt",
        "output.dir": expected_out,
        "output": expected_out,
    }
    text = json.dumps({k: v for k, v in log.items() if k != "recipe"})
    assert str(tmp_path / "data") not in text and str(tmp_path / "runs") not in text
    # --out elsewhere: recorded relative to the recipe too
    moved = run_apply(plan, out=tmp_path / "elsewhere" / "o", device="cpu", use_cache=False).log
    assert moved["paths"]["output"] == "../elsewhere/o"
    assert moved["paths"]["output.dir"] == expected_out
