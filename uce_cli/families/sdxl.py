"""Stable Diffusion XL: two CLIP text encoders whose penultimate hidden states, concatenated per
token, are what every ``attn2`` of the UNet reads; a pooled vector from the second encoder that
enters the UNet through ``add_embedding``.

Data flow (diffusers' ``StableDiffusionXLPipeline.encode_prompt``, reproduced call for call)::

    prompt ─tokenizer──▶ CLIPTextModel (CLIP-L)                 ─hidden_states[-2]─┐ (77, d1)
           ─tokenizer_2─▶ CLIPTextModelWithProjection (bigG)   ─hidden_states[-2]─┴─concat─▶ (77, d1+d2) ─▶ attn2.to_k/to_v
                                                               ─text_embeds (pooled, d2')─▶ [· ; time ids] ─▶ add_embedding.linear_1

Groups: ``text`` (width d1 + d2, 2048 in SDXL) is read by every cross-attention ``to_k``/``to_v``
(down → mid → up). ``pooled`` (width d2', 1280) is read by the first ``d2'`` columns of
``add_embedding.linear_1``; its remaining columns read the embedded time ids (original size, crop,
target size) and are never edited. The pooled group is edited only when the recipe asks for the
``add_embedding`` projection (docs/families.md, "SDXL", says what it changes and what it measured).

Tokens: both tokenizers share CLIP's BPE and 77 positions, so a prompt has the same token count in
both (checked per prompt: one the two split differently is refused, naming both counts). The first tokenizer pads with EOS, the
second with ``"!"`` (id 0 in the real vocabulary): after the last word the UNet sees, per position,
[EOS-pad state of CLIP-L ; "!"-pad state of bigG]. The paper mode's "last word through the end"
pairs these concatenated 2048-d positions one to one (last word ↔ last word, EOS ↔ EOS, pad ↔ pad);
each half pairs like with like, since both halves of source and target pad the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from uce_cli.errors import ModelError, UceError
from uce_cli.families.base import Family, Group, SingleFileLayout, TextPath, Tokens
from uce_cli.weights.files import weight_files

if TYPE_CHECKING:
    import torch

# Components of an SDXL base-type pipeline (text-to-image, img2img, inpaint share them).
COMPONENTS = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
TOKENIZERS = (
    ("tokenizer", "text_encoder", "CLIP-L"),
    ("tokenizer_2", "text_encoder_2", "OpenCLIP-bigG"),
)
POOLED_KEY = "add_embedding.linear_1.weight"
_KV = re.compile(r"^(?:down_blocks|mid_block|up_blocks)\..*\.attn2\.(?P<proj>to_k|to_v)\.weight$")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc} — is this a complete SDXL folder?") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object — is this a complete SDXL folder?")
    return data


def _shown(prompt: str) -> str:
    return prompt if len(prompt) <= 60 else prompt[:57] + "..."


class SdxlTextPath(TextPath):
    """Both tokenizers (and, for encoding, both encoders) of one SDXL folder."""

    def __init__(
        self, tokenizers: list[Any], encoders: list[Any], groups: tuple[Group, ...]
    ) -> None:
        """Both tokenizers, and both encoders (CLIP-L, bigG) or none (tokens only)."""
        self.groups = groups
        self.tokenizers = tokenizers
        self.encoders = encoders
        lengths = [t.model_max_length for t in tokenizers]
        if lengths[0] != lengths[1]:
            raise ModelError(
                f"tokenizer reads {lengths[0]} tokens, tokenizer_2 {lengths[1]} — SDXL "
                "concatenates both encoders per position and needs the same length"
            )
        self.max_tokens = int(lengths[0])

    @classmethod
    def load(
        cls,
        root: Path,
        groups: tuple[Group, ...],
        device: torch.device | None,
        dtype: torch.dtype | None,
    ) -> SdxlTextPath:
        """From a folder: both tokenizers; with a device, both encoders (safetensors) on it."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers, encoders = [], []
        for (tok_dir, enc_dir, _), enc_cls in zip(
            TOKENIZERS, (CLIPTextModel, CLIPTextModelWithProjection), strict=True
        ):
            try:
                tokenizers.append(CLIPTokenizer.from_pretrained(str(root / tok_dir)))
                if device is not None:
                    encoder = enc_cls.from_pretrained(
                        str(root / enc_dir), use_safetensors=True, dtype=dtype
                    )
                    encoders.append(encoder.to(device).eval().requires_grad_(False))
            except Exception as exc:  # transformers raises OSError/ValueError on broken folders
                raise ModelError(f"cannot load {root}'s {tok_dir}/{enc_dir}: {exc}") from None
        return cls(tokenizers, encoders, groups)

    def token_counts(self, prompts: Sequence[str]) -> list[dict[str, int]]:
        """Per tokenizer: prompt → token count incl. BOS/EOS, untruncated."""
        return [
            {
                p: len(ids)
                for p, ids in zip(
                    prompts,
                    tok(list(prompts), truncation=False, padding=False)["input_ids"],
                    strict=True,
                )
            }
            for tok in self.tokenizers
        ]

    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        """Tokens on what the UNet sees: 77 positions of the concatenated states; 1 pooled vector.

        Both tokenizers share SDXL's BPE, so a prompt has one count; a prompt longer than both
        read is left to the caller, which refuses it naming its recipe section.

        Raises:
            UceError: the two tokenizers count a prompt differently (their positions would not
                line up), naming both counts and the tokenizer(s) it is too long for.
        """
        counts = self.token_counts(prompts)
        # the longest first: a prompt too long for one tokenizer is the one worth naming
        for p in sorted(prompts, key=lambda p: -max(counts[0][p], counts[1][p])):
            if counts[0][p] == counts[1][p]:
                continue
            over = [
                f"{tok_dir} ({encoder}) reads {tok.model_max_length}"
                for (tok_dir, _, encoder), tok, n_of in zip(
                    TOKENIZERS, self.tokenizers, counts, strict=True
                )
                if n_of[p] > tok.model_max_length
            ]
            too_long = f" — too long: {'; '.join(over)} tokens" if over else ""
            raise UceError(
                f"prompt '{_shown(p)}' has {counts[0][p]} tokens in tokenizer and {counts[1][p]} "
                f"in tokenizer_2{too_long} — uce pairs positions of the concatenated embeddings "
                "and needs both tokenizers to split the prompt alike (SDXL's share one BPE "
                "vocabulary; uce refuses rather than truncating)"
            )
        seen = self.max_tokens
        out: dict[str, dict[str, Tokens]] = {}
        for group in self.groups:
            if group.name == "text":
                out["text"] = {p: Tokens(counts[0][p], counts[0][p] - 2, seen) for p in prompts}
            else:
                out[group.name] = {p: Tokens(counts[0][p], 0, 1) for p in prompts}
        return out

    def encode(
        self, prompts: Sequence[str], padding: str = "max_length"
    ) -> dict[str, torch.Tensor]:
        """``text``: (B, L, d1+d2), exactly ``encode_prompt``'s prompt_embeds; ``pooled``: (B, 1, d2').

        Same calls as ``StableDiffusionXLPipeline.encode_prompt`` (no clip_skip, no textual
        inversion): each tokenizer pads to its ``model_max_length`` with truncation, each encoder
        runs without attention mask with ``output_hidden_states=True``; the penultimate states are
        concatenated (CLIP-L first) and cast to ``text_encoder_2``'s dtype; the pooled vector is
        ``text_encoder_2``'s ``text_embeds``. ``padding="longest"`` pads both to the batch's
        longest prompt: both encoders are causal, so positions up to the last word (and the pooled
        vector, taken at EOS) are unchanged.
        """
        import torch

        if not self.encoders:
            raise RuntimeError("SdxlTextPath.encode needs the encoders: build it with a device")
        hidden = []
        pooled = None
        with torch.inference_mode():
            for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
                ids = tok(
                    list(prompts),
                    padding=padding,
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                out = enc(ids.to(next(enc.parameters()).device), output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
            text = torch.concat(hidden, dim=-1).to(dtype=self.encoders[1].dtype)
        result = {"text": text}
        if any(g.name == "pooled" for g in self.groups):
            result["pooled"] = pooled.unsqueeze(1)  # (B, 1, d2')
        return result

    def release(self) -> None:
        """Drop both encoders (tokenizers stay: tokens() still works)."""
        self.encoders = []


class SdxlFamily(Family):
    """Stable Diffusion XL base-type pipelines (two text encoders, ``text_time`` UNet)."""

    name = "sdxl"
    label = "Stable Diffusion XL"
    pipelines: ClassVar[str] = "Stable Diffusion XL pipelines (two CLIP text encoders)"
    edits = "cross-attention keys/values (and, if asked, the text columns of add_embedding)"
    denoiser = "unet"
    width_checks = ((("text_encoder", "text_encoder_2"), "hidden", "cross_attention_dim"),)
    pipeline_prefixes = ("StableDiffusionXL",)
    opt_in = ("add_embedding",)  # the pooled path: docs/families.md says why it is not default

    def _config(self, component: str) -> dict[str, Any]:
        return _read_json(self.root / component / "config.json")

    def check_components(self) -> None:
        """Raise ModelError naming the folder and the missing component (e.g. a refiner's text_encoder)."""
        for component in COMPONENTS:
            entry = self.index.get(component)
            if not (isinstance(entry, list) and entry and entry[0] is not None):
                hint = (
                    " — an SDXL refiner has only text_encoder_2; uce edits pipelines with both encoders"
                    if component == "text_encoder"
                    else ""
                )
                raise ModelError(
                    f"{self.root}: model_index.json has no '{component}' component{hint}"
                )
            if component != "scheduler" and not (self.root / component).is_dir():
                raise ModelError(
                    f"{self.root / component} is missing — model_index.json lists '{component}'; "
                    "is the download complete?"
                )
        unet = self._config("unet")
        if unet.get("addition_embed_type") != "text_time":
            from uce_cli.families import supported

            raise ModelError(
                f"{self.root / 'unet' / 'config.json'}: addition_embed_type is "
                f"{unet.get('addition_embed_type')!r}, not 'text_time' — not an SDXL UNet; "
                f"{supported()}"
            )

    def group_of(self, key: str) -> tuple[str, str] | None:
        """``text`` for every attn2 to_k/to_v, ``pooled`` for add_embedding.linear_1 (its text columns)."""
        if m := _KV.match(key):
            return ("text", m["proj"])
        if key == POOLED_KEY:
            return ("pooled", "add_embedding")
        return None

    def columns_of(self, key: str) -> tuple[int, int] | None:
        """add_embedding.linear_1: its first d2' columns read the pooled text (the rest, time ids)."""
        return (0, self.groups()[1].width) if key == POOLED_KEY else None

    def groups(self) -> tuple[Group, ...]:
        """``text`` (d1 + d2, checked against the UNet's cross_attention_dim) and ``pooled`` (d2')."""
        te1, te2, unet = (self._config(c) for c in ("text_encoder", "text_encoder_2", "unet"))
        d1, d2, d_pool = (
            int(te1["hidden_size"]),
            int(te2["hidden_size"]),
            int(te2["projection_dim"]),
        )
        cross = unet.get("cross_attention_dim")
        if cross != d1 + d2:
            raise ModelError(
                f"{self.root / 'unet' / 'config.json'}: cross_attention_dim {cross} ≠ {d1} + {d2} "
                "(the two text encoders' widths) — not an SDXL pipeline uce can pair"
            )
        add_in = unet.get("projection_class_embeddings_input_dim")
        time_dim = unet.get("addition_time_embed_dim")
        n_time = add_in - d_pool if isinstance(add_in, int) else -1
        if not isinstance(time_dim, int) or n_time <= 0 or n_time % time_dim:
            raise ModelError(
                f"{self.root / 'unet' / 'config.json'}: projection_class_embeddings_input_dim {add_in} "
                f"does not hold the pooled width {d_pool} plus time ids"
            )
        return (
            Group(
                "text",
                d1 + d2,
                f"CLIP-L ({d1}) ⊕ OpenCLIP-bigG ({d2}) penultimate hidden states, 77 tokens",
            ),
            Group(
                "pooled",
                d_pool,
                f"OpenCLIP-bigG pooled projection ({d_pool}) into add_embedding.linear_1",
            ),
        )

    def text_path(self, device: torch.device | None, dtype: torch.dtype | None) -> TextPath:
        """Both tokenizers; with a device, both encoders too."""
        if device is not None:
            self.text_encoder_files()  # refuses pickle-only folders with a clear message
        return SdxlTextPath.load(self.root, self.groups(), device, dtype)

    def text_path_of(self, pipe: Any) -> TextPath | None:
        """The loaded pipeline's own tokenizers and encoders."""
        return SdxlTextPath(
            [pipe.tokenizer, pipe.tokenizer_2],
            [pipe.text_encoder, pipe.text_encoder_2],
            self.groups(),
        )

    def text_encoder_files(self) -> list[Path]:
        """Both encoders' safetensors files (pickle-only folders are refused)."""
        return [
            f for _, enc_dir, _ in TOKENIZERS for f in weight_files(self.root / enc_dir, "model")
        ]

    def order(self, key: str) -> tuple:
        """down → mid → up (numerically), then add_embedding."""
        part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(key.split(".")[0], 3)
        return (part, *super().order(key))

    def stride(self) -> int:
        """``layers_per_block + 1``: the step of SGM's input/output block numbering."""
        return int(self._config("unet")["layers_per_block"]) + 1

    def kohya_name(self, key: str) -> str | None:
        """SGM-numbered kohya name (``lora_unet_input_blocks_4_1_…_attn2_to_k``), as sd-scripts writes SDXL."""
        from uce_cli.families.sdxl_layout import unet_key_to_sgm

        if self.group_of(key) is None:
            return None
        return "lora_unet_" + unet_key_to_sgm(key, self.stride()).removesuffix(".weight").replace(
            ".", "_"
        )

    @classmethod
    def single_file_layout(cls) -> SingleFileLayout | None:
        """The SGM layout of SDXL single files (A1111, ComfyUI, sd_xl_base_1.0.safetensors)."""
        from uce_cli.families.sdxl_layout import SdxlSingleFile

        return SdxlSingleFile()
