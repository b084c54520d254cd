"""What a model spec names — the builtin model, a local path or a hub id — decided without torch.

``uce validate`` and plan resolution use this to refuse a missing local model before anything
heavy is imported; ``uce_cli.families.model`` uses the same rules to open one.
"""

from __future__ import annotations

import os
import re

BUILTIN_PREFIX = "builtin:"
# How the Hugging Face Hub spells a repository: exactly one slash.
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Weight files a single-file model can be (pickle ones only with --allow-pickle).
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_PATH_PREFIXES = (".", "/", "~")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` is shaped like a hub repository id (``owner/name``, not ``./x`` or ``~/x``)."""
    return bool(HUB_ID.match(spec)) and not spec.startswith(_PATH_PREFIXES)


def looks_like_local_path(spec: str) -> bool:
    """Whether ``spec`` can only mean a local path.

    True for specs starting with ``.``, ``/`` or ``~``, naming a weight file (``.safetensors``,
    ``.ckpt``, …), or holding path separators without being an ``owner/name`` hub id. A bare
    name (``m``) or a hub id is not: it may name a hub repository.
    """
    if spec.startswith(BUILTIN_PREFIX):
        return False
    if spec.startswith(_PATH_PREFIXES) or spec.lower().endswith(MODEL_FILE_SUFFIXES):
        return True
    separators = [s for s in (os.sep, os.altsep) if s]
    return any(s in spec for s in separators) and not is_hub_id(spec)
