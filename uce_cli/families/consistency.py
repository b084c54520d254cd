"""Whether a pipeline folder's components belong together, told from their configs before any tensor is read.

A folder assembled from two models (a FLUX index with an SD 3 transformer, a PixArt folder with
Sana's text encoder) used to fail deep inside a matrix product with a shape error. Here each
component's config must be the class ``model_index.json`` names, and the text encoders must be as
wide as the denoiser's config says it reads (``Family.width_checks``); every sharded index is read
once (``weights.files.index_shards``) so a broken one is refused before a library reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uce_cli.errors import ModelError
from uce_cli.families.base import Family
from uce_cli.weights.files import check_indexes, read_json_config


def _listed(index: dict[str, Any]) -> dict[str, str]:
    """component → class name, for the components model_index.json lists with a class."""
    return {
        name: entry[1]
        for name, entry in index.items()
        if not name.startswith("_")
        and isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[1], str)
    }


def _config(root: Path, component: str) -> dict[str, Any] | None:
    path = root / component / "config.json"
    return read_json_config(path) if path.is_file() else None


def _is_class(config: dict[str, Any], class_name: str) -> bool | None:
    """Whether a component's config describes ``class_name``; None when it says nothing."""
    if isinstance(config.get("_class_name"), str):  # a diffusers model
        return config["_class_name"] == class_name
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    if not isinstance(architectures, list) and not isinstance(model_type, str):
        return None
    if isinstance(architectures, list) and class_name in architectures:
        return True
    # transformers: the class name starts with its model type (CLIPTextModel: clip_text_model)
    return isinstance(model_type, str) and class_name.lower().startswith(
        model_type.replace("_", "").replace("-", "").lower()
    )


def _describe(config: dict[str, Any]) -> str:
    if isinstance(config.get("_class_name"), str):
        return config["_class_name"]
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return str(architectures[0])
    return f"'{config.get('model_type')}' model"


def _width(config: dict[str, Any], field: str) -> int | None:
    """An encoder's output width: ``hidden`` (hidden_size or T5's d_model) or ``projection``."""
    keys = ("hidden_size", "d_model") if field == "hidden" else ("projection_dim",)
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_consistency(family: Family) -> None:
    """Refuse a folder whose components do not belong to one pipeline of ``family``.

    Raises:
        ModelError: a broken sharded index, a component whose config is another class than
            model_index.json names, or text encoders of another width than the denoiser reads —
            naming the component that does not belong.
    """
    root = family.root
    listed = _listed(family.index)
    for component in sorted(listed):
        if (root / component).is_dir():
            check_indexes(root / component)
    configs: dict[str, dict[str, Any]] = {}
    for component, class_name in sorted(listed.items()):
        config = _config(root, component)
        if config is None:
            continue
        configs[component] = config
        if _is_class(config, class_name) is False:
            raise ModelError(
                f"{root / component / 'config.json'} is a {_describe(config)}, but "
                f"model_index.json names a {class_name} — the '{component}' component does not "
                f"belong to this {family.label} pipeline (copied from another model?)"
            )
    denoiser = configs.get(family.denoiser)
    if denoiser is None:
        return
    for encoders, field, denoiser_field in family.width_checks:
        expected = denoiser.get(denoiser_field)
        widths = [_width(configs[e], field) if e in configs else None for e in encoders]
        if not isinstance(expected, int) or any(w is None for w in widths):
            continue
        total = sum(w for w in widths if w is not None)
        if total != expected:
            parts = " + ".join(f"{e} {w}" for e, w in zip(encoders, widths, strict=True))
            wrong = encoders[0] if len(encoders) == 1 else " or ".join(encoders)
            raise ModelError(
                f"{root}: the text encoder output is {total} wide ({parts}), but "
                f"{family.denoiser}/config.json reads {denoiser_field} = {expected} — the "
                f"'{wrong}' component does not belong to this {family.label} pipeline "
                f"(or the '{family.denoiser}' does not)"
            )
