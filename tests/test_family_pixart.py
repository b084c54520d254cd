"""PixArt-α/Σ and Sana families: uce's vectors are what the pipelines feed attn2, the tokens are
counted on the unmasked positions, and the padded positions never reach the transformer."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from tests.conftest import ERASE_RECIPE, apply_recipe, write_recipe
from uce_cli.artifacts.lora import LORA_FILE
from uce_cli.cli import app
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe
from uce_cli.errors import ModelError
from uce_cli.families.pixart import PixArtFamily
from uce_cli.families.sana import SanaFamily

PROMPTS = ["painting by Kelly Mckernan", "", "  A photo of a CAT  ", "art"]
KINDS = ["tiny_pixart", "tiny_pixart_sigma", "tiny_sana"]
DENOISER_FILE = "transformer/diffusion_pytorch_model.safetensors"


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


# --- end to end: apply, formats, sample, eval, transfer ------------------------------------------

runner = CliRunner()

PARITY_RECIPE = """
alignment: {mode}
erase:
  - concepts: [Kelly Mckernan, Kinkade]
    templates: ["painting by {{}}", "{{}}"]
    guide: art
moderate:
  - concepts: [nudity]
debias:
  - concepts: [doctor]
    attributes: [male, female]
    alphas: {{male: 0.3, female: 0.2}}
    alpha_scale: absolute
preserve:
  - concepts: [Claude Monet, a photo of a dog]
solver: {{lambda: 0.3, erase_scale: 0.8, preserve_scale: 0.4}}
"""


def run(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def kv_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every block's attn2 to_k/to_v weight of a folder's transformer."""
    with safe_open(str(folder / DENOISER_FILE), framework="pt") as f:
        return {
            k: f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118 - safe_open has no __iter__
            if ".attn2.to_" in k and k.endswith(("to_k.weight", "to_v.weight"))
        }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class CaptionReference:
    """Plain float64 UCE (docs/design.md), one pair at a time, per layer, on the vectors the
    pipeline itself feeds attn2, with the positions re-derived from its attention mask."""

    def __init__(self, root: Path) -> None:
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(str(root))
        self.gemma = hasattr(self.pipe.transformer, "caption_norm")
        defaults = inspect.signature(type(self.pipe).__call__).parameters
        self.kwargs = {"max_sequence_length": defaults["max_sequence_length"].default}
        if self.gemma:
            self.kwargs["complex_human_instruction"] = defaults["complex_human_instruction"].default
        self.cache: dict[tuple[str, ...], tuple[torch.Tensor, list[int], list[int]]] = {}

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        """((N, L, d) float64, seen, last word) — T5: the token before </s>; Gemma: the last."""
        if tuple(texts) not in self.cache:  # the same for every layer: encode once per text list
            self.cache[tuple(texts)] = self.encode(texts)
        return self.cache[tuple(texts)]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        with torch.no_grad():
            embeds, mask, _, _ = self.pipe.encode_prompt(
                texts, do_classifier_free_guidance=False, **self.kwargs
            )
        hidden = what_attn2_reads(self.pipe, embeds).double()
        seen = [int(s) for s in mask.sum(1)]
        last = [s - 1 if self.gemma else max(s - 2, 0) for s in seen]
        return hidden, seen, last

    def vectors(self, source: str, targets: list[tuple[str, float]], mode: str):  # noqa: ANN201
        hidden, seen, f = self.embed([source] + [t for t, _ in targets])
        k = min(s - i for s, i in zip(seen, f, strict=True)) if mode == "paper" else 1
        c = hidden[0, f[0] : f[0] + k]
        c_star = sum(w * hidden[i + 1, f[i + 1] : f[i + 1] + k] for i, (_, w) in enumerate(targets))
        return c, c_star

    def edit(self, w_old: torch.Tensor, pairs, preserve, lam, se, sp, mode) -> torch.Tensor:  # noqa: ANN001
        w = w_old.double()
        d = w.shape[1]
        mat1, mat2 = lam * w.clone(), lam * torch.eye(d, dtype=torch.float64)
        for source, targets in pairs:
            c, c_star = self.vectors(source, targets, mode)
            for c_i, cs_i in zip(c, c_star, strict=True):
                mat1 += se * torch.outer(w @ cs_i, c_i)
                mat2 += se * torch.outer(c_i, c_i)
        for prompt in preserve:
            hidden, seen, f = self.embed([prompt])
            rows = hidden[0, : seen[0]] if mode == "paper" else hidden[0, f[0] : f[0] + 1]
            for c_j in rows:
                mat1 += sp * torch.outer(w @ c_j, c_j)
                mat2 += sp * torch.outer(c_j, c_j)
        return torch.linalg.solve(mat2.T, mat1.T).T  # mat1 · mat2⁻¹ (Eq. 7 with the λ ridge)


@pytest.mark.parametrize("mode", ["paper", "last-token"])
@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_float64_reference(
    kind: str, mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = request.getfixturevalue(kind)
    base_hash = hashlib.sha256((root / DENOISER_FILE).read_bytes()).hexdigest()
    plan = plan_recipe(write_recipe(tmp_path, f"model: {root}\n" + PARITY_RECIPE.format(mode=mode)))
    out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=False).out
    new, old = kv_of(out), kv_of(root)
    reference = CaptionReference(root)
    pairs = [(p.source, list(p.targets)) for p in plan.pairs]
    worst = max(
        rel(new[key], reference.edit(w, pairs, plan.preserve, 0.3, 0.8, 0.4, mode))
        for key, w in old.items()
    )
    assert len(old) == 4 and worst < 1e-6, worst
    # the base is untouched; only the attn2 k/v differ in the output; the delta holds them
    assert hashlib.sha256((root / DENOISER_FILE).read_bytes()).hexdigest() == base_hash
    base_all, out_all = load_file(str(root / DENOISER_FILE)), load_file(str(out / DENOISER_FILE))
    assert {k for k in base_all if not torch.equal(base_all[k], out_all[k])} == set(old)
    delta = load_file(str(out / "edit.safetensors"))
    assert set(delta) == {f"transformer.{k}" for k in old}


@pytest.mark.parametrize("kind", ["tiny_pixart", "tiny_sana"])
def test_alignment_uses_only_unmasked_positions(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = request.getfixturevalue(kind)
    path = family_of(root).text_path(None, None)
    for mode in ("paper", "last-token"):
        plan = plan_recipe(
            write_recipe(tmp_path / mode, f"model: {root}\n" + PARITY_RECIPE.format(mode=mode))
        )
        log = json.loads(
            (
                run_apply(plan, out=tmp_path / mode / "out", device="cpu", use_cache=False).out
                / "edit_log.json"
            ).read_text()
        )
        tokens = path.tokens(
            [
                *plan.preserve,
                *(p.source for p in plan.pairs),
                *(t for p in plan.pairs for t, _ in p.targets),
            ]
        )["text"]
        for pair in log["plan"]["pairs"]:
            source = tokens[pair["source"]]
            assert pair["source_start"] == source.last_word
            assert pair["source_start"] + pair["vectors"] <= source.seen  # never a padded row
            for target, _, start in pair["targets"]:
                assert start == tokens[target].last_word
                assert start + pair["vectors"] <= tokens[target].seen
            if mode == "last-token":
                assert pair["vectors"] == 1
            else:
                k = min(
                    tokens[p].seen - tokens[p].last_word
                    for p in [pair["source"], *(t for t, _, _ in pair["targets"])]
                )
                assert pair["vectors"] == k
        expected_preserve = (
            sum(tokens[p].seen for p in plan.preserve) if mode == "paper" else len(plan.preserve)
        )
        assert log["plan"]["preserve_vectors"] == expected_preserve
    # T5: a one-word guide pairs last word and </s> (K = 2); Sana: the last token alone (K = 1)
    guided = next(p for p in log["plan"]["pairs"] if p["targets"][0][0] == "art")  # last-token run
    assert guided["vectors"] == 1


@pytest.fixture(scope="module")
def pixart_edit(tiny_pixart: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return apply_recipe(
        tiny_pixart, tmp_path_factory.mktemp("pixart-edit"), ["diffusers", "delta", "operator"]
    )


@pytest.fixture(scope="module")
def sana_edit(tiny_sana: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return apply_recipe(
        tiny_sana, tmp_path_factory.mktemp("sana-edit"), ["diffusers", "delta", "lora", "operator"]
    )


def test_outputs_load_with_diffusers(pixart_edit: Path, sana_edit: Path) -> None:
    from diffusers import DiffusionPipeline

    for out in (pixart_edit, sana_edit):
        edited = kv_of(out)
        pipe = DiffusionPipeline.from_pretrained(str(out))
        state = pipe.transformer.state_dict()
        assert all(torch.equal(state[k], w) for k, w in edited.items())
        delta = load_file(str(out / "edit.safetensors"))
        assert all(torch.equal(delta[f"transformer.{k}"], w) for k, w in edited.items())
        assert (
            load_file(str(out / "operator.safetensors"))["K"].shape
            == (state["transformer_blocks.0.attn2.to_k.weight"].shape[1],) * 2
        )


def test_sana_lora_loads_with_load_lora_weights(sana_edit: Path, tiny_sana: Path) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sana))
    pipe.load_lora_weights(str(sana_edit / LORA_FILE))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter wrappers
    state = pipe.transformer.state_dict()
    edited = kv_of(sana_edit)
    assert max(rel(state[k], w) for k, w in edited.items()) < 1e-5


def test_lora_and_single_file_refused_where_diffusers_cannot_load_them(
    tiny_pixart: Path, tiny_sana: Path, tmp_path: Path
) -> None:
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, SanaTransformer2DModel

    # what the refusals rest on (diffusers 0.42): PixArt pipelines have no LoRA loader
    assert not hasattr(PixArtAlphaPipeline, "load_lora_weights")
    assert not hasattr(PixArtSigmaPipeline, "load_lora_weights")
    assert hasattr(SanaTransformer2DModel, "from_single_file")  # …but needs tensors a folder lacks
    cases = [
        (tiny_pixart, "lora", "the lora format is not loadable for PixArt"),
        (tiny_pixart, "single-file", "the single-file format has no layout for PixArt"),
        (tiny_pixart, "lora-kohya", "the lora-kohya format has no layout for PixArt"),
        (tiny_sana, "single-file", "the single-file format has no layout for Sana"),
    ]
    for i, (root, fmt, message) in enumerate(cases):
        recipe = write_recipe(tmp_path / str(i), f"model: {root}\n{ERASE_RECIPE}")
        result = run(
            "apply", recipe, "--out", tmp_path / str(i) / "out", "--device", "cpu", "--format", fmt
        )
        assert result.exit_code == 1, result.output
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / str(i) / "out").exists()


def test_edited_transformer_equals_base_fed_projected_captions(
    pixart_edit: Path, tiny_pixart: Path
) -> None:
    """attn2 is the only reader of the projected captions: W_new = W_old·K makes the edited
    transformer the base one fed C·Kᵀ (docs/design.md), here at every position."""
    from diffusers import DiffusionPipeline

    k = load_file(str(pixart_edit / "operator.safetensors"))["K"].float()
    pipes = [DiffusionPipeline.from_pretrained(str(p)) for p in (tiny_pixart, pixart_edit)]
    _, embeds, mask = pipeline_inputs(tiny_pixart, PROMPTS)
    latents = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
        timestep=torch.full((len(PROMPTS),), 500),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    base, edited = pipes
    handle = base.transformer.caption_projection.register_forward_hook(
        lambda _m, _a, out: out @ k.T
    )
    with torch.no_grad():
        fed = base.transformer(latents, **kwargs)[0]
        handle.remove()
        plain = base.transformer(latents, **kwargs)[0]
        new = edited.transformer(latents, **kwargs)[0]
    assert rel(new, fed) < 1e-5
    assert rel(new, plain) > 1e-3  # the edit changes the output


@pytest.mark.parametrize("edit_fixture", ["pixart_edit", "sana_edit"])
def test_sample_compare_runs(
    edit_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import numpy as np
    from PIL import Image

    edit = request.getfixturevalue(edit_fixture)
    result = run(
        "sample",
        "--edit",
        edit,
        "--compare",
        "--prompt",
        "painting by Kelly Mckernan",
        "--steps",
        "2",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
    )
    assert result.exit_code == 0, result.output
    base, edited = (sorted((tmp_path / "s" / role).glob("*.png")) for role in ("base", "edited"))
    assert len(base) == len(edited) == 1
    a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in (base[0], edited[0]))
    size = 64 if edit_fixture == "pixart_edit" else 32  # the denoiser's sample size × VAE factor
    assert a.shape == b.shape == (size, size, 3)
    assert np.abs(a - b).max() > 0  # the edit changes the image


def test_eval_text_report(pixart_edit: Path, sana_edit: Path) -> None:
    for out, eos in ((pixart_edit, True), (sana_edit, False)):
        result = run("eval", out, "--device", "cpu", "--no-plots", "--force")
        assert result.exit_code == 0, result.output
        figures = json.loads((out / "eval" / "eval.json").read_text())["text"]["figures"]
        assert 0 < figures["efficacy"] <= 1 and figures["drift_preserve"] >= 0
        assert figures["leakage_pad"] is None  # padded positions are masked: never counted
        # T5 has </s> after the last word; Gemma has no EOS
        assert (figures["leakage_eos"] is not None) == eos


def test_transfer_within_the_caption_path(
    pixart_edit: Path, tiny_pixart_sigma: Path, tiny_sana: Path, tmp_path: Path
) -> None:
    from uce_cli.weights.tiny_transformers import write_tiny_transformer_model

    op = pixart_edit / "operator.safetensors"
    # Σ built from the same seed shares T5 and the caption projection: K transfers
    result = run(
        "transfer", op, "--model", tiny_pixart_sigma, "--out", tmp_path / "t", "--format", "delta"
    )
    assert result.exit_code == 0, result.output
    k = load_file(str(op))["K"].double()
    moved = load_file(str(tmp_path / "t" / "edit.safetensors"))
    base = kv_of(tiny_pixart_sigma)
    assert max(rel(moved[f"transformer.{key}"], w.double() @ k) for key, w in base.items()) < 1e-6
    # same T5, another caption projection: the vectors differ, so K is refused
    stranger = Path(shutil.copytree(tiny_pixart_sigma, tmp_path / "stranger"))
    other = write_tiny_transformer_model(tmp_path / "seed1", "pixart-sigma", seed=1)
    shutil.rmtree(stranger / "transformer")
    shutil.copytree(other / "transformer", stranger / "transformer")
    result = run("transfer", op, "--model", stranger, "--out", tmp_path / "t2")
    assert result.exit_code == 1 and "text_encoder_weights_sha256" in result.stderr
    # another family
    result = run("transfer", op, "--model", tiny_sana, "--out", tmp_path / "t3")
    assert result.exit_code == 1 and "only transfers within one model family" in result.stderr


def test_apply_names_a_missing_component(tiny_sana: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_sana, tmp_path / "copy"))
    shutil.rmtree(copy / "transformer")
    recipe = write_recipe(tmp_path, f"model: {copy}\n{ERASE_RECIPE}")
    result = run("apply", recipe, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "the 'transformer' folder is missing" in result.stderr and str(copy) in result.stderr


def test_debias_loop_refused_on_a_transformer_family(tiny_pixart: Path, tmp_path: Path) -> None:
    """The loop samples through a UNet pipeline; PixArt/Sana get one line, before any encoding."""
    from tests.test_debias import _loop_recipe

    result = run("apply", _loop_recipe(tiny_pixart, tmp_path), "--out", tmp_path / "out",
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "the debias loop (alphas: auto) samples with UNet pipelines" in result.stderr
    assert "has a transformer — give the alphas explicitly" in result.stderr
    assert not (tmp_path / "out").exists()
