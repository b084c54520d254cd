"""Pipelines for sampling: a base model folder's scheduler, image size and loaded pipeline."""

from __future__ import annotations

import difflib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from uce_cli.errors import ModelError, UceError

DEFAULT_SAMPLE_SIZE = 128


def _index_class(index: dict[str, Any], component: str) -> str:
    entry = index.get(component)
    if not isinstance(entry, list) or len(entry) != 2 or not entry[1]:
        raise ModelError(f"the model has no '{component}' in its model_index.json")
    return entry[1]


def resolve_scheduler(name: str | None, root: Path) -> type:
    """The diffusers scheduler class named ``name``, or the model's own when ``name`` is None.

    Raises:
        UceError: an unknown name, or a scheduler that does not fit the model's.
    """
    import diffusers
    from diffusers import SchedulerMixin

    index = json.loads((root / "model_index.json").read_text())
    current = _index_class(index, "scheduler")
    current_cls = getattr(diffusers, current, None)
    if not (isinstance(current_cls, type) and issubclass(current_cls, SchedulerMixin)):
        raise ModelError(f"{root}: its scheduler {current} is not a diffusers scheduler class")
    if name is None or name == current:
        return current_cls
    # ``compatibles`` is an instance property; a scheduler object costs only its config.
    compatibles = current_cls.from_config(current_cls.load_config(root / "scheduler")).compatibles
    names = sorted(c.__name__ for c in compatibles)
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UceError(
            f"--scheduler {name}: unknown scheduler — {hint}choose a diffusers scheduler class that "
            f"fits this model, e.g. {', '.join(names[:6])}"
        )
    if cls not in compatibles:
        raise UceError(
            f"--scheduler {name} does not fit this model's {current} — choose one of {', '.join(names)}"
        )
    return cls


def image_size(
    root: Path, height: int | None, width: int | None, denoiser: str = "unet"
) -> tuple[int, int]:
    """Requested size, else the model's: the denoiser's sample size × the VAE's downsampling factor.

    Args:
        root: the model folder.
        height: requested image height in pixels; None for the model's.
        width: requested image width in pixels; None for the model's.
        denoiser: the component holding the editable weights (``Family.denoiser``).

    Returns:
        ``(height, width)`` in pixels.

    Raises:
        ModelError: no requested size and unreadable unet/vae configs.
    """
    try:
        unet = json.loads((root / denoiser / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
        # A transformer config without sample_size (FLUX's) samples at its pipeline's
        # default_sample_size, 128 latents (1024 px at FLUX's VAE factor 8).
        sample = unet.get("sample_size", DEFAULT_SAMPLE_SIZE)
        h, w = (sample, sample) if isinstance(sample, int) else sample
        # AutoencoderKL: block_out_channels; AutoencoderDC (Sana): encoder_block_out_channels
        blocks = vae.get("block_out_channels") or vae["encoder_block_out_channels"]
        factor = 2 ** (len(blocks) - 1)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ModelError(
            f"{root}: cannot read the image size from the {denoiser}/vae configs ({exc}) — pass --height and --width"
        ) from None
    return height or h * factor, width or w * factor


def load_pipeline(
    root: Path,
    scheduler_cls: type,
    device: torch.device,
    dtype: torch.dtype,
    denoiser: str = "unet",
) -> Any:
    """The base pipeline on ``device`` in ``dtype``, with the chosen scheduler, bars off.

    ``denoiser`` is the family's component that holds the editable weights (``Family.denoiser``).

    Raises:
        ModelError: a folder diffusers cannot load, or a pipeline without that denoiser.
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # uce reports its own progress; the libraries' loading bars would interleave with it.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # Loading in ``dtype`` (not casting afterwards) keeps fp32-only modules in fp32. Newer
            # diffusers call the keyword ``dtype`` and warn on ``torch_dtype``; older ones know
            # only ``torch_dtype``, which both accept.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                str(root), safety_checker=None, requires_safety_checker=False,
                use_safetensors=True, torch_dtype=dtype,
            )  # fmt: skip
    except Exception as exc:  # diffusers raises OSError/ValueError/etc. on broken folders
        raise ModelError(f"cannot load the pipeline from {root}: {exc}") from exc
    if not hasattr(pipe, denoiser):
        raise ModelError(
            f"{root} holds a {type(pipe).__name__} without a {denoiser}; uce sample needs the "
            "pipeline the model's family edits"
        )
    if type(pipe.scheduler) is not scheduler_cls:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
