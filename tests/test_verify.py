"""``uce verify``: any two edit formats compared tensor by tensor; exit 1 beyond --rtol, naming the worst tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import apply_recipe
from uce_cli.artifacts.formats import FORMATS
from uce_cli.cli import app
from uce_cli.commands.verify import compare_edits

runner = CliRunner()


def apply(
    model: Path, folder: Path, concepts: str, formats: list[str], lora_rank: int | None = None
) -> Path:
    body = f"erase:\n  - concepts: [{concepts}]\n    templates: art\npreserve:\n  - concepts: [Rembrandt]\n"
    return apply_recipe(model, folder, formats, lora_rank, body)


@pytest.fixture(scope="module")
def published(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return apply(tiny_model, tmp_path_factory.mktemp("published"), "Thomas Kinkade", list(FORMATS))


def run(*args: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    ("edit", "needs_base"),
    [
        ("edit.safetensors", False),
        ("model.safetensors", False),
        (".", False),
        ("pytorch_lora_weights.safetensors", True),
        ("lora_kohya.safetensors", True),
        ("operator.safetensors", True),
    ],
)
def test_every_format_matches_the_published_delta(
    published: Path, tiny_model: Path, edit: str, needs_base: bool
) -> None:
    args = [
        "verify",
        published / edit,
        "--against",
        published / "edit.safetensors",
        "--rtol",
        "1e-5",
    ]
    result = run(*args, *(["--base", tiny_model] if needs_base else []))
    assert result.exit_code == 0, result.stderr
    assert "match: 14 tensors within rtol 1e-05" in result.stdout
    assert "down_blocks.0.attentions.0" in result.stdout  # the per-layer table


def test_recreated_edit_verifies_and_a_different_edit_fails(
    published: Path, tiny_model: Path, tmp_path: Path
) -> None:
    again = apply(tiny_model, tmp_path / "again", "Thomas Kinkade", ["delta"])
    ok = run("verify", again, "--against", published, "--json")
    assert ok.exit_code == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert (
        report["ok"]
        and len(report["tensors"]) == 14
        and max(t["rel_error"] for t in report["tensors"]) < 1e-6
    )
    other = apply(tiny_model, tmp_path / "other", "Kelly Mckernan", ["delta"])
    bad = run("verify", other, "--against", published)
    assert bad.exit_code == 1
    assert "DIFF" in bad.stdout
    worst = compare_edits(other, published).worst
    assert bad.stderr.startswith("error: 14 of 14 tensors differ beyond rtol 0.001; worst ")
    assert worst.key in bad.stderr


def test_truncated_lora_fails_a_tight_tolerance(
    published: Path, tiny_model: Path, tmp_path: Path
) -> None:
    truncated = apply(tiny_model, tmp_path, "Thomas Kinkade", ["lora"], lora_rank=2)
    loose = compare_edits(truncated, published / "edit.safetensors", rtol=1.0, base=str(tiny_model))
    assert not loose.failed and all(
        r.rel_to_edit is not None and r.rel_to_edit > 1e-3 for r in loose.rows
    )
    result = run(
        "verify",
        truncated,
        "--against",
        published / "edit.safetensors",
        "--base",
        tiny_model,
        "--rtol",
        "1e-6",
    )
    assert result.exit_code == 1 and "differ beyond rtol 1e-06" in result.stderr


def test_partial_edits_need_a_base(published: Path, tiny_model: Path, tmp_path: Path) -> None:
    result = run("verify", published / "operator.safetensors", "--against", published)
    assert result.exit_code == 1 and "pass --base MODEL" in result.stderr
    delta = load_file(published / "edit.safetensors")
    only_k = {k: v for k, v in delta.items() if k.endswith("to_k.weight")}
    save_file(only_k, str(tmp_path / "k.safetensors"), {"format": "uce-delta"})
    partial = run("verify", tmp_path / "k.safetensors", "--against", published)
    assert partial.exit_code == 0 and "7 tensors only in the reference" in partial.stderr
    completed = run(
        "verify", tmp_path / "k.safetensors", "--against", published, "--base", tiny_model
    )
    assert completed.exit_code == 1  # the to_v tensors are the base's, not the edit's
    assert "7 of 14 tensors differ" in completed.stderr and "to_v" in completed.stderr


def test_bad_inputs(published: Path, tmp_path: Path) -> None:
    missing = run("verify", tmp_path / "nope.safetensors", "--against", published)
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    corrupt = run("verify", tmp_path / "junk.safetensors", "--against", published)
    assert (
        corrupt.exit_code == 1 and "corrupt" in corrupt.stderr and "Traceback" not in corrupt.stderr
    )
    assert run("verify", published, "--against", published, "--rtol", "-1").exit_code == 2


def test_a_non_finite_model_fails_and_is_named(
    published: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import shutil

    folder = Path(shutil.copytree(published, tmp_path / "copy"))
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet)
    key = sorted(k for k in state if k.endswith("attn2.to_k.weight"))[-1]
    state[key][0, 0] = float("nan")
    save_file(state, str(unet), {"format": "pt"})
    (folder / "edit.safetensors").unlink()  # compare the model folder itself
    result = run("verify", folder, "--against", published / "edit.safetensors")
    assert result.exit_code == 1
    assert f"worst {key} (relative error inf)" in result.stderr
    assert "1 of 14 tensors differ" in result.stderr
    as_json = run("verify", folder, "--against", published / "edit.safetensors", "--json")
    assert as_json.exit_code == 1

    def refuse(name: str) -> None:
        raise AssertionError(f"--json wrote {name}, which is not JSON")

    report = json.loads(as_json.stdout, parse_constant=refuse)
    rows = {row["key"]: row for row in report["tensors"]}
    assert rows[key]["rel_error"] is None and rows[key]["ok"] is False
