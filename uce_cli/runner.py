"""``uce apply`` as a library call: plan → encode once → solve once → write outputs + edit log."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uce_cli.cache import preserve_key
from uce_cli.distributed import Ranks
from uce_cli.editlog import build_edit_log, output_fingerprint, relative_paths
from uce_cli.encode import token_counts
from uce_cli.errors import OutputError
from uce_cli.formats import edit_metadata, write_formats
from uce_cli.formats.files import kv_files, kv_weights_sha256, text_encoder_weights_sha256
from uce_cli.model import (
    load_text_encoder,
    load_tokenizer,
    open_model,
    pick_device,
    pick_dtype,
    text_encoder_files,
)
from uce_cli.outputs import (
    EDIT_LOG_FILE,
    HashBook,
    abandon_stage,
    check_destination,
    finalize,
    resolve_destination,
    staging_dir,
    write_json,
)
from uce_cli.plan import EditPlan, operator_refusal
from uce_cli.progress import NullProgress, Progress
from uce_cli.solve import Scales, operator_rank, solve_edit
from uce_cli.stats import collect_statistics


@dataclass
class ApplyResult:
    """What ``run_apply`` produced: the output folder and its edit log."""

    out: Path
    log: dict[str, Any]


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

    Raises:
        UceError: any problem a user can fix (model, solve, output).
    """
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
    model = open_model(plan.model, plan.revision, allow_pickle=allow_pickle)
    if lora_rank is not None:  # refuse a rank that cannot fit before encoding anything
        from uce_cli.formats.lora import check_rank

        check_rank(lora_rank, {f"{model.denoiser}.{t.key}": t.shape for t in model.kv})
    check_destination(out, model.root, force)
    run_device = pick_device(device)
    run_dtype = pick_dtype(dtype, run_device)
    solve_device = run_device if run_device.type == "cuda" else torch.device("cpu")
    pipe = None
    if plan.loop is not None:
        # The judge first: without it (offline, not cached) the loop cannot run at all.
        from uce_cli.classify import ClipClassifier

        classifier = classifier or ClipClassifier(plan.loop.classifier, run_device)
    # One identity for the text encoder (its weights, not its file layout): the preserve cache
    # key, the operator/LoRA metadata and the edit log all use it; the base k/v weights' content
    # hash names the base in delta/LoRA files (uce merge checks it). Hashing releases the GIL, so
    # both run beside the encoder's loading.
    keys = [t.key for t in model.kv if t.key.split(".")[-2] in plan.projections]
    with ThreadPoolExecutor(max_workers=1) as pool:
        encoder_hash = pool.submit(text_encoder_weights_sha256, model.root)
        kv_hash_job = pool.submit(kv_weights_sha256, model, keys)
        if plan.loop is not None:
            # The loop samples: one pipeline, loaded once; its text encoder serves the statistics.
            from uce_cli.pipeline import load_pipeline, resolve_scheduler

            pipe = load_pipeline(
                model.root, resolve_scheduler(None, model.root), run_device, run_dtype
            )
            tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        else:
            tokenizer, encoder = load_text_encoder(model, run_device, run_dtype)
        encoder_id = encoder_hash.result()
        kv_hash = kv_hash_job.result()
    progress.finish()
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache_key = (
        preserve_key(
            encoder_id,
            plan.preserve,
            plan.alignment,
            tokenizer.model_max_length,
            str(run_dtype).removeprefix("torch."),
        )
        if use_cache and plan.preserve
        else None
    )
    stats, counts, cache_status = collect_statistics(
        plan, tokenizer, encoder, solve_device, batch_size, progress, cache_key
    )
    del encoder
    timings["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    old = model.read_kv(keys)
    scales = Scales(plan.lam, plan.erase_scale, plan.preserve_scale)
    loop_record = None
    if plan.loop is not None:
        from uce_cli.debias import run_debias_loop
        from uce_cli.pipeline import image_size

        assert pipe is not None and classifier is not None
        height, width = image_size(model.root, None, None)
        loop = run_debias_loop(
            plan, pipe, old, stats, scales, classifier, height, width, progress, on_iteration, ranks
        )
        new, k, metrics, loop_record = loop.weights, loop.k, loop.metrics, loop.record
        timings["debias_loop"] = time.perf_counter() - t0
    else:
        progress.start("solve")
        new, k, metrics = solve_edit(old, stats, scales, kv_files(model))
        progress.finish()
        timings["solve"] = time.perf_counter() - t0

    if ranks is not None and not ranks.main:
        return None  # rank 0 writes the outputs
    t0 = time.perf_counter()
    progress.start("save")
    stage = staging_dir(out)
    hashes = HashBook()
    try:
        written = write_formats(
            stage,
            model,
            plan.formats,
            old,
            new,
            {
                **edit_metadata(plan),
                "text_encoder_weights_sha256": encoder_id,
                "base_kv_weights_sha256": kv_hash,
                "edit_form": "operator" if k is not None else "per-layer",
            },
            k=k,
            projections=plan.projections,
            lora_rank=lora_rank,
            hashes=hashes,
        )
        timings["save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        shapes = {t.key: list(t.shape) for t in model.kv}
        outputs = dict(
            zip(
                map(str, written.files),
                hashes.sha256_many([stage / f for f in written.files]).values(),
                strict=True,
            )
        )
        log = build_edit_log(
            fingerprint=output_fingerprint(
                plan.recipe_sha256, {**outputs, **{str(f): d for f, d in written.content.items()}}
            ),
            recipe_file=plan.source_file,
            recipe_sha256=plan.recipe_sha256,
            recipe=plan.recipe,
            paths=relative_paths(plan.source_file, plan.recipe_paths, out),
            base_model={
                "spec": plan.model,
                "revision": plan.revision,
                "path": str(model.root),
                # What the edit reads is hashed by content; whole-file hashes are recorded where
                # they came for free (copied for the diffusers output, or a hub cache blob):
                # hashing a 3.4 GB UNet only for the log would cost seconds.
                "text_encoder_weights_sha256": encoder_id,
                "kv_weights_sha256": kv_hash,
                "files": {
                    str(p.relative_to(model.root)): digest
                    for p in [*model.denoiser_files, *text_encoder_files(model)]
                    if (digest := hashes.known(p)) is not None
                },
            },
            device=str(run_device),
            dtype=str(run_dtype).removeprefix("torch."),
            plan={
                **plan.summary(),
                "preserve_vectors": stats.n_preserve_vectors,
                "edit_vectors": stats.n_edit_vectors,
                "token_counts_max": max(counts.values()),
                "preserve_cache": cache_status,
                "pairs": stats.spans,
            },
            solver={
                "lambda": scales.lam,
                "erase_scale": scales.erase_scale,
                "preserve_scale": scales.preserve_scale,
                "width": stats.width,
                "operator_rank": operator_rank(k) if k is not None else None,
                "form": "W_new = W_old·K (one operator)"
                if k is not None
                else "per layer (norm-relative debias targets; no operator)",
                "precision": (
                    "float64 Gram matrices, Cholesky solve and operator K; W_old·K applied in "
                    "float32 (float64 for float64 weights), cast back once"
                    if k is not None
                    else "float64 Gram matrices, targets and Cholesky solve; cast back once"
                ),
            },
            layers={
                f"{model.denoiser}.{key}": {
                    "shape": shapes[key],
                    **m,
                    **written.layers.get(f"{model.denoiser}.{key}", {}),
                }
                for key, m in metrics.items()
            },
            **({"debias": loop_record} if loop_record is not None else {}),
            timings={k_: round(v, 4) for k_, v in timings.items()},
            outputs=outputs,
        )
        log["timings"]["hash_and_log"] = round(time.perf_counter() - t0, 4)
        write_json(stage / EDIT_LOG_FILE, log)
        finalize(stage, out, force)
    except BaseException as exc:
        abandon_stage(stage, out, exc)  # deletes the stage; raises an OSError as an OutputError
        raise
    finally:
        progress.finish()
    return ApplyResult(out, log)


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
    tokenizer = _local_tokenizer(plan.model)
    if tokenizer is None:
        report["vectors"] = (
            "per pair 77 − max(f(s), f(t)) (paper) / 1 (last-token); tokenizer not available locally"
        )
        return report
    from uce_cli.encode import check_lengths
    from uce_cli.stats import pair_spans, prompt_sections

    counts = token_counts(tokenizer, plan.prompts())
    check_lengths(counts, tokenizer.model_max_length, prompt_sections(plan))
    spans = pair_spans(plan, counts, tokenizer.model_max_length)
    per_pair = [src.length for src, _ in spans]
    preserve_per = tokenizer.model_max_length if plan.alignment == "paper" else 1
    report["vectors"] = {
        "edit_vectors": sum(per_pair),
        "per_edit_prompt_min": min(per_pair),
        "per_edit_prompt_max": max(per_pair),
        "preserve_vectors": preserve_per * len(plan.preserve),
        "per_preserve_prompt": preserve_per,
    }
    for shown in report["first_pairs"].values():
        for item in shown:
            src, _ = spans[next(i for i, p in enumerate(plan.pairs) if p.source == item["source"])]
            item["vectors"] = src.length
            item["source_start"] = src.start
    return report


def _local_tokenizer(model: str) -> object | None:
    """The model's tokenizer if it is available without network or weights, else None."""
    from uce_cli.tiny import TINY_MODEL_NAME, build_tiny_tokenizer

    if model == TINY_MODEL_NAME:
        return build_tiny_tokenizer()
    root = Path(model)
    if (root / "tokenizer").is_dir():
        return load_tokenizer(root)
    return None
