"""PixArt-α/Σ and Sana families: uce's vectors are what the pipelines feed attn2, the tokens are
counted on the unmasked positions, and the padded positions never reach the transformer."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from uce_cli.errors import ModelError
from uce_cli.families.pixart import PixArtFamily
from uce_cli.families.sana import SanaFamily

PROMPTS = ["painting by Kelly Mckernan", "", "  A photo of a CAT  ", "art"]
KINDS = ["tiny_pixart", "tiny_pixart_sigma", "tiny_sana"]


def family_of(root: Path) -> PixArtFamily | SanaFamily:
    index = json.loads((root / "model_index.json").read_text())
    for family in (PixArtFamily, SanaFamily):
        if family.claims(index):
            return family(root, index)
    raise AssertionError(f"no family claims {root}")


def pipeline_inputs(root: Path, prompts: list[str]) -> tuple[object, torch.Tensor, torch.Tensor]:
    """(pipeline, prompt_embeds, mask) from the pipeline's own encode_prompt with __call__'s
    defaults (max length; Sana's instruction)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(root))
    defaults = inspect.signature(type(pipe).__call__).parameters
    kwargs = {"max_sequence_length": defaults["max_sequence_length"].default}
    if "complex_human_instruction" in defaults:
        kwargs["complex_human_instruction"] = defaults["complex_human_instruction"].default
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, **kwargs
        )
    return pipe, embeds, mask


def what_attn2_reads(pipe: object, embeds: torch.Tensor) -> torch.Tensor:
    """The transformer's own caption projection (and Sana's caption norm) over the embeds."""
    transformer = pipe.transformer
    with torch.no_grad():
        out = transformer.caption_projection(embeds)
        if hasattr(transformer, "caption_norm"):
            out = transformer.caption_norm(out)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_vectors_are_what_attn2_reads(kind: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(kind)
    path = family_of(root).text_path(torch.device("cpu"), torch.float32)
    vectors = path.encode(PROMPTS)["text"]
    pipe, embeds, mask = pipeline_inputs(root, PROMPTS)
    reference = what_attn2_reads(pipe, embeds)
    assert vectors.dtype == torch.float32 and vectors.shape == reference.shape
    # bit-identical on the unmasked positions (and, since uce runs the same code, everywhere)
    for row, seen in enumerate(mask.sum(1).tolist()):
        assert torch.equal(vectors[row, :seen], reference[row, :seen])
    assert torch.equal(vectors, reference)
    # the text path over the loaded pipeline (the debias loop's) gives the same vectors
    assert torch.equal(family_of(root).text_path_of(pipe).encode(PROMPTS)["text"], reference)


@pytest.mark.parametrize("kind", KINDS)
def test_seen_is_the_pipeline_mask(kind: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(kind)
    tokens = family_of(root).text_path(None, None).tokens(PROMPTS)["text"]
    _, _, mask = pipeline_inputs(root, PROMPTS)
    for prompt, row in zip(PROMPTS, mask, strict=True):
        seen = int(row.sum())
        assert tokens[prompt].seen == seen
        # the unmasked positions are a leading run: 0 … seen−1
        assert row[:seen].all() and not row[seen:].any()


def test_t5_tokens(tiny_pixart: Path) -> None:
    path = family_of(tiny_pixart).text_path(None, None)
    tokens = path.tokens(PROMPTS)["text"]
    tok = path.tokenizer
    ids = tok("painting by kelly mckernan").input_ids
    # last_word is the token before </s>; seen counts the words and </s>
    assert tok.convert_ids_to_tokens(ids[tokens[PROMPTS[0]].last_word + 1]) == "</s>"
    assert tokens[PROMPTS[0]].last_word == len(ids) - 2 == tokens[PROMPTS[0]].seen - 2
    # "" is [</s>] alone: its last_word is that only position
    assert (tokens[""].n_tokens, tokens[""].last_word, tokens[""].seen) == (1, 0, 1)
    # prompts are lowercased and stripped as the pipeline does: same tokens as the plain form
    assert tokens[PROMPTS[2]] == path.tokens(["a photo of a cat"])["text"]["a photo of a cat"]


def test_gemma_tokens(tiny_sana: Path) -> None:
    path = family_of(tiny_sana).text_path(None, None)
    tokens = path.tokens(PROMPTS)["text"]
    # kept positions: <bos> then the prompt's tokens; Gemma appends no EOS
    assert (tokens["art"].n_tokens, tokens["art"].last_word, tokens["art"].seen) == (2, 1, 2)
    # "": <bos> and the instruction's last token
    assert (tokens[""].last_word, tokens[""].seen) == (1, 2)
    # <bos> + the prompt's tokens as they follow the instruction's "Prompt: " (word-initial "▁")
    bare = path.tokenizer(" painting by kelly mckernan").input_ids
    assert tokens[PROMPTS[0]].seen == len(bare)
    assert tokens[PROMPTS[0]].last_word == len(bare) - 1


@pytest.mark.parametrize(
    ("kind", "limit"), [("tiny_pixart", 120), ("tiny_pixart_sigma", 300), ("tiny_sana", 300)]
)
def test_max_length_is_the_pipeline_default(
    kind: str, limit: int, request: pytest.FixtureRequest
) -> None:
    path = family_of(request.getfixturevalue(kind)).text_path(None, None)
    assert path.max_tokens == limit
    long = "cat " * (limit + 5)
    counted = path.tokens([long])["text"][long]
    # counted untruncated (the caller refuses it), seen is what the pipeline would keep
    assert counted.n_tokens > limit
    assert counted.seen == limit


@pytest.mark.parametrize("kind", KINDS)
def test_padded_positions_never_reach_the_transformer(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Noise on every masked row of what attn2 reads leaves the transformer's output unchanged,
    so statistics over positions 0 … seen−1 cover everything the edit can act on."""
    root = request.getfixturevalue(kind)
    pipe, embeds, mask = pipeline_inputs(root, PROMPTS)
    transformer = pipe.transformer
    last = (
        transformer.caption_norm
        if hasattr(transformer, "caption_norm")
        else transformer.caption_projection
    )
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((len(PROMPTS), transformer.config.in_channels, 8, 8), generator=generator)
    timestep = torch.full((len(PROMPTS),), 500)
    extra = (
        {}
        if hasattr(transformer, "caption_norm")
        else {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    )

    def run(noise: bool) -> torch.Tensor:
        def perturb(_module: object, _args: object, out: torch.Tensor) -> torch.Tensor:
            pad = (~mask.bool()).unsqueeze(-1)
            return out + 100.0 * torch.randn(out.shape, generator=generator) * pad

        handle = last.register_forward_hook(perturb) if noise else None
        with torch.no_grad():
            out = transformer(
                latents,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=timestep,
                return_dict=False,
                **extra,
            )[0]
        if handle is not None:
            handle.remove()
        return out

    assert torch.equal(run(noise=False), run(noise=True))


def test_editable_weights_and_group(tiny_pixart: Path, tiny_sana: Path) -> None:
    from safetensors import safe_open

    for root, width in ((tiny_pixart, 24), (tiny_sana, 16)):
        family = family_of(root)
        (group,) = family.groups()
        assert (group.name, group.width) == ("text", width)
        with safe_open(
            str(root / "transformer" / "diffusion_pytorch_model.safetensors"), "pt"
        ) as f:
            keys = list(f.keys())
            editable = {k: family.group_of(k) for k in keys if family.group_of(k)}
            # every block's attn2 k/v, nothing else (attn1, to_q, biases, caption_projection)
            assert sorted(editable) == sorted(
                f"transformer_blocks.{i}.attn2.{p}.weight"
                for i in range(2)
                for p in ("to_k", "to_v")
            )
            assert {v for v in editable.values()} == {("text", "to_k"), ("text", "to_v")}
            assert all(f.get_slice(k).get_shape()[1] == width for k in editable)


def test_claims_only_its_pipelines(
    tiny_pixart: Path, tiny_pixart_sigma: Path, tiny_sana: Path
) -> None:
    read = lambda root: json.loads((root / "model_index.json").read_text())  # noqa: E731
    assert PixArtFamily.claims(read(tiny_pixart)) and PixArtFamily.claims(read(tiny_pixart_sigma))
    assert not PixArtFamily.claims(read(tiny_sana)) and SanaFamily.claims(read(tiny_sana))
    for other in ("PixArtSigmaPAGPipeline", "SanaSprintPipeline", "SanaControlNetPipeline"):
        assert not PixArtFamily.claims({"_class_name": other})
        assert not SanaFamily.claims({"_class_name": other})


def test_missing_component_is_named(tiny_pixart: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_pixart, tmp_path / "copy"))
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(ModelError, match=r"the 'text_encoder' folder is missing"):
        family_of(copy).check_components()
    index = json.loads((copy / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (copy / "text_encoder").mkdir()
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="text encoder is a CLIPTextModel, not a T5EncoderModel"):
        family_of(copy).check_components()
