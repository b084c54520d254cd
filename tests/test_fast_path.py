"""The cost floor: no UNet instantiation, each prompt encoded once, the preserve-statistics cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import uce_cli.edit.stats as stats_module
from tests.conftest import write_recipe
from uce_cli.commands.apply import run_apply
from uce_cli.edit.cache import _path
from uce_cli.edit.encode import encode_batches, token_counts
from uce_cli.edit.plan import plan_recipe
from uce_cli.families.model import load_text_encoder, open_model

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of this test's own: entries left by other tests must not turn a miss into a hit."""
    monkeypatch.setenv("UCE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture()
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every prompt the apply run sends through the text encoder."""
    seen: list[str] = []
    real = stats_module.encode_prompts

    def spy(text_path, prompts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.extend(prompts)
        yield from real(text_path, prompts, *args, **kwargs)

    monkeypatch.setattr(stats_module, "encode_prompts", spy)
    return seen


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm()) <= 1e-5 * float(b.norm())


def recipe_text(model: Path, extra: str = "") -> str:
    return (
        f"model: {model}\nerase:\n  - concepts: [Kelly Mckernan, Kinkade]\n    templates: art\n"
        f"preserve:\n  - concepts: [Claude Monet, Rembrandt, a cat, a dog, a city]\n{extra}"
    )


def test_unet_is_never_instantiated(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("UNet2DConditionModel was constructed")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "__init__", refuse)
    recipe = write_recipe(tmp_path, recipe_text(tiny_model))
    out = run_apply(plan_recipe(recipe), out=tmp_path / "out", device="cpu", use_cache=False).out
    assert (out / UNET_FILE).is_file()


def test_each_unique_prompt_encoded_once(
    tiny_model: Path, tmp_path: Path, encoded: list[str]
) -> None:
    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\nerase:\n  - concepts: [a, b]\n    guide: art\nmoderate:\n  - concepts: [c]\n"
        "preserve:\n  - concepts: [art, d]\n",
    )
    run_apply(plan_recipe(recipe), out=tmp_path / "out", device="cpu", use_cache=False)
    assert sorted(encoded) == sorted(["a", "b", "c", "art", "", "d"])


def test_preserve_cache_hit_miss_corrupt(
    tiny_model: Path, tmp_path: Path, encoded: list[str]
) -> None:
    recipe = write_recipe(tmp_path, recipe_text(tiny_model))
    plan = plan_recipe(recipe)

    def apply(name: str, **kwargs: object) -> tuple[dict, dict]:
        out = run_apply(plan, out=tmp_path / name, device="cpu", **kwargs).out
        return json.loads((out / "edit_log.json").read_text()), load_file(str(out / UNET_FILE))

    first_log, first = apply("first")
    assert first_log["plan"]["preserve_cache"] == "miss"
    assert "Claude Monet" in encoded

    encoded.clear()
    second_log, second = apply("second")
    assert second_log["plan"]["preserve_cache"] == "hit"
    assert not {"Claude Monet", "Rembrandt", "a city"} & set(encoded)  # not re-encoded
    assert second_log["plan"]["preserve_vectors"] == first_log["plan"]["preserve_vectors"]
    # same G_p; edit prompts now ride in smaller batches, so fp32 encoder rounding may differ
    assert all(close(first[k], second[k]) for k in first)

    cache_files = list(_path("x").parent.glob("*.safetensors"))
    assert len(cache_files) == 1
    cache_files[0].write_bytes(cache_files[0].read_bytes()[:-16] + b"\x00" * 16)  # corrupt payload
    encoded.clear()
    third_log, third = apply("third")
    assert third_log["plan"]["preserve_cache"] == "corrupt"
    assert "Claude Monet" in encoded  # rebuilt from the prompts
    assert all(close(first[k], third[k]) for k in first)
    assert apply("fourth")[0]["plan"]["preserve_cache"] == "hit"  # the rebuilt entry is good

    off_log, _ = apply("fifth", use_cache=False)
    assert off_log["plan"]["preserve_cache"] == "off"


def test_cache_entry_under_wrong_key_is_not_used(tiny_model: Path, tmp_path: Path) -> None:
    plan_a = plan_recipe(write_recipe(tmp_path / "a", recipe_text(tiny_model)))
    plan_b = plan_recipe(
        write_recipe(tmp_path / "b", recipe_text(tiny_model).replace("a city", "a tree"))
    )
    run_apply(plan_a, out=tmp_path / "a" / "out", device="cpu")
    [entry_a] = list(_path("x").parent.glob("*.safetensors"))
    run_apply(plan_b, out=tmp_path / "b" / "out", device="cpu")
    entry_b = next(p for p in _path("x").parent.glob("*.safetensors") if p != entry_a)
    entry_b.write_bytes(entry_a.read_bytes())  # a valid file, but for another preserve set
    log = run_apply(plan_b, out=tmp_path / "b" / "again", device="cpu").log
    assert log["plan"]["preserve_cache"] == "corrupt"


def test_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert _path("k") == tmp_path / "elsewhere" / "preserve" / "k.safetensors"


def test_last_token_prefix_encoding_is_exact(tiny_model: Path) -> None:
    model = open_model(str(tiny_model))
    tokenizer, encoder = load_text_encoder(model, torch.device("cpu"), torch.float32)
    prompts = ["", "art", "painting by Kelly Mckernan", "a photo of a dog in the city"]
    counts = token_counts(tokenizer, prompts)
    [(_, padded)] = list(encode_batches(tokenizer, encoder, prompts, 8, padding="max_length"))
    [(_, short)] = list(encode_batches(tokenizer, encoder, prompts, 8, padding="longest"))
    assert short.shape[1] == max(counts.values()) < padded.shape[1] == 77
    for i, prompt in enumerate(prompts):
        f = counts[prompt] - 2
        assert torch.allclose(short[i, : f + 1], padded[i, : f + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("alignment", ["paper", "last-token"])
def test_cache_hit_gives_bit_identical_tensors(
    tiny_model: Path, tmp_path: Path, alignment: str
) -> None:
    """A hit reuses G_p and encodes the edit prompts in the very batches a miss does."""
    recipe = write_recipe(tmp_path, recipe_text(tiny_model, f"alignment: {alignment}\n"))
    plan = plan_recipe(recipe)
    runs = []
    for name in ("miss", "hit"):
        result = run_apply(plan, out=tmp_path / name, device="cpu")
        assert result.log["plan"]["preserve_cache"] == name
        runs.append((result.log, load_file(str(result.out / "edit.safetensors"))))
    (miss_log, miss), (hit_log, hit) = runs
    assert set(miss) == set(hit) and all(torch.equal(miss[k], hit[k]) for k in miss)
    assert miss_log["fingerprint"] == hit_log["fingerprint"]
    assert miss_log["layers"] == hit_log["layers"]
