"""What a model family tells the rest of uce: how to detect it, turn prompts into the vectors its
editable layers read, which weights are editable, and the key names of its single-file and LoRA
layouts.

Everything above this layer (plan → encode → statistics → solve → artifacts, and ``uce sample``)
uses a family only through this interface. One family is one module under ``uce_cli/families/``;
adding a family means writing one such module and listing it in ``families/__init__.py``.

Vocabulary:

- a **group** is one embedding that editable layers read (SD 1.x: the CLIP hidden states, 768-d;
  FLUX: the T5 sequence into ``context_embedder`` and the pooled CLIP vector into the pooled
  projection). The solver builds one operator per group.
- for each prompt and group, the family reports a :class:`Tokens`: where the last word token is in
  the sequence the layers read, and how many leading positions of that sequence the denoiser sees
  (all 77 for CLIP families, which attend to padding; the unmasked tokens for masked families; 1
  for a pooled vector). The alignment modes are defined on those positions only:
  ``paper``: K = min over the pair of (seen − last_word); positions last_word … last_word+K−1 are
  paired one to one; a preserve prompt contributes positions 0 … seen−1.
  ``last-token``: one vector per prompt, at last_word.
  For CLIP families (seen = 77 for every prompt) this is exactly the published K = 77 − max f.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from uce_cli.weights.tensorfile import SavedFile


@dataclass(frozen=True)
class Group:
    """One embedding that editable layers read; the solver builds one operator per group."""

    name: str  # short id used in logs, operator files and LoRA metadata, e.g. "text", "pooled"
    width: int  # d_in of every layer of the group
    reads: str  # one line for people: what the vectors are, e.g. "CLIP-L penultimate + bigG …"


@dataclass(frozen=True)
class Tokens:
    """Where a prompt's words sit in the sequence a group's layers read."""

    n_tokens: int  # tokenizer tokens incl. special tokens, untruncated (for length errors)
    last_word: int  # f(x): index of the last word token (BOS/first position for the empty prompt)
    seen: int  # leading positions the denoiser attends to (77 for CLIP; unmasked for T5; 1 pooled)


@dataclass(frozen=True)
class EditableTensor:
    """One editable weight inside the denoiser's safetensors files (headers only, nothing read)."""

    key: str  # name inside the denoiser component, e.g. "down_blocks.0…attn2.to_k.weight"
    group: str  # the Group it reads
    file: Path
    shape: tuple[int, int]  # (d_out, d_in)
    dtype: str  # safetensors dtype name, e.g. "F32"
    projection: str  # "to_k" | "to_v" | "context_embedder" | …: what `projections:` filters on
    # The d_in columns the group reads, (start, stop), when the layer also reads something else
    # (SDXL's add_embedding.linear_1: pooled text, then time ids). Only W[:, start:stop] is
    # edited, with the group's operator; the other columns stay as they are. None: all columns.
    columns: tuple[int, int] | None = None

    @property
    def part_width(self) -> int:
        """d_in of the edited part: the group's width."""
        return self.shape[1] if self.columns is None else self.columns[1] - self.columns[0]

    def part(self, w: torch.Tensor) -> torch.Tensor:
        """The edited part of the full weight ``w``: its ``columns`` (a view), or all of it."""
        return w if self.columns is None else w[:, self.columns[0] : self.columns[1]]

    def whole(self, w_old: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """The full weight: ``w_old`` with its edited columns replaced by ``part`` (a new tensor)."""
        if self.columns is None:
            return part
        w = w_old.clone()
        w[:, self.columns[0] : self.columns[1]] = part
        return w


class TextPath(ABC):
    """Prompts → the vectors each group's layers read. Made by ``Family.text_path``.

    ``encode`` must return exactly what the pipeline feeds its denoiser (tests compare it with the
    pipeline's own ``encode_prompt``), so uce's statistics are built on the real inputs.
    """

    groups: tuple[Group, ...]
    max_tokens: int  # longest prompt accepted, in tokens (for the error message)

    @abstractmethod
    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        """group name → prompt → Tokens. Needs only the tokenizers (``--dry-run`` uses it).

        ``n_tokens`` is counted without truncation (the longest over the family's tokenizers):
        the caller refuses a prompt with ``n_tokens > max_tokens``, naming the recipe section it
        came from (``encode.check_lengths``) — uce refuses rather than truncating, which would
        move the anchor token.
        """

    @abstractmethod
    def encode(
        self, prompts: Sequence[str], padding: str = "max_length"
    ) -> dict[str, torch.Tensor]:
        """group name → (B, L, d) on the encoder's device; rows ≥ Tokens.seen are ignored.

        ``padding="longest"`` may shorten L to the batch's longest prompt where the family's
        encoders are causal (CLIP) — positions ≤ last_word are then unchanged; a family whose
        encoder is not causal (T5) ignores it and pads as its pipeline does.
        """

    def release(self) -> None:  # noqa: B027 - optional hook
        """Drop the encoders' weights (called once statistics are collected)."""


class Family(ABC):
    """One model family, bound to one local diffusers folder (``root``)."""

    # "sd1", "sd2", "sdxl", "pixart", "sana", "flux", "sd3"; a class covering variants that only
    # the configs tell apart (SD 1.x / 2.x) sets name and label per instance in __init__.
    name: str
    label: str  # for people: "Stable Diffusion XL"
    pipelines: ClassVar[str]  # what uce edits of it, for refusals: "Stable Diffusion XL pipelines"
    edits: ClassVar[str]  # what is edited, honestly: "cross-attention keys/values", …
    denoiser: ClassVar[str]  # the component holding the editable weights: "unet" | "transformer"
    pipeline_prefixes: ClassVar[tuple[str, ...]]  # model_index _class_name prefixes it claims
    # projections edited only when a recipe names them (SDXL's add_embedding); the others are
    # what a recipe without layers.projections edits
    opt_in: ClassVar[tuple[str, ...]] = ()
    # False where the pipeline's guidance takes no negative prompt (FLUX's distilled guidance):
    # ``uce sample --negative-prompt`` is then refused rather than silently ignored.
    negative_prompt: ClassVar[bool] = True
    # What ``--dtype auto`` means on CUDA: fp16, or bf16 where a T5/Gemma encoder overflows fp16.
    cuda_dtype: ClassVar[str] = "fp16"

    # Prefixes of denoiser tensors that belong to the text path (PixArt's ``caption_projection.``):
    # their bytes join the text encoder's in ``text_encoder_weights_sha256``, the edit's identity.
    text_tensor_prefixes: ClassVar[tuple[str, ...]] = ()

    # (text encoder components, their width field, denoiser config field): the encoders' widths
    # ("hidden": hidden_size or d_model; "projection": projection_dim) must sum to the field, so a
    # component from another model is refused from the configs (``families.consistency``).
    width_checks: ClassVar[tuple[tuple[tuple[str, ...], str, str], ...]] = ()

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        self.root = root
        self.index = index

    @classmethod
    def claims(cls, index: dict[str, Any]) -> bool:
        """True when a model_index.json is this family's (by pipeline class and components)."""
        name = str(index.get("_class_name") or "")
        return any(name.startswith(p) for p in cls.pipeline_prefixes)

    @abstractmethod
    def check_components(self) -> None:
        """Raise ModelError naming the folder and the missing/unexpected component."""

    @abstractmethod
    def group_of(self, key: str) -> tuple[str, str] | None:
        """(group, projection) of an editable denoiser key, or None for every other tensor."""

    @abstractmethod
    def groups(self) -> tuple[Group, ...]:
        """The groups, read from the configs (no weights)."""

    @abstractmethod
    def text_path(self, device: torch.device | None, dtype: torch.dtype | None) -> TextPath:
        """Tokenizers and (when device is not None) encoders; device None: tokenizers only."""

    @abstractmethod
    def text_encoder_files(self) -> list[Path]:
        """Every text-encoder weight file the edit depends on (hashed into the edit's identity)."""

    def columns_of(self, key: str) -> tuple[int, int] | None:
        """The columns of an editable key its group reads (``EditableTensor.columns``); None: all."""
        return None

    def order(self, key: str) -> tuple:
        """Sort key for editable tensors: the denoiser's own order (tables read top to bottom)."""
        return tuple(int(x) if x.isdigit() else x for x in key.split("."))

    def sample_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments ``uce sample`` passes to the family's pipeline call, so that
        it conditions on exactly the vectors uce edits (e.g. no caption rewriting)."""
        return {}

    # The multiple an image's height and width must be for the family's pipeline (diffusers'
    # check_inputs refuses others): ``uce sample`` refuses other sizes in one line.
    size_multiple: ClassVar[int] = 8

    def sampling_refusal(self, steps: int, scheduler: str) -> str | None:
        """Why the family's pipeline cannot sample with these settings (one line), or None."""
        return None

    def text_path_of(self, pipe: Any) -> TextPath | None:
        """The text path over a loaded pipeline's own tokenizers and encoders (the debias loop
        samples with that pipeline and encodes with it); None: ``text_path`` loads them again."""
        return None

    # --- third-party layouts; None where the family has none (the format is then refused) ----
    # Whether the family's diffusers pipeline loads a diffusers-layout LoRA (``load_lora_weights``,
    # keys ``<denoiser>.<module>.lora_A/B.weight``); False: the lora format is refused.
    diffusers_lora: ClassVar[bool] = True

    def kohya_name(self, key: str) -> str | None:
        """kohya LoRA module name of an editable key (``lora_unet_…``), or None if unsupported."""
        return None

    @classmethod
    def single_file_layout(cls) -> SingleFileLayout | None:
        """The family's single-file layout, known before any folder exists (a single file is
        recognised by its keys, then converted): None when uce reads and writes none."""
        return None

    def single_file(self) -> SingleFileLayout | None:
        """The A1111/ComfyUI single-file layout, or None when uce does not write one."""
        return self.single_file_layout()


class SingleFileLayout(ABC):
    """Key names of a family's single-file (LDM/A1111/ComfyUI) checkpoint."""

    @abstractmethod
    def claims(self, keys: Sequence[str]) -> bool:
        """True when a single file's tensor keys are this family's layout."""

    @abstractmethod
    def editable_names(self, keys: Sequence[str]) -> dict[str, str]:
        """{single-file key: diffusers denoiser key} for every editable tensor among ``keys``."""

    @abstractmethod
    def to_single_file(self, root: Path) -> dict[str, dict[str, str]]:
        """component → {diffusers key: single-file key} for a whole pipeline folder."""

    @abstractmethod
    def config_source(self, keys: Sequence[str]) -> str:
        """The hub id (or builtin) whose configs rebuild a diffusers folder from this file."""

    @abstractmethod
    def editable_key(self, key: str, keys: Sequence[str]) -> str:
        """The single-file key of the diffusers editable ``key`` in a file with tensor ``keys``."""

    @abstractmethod
    def convert(self, path: Path, config_root: Path, dest: Path) -> None:
        """Write a complete diffusers folder at ``dest`` from the file and a config folder
        (model_index.json, component configs, tokenizers from ``config_root``; weights from the file).

        Raises:
            ModelError: a tensor the config expects is missing or has another shape (named).
        """

    @abstractmethod
    def write(
        self, path: Path, root: Path, new: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> SavedFile:
        """Write the pipeline at ``root`` as one single file, with ``new`` (denoiser key → tensor)
        replacing the editable tensors; byte-reproducible (``uce_cli.weights.tensorfile.save_tensors``)."""
