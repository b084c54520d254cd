"""Tests for the built-in tiny SD model: reproducibility, loading, tokenizer and cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from safetensors import safe_open

from uce_cli.weights import tiny
from uce_cli.weights.tiny import (
    TINY_MODEL_NAME,
    build_tiny_tokenizer,
    ensure_tiny_model,
    write_tiny_model,
)

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seed-0 tiny model folder shared by the read-only tests (building costs ~0.5 s)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    """The in-memory tokenizer the folder's tokenizer must match."""
    return build_tiny_tokenizer()


def _leftover_temp_dirs(parent: Path) -> list[Path]:
    """Return hidden build dirs that a finished build should have renamed or removed."""
    return [p for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def test_model_name_constant() -> None:
    assert TINY_MODEL_NAME == "builtin:tiny-sd"


def test_same_seed_is_byte_identical_and_seed_matters(tiny_dir: Path, tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    # Building must not consume or reseed the caller's global torch RNG.
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    for rel in (UNET_WEIGHTS, TEXT_ENCODER_WEIGHTS):
        assert (tiny_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
        assert (tiny_dir / rel).read_bytes() != (other / rel).read_bytes(), rel
    assert _leftover_temp_dirs(tmp_path) == []


def test_folder_layout_is_sd1_style_and_safetensors_only(tiny_dir: Path) -> None:
    for rel in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        TEXT_ENCODER_WEIGHTS,
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        UNET_WEIGHTS,
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (tiny_dir / rel).is_file(), rel
    # No pickled weights anywhere: only .safetensors may hold tensors.
    for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt"):
        assert list(tiny_dir.rglob(pattern)) == [], pattern


def test_write_refuses_to_overwrite(tiny_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        write_tiny_model(tiny_dir)
    assert (tiny_dir / "model_index.json").is_file()


def test_tokenizer_template_words_single_rare_words_split(tokenizer: CLIPTokenizer) -> None:
    for word in ("art", "painting", "by", "of", "photo", "style"):
        assert len(tokenizer.tokenize(word)) == 1, word
    assert len(tokenizer.tokenize("Kinkade")) >= 3
    assert len(tokenizer.tokenize("Mckernan")) >= 3


def test_tokenizer_special_tokens_and_padding(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id

    text = "painting by Kelly Mckernan"
    n_tokens = len(tokenizer.tokenize(text))
    enc = tokenizer(text, padding="max_length", max_length=77, truncation=True)
    assert len(enc.input_ids) == 77
    assert sum(enc.attention_mask) == n_tokens + 2
    assert enc.input_ids[0] == tokenizer.bos_token_id
    assert enc.input_ids[n_tokens + 1] == tokenizer.eos_token_id


def test_tokenizer_never_emits_unk(tokenizer: CLIPTokenizer) -> None:
    # unk is <|endoftext|>, so any unk would show up as an eos id inside the text.
    ids = tokenizer("Zdzisław Beksiński ☃ 42 naïve").input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]
    assert len(ids) > 10


def test_reloaded_tokenizer_matches(tiny_dir: Path, tokenizer: CLIPTokenizer) -> None:
    from transformers import CLIPTokenizer

    reloaded = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert len(reloaded) == len(tokenizer)
    assert reloaded.pad_token_id == reloaded.eos_token_id == tokenizer.eos_token_id
    for text in ("painting by Kelly Mckernan", "art by Thomas Kinkade", "photo of a nurse"):
        expected = tokenizer(text, padding="max_length", max_length=77).input_ids
        assert reloaded(text, padding="max_length", max_length=77).input_ids == expected


def test_unet_has_cross_attention_layers(tiny_dir: Path) -> None:
    with safe_open(str(tiny_dir / UNET_WEIGHTS), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    to_k = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    to_v = [k for k in shapes if k.endswith("attn2.to_v.weight")]
    assert len(to_k) >= 4
    assert len(to_v) == len(to_k)
    for key in to_k + to_v:
        assert len(shapes[key]) == 2 and shapes[key][1] == 32, (key, shapes[key])


def test_pipeline_loads_offline_and_samples_deterministically(
    tiny_dir: Path, tokenizer: CLIPTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.steps_offset == 1
    # SD 1.x geometry: VAE downsamples by 8 and the default image is 64px.
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.vocab_size == len(tokenizer)

    def sample() -> np.ndarray:
        image = pipe(
            "painting by Kelly Mckernan",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
        ).images[0]
        assert image.size == (64, 64)
        return np.asarray(image)

    first = sample()
    assert first.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, sample())


def test_ensure_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_tiny_model(tmp_path)
    assert path == tmp_path / "models" / "tiny-sd-v1"
    assert (path / "model_index.json").is_file()
    mtime = (path / "model_index.json").stat().st_mtime_ns

    def no_rebuild(seed: int = 0) -> None:
        raise AssertionError("ensure_tiny_model rebuilt an existing model")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", no_rebuild)
    assert ensure_tiny_model(tmp_path) == path
    assert (path / "model_index.json").stat().st_mtime_ns == mtime


def test_ensure_loses_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "models" / "tiny-sd-v1"
    real_build = tiny._build_in_temp_dir

    def build_while_rival_wins(parent: Path, name: str, seed: int) -> Path:
        mine = real_build(parent, name, seed)
        # A rival process finishes and renames its copy first.
        os.replace(real_build(parent, name, seed), dest)
        return mine

    monkeypatch.setattr(tiny, "_build_in_temp_dir", build_while_rival_wins)
    assert ensure_tiny_model(tmp_path) == dest
    # The rival's complete copy is kept and the loser's copy is discarded.
    assert (dest / "model_index.json").is_file()
    assert (dest / UNET_WEIGHTS).is_file()
    assert _leftover_temp_dirs(dest.parent) == []
