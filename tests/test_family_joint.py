"""FLUX.1 and SD3 families: detection, groups, token positions, and vectors bit-identical to what
the pipelines feed their transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from uce_cli.errors import ModelError, UceError
from uce_cli.families.flux import FluxFamily
from uce_cli.families.sd3 import SD3Family

PROMPTS = ["painting by Kelly Mckernan", "", "art", "a photo of a cat in the city"]


def _family(cls: type, root: Path) -> object:
    return cls(root, json.loads((root / "model_index.json").read_text()))


def test_flux_groups_and_editable_keys(tiny_flux: Path) -> None:
    fam = _family(FluxFamily, tiny_flux)
    assert FluxFamily.claims(fam.index) and not SD3Family.claims(fam.index)
    fam.check_components()
    assert [(g.name, g.width) for g in fam.groups()] == [("t5", 48), ("pooled", 32)]
    assert fam.group_of("context_embedder.weight") == ("t5", "context_embedder")
    assert fam.group_of("time_text_embed.text_embedder.linear_1.weight") == (
        "pooled",
        "text_embedder",
    )
    # Biases, the second pooled layer and every attention projection are not editable.
    for key in (
        "context_embedder.bias",
        "time_text_embed.text_embedder.linear_1.bias",
        "time_text_embed.text_embedder.linear_2.weight",
        "transformer_blocks.0.attn.add_k_proj.weight",
        "transformer_blocks.0.attn.to_k.weight",
    ):
        assert fam.group_of(key) is None
    assert "not attention keys/values" in fam.edits
    names = sorted(p.parent.name for p in fam.text_encoder_files())
    assert names == ["text_encoder", "text_encoder_2"]


def test_flux_missing_component(tiny_flux: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_flux, tmp_path / "flux"))
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(ModelError, match=r"no 'tokenizer_2' component"):
        _family(FluxFamily, copy).check_components()


def test_flux_tokens(tiny_flux: Path) -> None:
    path = _family(FluxFamily, tiny_flux).text_path(None, None)
    tokens = path.tokens(PROMPTS)
    tok = path.tokenizer_2
    for p in PROMPTS:
        ids = tok(p).input_ids
        t = tokens["t5"][p]
        assert t.n_tokens == len(ids) and ids[-1] == tok.eos_token_id
        assert t.seen == 512
        if p:
            # the last word piece is the one just before </s>
            assert t.last_word == len(ids) - 2
            assert tok.convert_ids_to_tokens(ids[t.last_word]) != "</s>"
        else:
            assert t.last_word == 0 and ids == [tok.eos_token_id]
        assert (tokens["pooled"][p].last_word, tokens["pooled"][p].seen) == (0, 1)
    assert tokens["t5"]["art"].last_word == 0  # "▁art" is one piece
    # CLIP is truncated as the pipeline does (the pooled vector has no anchor); the caller
    # refuses n_tokens over max_tokens, T5's 512.
    long = path.tokens(["cat " * 100])
    assert long["pooled"]["cat " * 100].n_tokens == 102 and path.max_tokens == 512


def test_flux_vectors_equal_pipeline(tiny_flux: Path) -> None:
    from diffusers import FluxPipeline

    fam = _family(FluxFamily, tiny_flux)
    path = fam.text_path(torch.device("cpu"), torch.float32)
    got = path.encode(PROMPTS)
    pipe = FluxPipeline.from_pretrained(tiny_flux, transformer=None, vae=None)
    with torch.no_grad():  # as FluxPipeline.__call__ runs it (autograd changes T5's kernels)
        seq, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
    assert got["t5"].shape == (4, 512, 48) and got["pooled"].shape == (4, 1, 32)
    assert torch.equal(got["t5"], seq)
    assert torch.equal(got["pooled"][:, 0], pooled)
    path.release()
    with pytest.raises(ModelError, match="without encoders"):
        path.encode(PROMPTS)


def test_sd3_groups_tokens_and_vectors(tiny_sd3: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    fam = _family(SD3Family, tiny_sd3)
    assert SD3Family.claims(fam.index) and not FluxFamily.claims(fam.index)
    fam.check_components()
    assert [(g.name, g.width) for g in fam.groups()] == [("joint", 80), ("pooled", 72)]
    assert fam.group_of("context_embedder.weight") == ("joint", "context_embedder")
    path = fam.text_path(torch.device("cpu"), torch.float32)
    tokens = path.tokens(PROMPTS)
    clip = path.tokenizers[0]
    for p in PROMPTS:
        n = len(clip(p).input_ids)
        assert tokens["joint"][p].last_word == max(n - 2, 0)
        assert tokens["joint"][p].seen == 77 + 256
    assert path.max_tokens == 77
    with pytest.raises(UceError, match=r"has \d+ tokens in the T5 tokenizer \(tokenizer_3\)"):
        path.tokens(["Mckernan " * 30])  # ≤ 77 CLIP tokens, > 256 T5 pieces
    got = path.encode(PROMPTS)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, transformer=None, vae=None)
    with torch.no_grad():  # as StableDiffusion3Pipeline.__call__ runs it
        seq, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False
        )
    assert got["joint"].shape == (4, 333, 80) and got["pooled"].shape == (4, 1, 72)
    assert torch.equal(got["joint"], seq)
    assert torch.equal(got["pooled"][:, 0], pooled)
    # the CLIP part is zero-padded from 32 + 40 to T5's 80
    assert torch.count_nonzero(got["joint"][:, :77, 72:]) == 0


def test_auto_dtype_on_cuda_is_bf16_for_t5_and_gemma_families() -> None:
    """T5-XXL overflows in fp16: `--dtype auto` picks bf16 on CUDA for FLUX, SD3, PixArt, Sana."""
    import torch

    from uce_cli.families.flux import FluxFamily
    from uce_cli.families.model import pick_dtype
    from uce_cli.families.pixart import PixArtFamily
    from uce_cli.families.sana import SanaFamily
    from uce_cli.families.sd import SD
    from uce_cli.families.sd3 import SD3Family

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for family in (FluxFamily, SD3Family, PixArtFamily, SanaFamily):
        assert pick_dtype("auto", cuda, family.cuda_dtype) == torch.bfloat16, family
        assert pick_dtype("auto", cpu, family.cuda_dtype) == torch.float32
    assert pick_dtype("auto", cuda, SD.cuda_dtype) == torch.float16
    assert pick_dtype("fp16", cuda, FluxFamily.cuda_dtype) == torch.float16  # explicit wins
