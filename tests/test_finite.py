"""Non-finite numbers never reach an output: solve, apply, merge and transfer refuse them by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import ERASE_RECIPE, apply_recipe, write_recipe
from uce_cli.artifacts.formats import write_formats
from uce_cli.artifacts.lora import LORA_FILE
from uce_cli.cli import app
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe
from uce_cli.edit.solve import Scales, solve_edit
from uce_cli.edit.stats import EditStats
from uce_cli.errors import ModelError, SolveError
from uce_cli.families.model import open_model

runner = CliRunner()
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"


def run(*args: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def assert_error(result, *needles: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def random_stats(d: int = 16, seed: int = 0) -> EditStats:
    gen = torch.Generator().manual_seed(seed)
    c_s, c_t, c_p = (torch.randn(n, d, generator=gen, dtype=torch.float64) for n in (8, 8, 40))
    return EditStats(d, c_s.T @ c_s, c_t.T @ c_s, c_t.T @ c_t, c_p.T @ c_p)


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".uce-tmp-" in p.name or ".uce-old-" in p.name]


@pytest.mark.parametrize(
    ("matrix", "cause"),
    [("G_ts", "debias alphas"), ("G_t", "debias alphas"), ("G_p", "text encoder")],
)
def test_non_finite_statistics_are_refused(matrix: str, cause: str) -> None:
    stats = random_stats()
    getattr(stats, matrix)[0, 0] = float("inf")
    w = torch.randn(12, 16)
    with pytest.raises(SolveError, match=rf"statistics {matrix} are not finite: .*{cause}"):
        solve_edit({"layer": w}, stats, Scales(0.5, 1.0, 0.1))


@pytest.mark.parametrize("field", ["lam", "erase_scale", "preserve_scale"])
def test_non_finite_scales_are_refused(field: str) -> None:
    scales = {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": 0.1, field: float("nan")}
    name = {"lam": "lambda"}.get(field, field)
    with pytest.raises(SolveError, match=rf"solver\.{name} is nan — .*finite"):
        solve_edit({"layer": torch.randn(12, 16)}, random_stats(), Scales(**scales))


def test_huge_scales_overflow_is_refused_naming_the_layer() -> None:
    """An edit that overflows the weights' dtype (fp16 here) stops before anything is returned."""
    d = 8
    eye = torch.eye(d, dtype=torch.float64)
    stats = EditStats(d, eye.clone(), 1e4 * eye, 1e8 * eye, eye.clone())  # K ≈ 5000·I
    w = torch.full((4, d), 100.0, dtype=torch.float16)
    with pytest.raises(SolveError, match=r"layer up\.attn2\.to_k\.weight: .* non-finite .*float16"):
        solve_edit({"up.attn2.to_k.weight": w}, stats, Scales(1.0, 1.0, 1.0))


def test_nan_base_weight_is_refused_naming_key_and_file(model_copy: Path, tmp_path: Path) -> None:
    unet = model_copy / UNET_FILE
    state = load_file(unet)
    key = sorted(k for k in state if k.endswith("attn2.to_v.weight"))[0]
    state[key][3, 5] = float("nan")
    save_file(state, str(unet), {"format": "pt"})
    recipe = write_recipe(tmp_path / "r", f"model: {model_copy}\n{ERASE_RECIPE}")
    with pytest.raises(ModelError, match=rf"base weight {key} in {unet} has 1 non-finite"):
        run_apply(plan_recipe(recipe), out=tmp_path / "out", device="cpu", use_cache=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)
    assert_error(run("apply", recipe, "--out", tmp_path / "cli"), key, "non-finite", "corrupt")
    assert not (tmp_path / "cli").exists()


def test_nan_text_encoder_is_refused_naming_the_prompt(model_copy: Path, tmp_path: Path) -> None:
    te = model_copy / TEXT_FILE
    with safe_open(str(te), "pt") as f:
        meta = f.metadata()
    state = load_file(te)
    key = next(k for k in state if k.endswith("final_layer_norm.weight"))
    state[key][0] = float("nan")
    save_file(state, str(te), meta)
    recipe = write_recipe(tmp_path / "r", f"model: {model_copy}\n{ERASE_RECIPE}")
    assert_error(
        run("apply", recipe, "--out", tmp_path / "out"),
        "non-finite hidden states",
        "for the prompt '",
        "text_encoder",
    )
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_write_formats_refuses_a_non_finite_tensor(tiny_model: Path, tmp_path: Path) -> None:
    model = open_model(str(tiny_model))
    old = model.read_kv()
    new = {k: v.clone() for k, v in old.items()}
    key = sorted(new)[-1]
    new[key][0, 0] = float("inf")
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(SolveError, match=rf"layer unet\.{key}: the edited weight has 1 non-finite"):
        write_formats(stage, model, ["delta", "lora", "diffusers"], old, new, {})
    assert not list(stage.iterdir())  # checked before anything is written


@pytest.fixture(scope="module")
def edited(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return apply_recipe(
        tiny_model, tmp_path_factory.mktemp("finite"), ["delta", "lora", "operator"]
    )


def test_merge_refuses_an_all_nan_delta(edited: Path, tiny_model: Path, tmp_path: Path) -> None:
    with safe_open(str(edited / "edit.safetensors"), "pt") as f:
        meta = f.metadata()
    delta = load_file(edited / "edit.safetensors")
    bad = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
    save_file(bad, str(tmp_path / "nan.safetensors"), meta)
    result = run("merge", tiny_model, tmp_path / "nan.safetensors", "--out", tmp_path / "m")
    assert_error(result, "nan.safetensors", "delta tensor 'unet.", "non-finite values")
    assert not (tmp_path / "m").exists() and no_leftovers(tmp_path)


def test_merge_refuses_a_lora_with_non_finite_factors(
    edited: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with safe_open(str(edited / LORA_FILE), "pt") as f:
        meta = f.metadata()
    lora = load_file(edited / LORA_FILE)
    key = sorted(k for k in lora if k.endswith("lora_B.weight"))[0]
    lora[key][1, 0] = float("-inf")
    save_file(lora, str(tmp_path / "lora.safetensors"), meta)
    result = run("merge", tiny_model, tmp_path / "lora.safetensors", "--out", tmp_path / "m")
    assert_error(result, "lora.safetensors", key, "1 non-finite")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["merge", "transfer"])
def test_an_inf_operator_is_refused(
    edited: Path, tiny_model: Path, tmp_path: Path, command: str
) -> None:
    with safe_open(str(edited / "operator.safetensors"), "pt") as f:
        meta = f.metadata()
        k = f.get_tensor("K")
    k[2, 3] = float("inf")
    save_file({"K": k}, str(tmp_path / "op.safetensors"), meta)
    args = (
        ["merge", tiny_model, tmp_path / "op.safetensors"]
        if command == "merge"
        else ["transfer", tmp_path / "op.safetensors", "--model", tiny_model]
    )
    assert_error(run(*args, "--out", tmp_path / "o"), "operator 'K'", "1 non-finite")
    assert not (tmp_path / "o").exists()


def test_metrics_of_a_finite_edit_are_finite(edited: Path) -> None:
    log = json.loads((edited / "edit_log.json").read_text())
    values = [v for m in log["layers"].values() for v in m.values() if isinstance(v, float)]
    assert values and all(torch.isfinite(torch.tensor(values)))
