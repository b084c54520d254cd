"""``uce apply`` as a library call: open → encode/statistics → solve → write → log, one stage each.

The model's family (``uce_cli.families``) supplies everything model-specific: the text path that
turns prompts into the vectors each group of editable layers reads, the groups, the editable
tensors. Statistics and the solve run once per group (one operator per group).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uce_cli.artifacts.editlog import build_edit_log, output_fingerprint, relative_paths
from uce_cli.artifacts.files import kv_files, kv_weights_sha256, text_encoder_weights_sha256
from uce_cli.artifacts.formats import check_formats, edit_metadata, refuse_formats, write_formats
from uce_cli.artifacts.outputs import (
    EDIT_LOG_FILE,
    HashBook,
    abandon_stage,
    check_destination,
    finalize,
    resolve_destination,
    staging_dir,
    write_json,
)
from uce_cli.distributed import Ranks
from uce_cli.edit.autopreserve import (
    choose_preserve,
    drift_forms,
    keep_exact_rows,
    with_keep_exact,
    with_preserved,
)
from uce_cli.edit.cache import preserve_key
from uce_cli.edit.nullspace import NoFreeDirectionError
from uce_cli.edit.plan import EditPlan, check_loop_work, loop_work, operator_refusal
from uce_cli.edit.solve import Scales, operator_rank, solve_edit
from uce_cli.edit.stats import EditStats, collect_statistics
from uce_cli.errors import OutputError, UceError
from uce_cli.families.base import Family, TextPath
from uce_cli.families.model import (
    BaseModelFiles,
    open_model,
    open_text_path,
    pick_device,
    pick_dtype,
    text_encoder_files,
)
from uce_cli.progress import NullProgress, Progress


@dataclass
class ApplyResult:
    """What ``run_apply`` produced: the output folder and its edit log."""

    out: Path
    log: dict[str, Any]


@dataclass
class Opened:
    """What the open stage gives: the model, where things run, its text path and identities."""

    model: BaseModelFiles
    keys: list[str]  # the editable keys the plan's projections select
    run_device: torch.device
    run_dtype: torch.dtype
    solve_device: torch.device
    text_path: TextPath
    encoder_id: str  # text_encoder_weights_sha256
    kv_hash: str  # the selected base tensors' content hash
    pipe: Any = None  # the loaded pipeline, when the debias loop samples
    classifier: Callable[[list[Any], list[str]], torch.Tensor] | None = None
    harden_rows: dict[str, Any] | None = None  # ``harden:``'s erased vectors per group


@dataclass
class Solved:
    """What the solve stage gives: base and new weights, one operator per group (or None)."""

    old: dict[str, torch.Tensor]
    new: dict[str, torch.Tensor]
    ks: dict[str, torch.Tensor] | None
    metrics: dict[str, dict[str, float]]
    loop_record: dict[str, Any] | None = None
    harden_record: dict[str, Any] | None = None


def run_apply(
    plan: EditPlan,
    out: Path | None = None,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 32,
    progress: Progress | None = None,
    use_cache: bool = True,
    lora_rank: int | None = None,
    allow_pickle: bool = False,
    classifier: Callable[[list[Any], list[str]], torch.Tensor] | None = None,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    ranks: Ranks | None = None,
    allow_long: bool = False,
) -> ApplyResult | None:
    """Run a resolved plan end to end and write its outputs atomically.

    Args:
        plan: the resolved recipe.
        out: output folder (default: the plan's ``output.dir``).
        force: replace an existing output.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``mps`` for encoding (and solving, except on MPS,
            which has no float64: the solve then runs on the CPU).
        dtype: text-encoder compute dtype (``auto`` | ``fp32`` | ``fp16`` | ``bf16``).
        batch_size: prompts per encoder pass.
        progress: stage/advance reporting.
        use_cache: reuse (and store) the preserve set's Gram matrix in the uce cache.
        lora_rank: truncate the LoRA formats to this rank (None: exact rank).
        allow_pickle: accept a pickle single-file model (read with ``weights_only=True``).
        classifier: the debias loop's judge (images, labels → (N, J) probabilities); default:
            the CLIP model ``debias_loop.classifier``. Used only when a debias group is ``auto``.
        on_iteration: receives each debias-loop iteration's record as it completes.
        ranks: under ``accelerate launch``, every rank samples its share of the debias loop's
            images; only rank 0 writes the outputs (the others return None).
        allow_long: run a debias loop beyond ``MAX_LOOP_WORK`` (``uce apply --allow-long``).

    Raises:
        UceError: any problem a user can fix (model, solve, output).
    """
    check_loop_work(plan, allow_long)
    progress = progress or NullProgress()
    out = out or plan.output_dir
    if out is None:
        raise OutputError("no output folder — pass --out DIR or set output.dir in the recipe")
    out = resolve_destination(out)
    check_destination(out, None, force, inputs=[Path(plan.source_file)])
    if plan.per_layer and "operator" in plan.formats:
        raise OutputError(operator_refusal(next(p.section for p in plan.pairs if p.relative)))
    timings: dict[str, float] = {}
    torch.manual_seed(plan.seed)

    t0 = time.perf_counter()
    progress.start("load model")
    opened = open_stage(plan, out, force, device, dtype, lora_rank, allow_pickle, classifier)
    progress.finish()
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats, counts, cache_status = statistics_stage(plan, opened, batch_size, progress, use_cache)
    timings["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    solved = solve_stage(plan, opened, stats, progress, on_iteration, ranks)
    timings["debias_loop" if plan.loop is not None else "solve"] = time.perf_counter() - t0

    if ranks is not None and not ranks.main:
        return None  # rank 0 writes the outputs
    return write_stage(
        plan, out, force, opened, stats, counts, cache_status, solved, lora_rank, timings, progress
    )


def open_stage(
    plan: EditPlan,
    out: Path,
    force: bool,
    device: str,
    dtype: str,
    lora_rank: int | None,
    allow_pickle: bool,
    classifier: Callable[[list[Any], list[str]], torch.Tensor] | None,
) -> Opened:
    """Open the model and its family's text path (the debias loop's pipeline and judge too).

    Raises:
        UceError: the model cannot be opened, a LoRA rank that cannot fit, a bad destination.
    """
    model = open_model(plan.model, plan.revision, allow_pickle=allow_pickle)
    assert model.family is not None
    # a format the family has no loadable layout for is refused before anything is encoded
    refuse_formats(model.family, check_formats(plan.formats), [t.key for t in model.kv])
    if lora_rank is not None:  # refuse a rank that cannot fit before encoding anything
        from uce_cli.artifacts.lora import check_rank

        check_rank(lora_rank, {f"{model.denoiser}.{t.key}": t.shape for t in model.kv})
    check_destination(out, model.root, force)
    run_device = pick_device(device)
    run_dtype = pick_dtype(dtype, run_device, model.family.cuda_dtype)
    solve_device = run_device if run_device.type == "cuda" else torch.device("cpu")
    keys = selected_keys(model, plan)
    if plan.loop is not None:
        if len({t.group for t in model.kv if t.key in keys}) != 1:
            raise UceError(
                f"the debias loop (alphas: auto) runs on one-group families; {model.family.label} "
                "has several — give the alphas explicitly"
            )
        if model.denoiser != "unet":
            raise UceError(
                f"the debias loop (alphas: auto) samples with UNet pipelines (SD 1.x/2.x, SDXL); "
                f"{model.family.label} has a {model.denoiser} — give the alphas explicitly"
            )
        # The judge first: without it (offline, not cached) the loop cannot run at all.
        from uce_cli.judge.classify import ClipClassifier

        classifier = classifier or ClipClassifier(
            plan.loop.classifier, run_device, allow_pickle=allow_pickle
        )
    # One identity for the text encoder (its weights, not its file layout): the preserve cache
    # key, the operator/LoRA metadata and the edit log all use it; the base k/v weights' content
    # hash names the base in delta/LoRA files (uce merge checks it). Hashing releases the GIL, so
    # both run beside the encoder's loading.
    pipe = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        encoder_hash = pool.submit(text_encoder_weights_sha256, model.root, model.family)
        kv_hash_job = pool.submit(kv_weights_sha256, model, keys)
        text_path = None
        if plan.loop is not None:
            # The loop samples: one pipeline, loaded once; its text encoder serves the statistics.
            from uce_cli.artifacts.pipeline import load_pipeline, resolve_scheduler

            pipe = load_pipeline(
                model.root,
                resolve_scheduler(None, model.root),
                run_device,
                run_dtype,
                model.denoiser,
            )
            text_path = model.family.text_path_of(pipe)
        if text_path is None:
            text_path = open_text_path(model, run_device, run_dtype)
        encoder_id = encoder_hash.result()
        kv_hash = kv_hash_job.result()
    return Opened(
        model, keys, run_device, run_dtype, solve_device, text_path, encoder_id, kv_hash, pipe,
        classifier,
    )  # fmt: skip


def selected_keys(model: BaseModelFiles, plan: EditPlan) -> list[str]:
    """The editable keys the recipe's ``layers.projections`` select (all, when it names none).

    Raises:
        UceError: a named projection the model's family does not edit (never another one instead).
    """
    if not plan.projections_given:  # all, less those the family edits only when named
        assert model.family is not None
        return [t.key for t in model.kv if t.projection not in model.family.opt_in]
    known = list(dict.fromkeys(t.projection for t in model.kv))
    unknown = [p for p in plan.projections if p not in known]
    if unknown:
        assert model.family is not None
        raise UceError(
            f"layers.projections: '{unknown[0]}' is not an editable projection of "
            f"{model.family.label} — it edits {model.family.edits}: {', '.join(known)}"
        )
    return [t.key for t in model.kv if t.projection in plan.projections]


def statistics_stage(
    plan: EditPlan, opened: Opened, batch_size: int, progress: Progress, use_cache: bool
) -> tuple[dict[str, EditStats], dict[str, int], str]:
    """Encode every prompt once through the text path; the Gram statistics of each group."""
    cache_key = (
        preserve_key(
            opened.encoder_id,
            plan.preserve,
            plan.alignment,
            opened.text_path.max_tokens,
            str(opened.run_dtype).removeprefix("torch."),
        )
        if use_cache and plan.preserve
        else None
    )
    stats, counts, status = collect_statistics(
        plan, opened.text_path, opened.solve_device, batch_size, progress, cache_key
    )
    if plan.harden is not None:  # the erased vectors the hardening rounds attack
        from uce_cli.edit.harden import attack_rows

        opened.harden_rows = attack_rows(plan, opened.text_path, batch_size)
    # a group none of whose layers the plan's projections select is not edited (SDXL's pooled)
    edited = {t.group for t in opened.model.kv if t.key in set(opened.keys)}
    stats = {g: s for g, s in stats.items() if g in edited}
    if plan.keep_exact:
        rows = keep_exact_rows(opened.text_path, plan.alignment, plan.keep_exact)
        stats = {g: with_keep_exact(s, rows[g]) for g, s in stats.items()}
    if plan.auto_preserve:
        stats = auto_preserve_stage(plan, opened, stats, batch_size, progress)
    if opened.pipe is None:  # the loop's pipeline keeps its encoder; otherwise it is done
        opened.text_path.release()
    return stats, counts, status


def solver_scales(plan: EditPlan) -> Scales:
    """The solve's scales and method, as the plan resolved them."""
    return Scales(
        plan.lam, plan.erase_scale, plan.preserve_scale, plan.method, plan.null_space_threshold
    )


def group_weights(
    opened: Opened, old: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """group → {key: the columns of W_old the group's operator edits}."""
    tensor_of = {t.key: t for t in opened.model.kv}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in old.items():
        groups.setdefault(tensor_of[key].group, {})[key] = tensor_of[key].part(w)
    return groups


def auto_preserve_stage(
    plan: EditPlan,
    opened: Opened,
    stats: dict[str, EditStats],
    batch_size: int,
    progress: Progress,
) -> dict[str, EditStats]:
    """Choose each ``auto`` preserve group's concepts by the drift the edit without them causes
    (``uce_cli.edit.autopreserve``); their prompts join ``plan.preserve``, the record
    ``plan.auto_choices``. Returns the statistics with the chosen vectors in G_p."""
    weights = group_weights(opened, opened.model.read_kv(opened.keys))
    scales = solver_scales(plan)
    for candidates in plan.auto_preserve:
        forms = {}
        for group, group_stats in stats.items():
            if weights.get(group):
                try:
                    new, _, _ = solve_edit(weights[group], group_stats, scales)
                except NoFreeDirectionError as exc:
                    raise NoFreeDirectionError(f"group '{group}': {exc}") from None
                forms[group] = drift_forms(weights[group], new)
        choice = choose_preserve(
            candidates, opened.text_path, plan.alignment, forms, batch_size, progress
        )
        stats = {
            g: with_preserved(s, choice.rows[g], choice.counts.get(g)) if g in choice.rows else s
            for g, s in stats.items()
        }
        known = set(plan.preserve)
        plan.preserve = plan.preserve + [p for p in choice.prompts if p not in known]
        plan.auto_choices.append(choice.record())
    return stats


def solve_stage(
    plan: EditPlan,
    opened: Opened,
    stats: dict[str, EditStats],
    progress: Progress,
    on_iteration: Callable[[dict[str, Any]], None] | None,
    ranks: Ranks | None,
) -> Solved:
    """The closed form once per group (or the debias loop, on a one-group family)."""
    model = opened.model
    old = model.read_kv(opened.keys)
    scales = solver_scales(plan)
    if plan.loop is not None:
        from uce_cli.artifacts.pipeline import image_size
        from uce_cli.commands.debias import run_debias_loop

        assert opened.pipe is not None and opened.classifier is not None
        [(group, group_stats)] = stats.items()
        height, width = image_size(model.root, None, None, model.denoiser)
        loop = run_debias_loop(
            plan, opened.pipe, old, group_stats, scales, opened.classifier, height, width,
            progress, on_iteration, ranks,
        )  # fmt: skip
        ks = {group: loop.k} if loop.k is not None else None
        return Solved(old, loop.weights, ks, loop.metrics, loop.record)
    progress.start("solve")
    files = kv_files(model)
    tensor_of = {t.key: t for t in model.kv}
    group_of = {t.key: t.group for t in model.kv}
    new: dict[str, torch.Tensor] = {}
    ks: dict[str, torch.Tensor] = {}
    metrics: dict[str, dict[str, float]] = {}
    records: dict[str, Any] = {}
    for group, group_stats in stats.items():
        # a layer that reads the group in some of its columns is solved on those columns only
        weights = {key: tensor_of[key].part(w) for key, w in old.items() if group_of[key] == group}
        if not weights:
            continue
        try:
            if plan.harden is not None and opened.harden_rows is not None:
                from uce_cli.edit.harden import harden_edit

                new_g, k, metrics_g, records[group] = harden_edit(
                    weights, group_stats, scales, opened.harden_rows[group], plan.harden, files
                )
            else:
                new_g, k, metrics_g = solve_edit(weights, group_stats, scales, files)
        except NoFreeDirectionError as exc:
            raise NoFreeDirectionError(f"group '{group}': {exc}") from None
        new.update({key: tensor_of[key].whole(old[key], w) for key, w in new_g.items()})
        metrics.update(metrics_g)
        if k is not None:
            ks[group] = k
    progress.finish()
    # Debias with norm-relative α is solved per layer: no operator for any group then.
    solved = Solved(old, new, ks if len(ks) == len({group_of[k] for k in old}) else None, metrics)
    if records:
        solved.harden_record = records
    return solved


def write_stage(
    plan: EditPlan,
    out: Path,
    force: bool,
    opened: Opened,
    stats: dict[str, EditStats],
    counts: dict[str, int],
    cache_status: str,
    solved: Solved,
    lora_rank: int | None,
    timings: dict[str, float],
    progress: Progress,
) -> ApplyResult:
    """Write the requested formats and the edit log into a staging folder, then rename it into place."""
    model = opened.model
    t0 = time.perf_counter()
    progress.start("save")
    stage = staging_dir(out)
    hashes = HashBook()
    try:
        written = write_formats(
            stage,
            model,
            plan.formats,
            solved.old,
            solved.new,
            {
                **edit_metadata(plan),
                "text_encoder_weights_sha256": opened.encoder_id,
                "base_kv_weights_sha256": opened.kv_hash,
                "edit_form": "operator" if solved.ks is not None else "per-layer",
            },
            k=solved.ks,
            projections=list(dict.fromkeys(t.projection for t in model.kv if t.key in opened.keys)),
            lora_rank=lora_rank,
            hashes=hashes,
        )
        timings["save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = dict(
            zip(
                map(str, written.files),
                hashes.sha256_many([stage / f for f in written.files]).values(),
                strict=True,
            )
        )
        log = edit_log(
            plan, out, opened, stats, counts, cache_status, solved, written, outputs, hashes,
            timings,
        )  # fmt: skip
        log["timings"]["hash_and_log"] = round(time.perf_counter() - t0, 4)
        write_json(stage / EDIT_LOG_FILE, log)
        finalize(stage, out, force)
    except BaseException as exc:
        abandon_stage(stage, out, exc)  # deletes the stage; raises an OSError as an OutputError
        raise
    finally:
        progress.finish()
    return ApplyResult(out, log)


def _per_group(stats: dict[str, EditStats], value: Callable[[str, EditStats], Any]) -> Any:
    """One group's value as is (the log's SD-era shape), several as {group: value}."""
    if len(stats) == 1:
        [(group, s)] = stats.items()
        return value(group, s)
    return {group: value(group, s) for group, s in stats.items()}


def edit_log(
    plan: EditPlan,
    out: Path,
    opened: Opened,
    stats: dict[str, EditStats],
    counts: dict[str, int],
    cache_status: str,
    solved: Solved,
    written: Any,
    outputs: dict[str, str],
    hashes: HashBook,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The edit log: recipe, base, plan, solver (per group), layers, timings, outputs."""
    model = opened.model
    assert model.family is not None
    ks = solved.ks
    shapes = {t.key: list(t.shape) for t in model.kv}
    groups = {g.name: g for g in model.groups}
    return build_edit_log(
        fingerprint=output_fingerprint(
            plan.recipe_sha256, {**outputs, **{str(f): d for f, d in written.content.items()}}
        ),
        recipe_file=plan.source_file,
        # where the recipe is, so its relative paths never depend on the working folder
        recipe_folder=str(Path(plan.source_file).expanduser().resolve().parent),
        recipe_sha256=plan.recipe_sha256,
        recipe=plan.recipe,
        paths=relative_paths(plan.source_file, plan.recipe_paths, out),
        base_model={
            "spec": plan.model,
            "revision": plan.revision,
            "path": str(model.root),
            "family": model.family.name,
            # What the edit reads is hashed by content; whole-file hashes are recorded where
            # they came for free (copied for the diffusers output, or a hub cache blob):
            # hashing a 3.4 GB UNet only for the log would cost seconds.
            "text_encoder_weights_sha256": opened.encoder_id,
            "kv_weights_sha256": opened.kv_hash,
            "files": {
                str(p.relative_to(model.root)): digest
                for p in [*model.denoiser_files, *text_encoder_files(model)]
                if (digest := hashes.known(p)) is not None
            },
        },
        device=str(opened.run_device),
        dtype=str(opened.run_dtype).removeprefix("torch."),
        plan={
            **plan.summary(),
            "projections": list(
                dict.fromkeys(t.projection for t in model.kv if t.key in opened.keys)
            ),
            "preserve_vectors": _per_group(stats, lambda _, s: s.n_preserve_vectors),
            "edit_vectors": _per_group(stats, lambda _, s: s.n_edit_vectors),
            "token_counts_max": max(counts.values()),
            "preserve_cache": cache_status,
            "pairs": _per_group(stats, lambda _, s: s.spans),
        },
        solver={
            "lambda": plan.lam,
            "erase_scale": plan.erase_scale,
            "preserve_scale": plan.preserve_scale,
            "width": _per_group(stats, lambda _, s: s.width),
            "operator_rank": _per_group(
                stats, lambda g, _: operator_rank(ks[g]) if ks is not None and g in ks else None
            ),
            "groups": {
                g: {
                    "width": s.width,
                    "rank": operator_rank(ks[g]) if ks is not None and g in ks else None,
                    "reads": groups[g].reads if g in groups else "",
                }
                for g, s in stats.items()
            },
            "form": "W_new = W_old·K (one operator)"
            if ks is not None
            else "per layer (norm-relative debias targets; no operator)",
            **solver_record(plan, stats, solved.metrics, {t.key: t.group for t in model.kv}),
            "precision": (
                "float64 Gram matrices, Cholesky solve and operator K; W_old·K applied in "
                "float32 (float64 for float64 weights), cast back once"
                if ks is not None
                else "float64 Gram matrices, targets and Cholesky solve; cast back once"
            ),
        },
        layers={
            f"{model.denoiser}.{key}": {
                "shape": shapes[key],
                **m,
                **written.layers.get(f"{model.denoiser}.{key}", {}),
            }
            for key, m in solved.metrics.items()
        },
        **({"debias": solved.loop_record} if solved.loop_record is not None else {}),
        **({"harden": solved.harden_record} if solved.harden_record is not None else {}),
        timings={k_: round(v, 4) for k_, v in timings.items()},
        outputs=outputs,
    )


def solver_record(
    plan: EditPlan,
    stats: dict[str, EditStats],
    metrics: dict[str, dict[str, float]],
    group_of: dict[str, str],
) -> dict[str, Any]:
    """The edit log's record of the newer solver options (nothing when none is used): method,
    threshold, kept rank per group (free directions of the update), auto-preserve's choices."""
    record: dict[str, Any] = {"method": plan.method}
    if not plan.solver_options():
        return record
    if plan.method == "null-space":
        record["null_space_threshold"] = plan.null_space_threshold
    if plan.keep_exact:
        record["keep_exact"] = list(plan.keep_exact)
    kept: dict[str, dict[str, int]] = {}
    for key, m in metrics.items():
        if "kept_rank" in m and group_of.get(key) in stats:
            kept[group_of[key]] = {
                "kept_rank": int(m["kept_rank"]),
                "fixed_by_preserve": int(m["fixed_rank_preserve"]),
                "fixed_by_keep_exact": int(m["fixed_rank_keep_exact"]),
            }
    record["kept_rank"] = _per_group(stats, lambda g, _: kept.get(g, {}).get("kept_rank"))
    record["free_space"] = kept
    if plan.auto_choices:
        record["auto_preserve"] = plan.auto_choices
    return record


def describe_plan(plan: EditPlan, first: int = 3) -> dict[str, Any]:
    """The plan as ``--dry-run`` shows it: counts, first prompts per section, vectors per prompt.

    Vectors per prompt need the tokenizer (no weights): read from a local folder, or generated for
    the builtin model; for a hub model not on disk the formula is shown instead.
    """
    report: dict[str, Any] = {
        **plan.summary(),
        "first_pairs": {},
        "first_preserve": plan.preserve[:first],
    }
    if (work := loop_work(plan)) is not None:
        report["debias_loop_work"] = work
    for pair in plan.pairs:
        shown = report["first_pairs"].setdefault(pair.section, [])
        if len(shown) < first:
            item: dict[str, Any] = {
                "source": pair.source,
                "targets": [list(t) for t in pair.targets],
            }
            if pair.attributes:
                item["alpha"] = ("auto, " if pair.auto else "") + (
                    "relative" if pair.relative else "absolute"
                )
            shown.append(item)
    family = _local_family(plan.model)
    if family is not None and not plan.projections_given:
        report["projections"] = [f"all: {family.edits}"]
    text_path = family.text_path(None, None) if family is not None else None
    if text_path is not None and family is not None:
        # only the groups whose layers the projections select are edited (SDXL's pooled: if named)
        edited = _edited_groups(family, plan)
        text_path.groups = tuple(g for g in text_path.groups if g.name in edited)
    if text_path is None:
        report["vectors"] = (
            "per pair 77 − max(f(s), f(t)) (paper) / 1 (last-token); tokenizer not available locally"
        )
        return report
    from uce_cli.edit.stats import pair_spans, prompt_tokens

    tokens, _ = prompt_tokens(plan, text_path)
    vectors: dict[str, dict[str, int]] = {}
    first_spans = None
    for group in text_path.groups:
        spans = pair_spans(plan, tokens[group.name])
        first_spans = first_spans or spans
        per_pair = [src.length for src, _ in spans]
        per_preserve = [
            tokens[group.name][p].seen if plan.alignment == "paper" else 1 for p in plan.preserve
        ]
        vectors[group.name] = {
            "edit_vectors": sum(per_pair),
            "per_edit_prompt_min": min(per_pair),
            "per_edit_prompt_max": max(per_pair),
            "preserve_vectors": sum(per_preserve),
            "per_preserve_prompt": max(
                per_preserve, default=text_path.max_tokens if plan.alignment == "paper" else 1
            ),
        }
    report["vectors"] = next(iter(vectors.values())) if len(vectors) == 1 else vectors
    assert first_spans is not None
    for shown in report["first_pairs"].values():
        for item in shown:
            index = next(i for i, p in enumerate(plan.pairs) if p.source == item["source"])
            src, _ = first_spans[index]
            item["vectors"] = src.length
            item["source_start"] = src.start
    return report


def _local_family(model: str) -> Family | None:
    """The model's family if it is on disk or builtin, else None."""
    from uce_cli.families import open_family
    from uce_cli.families.model import read_model_index, resolve_model
    from uce_cli.weights.modelspec import BUILTIN_PREFIX

    if model.startswith(BUILTIN_PREFIX):
        root = resolve_model(model)
    else:
        root = Path(model)
        if not (root / "model_index.json").is_file():
            return None
    return open_family(root, read_model_index(root / "model_index.json"))


def _edited_groups(family: Family, plan: EditPlan) -> set[str]:
    """The groups with a layer the plan's projections select (headers only)."""
    from uce_cli.weights.files import read_header, weight_files

    return {
        found[0]
        for file in weight_files(family.root / family.denoiser, "diffusion_pytorch_model")
        for key in read_header(file)[0]
        if (found := family.group_of(key)) is not None
        and (
            found[1] in plan.projections
            if plan.projections_given
            else found[1] not in family.opt_in
        )
    }
