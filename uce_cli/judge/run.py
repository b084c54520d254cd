"""Opening an ``uce apply`` output folder for judging: its log read through the validating reader,
its recipe's folder found from the log (never from the working folder), every local file the
recipe names checked to lie in the run's or the recipe's folder, and which ``evaluate:`` is used.

A run folder is input: whoever can write into it controls its edit log. So the recipe's folder
is trusted only where the recipe file still is there (outside the run) and still parses as a
recipe; a local path in the logged recipe must resolve inside the run folder or that trusted
folder, or be named, as it is, by that recipe file itself.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from uce_cli.artifacts.editlog import read_edit_log
from uce_cli.edit.evalspec import Evaluate
from uce_cli.edit.plan import EditPlan, resolve_plan
from uce_cli.edit.recipe import Recipe, load_recipe, parse_recipe, recipe_sha256
from uce_cli.edit.upstream import UPSTREAM_PREFIX
from uce_cli.errors import RecipeError, UceError, UceWarning


@dataclass
class Run:
    """An ``uce apply`` output folder opened for evaluation."""

    path: Path
    log: dict[str, Any]
    plan: EditPlan
    evaluate: Evaluate
    base_dir: Path  # the recipe's folder: relative prompt files are read from it
    base_spec: str
    base_revision: str | None
    # where evaluate: came from and the hashes that say which recipe judged the edit (eval.json)
    provenance: dict[str, Any] = field(default_factory=dict)


def evaluate_sha256(evaluate: Evaluate | None) -> str | None:
    """Hash of an ``evaluate:`` section (normalized), None when there is none."""
    if evaluate is None:
        return None
    payload = json.dumps(evaluate.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def recipe_folder_candidates(run: Path, log: dict[str, Any]) -> list[Path]:
    """Where the recipe's folder may be, from the log alone (never the working folder).

    In order: ``recipe_folder`` (absolute, written by this uce); the folder of an absolute
    ``recipe_file``; the folder ``paths.output`` (the run relative to the recipe's folder) leads
    back to when it has no ``..``.
    """
    candidates: list[Path] = []
    folder = log.get("recipe_folder")
    if isinstance(folder, str) and Path(folder).is_absolute():
        candidates.append(Path(folder))
    recipe_file = log.get("recipe_file")
    if recipe_file and Path(recipe_file).is_absolute():
        candidates.append(Path(recipe_file).parent)
    output = (log.get("paths") or {}).get("output")
    if output:
        parts = PurePath(output).parts
        if not PurePath(output).is_absolute() and ".." not in parts:
            up = len([p for p in parts if p != "."])
            resolved = run.resolve()
            if up <= len(resolved.parents):
                candidates.append(resolved if up == 0 else resolved.parents[up - 1])
    return list(dict.fromkeys(candidates))


def recipe_local_paths(recipe: Recipe, evaluate: Evaluate | None) -> dict[str, str]:
    """Field → path of every local file or folder the recipe names (``upstream:`` ones aside)."""
    paths: dict[str, str] = {}
    for section in ("erase", "moderate", "debias", "preserve"):
        for i, group in enumerate(getattr(recipe, section)):
            if group.concepts_file is not None:
                paths[f"{section}.{i}.concepts_file"] = group.concepts_file
    if evaluate is not None:
        for name in ("heldout", "preserved", "unrelated"):
            for i, ps in enumerate(getattr(evaluate, name)):
                paths[f"evaluate.{name}.{i}.file"] = ps.file
        if evaluate.images is not None:
            paths["evaluate.images.prompts.file"] = evaluate.images.prompts.file
            if evaluate.images.reference is not None:
                paths["evaluate.images.reference"] = evaluate.images.reference
    return {k: v for k, v in paths.items() if not v.startswith(UPSTREAM_PREFIX)}


def _find_recipe(run: Path, log: dict[str, Any]) -> tuple[Path | None, Recipe | None]:
    """The recipe's folder (None if the log does not say) and the recipe file found there, if it
    lies outside the run folder and parses (only then does it vouch for its paths)."""
    name = (log.get("paths") or {}).get("recipe_file") or Path(
        log.get("recipe_file") or "recipe.yaml"
    ).name
    candidates = recipe_folder_candidates(run, log)
    for folder in candidates:
        file = folder / name
        if not file.is_file():
            continue
        if _inside(file.resolve(), run.resolve()):
            return folder, None
        try:
            return folder, load_recipe(file)
        except RecipeError:
            return folder, None
    return (candidates[0] if candidates else None), None


def _check_local_paths(
    run: Path,
    folder: Path | None,
    paths: dict[str, str],
    vouched: dict[str, str],
    trusted: bool,
) -> None:
    """Refuse a path of the logged recipe that leads out of the run's and recipe's folders.

    Raises:
        UceError: naming the log, the field and the path.
    """
    log_file = run / "edit_log.json"
    roots = [run.resolve()] + ([folder.resolve()] if folder is not None and trusted else [])
    for where, value in paths.items():
        if vouched.get(where) == value:
            continue  # the recipe file itself names it: the user's own choice
        if folder is None:
            raise UceError(
                f"{log_file}: recipe.{where} is {value!r}, relative to the recipe's folder, but "
                "the log does not say where that folder is (made by an older uce from another "
                "folder?) — run `uce apply` again to record it"
            )
        try:
            target = (folder / Path(value).expanduser()).resolve()
        except (RuntimeError, OSError, ValueError):
            target = None
        if target is None or not any(_inside(target, root) for root in roots):
            shown = " or ".join(str(r) for r in roots)
            raise UceError(
                f"{log_file}: recipe.{where} is {value!r}, outside {shown} — a run folder is "
                "input, so uce eval reads only files in the run's folder or the recipe's; put "
                "the file there, or name it in the recipe file itself"
            )


def open_run(path: Path) -> Run:
    """Read a run's edit log and re-resolve its recipe (for the edited and preserved concepts).

    Raises:
        UceError: not an ``uce apply`` output, a path of its log leads outside the run's and the
            recipe's folders, or its recipe cannot be resolved again.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UceError(f"{path}: not a folder — give an output folder of `uce apply`")
    log = read_edit_log(path)
    recipe_data = log.get("recipe")
    base = log.get("base_model") or {}
    if not isinstance(recipe_data, dict) or not base.get("spec"):
        raise UceError(
            f"{path}: its edit log has no recipe or base model (made by merge/transfer?) — "
            "`uce eval` judges outputs of `uce apply`"
        )
    folder, current = _find_recipe(path, log)
    name = (log.get("paths") or {}).get("recipe_file") or Path(
        log.get("recipe_file") or "recipe.yaml"
    ).name
    recipe_file = (folder or path) / name
    recipe = parse_recipe(recipe_data, f"{recipe_file} (as recorded in {path / 'edit_log.json'})")
    evaluate = recipe.evaluate
    logged_sha = evaluate_sha256(recipe.evaluate)
    provenance: dict[str, Any] = {
        "evaluate_from": "edit log",
        "evaluate_sha256": logged_sha,
        "logged_evaluate_sha256": logged_sha,
        "recipe_file_sha256_now": None,
    }
    if current is not None:
        # The recipe file's evaluate: wins while the file still describes this edit (its hash
        # leaves evaluate: out), so expectations can be added after the edit was made.
        now = recipe_sha256(current)
        provenance["recipe_file_sha256_now"] = now
        if now == log.get("recipe_sha256"):
            evaluate = current.evaluate
            provenance["evaluate_from"] = "recipe file"
            provenance["evaluate_sha256"] = evaluate_sha256(evaluate)
            if provenance["evaluate_sha256"] != logged_sha:
                warnings.warn(
                    f"{recipe_file}: evaluate: changed since `uce apply` — judged with the "
                    f"file's (sha256 {str(provenance['evaluate_sha256'])[:12]}; the log's "
                    f"{str(logged_sha)[:12]}); both are recorded in eval.json",
                    UceWarning,
                    stacklevel=2,
                )
        else:
            warnings.warn(
                f"{recipe_file} now describes another edit (recipe sha256 {now[:12]}, the run's "
                f"{str(log.get('recipe_sha256'))[:12]}) — judged with evaluate: as recorded in "
                "the edit log",
                UceWarning,
                stacklevel=2,
            )
    vouched = recipe_local_paths(current, current.evaluate) if current is not None else {}
    _check_local_paths(
        path,
        folder,
        recipe_local_paths(recipe, evaluate),
        vouched,
        trusted=current is not None,
    )
    try:
        plan = resolve_plan(recipe, recipe_file)
    except RecipeError as exc:
        raise UceError(
            f"{path}: cannot resolve its recipe again to find the edited concepts: "
            f"{exc.problems[0]}"
        ) from None
    return Run(
        path,
        log,
        plan,
        evaluate or Evaluate(),
        recipe_file.parent,
        base["spec"],
        base.get("revision"),
        provenance,
    )


def check_same_base(run: Run, base: Any, keys: list[str]) -> None:
    """Refuse to judge an edit against a base it was not made for (as ``uce merge`` refuses).

    The log records the content hash of the base's edited k/v tensors
    (``base_model.kv_weights_sha256``, over the keys of ``layers``); the base opened now must
    hash the same.

    Raises:
        UceError: the hashes differ, naming both.
    """
    from uce_cli.artifacts.files import kv_weights_sha256

    recorded = (run.log.get("base_model") or {}).get("kv_weights_sha256")
    if not recorded:
        warnings.warn(
            f"{run.path / 'edit_log.json'} does not record the base's k/v hash (an older uce): "
            f"cannot check that the edit was made for {run.base_spec}",
            UceWarning,
            stacklevel=2,
        )
        return
    logged = [k for k in run.log.get("layers", {}) if k in {t.key for t in base.kv}]
    actual = kv_weights_sha256(base, logged or keys)
    if actual != recorded:
        raise UceError(
            f"{run.path}: the edit was made for another base than {run.base_spec} as it is now "
            f"(its log records k/v sha256 {recorded[:12]}…, the base's k/v weights hash to "
            f"{actual[:12]}…) — the figures would compare the edit with the wrong weights; "
            "point the log's base_model.spec at the model it was made from"
        )
