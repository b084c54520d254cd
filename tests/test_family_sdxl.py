"""The SDXL family on the tiny SDXL model: its vectors are the pipeline's own, its tokens are on what
the UNet sees, and its single-file and LoRA layouts load with diffusers' own loaders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from uce_cli.artifacts.lora import factorize_delta
from uce_cli.errors import ModelError, UceError
from uce_cli.families.sdxl import POOLED_KEY, SdxlFamily
from uce_cli.families.sdxl_layout import single_file_state

PROMPTS = ["a cat", "", "painting by Kelly Mckernan", "photo of a dog in the garden"]


def _family(root: Path) -> SdxlFamily:
    return SdxlFamily(root, json.loads((root / "model_index.json").read_text()))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl: Path) -> object:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


@pytest.fixture(scope="module")
def text_path(tiny_sdxl: Path) -> object:
    return _family(tiny_sdxl).text_path(torch.device("cpu"), torch.float32)


def test_vectors_are_bit_identical_to_encode_prompt(pipe: object, text_path: object) -> None:
    ours = text_path.encode(PROMPTS)
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert ours["text"].dtype == torch.float32 and ours["text"].shape == (4, 77, 80)
    assert torch.equal(ours["text"], embeds)
    assert torch.equal(ours["pooled"][:, 0], pooled)
    # one prompt at a time too: the same calls give the same bits for any batch
    for prompt in PROMPTS:
        single = text_path.encode([prompt])
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        assert torch.equal(single["text"], embeds)
        assert torch.equal(single["pooled"][:, 0], pooled)


def test_longest_padding_keeps_positions_up_to_the_last_word(text_path: object) -> None:
    full = text_path.encode(PROMPTS)
    short = text_path.encode(PROMPTS, padding="longest")
    tokens = text_path.tokens(PROMPTS)["text"]
    assert short["text"].shape[1] == max(t.n_tokens for t in tokens.values()) < 77
    for i, p in enumerate(PROMPTS):
        f = tokens[p].last_word
        assert torch.allclose(short["text"][i, : f + 2], full["text"][i, : f + 2], atol=1e-6)
        assert torch.allclose(short["pooled"][i], full["pooled"][i], atol=1e-6)


def test_both_alignment_modes_pick_the_unets_rows(pipe: object, text_path: object) -> None:
    """last-token: the row at f is the last word's state in both halves; paper: f … f+K−1."""
    embeds = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0]
    tokens = text_path.tokens(PROMPTS)["text"]
    eos = pipe.tokenizer.eos_token_id
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tok(PROMPTS, padding="max_length", max_length=77).input_ids
        for p, row in zip(PROMPTS, ids, strict=True):
            f = tokens[p].last_word
            assert row[f + 1] == eos and (f == 0 or row[f] != eos)
    source, target = "painting by Kelly Mckernan", "a cat"
    f_s, f_t = tokens[source].last_word, tokens[target].last_word
    k = tokens[source].seen - max(f_s, f_t)
    enc = text_path.encode([source, target])["text"]
    assert torch.equal(enc[0, f_s : f_s + k], embeds[2, f_s : f_s + k])
    assert torch.equal(enc[1, f_t : f_t + k], embeds[0, f_t : f_t + k])
    assert f_s + k == 77  # the longer prompt's block reaches the last position the UNet sees
    assert torch.equal(enc[0, f_s], embeds[2, f_s])  # last-token's one vector


def test_tokens_are_defined_on_what_the_unet_sees(pipe: object, text_path: object) -> None:
    tokens = text_path.tokens(PROMPTS)
    counts = [len(pipe.tokenizer(p).input_ids) for p in PROMPTS]
    assert counts == [len(pipe.tokenizer_2(p).input_ids) for p in PROMPTS]
    for p, n in zip(PROMPTS, counts, strict=True):
        assert tokens["text"][p].n_tokens == n
        assert tokens["text"][p].last_word == n - 2
        assert tokens["text"][p].seen == 77
        assert (tokens["pooled"][p].last_word, tokens["pooled"][p].seen) == (0, 1)
    assert tokens["text"][""].last_word == 0
    # the documented padding difference: tokenizer 1 pads with EOS, tokenizer 2 with "!"
    first = pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    second = pipe.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert first[:4] == second[:4] and first[3] == pipe.tokenizer.eos_token_id
    assert set(first[4:]) == {pipe.tokenizer.eos_token_id}
    assert set(second[4:]) == {pipe.tokenizer_2.convert_tokens_to_ids("!")}
    assert pipe.tokenizer_2.pad_token == "!"


def _strip_merges(root: Path, tokenizer: str) -> None:
    """Make one tokenizer split every word into bytes (its merges dropped)."""
    (root / tokenizer / "merges.txt").write_text("#version: 0.2\n")


@pytest.mark.parametrize("tokenizer", ["tokenizer", "tokenizer_2"])
def test_prompt_too_long_for_either_tokenizer_is_refused(
    tiny_sdxl: Path, tmp_path: Path, tokenizer: str
) -> None:
    root = Path(shutil.copytree(tiny_sdxl, tmp_path / "m"))
    _strip_merges(root, tokenizer)
    path = _family(root).text_path(None, None)
    prompt = "painting " * 12  # 14 tokens with merges, 98 spelled out in bytes
    with pytest.raises(UceError) as err:
        path.tokens(["a cat", prompt])
    msg = str(err.value)
    counts = (98, 14) if tokenizer == "tokenizer" else (14, 98)
    assert f"has {counts[0]} tokens in tokenizer and {counts[1]} in tokenizer_2" in msg
    assert f"too long: {tokenizer} (" in msg and "reads 77 tokens" in msg
    assert msg.count("reads 77") == 1  # only the tokenizer that overflows is named


def test_prompt_over_77_for_both_is_left_to_the_caller(text_path: object) -> None:
    """Both tokenizers agree: n_tokens is counted untruncated; the caller refuses it by section."""
    tokens = text_path.tokens(["cat " * 80])
    assert tokens["text"]["cat " * 80].n_tokens == 82 > text_path.max_tokens == 77


def test_tokenizers_that_split_a_prompt_differently_are_refused(
    tiny_sdxl: Path, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(tiny_sdxl, tmp_path / "m"))
    _strip_merges(root, "tokenizer_2")
    with pytest.raises(UceError, match="has 3 tokens in tokenizer and 5 in tokenizer_2"):
        _family(root).text_path(None, None).tokens(["cat"])


def test_groups_and_editable_keys(tiny_sdxl: Path, pipe: object) -> None:
    family = _family(tiny_sdxl)
    family.check_components()
    text, pooled = family.groups()
    assert (text.name, text.width, pooled.name, pooled.width) == ("text", 80, "pooled", 40)
    keys = list(pipe.unet.state_dict())
    editable = {k: family.group_of(k) for k in keys if family.group_of(k)}
    assert sum(g == ("text", "to_k") for g in editable.values()) == 17
    assert sum(g == ("text", "to_v") for g in editable.values()) == 17
    assert editable[POOLED_KEY] == ("pooled", "add_embedding")
    assert family.columns_of(POOLED_KEY) == (0, 40)
    assert {family.columns_of(k) for k in editable if k != POOLED_KEY} == {None}
    assert (
        family.group_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight") is None
    )
    ordered = sorted(editable, key=family.order)
    parts = [k.split(".")[0] for k in ordered]
    assert parts == sorted(
        parts, key=["down_blocks", "mid_block", "up_blocks", "add_embedding"].index
    )


def test_a_refiner_or_incomplete_folder_is_refused(tiny_sdxl: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_sdxl, tmp_path / "m"))
    index = json.loads((root / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    with pytest.raises(ModelError, match="no 'text_encoder' component — an SDXL refiner"):
        SdxlFamily(root, index).check_components()
    shutil.rmtree(root / "tokenizer_2")
    with pytest.raises(ModelError, match=r"tokenizer_2 is missing — model_index.json lists"):
        _family(root).check_components()


def test_mismatched_cross_attention_width_is_refused(tiny_sdxl: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_sdxl, tmp_path / "m"))
    cfg = json.loads((root / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 64
    (root / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"cross_attention_dim 64 ≠ 32 \+ 48"):
        _family(root).groups()


def _edited(pipe: object, family: SdxlFamily) -> dict[str, torch.Tensor]:
    """A low-rank change of every editable tensor (add_embedding: its 40 text columns only)."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for key, w in pipe.unet.state_dict().items():
        if family.group_of(key) is None:
            continue
        cols = 40 if key == POOLED_KEY else w.shape[1]
        delta = torch.zeros_like(w)
        delta[:, :cols] = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(
            2, cols, generator=gen
        )
        out[key] = w + 0.05 * delta
    return out


def test_single_file_loads_with_from_single_file(
    tiny_sdxl: Path, pipe: object, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    family = _family(tiny_sdxl)
    new = _edited(pipe, family)
    path = tmp_path / "sdxl.safetensors"
    state = single_file_state(tiny_sdxl, new)
    save_file(state, str(path))
    layout = family.single_file()
    keys = list(state)
    assert layout.claims(keys)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert state["conditioner.embedders.1.model.text_projection"].shape == (48, 40)
    names = layout.editable_names(keys)
    assert sorted(names.values()) == sorted(new)
    assert names[
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    ] == ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    mapped = layout.to_single_file(tiny_sdxl)
    assert {mapped["unet"][k] for k in new} == set(names)

    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(pipe, component).state_dict()
        got = getattr(loaded, component).state_dict()
        for key, tensor in want.items():
            if key.endswith("position_ids"):
                continue
            expected = new.get(key, tensor) if component == "unet" else tensor
            assert torch.equal(got[key], expected), (component, key)


def test_sd1_single_file_keys_are_not_claimed() -> None:
    from uce_cli.families.sdxl_layout import SdxlSingleFile

    keys = [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ]
    assert not SdxlSingleFile().claims(keys)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_lora_loads_with_load_lora_weights(
    tiny_sdxl: Path, pipe: object, tmp_path: Path, layout: str
) -> None:
    from diffusers import StableDiffusionXLPipeline

    family = _family(tiny_sdxl)
    base = pipe.unet.state_dict()
    new = _edited(pipe, family)
    state = {}
    for key, w in new.items():
        f = factorize_delta(w - base[key])
        if layout == "kohya":
            name = family.kohya_name(key)
            state |= {
                f"{name}.lora_down.weight": f.down,
                f"{name}.lora_up.weight": f.up,
                f"{name}.alpha": torch.tensor(float(f.rank)),
            }
        else:
            module = "unet." + key.removesuffix(".weight")
            state |= {f"{module}.lora_A.weight": f.down, f"{module}.lora_B.weight": f.up}
    assert family.kohya_name(POOLED_KEY) == "lora_unet_label_emb_0_0"
    assert (
        family.kohya_name("up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_v.weight")
        == "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_v"
    )
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    other = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    other.load_lora_weights(str(path))
    other.fuse_lora()
    got = {k.replace(".base_layer", ""): v for k, v in other.unet.state_dict().items()}
    for key, w in new.items():
        assert torch.allclose(got[key], w, atol=1e-6), key
    assert torch.equal(got[POOLED_KEY][:, 40:], base[POOLED_KEY][:, 40:])  # time-id columns


def test_single_file_converts_back_to_the_same_folder(
    tiny_sdxl: Path, pipe: object, tmp_path: Path
) -> None:
    """convert(write(folder)) gives the folder's tensors back (bigG's q/k/v split, projection
    transposed back, VAE attention 2-D again), and editable_key names the written keys."""
    from diffusers import StableDiffusionXLPipeline

    family = _family(tiny_sdxl)
    layout = family.single_file()
    new = _edited(pipe, family)
    path = tmp_path / "sdxl.safetensors"
    layout.write(path, tiny_sdxl, new, {"config": str(tiny_sdxl)})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118
        for key, w in new.items():
            assert torch.equal(f.get_tensor(layout.editable_key(key, keys)), w)
    dest = tmp_path / "converted"
    layout.convert(path, tiny_sdxl, dest)
    back = StableDiffusionXLPipeline.from_pretrained(dest)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(pipe, component).state_dict()
        got = getattr(back, component).state_dict()
        for key, tensor in want.items():
            expected = new.get(key, tensor) if component == "unet" else tensor
            assert torch.equal(got[key], expected), (component, key)
    assert back.tokenizer_2.pad_token == "!"


def test_single_file_missing_tensor_is_named(tiny_sdxl: Path, pipe: object, tmp_path: Path) -> None:
    state = single_file_state(tiny_sdxl, {})
    del state["conditioner.embedders.1.model.ln_final.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match=r"'conditioner\.embedders\.1\.model\.ln_final\.weight' "):
        _family(tiny_sdxl).single_file().convert(path, tiny_sdxl, tmp_path / "out")
