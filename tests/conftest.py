"""Shared fixtures: an isolated uce cache, offline hub access, the tiny model, a finished edit."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The hub client reads HF_HUB_OFFLINE once, at import: set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "uce-upstream"


@pytest.fixture(scope="session", autouse=True)
def _session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Temp files of the tests and of every process they start go into the session's folder.

    What a library or a child leaves in a temp folder (``accelerate launch``'s torchelastic logs,
    scratch files) then goes when pytest removes that folder after a passing run
    (``tmp_path_retention_policy = "failed"`` in pyproject.toml), not into the system's /tmp.
    Session-scoped, so module- and session-scoped fixtures get it too.
    """
    folder = tmp_path_factory.getbasetemp() / "tmp"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        patch.setattr(tempfile, "tempdir", str(folder))
        yield


@pytest.fixture(autouse=True)
def _isolated_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point uce's cache at a per-session temp folder and keep the hub client offline."""
    cache = tmp_path_factory.getbasetemp() / "uce-cache"
    monkeypatch.setenv("UCE_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("UCE_DEBUG", raising=False)
    if SHARED_DATA.is_dir() and "UCE_DATA_MIRROR" not in os.environ:
        monkeypatch.setenv("UCE_DATA_MIRROR", str(SHARED_DATA))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1.x diffusers folder (seed 0), read-only by convention: copy it to modify it."""
    from uce_cli.weights.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("base") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-2.x-shaped diffusers folder (seed 0; OpenCLIP-style text encoder, linear
    projections, v-prediction), read-only by convention."""
    from uce_cli.weights.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("base-sd2") / "tiny-sd2", seed=0, variant="sd2")


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    """Write a recipe file and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# The erase most format/verify tests share: two multi-token artists, two preserved ones.
ERASE_RECIPE = """
erase:
  - concepts: [Kelly Mckernan, Thomas Kinkade]
    templates: art
preserve:
  - concepts: [Claude Monet, Rembrandt]
"""


def apply_recipe(
    model: Path | str,
    folder: Path,
    formats: list[str] | None = None,
    lora_rank: int | None = None,
    body: str = ERASE_RECIPE,
) -> Path:
    """Run ``body`` on ``model`` into ``folder/out`` (formats override the recipe's); return it."""
    from uce_cli.commands.apply import run_apply
    from uce_cli.edit.plan import plan_recipe

    plan = plan_recipe(write_recipe(folder, f"model: {model}\n{body}"))
    if formats is not None:
        plan.formats = formats
    return run_apply(
        plan, out=folder / "out", device="cpu", lora_rank=lora_rank, use_cache=False
    ).out


@pytest.fixture(scope="session")
def erased_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of a finished paper-mode erase on the tiny model (diffusers + delta + log)."""
    return apply_recipe(tiny_model, tmp_path_factory.mktemp("erased"))


@pytest.fixture()
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny model."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model-copy"))


class PlainEncoder:
    """The tiny model's tokenizer and text encoder, used the plain way the published scripts use
    them (pad to 77, no attention mask), for float64 references written independently of uce."""

    def __init__(self, model: Path) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
        self.enc = CLIPTextModel.from_pretrained(str(model / "text_encoder")).eval()

    def embed(self, texts: list[str]) -> tuple[object, list[int]]:
        """((N, 77, d) float64 hidden states, the last word token's index f of each text)."""
        import torch

        ids = self.tok(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = self.enc(ids.input_ids)[0].double()
        return hidden, [int(n) - 2 for n in ids.attention_mask.sum(1)]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL diffusers folder (seed 0), read-only by convention: copy it to modify it."""
    from uce_cli.weights.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("base-sdxl") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev-shaped diffusers folder (seed 0); read-only by convention."""
    from uce_cli.weights.tiny_joint import write_tiny_joint

    return write_tiny_joint("flux", tmp_path_factory.mktemp("base") / "tiny-flux", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3-shaped diffusers folder (seed 0); read-only by convention."""
    from uce_cli.weights.tiny_joint import write_tiny_joint

    return write_tiny_joint("sd3", tmp_path_factory.mktemp("base") / "tiny-sd3", seed=0)


def _tiny_transformer_model(factory: pytest.TempPathFactory, kind: str) -> Path:
    from uce_cli.weights.tiny_transformers import write_tiny_transformer_model

    return write_tiny_transformer_model(factory.mktemp("base") / f"tiny-{kind}", kind, seed=0)


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PixArt-α diffusers folder (seed 0), read-only by convention."""
    return _tiny_transformer_model(tmp_path_factory, "pixart-alpha")


@pytest.fixture(scope="session")
def tiny_pixart_sigma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PixArt-Σ diffusers folder (seed 0), read-only by convention."""
    return _tiny_transformer_model(tmp_path_factory, "pixart-sigma")


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Sana diffusers folder (seed 0), read-only by convention."""
    return _tiny_transformer_model(tmp_path_factory, "sana")
