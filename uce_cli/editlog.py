"""The edit log: a JSON record of an edit, complete enough to reproduce and audit it."""

from __future__ import annotations

import json
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
    """Assemble the log: schema, time, versions, then the given sections in order."""
    return {
        "schema": LOG_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        **sections,
    }


def read_edit_log(path: Path) -> dict[str, Any]:
    """Read an edit log from its file or from an output folder holding ``edit_log.json``.

    Raises:
        UceError: missing file or not an edit log.
    """
    file = path / "edit_log.json" if path.is_dir() else path
    if not file.is_file():
        raise UceError(
            f"{file}: no edit log here — give an output folder of `uce apply` or its edit_log.json"
        )
    try:
        log = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UceError(f"{file}: not a readable JSON edit log ({exc})") from None
    if not isinstance(log, dict) or "layers" not in log or "schema" not in log:
        raise UceError(f"{file}: JSON, but not a uce edit log (no 'schema'/'layers')")
    return log
