"""Stable Diffusion 1.x and 2.x: a UNet whose cross-attention ``attn2.to_k``/``to_v`` read one CLIP
text encoder's last hidden state (77 tokens, no attention mask).

SD 1.x reads CLIP ViT-L/14 (768-d, QuickGELU); SD 2.x reads OpenCLIP ViT-H/14 converted to a
transformers ``CLIPTextModel`` (1024-d, plain GELU) whose last layer is OpenCLIP's penultimate one,
so for both ``text_encoder(ids)[0]`` is what the pipeline feeds the UNet
(``StableDiffusionPipeline.encode_prompt`` with ``clip_skip=None``). One group, ``text``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from uce_cli.errors import ModelError
from uce_cli.families.base import Family, Group, SingleFileLayout, TextPath, Tokens
from uce_cli.families.clip import encode_batches, last_word_index, token_counts
from uce_cli.weights.files import weight_files

if TYPE_CHECKING:
    import torch

# Cross-attention blocks of diffusers' transformer blocks: attn2 reads the text embeddings.
CROSS_ATTN_KEY = re.compile(r"^(?P<block>.*\.attn2)\.(?P<proj>to_k|to_v)\.weight$")
# Components an SD 1.x/2.x pipeline does not have: a second text encoder, or a transformer denoiser.
EXTRA_COMPONENTS = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "transformer")
GROUP = "text"


class CLIPTextPath(TextPath):
    """One CLIP tokenizer and encoder; the group's vectors are ``encoder(ids)[0]`` over 77 tokens."""

    def __init__(self, tokenizer: Any, encoder: torch.nn.Module | None, group: Group) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.groups = (group,)
        self.max_tokens = int(tokenizer.model_max_length)

    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        """Every position is seen (the UNet attends to the pads); f = n − 2."""
        counts = token_counts(self.tokenizer, list(prompts))
        return {
            GROUP: {
                p: Tokens(n, max(last_word_index(n), 0), self.max_tokens) for p, n in counts.items()
            }
        }

    def encode(
        self, prompts: Sequence[str], padding: str = "max_length"
    ) -> dict[str, torch.Tensor]:
        """``{"text": (B, L, d)}``: the encoder's last hidden state, no attention mask."""
        if self.encoder is None:
            raise ModelError("the text encoder was released (or never loaded) — open it again")
        [(_, hidden)] = list(
            encode_batches(self.tokenizer, self.encoder, list(prompts), len(prompts), None, padding)
        )
        return {GROUP: hidden}

    def release(self) -> None:
        """Drop the reference to the encoder's weights."""
        self.encoder = None


class SD(Family):
    """Stable Diffusion 1.x / 2.x (``sd1`` / ``sd2``, told apart by the text encoder's config)."""

    name = "sd1"
    label = "Stable Diffusion 1.x"
    pipelines: ClassVar[str] = (
        "Stable Diffusion 1.x/2.x pipelines (a UNet and one CLIP text encoder)"
    )
    edits = "cross-attention keys/values (attn2.to_k, attn2.to_v)"
    denoiser = "unet"
    width_checks = ((("text_encoder",), "hidden", "cross_attention_dim"),)
    pipeline_prefixes = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    )

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        super().__init__(root, index)
        self._text_config: dict[str, Any] | None = None
        if _is_sd2(self.text_config()):
            self.name, self.label = "sd2", "Stable Diffusion 2.x"

    def text_config(self) -> dict[str, Any]:
        """The text encoder's config.json ({} when it cannot be read; check_components says why)."""
        if self._text_config is None:
            try:
                self._text_config = json.loads(
                    (self.root / "text_encoder" / "config.json").read_text(encoding="utf-8")
                )
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                self._text_config = {}
        return self._text_config if isinstance(self._text_config, dict) else {}

    def check_components(self) -> None:
        """Refuse a second text encoder, a transformer denoiser, missing parts or a non-CLIP encoder.

        Raises:
            ModelError: naming the folder and the component.
        """
        supported = f"uce edits {self.pipelines}"
        extra = [name for name in EXTRA_COMPONENTS if name in self.index]
        if extra:
            kind = "a transformer" if extra == ["transformer"] else "two text encoders"
            raise ModelError(
                f"{self.root}: a pipeline with {kind} ({', '.join(extra)}) is not supported yet — "
                f"{supported}"
            )
        for component in (self.denoiser, "text_encoder", "tokenizer"):
            if component not in self.index:
                raise ModelError(f"{self.root} has no '{component}' component — {supported}")
            if not (self.root / component).is_dir():
                raise ModelError(
                    f"{self.root}: model_index.json lists '{component}' but the folder "
                    f"{self.root / component} is missing — the model is incomplete"
                )
        encoder = self.index["text_encoder"]
        if isinstance(encoder, list) and len(encoder) == 2 and encoder[1] != "CLIPTextModel":
            raise ModelError(
                f"{self.root}: its text encoder is a {encoder[1]}, not a CLIPTextModel — {supported}"
            )

    def group_of(self, key: str) -> tuple[str, str] | None:
        """``("text", "to_k" | "to_v")`` for ``*.attn2.to_k.weight`` / ``*.attn2.to_v.weight``."""
        m = CROSS_ATTN_KEY.match(key)
        return (GROUP, m["proj"]) if m else None

    def groups(self) -> tuple[Group, ...]:
        """One group: the text encoder's last hidden state, as wide as the UNet's cross-attention."""
        try:
            unet = json.loads((self.root / self.denoiser / "config.json").read_text())
            width = int(unet["cross_attention_dim"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(
                f"{self.root / self.denoiser / 'config.json'}: cannot read cross_attention_dim ({exc})"
            ) from None
        encoder = "OpenCLIP-H (as CLIPTextModel)" if self.name == "sd2" else "CLIP"
        return (
            Group(GROUP, width, f"{encoder} text encoder's last hidden state, 77 tokens × {width}"),
        )

    def text_path(self, device: torch.device | None, dtype: torch.dtype | None) -> TextPath:
        """The tokenizer, and with a device the text encoder (safetensors only) on it in ``dtype``.

        Raises:
            ModelError: unloadable folders, or an encoder as wide as no cross-attention layer.
        """
        from transformers import AutoTokenizer, CLIPTextModel

        [group] = self.groups()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.root / "tokenizer"))
        except Exception as exc:  # transformers raises OSError/ValueError/etc. on broken folders
            raise ModelError(f"cannot load the tokenizer from {self.root}: {exc}") from exc
        if device is None:
            return CLIPTextPath(tokenizer, None, group)
        self.text_encoder_files()  # refuses pickle-only folders with a clear message
        try:
            encoder = CLIPTextModel.from_pretrained(
                str(self.root / "text_encoder"), use_safetensors=True, dtype=dtype
            )
        except Exception as exc:  # transformers raises OSError/ValueError/etc. on broken folders
            raise ModelError(f"cannot load the text encoder from {self.root}: {exc}") from exc
        hidden = encoder.config.hidden_size
        if hidden != group.width:
            raise ModelError(
                f"the text encoder's width {hidden} differs from the cross-attention width "
                f"{group.width} — this pipeline conditions the UNet on something uce does not model"
            )
        encoder.to(device).eval().requires_grad_(False)
        return CLIPTextPath(tokenizer, encoder, group)

    def text_path_of(self, pipe: Any) -> TextPath | None:
        """The loaded pipeline's own tokenizer and text encoder."""
        [group] = self.groups()
        return CLIPTextPath(pipe.tokenizer, pipe.text_encoder, group)

    def text_encoder_files(self) -> list[Path]:
        """The text encoder's safetensors files (pickle-only folders are refused)."""
        return weight_files(self.root / "text_encoder", "model")

    def order(self, key: str) -> tuple:
        """down → mid → up, then numerically, so tables read in the UNet's order."""
        part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(key.split(".")[0], 3)
        return (part, [int(x) if x.isdigit() else x for x in key.split(".")])

    def kohya_name(self, key: str) -> str | None:
        """``down_blocks.0…attn2.to_k.weight`` → ``lora_unet_down_blocks_0_…_attn2_to_k``."""
        return "lora_unet_" + key.removesuffix(".weight").replace(".", "_")

    @classmethod
    def single_file_layout(cls) -> SingleFileLayout | None:
        """The LDM layout (CLIP or OpenCLIP text encoder)."""
        from uce_cli.families.sd_singlefile import SDSingleFile

        return SDSingleFile()


def _is_sd2(text_config: dict[str, Any]) -> bool:
    """SD 2.x's OpenCLIP text encoder: plain GELU (CLIP ViT-L uses QuickGELU), or 1024 wide."""
    return text_config.get("hidden_act") == "gelu" or text_config.get("hidden_size") == 1024
