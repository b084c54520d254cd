"""Edit formats round-trip through the real loaders: LoRA (diffusers + kohya), delta, operator; merge; transfer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import ERASE_RECIPE, apply_recipe, write_recipe
from uce_cli.artifacts.formats import FORMATS
from uce_cli.artifacts.lora import KOHYA_FILE, LORA_FILE, check_rank, factorize_delta
from uce_cli.cli import app
from uce_cli.families.model import open_model

runner = CliRunner()


def run(*args: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def assert_error(result, *needles: str, code: int = 1) -> None:  # noqa: ANN001
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def edited(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One apply on the tiny model, written in every format."""
    return apply_recipe(tiny_model, tmp_path_factory.mktemp("formats"), list(FORMATS))


@pytest.fixture(scope="module")
def other_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'fine-tune' of the tiny model: same text encoder, every UNet weight moved."""
    folder = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("other") / "tiny-ft"))
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet)
    gen = torch.Generator().manual_seed(1)
    save_file(
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
        str(unet),
        {"format": "pt"},
    )
    return folder


def pipeline(folder: Path):  # noqa: ANN201
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)


def test_every_format_written_with_metadata(edited: Path) -> None:
    for name in (
        "edit.safetensors",
        LORA_FILE,
        KOHYA_FILE,
        "model.safetensors",
        "operator.safetensors",
    ):
        assert (edited / name).is_file(), name
    assert (edited / "model_index.json").is_file()
    with safe_open(str(edited / "operator.safetensors"), "pt") as f:
        meta = f.metadata()
        k = f.get_tensor("K")
    assert k.dtype == torch.float64 and k.shape == (32, 32)
    assert meta["format"] == "uce-operator" and meta["alignment"] == "paper"
    assert meta["projections"] == "to_k,to_v" and meta["width"] == "32"
    assert len(meta["text_encoder_weights_sha256"]) == 64 and len(meta["recipe_sha256"]) == 64


@pytest.mark.parametrize("weight_name", [LORA_FILE, KOHYA_FILE])
def test_lora_loaded_by_diffusers_reproduces_patched_weights_and_images(
    edited: Path, tiny_model: Path, weight_name: str
) -> None:
    patched = open_model(str(edited)).read_kv()
    pipe = pipeline(tiny_model)
    pipe.load_lora_weights(str(edited), weight_name=weight_name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    assert max(rel(fused[k], w) for k, w in patched.items()) < 1e-4
    # Images: base + fused LoRA vs the patched checkpoint, same seed; the edit itself moves pixels by ~0.4.
    reference = pipeline(edited)
    prompt = "a painting by Kelly Mckernan"
    images = [
        p(
            prompt,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        for p in (pipe, reference)
    ]
    assert abs(images[0] - images[1]).max() < 1e-4


def test_lora_rank_is_exact_by_default_and_truncation_reports_error(
    edited: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import json

    exact = json.loads((edited / "edit_log.json").read_text())["layers"]
    assert all(m["lora_rel_error"] < 1e-7 for m in exact.values())  # exact to float32
    out = apply_recipe(tiny_model, tmp_path, ["lora"], lora_rank=4)
    layers = json.loads((out / "edit_log.json").read_text())["layers"]
    factors = load_file(out / LORA_FILE)
    base = open_model(str(tiny_model)).read_kv()
    k = load_file(edited / "operator.safetensors")["K"]
    for name, m in layers.items():
        assert m["lora_rank"] == 4 and 0 < m["lora_rel_error"] < 1
        module = name.removesuffix(".weight")
        up, down = factors[f"{module}.lora_B.weight"], factors[f"{module}.lora_A.weight"]
        assert up.shape[1] == down.shape[0] == 4
        delta = base[name.removeprefix("unet.")].double() @ (k - torch.eye(32, dtype=torch.float64))
        assert abs(rel(up.double() @ down.double(), delta) - m["lora_rel_error"]) < 1e-5


def test_factorize_delta_is_exact_at_numerical_rank() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 32, generator=gen, dtype=torch.float64
    )
    f = factorize_delta(delta)
    assert f.rank == 3 and f.rel_error < 1e-12
    assert rel(f.up.double() @ f.down.double(), delta) < 1e-6


def test_bad_lora_rank_and_unknown_format_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_model}\n{ERASE_RECIPE}")
    assert_error(
        run("apply", recipe, "--out", tmp_path / "a", "--format", "lora", "--lora-rank", "33"),
        "--lora-rank 33 exceeds layer unet.",
        "down_blocks.0.attentions.0",
    )
    assert_error(
        run("apply", recipe, "--out", tmp_path / "b", "--format", "lora", "--lora-rank", "0"),
        "--lora-rank",
        code=2,
    )
    assert_error(
        run("apply", recipe, "--out", tmp_path / "c", "--format", "bogus"), "bogus", code=2
    )
    assert_error(
        run("apply", recipe, "--out", tmp_path / "d", "--lora-rank", "2"), "add --format lora"
    )
    bad = write_recipe(
        tmp_path,
        f"model: {tiny_model}\n{ERASE_RECIPE}output: {{formats: [lora, bogus]}}\n",
        "bad.yaml",
    )
    assert_error(run("validate", bad), "output.formats.1")
    assert not any((tmp_path / n).exists() for n in "abcd")
    with pytest.raises(Exception, match="must be a positive integer"):
        check_rank(-1, {"x": (4, 4)})


def test_transfer_equals_fresh_apply_on_the_other_model(
    edited: Path, other_model: Path, tmp_path: Path
) -> None:
    result = run(
        "transfer",
        edited / "operator.safetensors",
        "--model",
        other_model,
        "--out",
        tmp_path / "t",
        "--format",
        "diffusers",
        "--format",
        "delta",
    )
    assert result.exit_code == 0, result.stderr
    moved = open_model(str(tmp_path / "t")).read_kv()
    fresh = open_model(str(apply_recipe(other_model, tmp_path / "fresh", ["diffusers"]))).read_kv()
    assert set(moved) == set(fresh) and len(moved) == 14
    assert max(rel(moved[k], fresh[k]) for k in fresh) < 1e-5
    assert (
        max(rel(moved[k], w) for k, w in open_model(str(edited)).read_kv().items()) > 1e-2
    )  # not a copy


def test_transfer_refuses_another_text_encoder(edited: Path, tmp_path: Path) -> None:
    from uce_cli.weights.tiny import write_tiny_model

    stranger = write_tiny_model(tmp_path / "seed1", seed=1)
    result = run(
        "transfer", edited / "operator.safetensors", "--model", stranger, "--out", tmp_path / "t"
    )
    assert_error(result, "text_encoder_weights_sha256", "share the text encoder")
    assert_error(
        run("transfer", edited / "edit.safetensors", "--model", stranger, "--out", tmp_path / "t"),
        "not an operator",
    )
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "edit_file", ["edit.safetensors", LORA_FILE, KOHYA_FILE, "operator.safetensors"]
)
def test_merge_reproduces_the_edit(
    edited: Path, tiny_model: Path, tmp_path: Path, edit_file: str
) -> None:
    result = run("merge", tiny_model, edited / edit_file, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().endswith("m")
    merged = pipeline(tmp_path / "m").unet.state_dict()  # loads with diffusers
    patched = open_model(str(edited)).read_kv()
    assert max(rel(merged[k], w) for k, w in patched.items()) < 1e-4


def test_merge_refuses_wrong_base_and_corrupt_files(
    edited: Path, tiny_model: Path, tmp_path: Path
) -> None:
    delta = load_file(edited / "edit.safetensors")
    first = sorted(delta)[0]
    save_file(
        {**delta, first: delta[first][:, :16].contiguous()}, str(tmp_path / "shape.safetensors")
    )
    assert_error(
        run("merge", tiny_model, tmp_path / "shape.safetensors", "--out", tmp_path / "o"),
        first,
        "wrong base",
    )
    save_file(
        {**delta, "unet.extra.attn2.to_k.weight": delta[first].clone()},
        str(tmp_path / "key.safetensors"),
    )
    assert_error(
        run("merge", tiny_model, tmp_path / "key.safetensors", "--out", tmp_path / "o"),
        "unet.extra.attn2.to_k.weight",
    )
    data = (edited / "edit.safetensors").read_bytes()
    (tmp_path / "corrupt.safetensors").write_bytes(data[:200])
    assert_error(
        run("merge", tiny_model, tmp_path / "corrupt.safetensors", "--out", tmp_path / "o"),
        "corrupt",
    )
    lora = load_file(edited / LORA_FILE)
    lora.pop(sorted(k for k in lora if k.endswith("lora_B.weight"))[0])
    save_file(lora, str(tmp_path / "half.safetensors"))
    assert_error(
        run("merge", tiny_model, tmp_path / "half.safetensors", "--out", tmp_path / "o"),
        "lacks its up (lora_B)",
    )
    assert not (tmp_path / "o").exists()


def test_pickle_edit_needs_allow_pickle(edited: Path, tiny_model: Path, tmp_path: Path) -> None:
    torch.save(load_file(edited / "edit.safetensors"), tmp_path / "edit.pt")
    assert_error(
        run("merge", tiny_model, tmp_path / "edit.pt", "--out", tmp_path / "o"),
        "--allow-pickle",
        "pickle",
    )
    result = run(
        "merge", tiny_model, tmp_path / "edit.pt", "--out", tmp_path / "o", "--allow-pickle"
    )
    assert result.exit_code == 0, result.stderr
    merged = open_model(str(tmp_path / "o")).read_kv()
    assert all(torch.equal(merged[k], w) for k, w in open_model(str(edited)).read_kv().items())


def test_delta_and_lora_record_the_base_kv_hash(edited: Path) -> None:
    import json

    log = json.loads((edited / "edit_log.json").read_text())
    expected = log["base_model"]["kv_weights_sha256"]
    for name in ("edit.safetensors", LORA_FILE, KOHYA_FILE, "operator.safetensors"):
        with safe_open(str(edited / name), "pt") as f:
            assert f.metadata()["base_kv_weights_sha256"] == expected, name


def test_merge_refuses_a_delta_made_for_another_base(
    edited: Path, other_model: Path, tmp_path: Path
) -> None:
    result = run("merge", other_model, edited / "edit.safetensors", "--out", tmp_path / "m")
    assert_error(
        result,
        "was made for another base",
        "uce transfer OPERATOR --model",
        "--allow-other-base",
    )
    assert not (tmp_path / "m").exists()
    forced = run(
        "merge",
        other_model,
        edited / "edit.safetensors",
        "--out",
        tmp_path / "m",
        "--allow-other-base",
    )
    assert forced.exit_code == 0, forced.stderr
    assert "warning: " in forced.stderr and "--allow-other-base" in forced.stderr
    merged = open_model(str(tmp_path / "m")).read_kv()
    assert all(torch.equal(merged[k], w) for k, w in open_model(str(edited)).read_kv().items())


def test_merge_of_a_delta_on_its_own_base_says_nothing(
    edited: Path, tiny_model: Path, tmp_path: Path
) -> None:
    result = run("merge", tiny_model, edited / "edit.safetensors", "--out", tmp_path / "m")
    assert result.exit_code == 0, result.stderr
    assert "warning" not in result.stderr


@pytest.mark.parametrize("weight_name", [LORA_FILE, KOHYA_FILE])
def test_merge_of_a_lora_made_for_another_base_warns_once(
    edited: Path, other_model: Path, tmp_path: Path, weight_name: str
) -> None:
    result = run("merge", other_model, edited / weight_name, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert "made for another base" in warnings[0] and "uce transfer" in warnings[0]
    # applied as a difference: the other model's own weights plus ΔW of the edit
    base = open_model(str(other_model)).read_kv()
    merged = open_model(str(tmp_path / "m")).read_kv()
    assert max(rel(merged[k], base[k]) for k in merged) > 1e-3


def test_merge_of_a_delta_without_base_hash_warns(
    edited: Path, tiny_model: Path, tmp_path: Path
) -> None:
    save_file(load_file(edited / "edit.safetensors"), str(tmp_path / "old.safetensors"))
    result = run("merge", tiny_model, tmp_path / "old.safetensors", "--out", tmp_path / "m")
    assert result.exit_code == 0, result.stderr
    assert "warning: " in result.stderr and "does not record which base" in result.stderr


def test_merge_and_transfer_outputs_record_their_own_base(
    edited: Path, other_model: Path, tmp_path: Path
) -> None:
    import json

    result = run(
        "transfer",
        edited / "operator.safetensors",
        "--model",
        other_model,
        "--out",
        tmp_path / "t",
        "--format",
        "delta",
    )
    assert result.exit_code == 0, result.stderr
    log = json.loads((tmp_path / "t" / "edit_log.json").read_text())
    with safe_open(str(tmp_path / "t" / "edit.safetensors"), "pt") as f:
        recorded = f.metadata()["base_kv_weights_sha256"]
    assert recorded == log["base_model"]["kv_weights_sha256"]
    # so the transferred delta merges into the other model without complaint
    merged = run("merge", other_model, tmp_path / "t" / "edit.safetensors", "--out", tmp_path / "m")
    assert merged.exit_code == 0 and "warning" not in merged.stderr, merged.stderr
