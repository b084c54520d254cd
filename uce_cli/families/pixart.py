"""The PixArt-α and PixArt-Σ family: a T5 encoder whose masked hidden states pass through the
transformer's ``caption_projection``; every block's ``attn2`` reads that projection's output.

Data flow, as diffusers 0.42 runs it (``PixArtAlphaPipeline.encode_prompt`` →
``PixArtTransformer2DModel.forward``): the prompt is lowercased and stripped, tokenized by T5
(no BOS, ``</s>`` appended), padded to ``max_sequence_length`` (α 120, Σ 300: the pipelines'
``__call__`` defaults, read from the installed diffusers) with an attention mask; T5 runs with
that mask; the transformer maps the hidden states through ``caption_projection`` (Linear → GELU
→ Linear, to the inner width) and hands the result, unchanged, to the ``attn2`` of every block
with the mask turned into a −10000 bias on padded keys. So the editable weights are
``transformer_blocks.N.attn2.to_k/to_v``, one group ("text", the inner width), its vectors are
the caption projection's outputs, and only the unmasked positions — the words and ``</s>`` —
are seen (``Tokens.seen``). The projection is a fixed function of the prompt: uce reads its four
tensors from the transformer's files and never instantiates the transformer.

Tokens: ``seen`` = word tokens + ``</s>``; ``last_word`` = seen − 2, the last word token before
``</s>``. The empty prompt is ``[</s>]`` alone: its last_word is 0, that ``</s>``, the only
position the transformer sees of it (the "first position" rule of base.py — T5 has no BOS).
So in ``paper`` mode an erase towards ``""`` pairs each source's last word with ``""``'s
``</s>`` (K = 1); towards a one-word guide, last word ↔ last word and ``</s>`` ↔ ``</s>`` (K = 2).

Captions are lowercased and stripped as ``encode_prompt``'s default (``clean_caption=False``)
does. ``__call__`` defaults to ``clean_caption=True``, which needs ``bs4`` and ``ftfy`` and falls
back to the same lowercase/strip without them; with them it also rewrites URLs, HTML and some
punctuation, so ``uce sample`` passes ``clean_caption=False`` to condition on uce's vectors.

Outputs: diffusers' PixArt pipelines have no ``load_lora_weights`` and the transformer has no
``from_single_file`` in diffusers 0.42, so uce writes neither a LoRA nor a single file for them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from uce_cli.errors import ModelError
from uce_cli.families.base import Family, Group, TextPath, Tokens
from uce_cli.weights.files import read_json_config, weight_files

if TYPE_CHECKING:
    import torch

# attn2 of every transformer block reads the projected captions (PixArt and Sana alike).
CROSS_KV_KEY = re.compile(r"^transformer_blocks\.\d+\.attn2\.(?P<proj>to_k|to_v)\.weight$")
DENOISER = "transformer"
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def preprocess(prompt: str) -> str:
    """The caption the pipelines tokenize: ``_text_preprocessing(clean_caption=False)``."""
    return prompt.lower().strip()


def call_default(pipeline_class: type, name: str) -> Any:
    """The default of ``pipeline_class.__call__``'s argument ``name`` (max length, instruction)."""
    return inspect.signature(pipeline_class.__call__).parameters[name].default


def read_denoiser_tensors(root: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The transformer's tensors whose names start with ``prefix``, prefix removed."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(root / DENOISER, "diffusion_pytorch_model"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.startswith(prefix):
                    out[key.removeprefix(prefix)] = f.get_tensor(key)
    return out


class CaptionPath(TextPath):
    """Prompts → the caption projection's outputs over a masked encoder (PixArt; Sana extends it).

    ``encode`` returns ``{"text": (B, L, inner)}`` with L the pipeline's max length; rows at or
    past ``Tokens.seen`` are padding the transformer masks out (their values are still what the
    pipeline computes, so the whole tensor equals the pipeline's).
    """

    def __init__(
        self,
        group: Group,
        tokenizer: Any,
        max_length: int,
        encoder: torch.nn.Module | None = None,
        projection: torch.nn.Module | None = None,
    ) -> None:
        self.groups = (group,)
        self.tokenizer = tokenizer
        self.max_tokens = max_length
        self.encoder = encoder
        self.projection = projection

    # --- tokens -------------------------------------------------------------------------------
    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Untruncated token ids of each preprocessed prompt (special tokens included)."""
        texts = [preprocess(p) for p in prompts]
        return self.tokenizer(texts, truncation=False, padding=False)["input_ids"]

    def last_word(self, seen: int) -> int:
        """T5: the token before ``</s>``; ``""`` (``[</s>]``) → 0."""
        return max(seen - 2, 0)

    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        """group → prompt → Tokens; ``n_tokens`` is untruncated, ``seen`` at most the max length."""
        out: dict[str, Tokens] = {}
        for prompt, ids in zip(prompts, self.token_ids(prompts), strict=True):
            seen = min(len(ids), self.max_tokens)
            out[prompt] = Tokens(n_tokens=len(ids), last_word=self.last_word(seen), seen=seen)
        return {self.groups[0].name: out}

    # --- vectors ------------------------------------------------------------------------------
    def model_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, L), exactly as ``encode_prompt`` builds them."""
        batch = self.tokenizer(
            [preprocess(p) for p in prompts],
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Encoder hidden states (B, L, d_text) → what attn2 reads (B, L, inner)."""
        return self.projection(hidden)

    def encode(
        self, prompts: Sequence[str], padding: str = "max_length"
    ) -> dict[str, torch.Tensor]:
        """group → (B, L, inner) on the encoder's device; ``padding`` is ignored: T5 and Gemma
        run with a mask over the pipeline's fixed length, which uce keeps for bit-equality."""
        import torch

        if self.encoder is None or self.projection is None:
            raise RuntimeError("text path made without encoders (device=None): tokens only")
        device = next(self.encoder.parameters()).device
        ids, mask = self.model_inputs(prompts)
        with torch.inference_mode():
            hidden = self.encoder(ids.to(device), attention_mask=mask.to(device))[0]
            dtype = next(self.projection.parameters()).dtype
            return {self.groups[0].name: self.project(hidden.to(dtype))}

    def release(self) -> None:
        """Drop the encoder and projection weights."""
        self.encoder = None
        self.projection = None


def load_projection(
    root: Path, caption_channels: int, inner: int, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """diffusers' own ``PixArtAlphaTextProjection`` with the transformer's weights (read alone)."""
    from diffusers.models.embeddings import PixArtAlphaTextProjection

    tensors = read_denoiser_tensors(root, "caption_projection.")
    module = PixArtAlphaTextProjection(in_features=caption_channels, hidden_size=inner)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{root / DENOISER}: the caption_projection tensors do not fit its config "
            f"({caption_channels} → {inner}): {str(exc).splitlines()[0]}"
        ) from None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class CaptionFamily(Family):
    """What PixArt and Sana share: a transformer whose blocks' attn2 read projected captions."""

    denoiser: ClassVar[str] = DENOISER
    width_checks = ((("text_encoder",), "hidden", "caption_channels"),)
    edits: ClassVar[str] = "cross-attention keys/values"
    cuda_dtype: ClassVar[str] = "bf16"  # T5 (PixArt) and Gemma 2 (Sana) overflow in fp16
    encoder_classes: ClassVar[tuple[str, ...]]  # text_encoder classes the family accepts
    reads: ClassVar[str]  # Group.reads

    def check_components(self) -> None:
        """Raise ModelError naming the folder and a missing component or unexpected encoder."""
        for component in COMPONENTS:
            if component not in self.index:
                raise ModelError(
                    f"{self.root}: {self.label} pipeline without a '{component}' component in "
                    "model_index.json — is the folder complete?"
                )
            if not (self.root / component).is_dir():
                raise ModelError(
                    f"{self.root}: the '{component}' folder is missing — is the folder complete?"
                )
        encoder = self.index["text_encoder"]
        if (
            isinstance(encoder, list)
            and len(encoder) == 2
            and encoder[1] not in self.encoder_classes
        ):
            from uce_cli.families import supported  # the registry imports family modules lazily

            raise ModelError(
                f"{self.root}: its text encoder is a {encoder[1]}, not a "
                f"{' or '.join(self.encoder_classes)} as a {self.label} pipeline has — {supported()}"
            )

    def group_of(self, key: str) -> tuple[str, str] | None:
        """("text", "to_k"|"to_v") for a block's attn2 k/v weight; None for every other tensor."""
        match = CROSS_KV_KEY.match(key)
        return ("text", match["proj"]) if match else None

    def inner_width(self) -> tuple[int, int]:
        """(caption_channels, inner width) from the transformer config; attn2 must read the latter."""
        config = read_json_config(self.root / DENOISER / "config.json")
        try:
            inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
            channels = int(config["caption_channels"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"{self.root / DENOISER / 'config.json'}: no usable {exc} — is this a "
                f"{self.label} transformer?"
            ) from None
        cross = config.get("cross_attention_dim")
        if cross is not None and int(cross) != inner:
            raise ModelError(
                f"{self.root / DENOISER / 'config.json'}: cross_attention_dim {cross} differs from "
                f"the caption projection's width {inner} — not a {self.label} transformer uce knows"
            )
        return channels, inner

    def groups(self) -> tuple[Group, ...]:
        """One group: the caption projection's output, the transformer's inner width."""
        return (Group("text", self.inner_width()[1], self.reads),)

    def text_encoder_files(self) -> list[Path]:
        """The text encoder's safetensors files (the caption projection's tensors, in the
        denoiser's files, join the identity through ``text_tensor_prefixes``)."""
        return weight_files(self.root / "text_encoder", "model")

    def load_encoder(self, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
        """The text encoder (safetensors only) on ``device``, eval, without gradients."""
        import transformers

        self.text_encoder_files()  # refuses pickle-only folders with a clear message
        entry = self.index["text_encoder"]  # ["transformers", class], checked by check_components
        class_name = entry[1] if isinstance(entry, list) else self.encoder_classes[0]
        try:
            encoder = getattr(transformers, class_name).from_pretrained(
                str(self.root / "text_encoder"), use_safetensors=True, dtype=dtype
            )
        except Exception as exc:  # transformers raises OSError/ValueError/… on broken folders
            raise ModelError(f"cannot load the text encoder from {self.root}: {exc}") from exc
        return encoder.to(device).eval().requires_grad_(False)

    def load_tokenizer(self) -> Any:
        """The pipeline's tokenizer (no weights)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.root / "tokenizer"))
        except Exception as exc:  # broken tokenizer folders raise many kinds of errors
            raise ModelError(f"cannot load the tokenizer from {self.root}: {exc}") from exc

    def sample_kwargs(self) -> dict[str, Any]:
        """Captions lowercased/stripped as uce encodes them (not ``_clean_caption``), and images
        drawn at exactly the requested size (no aspect-ratio binning, which needs the real
        sample sizes and would resize the image)."""
        return {"clean_caption": False, "use_resolution_binning": False}

    def pipeline_class(self) -> type:
        """The diffusers pipeline class model_index.json names."""
        import diffusers

        return getattr(diffusers, str(self.index["_class_name"]))


class PixArtFamily(CaptionFamily):
    """PixArt-α and PixArt-Σ (PixArtTransformer2DModel, T5 v1.1 XXL)."""

    name = "pixart"
    label = "PixArt"
    pipelines: ClassVar[str] = "PixArt-α/Σ pipelines (PixArtAlphaPipeline, PixArtSigmaPipeline)"
    pipeline_prefixes: ClassVar[tuple[str, ...]] = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    encoder_classes: ClassVar[tuple[str, ...]] = ("T5EncoderModel",)
    diffusers_lora: ClassVar[bool] = False  # PixArt pipelines have no load_lora_weights (0.42)
    text_tensor_prefixes: ClassVar[tuple[str, ...]] = ("caption_projection.",)
    reads: ClassVar[str] = "T5 hidden states (masked) → caption_projection"

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        super().__init__(root, index)
        sigma = index.get("_class_name") == "PixArtSigmaPipeline"
        self.label = "PixArt-Σ" if sigma else "PixArt-α"  # one name: α and Σ share the text path

    def sampling_refusal(self, steps: int, scheduler: str) -> str | None:
        """PixArt-α with one step takes the pipeline's one-step (DMD) path, which reads the
        denoised sample a scheduler's step returns second: only LCMScheduler (a DMD model's)
        returns one; any other fails there with an IndexError."""
        if self.label == "PixArt-α" and steps == 1 and scheduler != "LCMScheduler":
            return (
                "--steps 1: the PixArt-α pipeline's one-step path is for one-step (DMD) models "
                f"with LCMScheduler; {scheduler} cannot take it — use --steps 2 or more"
            )
        return None

    @classmethod
    def claims(cls, index: dict[str, Any]) -> bool:
        """Exactly the α and Σ text-to-image pipelines (not their PAG or ControlNet variants)."""
        return str(index.get("_class_name") or "") in cls.pipeline_prefixes

    def max_length(self) -> int:
        """The pipeline's ``max_sequence_length`` default: 120 (α) or 300 (Σ)."""
        return int(call_default(self.pipeline_class(), "max_sequence_length"))

    def text_path(self, device: torch.device | None, dtype: torch.dtype | None) -> TextPath:
        """Tokenizer and, with a device, the T5 encoder and the caption projection."""
        group = self.groups()[0]
        tokenizer = self.load_tokenizer()
        if device is None:
            return CaptionPath(group, tokenizer, self.max_length())
        encoder = self.load_encoder(device, dtype)
        channels, inner = self.inner_width()
        # the pipeline casts T5's output to the encoder's dtype; the transformer shares it
        projection = load_projection(self.root, channels, inner, device, encoder.dtype)
        return CaptionPath(group, tokenizer, self.max_length(), encoder, projection)

    def text_path_of(self, pipe: Any) -> TextPath | None:
        """The loaded pipeline's own tokenizer, T5 and caption projection."""
        projection = pipe.transformer.caption_projection
        return CaptionPath(
            self.groups()[0], pipe.tokenizer, self.max_length(), pipe.text_encoder, projection
        )
