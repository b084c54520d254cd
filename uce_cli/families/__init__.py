"""The model families uce edits, and which one a pipeline folder (or a single file) is.

A family is one module with one :class:`~uce_cli.families.base.Family` subclass; adding one is one
line in ``FAMILIES`` (module path, class name). Modules are imported only when a model is opened,
so the CLI starts without torch. The first family whose ``claims(model_index)`` is true wins; a
pipeline no family claims is refused in one line naming its ``_class_name`` and what uce edits.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uce_cli.errors import ModelError
from uce_cli.families.base import Family, SingleFileLayout

# (module, class), in the order their claims are tried.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("uce_cli.families.sd", "SD"),
    ("uce_cli.families.sdxl", "SdxlFamily"),
    ("uce_cli.families.flux", "FluxFamily"),
    ("uce_cli.families.sd3", "SD3Family"),
    ("uce_cli.families.pixart", "PixArtFamily"),
    ("uce_cli.families.sana", "SanaFamily"),
)
# A folder no family claims by its _class_name, and whose _class_name is none of KNOWN's, is
# opened as this family when its components fit (a UNet and one CLIP text encoder): its own
# check_components names what does not.
FALLBACK = ("uce_cli.families.sd", "SD")
# Pipelines recognised by the prefix of their _class_name, for the refusal of those no family claims.
KNOWN = (
    ("StableDiffusionXL", "SDXL"),
    ("StableDiffusion3", "Stable Diffusion 3"),
    ("PixArt", "PixArt"),
    ("Sana", "Sana"),
    ("Flux", "FLUX"),
    ("HiDream", "HiDream"),
    ("Kandinsky", "Kandinsky"),
    ("IF", "DeepFloyd IF"),
)


def _load(entry: tuple[str, str]) -> type[Family]:
    module, name = entry
    return getattr(importlib.import_module(module), name)


def family_classes() -> list[type[Family]]:
    """Every registered family class, in claim order."""
    return [_load(entry) for entry in FAMILIES]


def supported() -> str:
    """What uce edits, for refusals: ``uce edits <pipelines>; <pipelines>``."""
    return "uce edits " + "; ".join(dict.fromkeys(cls.pipelines for cls in family_classes()))


def open_family(root: Path, index: dict[str, Any]) -> Family:
    """The family of a pipeline folder, its components checked.

    Raises:
        ModelError: no family claims it (naming its ``_class_name`` and what uce edits), the
            claiming family finds a component missing or unexpected, or a component belongs to
            another model (``families.consistency``).
    """
    class_name = str(index.get("_class_name") or "")
    cls = next((c for c in family_classes() if c.claims(index)), None)
    if cls is None:
        known = next((label for prefix, label in KNOWN if class_name.startswith(prefix)), None)
        if known is not None:
            raise ModelError(f"{root}: {class_name} ({known}) is not supported yet — {supported()}")
        cls = _load(FALLBACK)
    from uce_cli.families.consistency import check_consistency

    family = cls(root, index)
    family.check_components()
    check_consistency(family)
    return family


def single_file_layout(keys: Sequence[str]) -> tuple[type[Family], SingleFileLayout] | None:
    """The family and layout whose single-file keys these are, or None."""
    for cls in family_classes():
        layout = cls.single_file_layout()
        if layout is not None and layout.claims(keys):
            return cls, layout
    return None
