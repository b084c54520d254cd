"""Hub models: a pipeline's files from the local Hugging Face cache or the Hub, failing fast offline.

The hub client retries a failed connection for about 40 s before it gives up. uce looks in the
local cache first, and goes to the Hub only after one quick request shows it answers, so a typo
in a hub id (or a model never downloaded) on a machine without network is one error line in a
second or two. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from uce_cli.errors import ModelError

PROBE_TIMEOUT_S = 3.0  # one request to the Hub endpoint before any download
# Variant weights (fp16, ema) are other checkpoints; only the main one is edited and copied.
IGNORE_PATTERNS = ["*.fp16.*", "*.ema.*", "*non_ema*", "*.bin", "*.ckpt"]


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, kept short."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _kind(exc: BaseException) -> str:
    """The hub client's error class, by name (its module moved between versions)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    for name in (
        "GatedRepoError",
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "RemoteEntryNotFoundError",
    ):
        if name in names:
            return name
    return ""


def hub_unreachable() -> str | None:
    """Why the Hub cannot be used now (offline mode, or no answer to one quick request), else None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT)


@functools.cache
def _probe(endpoint: str) -> str | None:
    """One request to the Hub endpoint, no retries; asked once per process."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport error (DNS, refused, timeout, proxy) means unreachable
        return f"the Hub at {endpoint} cannot be reached ({_reason(exc)})"
    return None


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The repository's folder in the local Hugging Face cache, when its model_index.json is there.

    A pure look-up in the cache folder: ``hf_hub_download(local_files_only=True)`` builds request
    headers first, and that asks the Hub for its agent registry (one more request, up to 3 s)
    even when uce already knows the Hub cannot be reached.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        index = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:  # an invalid id or revision: nothing usable in the cache
        return None
    if not isinstance(index, str):  # None (not cached) or the "known not to exist" marker
        return None
    return Path(index).parent


def _components(index_file: Path) -> list[str]:
    """The component folders a model_index.json names (``unet``, ``text_encoder``, …)."""
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{index_file} is not valid JSON ({_reason(exc)})") from None
    if not isinstance(index, dict):
        raise ModelError(f"{index_file} is not a JSON object — not a diffusers pipeline")
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]


def _not_cached(repo_id: str, why: str) -> str:
    return (
        f"cannot fetch model '{repo_id}': it is not in the local Hugging Face cache and {why} — "
        "check the id for a typo, download it while online, or give a local diffusers folder"
    )


def check_hub_model(repo_id: str, revision: str | None = None) -> None:
    """Fail at once (before anything heavy is imported) when ``repo_id`` cannot be had.

    Raises:
        ModelError: the Hub is offline or unreachable and the model is not in the local cache.
    """
    why = hub_unreachable()
    if why is not None and _cached_snapshot(repo_id, revision) is None:
        raise ModelError(_not_cached(repo_id, why))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """A local folder with the diffusers pipeline ``repo_id``: from the HF cache, else downloaded.

    Only the components named in ``model_index.json`` are fetched: their configs, tokenizer files
    and main safetensors weights.

    Raises:
        ModelError: the model is not cached and the Hub is unreachable or offline, or the Hub
            does not have it (typo, gated, no such revision, not a diffusers pipeline).
    """
    why = hub_unreachable()
    if why is not None:
        cached = _cached_snapshot(repo_id, revision)
        if cached is None:
            raise ModelError(_not_cached(repo_id, why))
        return cached
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        index_file = Path(hf_hub_download(repo_id, "model_index.json", revision=revision))
        patterns = ["model_index.json"]
        for name in _components(index_file):
            patterns += [f"{name}/*.json", f"{name}/*.txt", f"{name}/*.model"]
            patterns += [f"{name}/*.safetensors"]
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS
            )
        )
    except ModelError:
        raise
    except Exception as exc:  # the hub client raises many types; each gets its own advice
        kind = _kind(exc)
        if kind == "GatedRepoError":
            hint = "it is gated: accept its terms on huggingface.co, then `hf auth login`"
        elif kind == "RepositoryNotFoundError":
            hint = (
                "no such repository on the Hub — check the id (a private one needs `hf auth login`)"
            )
        elif kind == "RevisionNotFoundError":
            hint = f"the Hub has no revision '{revision}' of it — check `revision`"
        elif kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            hint = "it has no model_index.json, so it is not a diffusers pipeline"
        else:
            hint = f"{_reason(exc)} — check the id and your network, or give a local folder"
        raise ModelError(
            f"cannot fetch model '{repo_id}' from the Hugging Face Hub: {hint}"
        ) from exc
