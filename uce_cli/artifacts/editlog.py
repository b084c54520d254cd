"""The edit log: a JSON record of an edit, complete enough to reproduce and audit it.

Two runs of the same recipe give the same outputs byte for byte, but their logs differ in what
describes the run rather than the edit (``created``, ``timings``, versions, device, where the base
and the output live). ``fingerprint`` is what a CI job compares instead: a sha256 over the recipe
hash and every output's digest — for the files uce serializes (delta, LoRA, operator, converted
single file) the digest of their tensors without the metadata, which names host paths; for the
rest (a diffusers folder, a patched single file) the file's sha256. Paths that come from the recipe
are recorded relative to the recipe's folder (``paths``), as written in it (``recipe``).
"""

from __future__ import annotations

import hashlib
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from uce_cli import __version__
from uce_cli.errors import UceError

LOG_SCHEMA = 1


def package_versions() -> dict[str, str]:
    """Versions of uce and the libraries that shape its numbers."""
    versions = {"uce": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "safetensors", "huggingface-hub"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_edit_log(**sections: Any) -> dict[str, Any]:
    """Assemble the log: schema, fingerprint (if given), time, versions, then the other sections."""
    head: dict[str, Any] = {"schema": LOG_SCHEMA}
    if "fingerprint" in sections:
        head["fingerprint"] = sections.pop("fingerprint")
    return {
        **head,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        **sections,
    }


def output_fingerprint(recipe_sha256: str | None, outputs: dict[str, str]) -> str:
    """sha256 over the recipe hash and each output's digest (``name|digest`` lines, name order).

    Args:
        recipe_sha256: the normalized recipe's hash (None for an edit file without one).
        outputs: output file (relative to the output folder) → its digest (module docstring).
    """
    digest = hashlib.sha256(f"recipe_sha256|{recipe_sha256 or ''}\n".encode())
    for name in sorted(outputs):
        digest.update(f"{name}|{outputs[name]}\n".encode())
    return digest.hexdigest()


def relative_paths(
    recipe_file: str | Path, recipe_paths: dict[str, str], out: Path
) -> dict[str, str]:
    """The recipe's paths and the output folder, relative to the recipe's folder (POSIX form).

    Args:
        recipe_file: the recipe's path.
        recipe_paths: field → path as written in the recipe (``model``, ``output.dir``,
            ``<section>.<i>.concepts_file``); shipped lists (``upstream:…``) are kept as named.
        out: the folder the run wrote.

    Returns:
        ``recipe_file`` (its name), each field, and ``output`` (where this run wrote, which
        ``--out`` may have moved from ``output.dir``); a path may start with ``../``.
    """
    folder = Path(recipe_file).expanduser().resolve().parent

    def relative(path: str | Path) -> str:
        if str(path).startswith("upstream:"):
            return str(path)
        target = folder / Path(path).expanduser()
        try:
            return Path(os.path.relpath(target, folder)).as_posix()
        except ValueError:  # another drive (Windows): no relative form
            return Path(target).as_posix()

    return {
        "recipe_file": Path(recipe_file).name,
        **{name: relative(path) for name, path in recipe_paths.items()},
        "output": relative(out),
    }


def read_edit_log(path: Path) -> dict[str, Any]:
    """Read an edit log from its file or from an output folder holding ``edit_log.json``.

    The log is input (anyone may write into a folder): it goes through the validating reader of
    ``artifacts.records``, so a field of the wrong shape is one error naming the file and field.

    Raises:
        UceError: missing file or not an edit log.
    """
    from uce_cli.artifacts.records import read_edit_log_record

    path = Path(path)
    file = path / "edit_log.json" if path.is_dir() else path
    if not (file.exists() or file.is_symlink()):
        raise UceError(
            f"{file}: no edit log here — give an output folder of `uce apply` or its edit_log.json"
        )
    return read_edit_log_record(file)
