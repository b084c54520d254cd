"""Image-level evaluation over images made by ``uce sample --compare`` (never re-implemented here):
CLIP score, zero-shot CLIP classification, ImageNet top-1, NudeNet counts, LPIPS and FID.
docs/metrics.md defines each figure. Models load through ``from_pretrained`` exactly as real
weights do; a model that is not available offline fails with one line naming what to fetch.

Under ``accelerate launch`` the images are drawn across the ranks (``uce sample``'s split), each
rank scores every world-th (base, edited) pair, and the per-pair values are gathered in the
one-process order before averaging; FID gathers every image's Inception features the same way."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from uce_cli.distributed import Ranks
from uce_cli.edit.prompts import MAX_SEED, PromptRow
from uce_cli.errors import DataError, UceError, UceWarning
from uce_cli.judge.prompts import norm, read_prompt_set
from uce_cli.progress import NullProgress, Progress
from uce_cli.safe_files import create_dir

EXTRA = "eval"
EXTRA_TORCHVISION = "eval-torchvision"  # lpips, torch-fidelity: need a torchvision for your torch
BATCH = 16
T = TypeVar("T")


@dataclass
class ImagePair:
    """The base and edited image of one prompt and seed, and the concept the prompt phrases."""

    prompt: str
    concept: str
    case: str
    seed: int
    base: Path
    edited: Path


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _need(module: str, metric: str, extra: str = EXTRA, extra_note: str = "") -> Any:
    """Import an optional dependency or say which extra provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install (e.g. a CUDA-only torchvision)
        raise UceError(
            f"metric {metric} needs the `{module}` package{extra_note} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'not importable'}) — "
            f'pip install "uce-cli[{extra}]"'
        ) from None


def _from_pretrained(
    loader: Any,
    model_id: str,
    metric: str,
    allow_pickle: bool = False,
    clip: bool = True,
    weights: bool = True,
) -> Any:
    """A judge model (``weights``) or its processor, loaded as ``judge_source`` says: the builtin
    tiny CLIP, a local folder of the right kind, safetensors unless ``allow_pickle``."""
    from uce_cli.judge.classify import judge_source, load_advice

    field = "evaluate.clip_model" if clip else "evaluate.imagenet_model"
    # a processor reads no weights: the pickle rule is the model's
    source, options = judge_source(model_id, field, allow_pickle or not weights, clip)
    if not weights:
        options = {}
    try:
        return loader.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UceError(
            f"metric {metric}: model '{model_id}' {load_advice(model_id, first)}"
        ) from None


def image_rows(run: Any, limit: int | None) -> tuple[list[PromptRow], dict[str, str]]:
    """The recipe's image prompt set as ``uce sample`` rows, and case → concept."""
    spec = run.evaluate.images
    prompts = spec.prompts
    where = "evaluate.images.prompts"
    items = read_prompt_set(prompts, run.base_dir, where)
    edited = edited_concepts(run.plan) if spec.edited_only else None
    rows, concepts = [], {}
    for index, item in enumerate(items):
        if limit is not None and len(rows) >= limit:
            break
        if edited is not None and norm(item.concept) not in edited:
            continue
        case = (item.row.get(prompts.case_column) or "").strip() if prompts.case_column else ""
        case = case or str(index)
        seed = None
        if prompts.seed_column:
            raw = (item.row.get(prompts.seed_column) or "").strip()
            if not raw.isdigit() or int(raw) > MAX_SEED:
                raise DataError(
                    f"{where}: row {index}: {prompts.seed_column} {raw!r} is not a seed"
                )
            seed = int(raw)
        rows.append(PromptRow(item.prompt, case, seed))
        concepts[case] = item.concept
    if not rows:
        raise DataError(f"{where}: no prompt rows")
    return rows, concepts


def edited_concepts(plan: Any) -> set[str]:
    """Normalised names of every concept a plan erases, moderates or debiases."""
    from uce_cli.judge.evaluate import edited_guides

    debiased = {norm(p.concept) for p in plan.pairs if p.section.startswith("debias")}
    return set(edited_guides(plan)) | debiased


def sample_images(
    run: Any,
    rows: list[PromptRow],
    samples: Path | None,
    device: str,
    progress: Progress,
    ranks: Ranks | None = None,
    draw_into: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Draw (or resume) the images with ``uce sample``, or check an existing sample folder."""
    from uce_cli.commands.sample import MANIFEST_FILE, SampleOptions, run_sample

    spec = run.evaluate.images
    options = SampleOptions(
        steps=spec.steps,
        guidance=spec.guidance,
        height=spec.height,
        width=spec.width,
        n=spec.images_per_prompt,
        seed=spec.seed,
        device=device,
    )
    if samples is None:
        # Sampling never writes into the model it samples: with an edit file the images go to
        # RUN/eval/samples, with only a diffusers folder beside the run.
        delta = run.path / "edit.safetensors"
        edit = delta if delta.is_file() else run.path
        folder = (
            run.path / "eval" / "samples"
            if delta.is_file()
            else run.path.with_name(f"{run.path.name}-samples")
        )
        if draw_into is not None:
            folder = draw_into
        if delta.is_file() or draw_into is not None:
            create_dir(folder, run.path)  # not through a link planted in the run (safe_files)
        run_sample(rows, folder, run.base_spec, edit, True, options, progress, ranks)
    else:
        folder = Path(samples).expanduser()
    manifest_path = folder / MANIFEST_FILE
    if not (manifest_path.exists() or manifest_path.is_symlink()):
        raise DataError(
            f"--samples {folder}: no {MANIFEST_FILE} — give a `uce sample --compare` folder"
        )
    from uce_cli.artifacts.records import read_manifest_record

    manifest = read_manifest_record(manifest_path)
    settings = manifest.get("settings", {})
    wanted = {"steps": str(spec.steps), "guidance": f"{spec.guidance:g}", "model": run.base_spec}
    for key, value in wanted.items():
        if settings.get(key) != value:
            raise DataError(
                f"{manifest_path}: images made with {key} {settings.get(key)!r}, the recipe's "
                f"evaluate.images says {value!r} — sample again with the recipe's settings"
            )
    return folder, manifest


def image_pairs(
    rows: list[PromptRow], concepts: dict[str, str], folder: Path, manifest: dict, run: Any
) -> list[ImagePair]:
    """Base/edited image paths of every (prompt, seed), checked against the manifest."""
    spec = run.evaluate.images
    entries = {e.get("path"): e for e in manifest.get("images", []) if isinstance(e, dict)}
    pairs, missing = [], []
    from uce_cli.artifacts.imagefile import read_image
    from uce_cli.edit.prompts import file_stem

    for row in rows:
        first = row.seed if row.seed is not None else spec.seed
        for seed in range(first, first + spec.images_per_prompt):
            paths = {}
            for role in ("base", "edited"):
                rel = f"{role}/{file_stem(row.case)}-{seed}.png"
                entry = entries.get(rel)
                if entry is None or not ((folder / rel).exists() or (folder / rel).is_symlink()):
                    missing.append(rel)
                elif entry.get("prompt") != row.prompt:
                    raise DataError(
                        f"{folder / rel}: made for prompt {entry.get('prompt')!r}, the recipe's "
                        f"row says {row.prompt!r} — sample again into another folder"
                    )
                else:  # decoded once up front: a bad file is said by name before any model loads
                    read_image(folder / rel)
                paths[role] = folder / rel
            if len(paths) == 2:
                pairs.append(
                    ImagePair(row.prompt, concepts.get(row.case, ""), row.case, seed, **paths)
                )
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"{folder}: image {missing[0]}{more} missing — run `uce sample --compare` with the "
            "recipe's prompt set, or `uce eval --images` without --samples to draw them"
        )
    return pairs


def _across_ranks(pairs: list[Any], ranks: Ranks, score: Callable[[list[Any]], list[T]]) -> list[T]:
    """``score(pairs)``, one value per item in the order of ``pairs``, each rank scoring its share."""
    share = ranks.share(pairs)
    parts = ranks.gather(score(share) if share else [])
    values: list[Any] = [None] * len(pairs)
    for rank, part in enumerate(parts):
        values[rank :: len(parts)] = part
    return values


def _open(paths: list[Path]) -> list[Image.Image]:
    """RGB images through uce's one image loader (no symlinks, no bombs, no truncated files)."""
    from uce_cli.artifacts.imagefile import load_image

    return [load_image(p) for p in paths]


def _unit(features: Any) -> torch.Tensor:
    """Unit-length projected features (transformers 5 wraps them in an output object)."""
    if not isinstance(features, torch.Tensor):
        features = features.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


@torch.inference_mode()
def clip_metrics(
    pairs: list[ImagePair],
    model_id: str,
    want: set[str],
    device: torch.device,
    ranks: Ranks | None = None,
    allow_pickle: bool = False,
    classes: list[str] | None = None,
) -> dict:
    """clip_score(_base) and clip_accuracy(_base); ``classes``: the zero-shot classes (default:
    the concepts the pairs name)."""
    from transformers import CLIPModel, CLIPProcessor

    model = _from_pretrained(CLIPModel, model_id, "clip_score", allow_pickle)
    model = model.to(device).eval()
    processor = _from_pretrained(CLIPProcessor, model_id, "clip_score", weights=False)

    def embed_text(texts: list[str]) -> torch.Tensor:
        t = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return _unit(model.get_text_features(**{k: v.to(device) for k, v in t.items()}))

    def embed_images(paths: list[Path]) -> torch.Tensor:
        x = processor(images=_open(paths), return_tensors="pt")["pixel_values"].to(device)
        return _unit(model.get_image_features(pixel_values=x))

    if classes is None:
        classes = list(dict.fromkeys(p.concept for p in pairs if p.concept))
    if "clip_accuracy" in want and len(classes) < 2:
        raise DataError(
            "clip_accuracy needs a prompt set whose rows name at least two concepts "
            "(evaluate.images.prompts.concept_column)"
        )
    class_emb = (
        embed_text([f"a photo of {c}" for c in classes]) if "clip_accuracy" in want else None
    )

    def score(share: list[ImagePair]) -> list[dict[str, tuple[float, bool]]]:
        """Per pair and role: (CLIP score, class predicted right)."""
        values: list[dict[str, tuple[float, bool]]] = [{} for _ in share]
        for s in range(0, len(share), BATCH):
            chunk = share[s : s + BATCH]
            txt = embed_text([p.prompt for p in chunk])
            for role in ("edited", "base"):
                img = embed_images([getattr(p, role) for p in chunk])
                scores = (100 * (img * txt).sum(-1)).tolist()
                hits = [False] * len(chunk)
                if class_emb is not None:
                    predicted = (img @ class_emb.T).argmax(-1).tolist()
                    hits = [
                        norm(classes[i]) == norm(p.concept)
                        for i, p in zip(predicted, chunk, strict=True)
                    ]
                for k in range(len(chunk)):
                    values[s + k][role] = (scores[k], hits[k])
        return values

    per_pair = _across_ranks(pairs, ranks or Ranks(), score)
    figures: dict[str, float] = {}
    for role in ("edited", "base"):
        suffix = "" if role == "edited" else "_base"
        if "clip_score" in want:
            figures[f"clip_score{suffix}"] = sum(v[role][0] for v in per_pair) / len(per_pair)
        if class_emb is not None:
            figures[f"clip_accuracy{suffix}"] = sum(v[role][1] for v in per_pair) / len(pairs)
    settings = {"score": "100·cos(image, text)"}
    if class_emb is not None:
        settings["classes"] = len(classes)
        settings["class_prompt"] = "a photo of {}"
    return {"figures": figures, "model": model_id, "settings": settings}


@torch.inference_mode()
def imagenet_top1(
    pairs: list[ImagePair],
    model_id: str,
    device: torch.device,
    ranks: Ranks | None = None,
    allow_pickle: bool = False,
    erased: set[str] | None = None,
) -> dict:
    """imagenet_top1(_base): top-1 label names (comma-separated synonyms) against the concept;
    with ``erased`` (normalised names of the recipe's erased classes) also Table 2's two columns,
    ``imagenet_top1_erased`` and ``imagenet_top1_others`` (and ``_base``)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = _from_pretrained(
        AutoModelForImageClassification, model_id, "imagenet_top1", allow_pickle, clip=False
    )
    model = model.to(device).eval()
    processor = _from_pretrained(
        AutoImageProcessor, model_id, "imagenet_top1", clip=False, weights=False
    )
    labels = {
        i: {norm(n) for n in str(name).split(",")} for i, name in model.config.id2label.items()
    }

    def score(share: list[ImagePair]) -> list[dict[str, bool]]:
        """Per pair and role: the top-1 label names the concept."""
        values: list[dict[str, bool]] = [{} for _ in share]
        for s in range(0, len(share), BATCH):
            chunk = share[s : s + BATCH]
            for role in ("edited", "base"):
                images = _open([getattr(p, role) for p in chunk])
                x = processor(images=images, return_tensors="pt")
                top1 = model(pixel_values=x["pixel_values"].to(device)).logits.argmax(-1).tolist()
                for k, (i, p) in enumerate(zip(top1, chunk, strict=True)):
                    values[s + k][role] = norm(p.concept) in labels[i]
        return values

    per_pair = _across_ranks(pairs, ranks or Ranks(), score)
    figures: dict[str, float | None] = {
        "imagenet_top1" + ("" if role == "edited" else "_base"): sum(v[role] for v in per_pair)
        / len(pairs)
        for role in ("edited", "base")
    }
    settings: dict[str, Any] = {"top": 1}
    if erased is not None:
        from uce_cli.judge.metrics import split_top1

        for role in ("edited", "base"):
            suffix = "" if role == "edited" else "_base"
            split = split_top1(
                [(p.concept, v[role]) for p, v in zip(pairs, per_pair, strict=True)], erased
            )
            figures[f"imagenet_top1_erased{suffix}"] = split["erased"]
            figures[f"imagenet_top1_others{suffix}"] = split["others"]
        settings["erased_classes"] = sorted(erased)
        settings["split"] = "mean over classes of per-class top-1 (Table 2's average)"
    return {"figures": figures, "model": model_id, "settings": settings}


def nudenet_counts(pairs: list[ImagePair], threshold: float, ranks: Ranks | None = None) -> dict:
    """nudenet_exposed(_base): *_EXPOSED detections with score > threshold, per class too."""
    nudenet = _need("nudenet", "nudenet", EXTRA, " (AGPL-3.0)")
    detector = nudenet.NudeDetector()

    def score(share: list[ImagePair]) -> list[dict[str, list[str]]]:
        """Per pair and role: the classes of the counted detections."""
        return [
            {
                role: [
                    box["class"]
                    for box in detector.detect(str(getattr(p, role)))
                    if box["class"].endswith("_EXPOSED") and box["score"] > threshold
                ]
                for role in ("edited", "base")
            }
            for p in share
        ]

    per_pair = _across_ranks(pairs, ranks or Ranks(), score)
    figures, classes = {}, {}
    for role in ("edited", "base"):
        counts: dict[str, int] = {}
        for found in per_pair:
            for name in found[role]:
                counts[name] = counts.get(name, 0) + 1
        figures["nudenet_exposed" + ("" if role == "edited" else "_base")] = float(
            sum(counts.values())
        )
        classes[role] = dict(sorted(counts.items()))
    from uce_cli.judge.metrics import class_reductions, reduction

    figures["nudenet_reduction"] = reduction(
        figures["nudenet_exposed"], figures["nudenet_exposed_base"]
    )
    return {
        "figures": figures,
        "model": "NudeNet NudeDetector (bundled 320n.onnx)",
        "settings": {
            "threshold": threshold,
            "classes": classes,
            "counted": "*_EXPOSED",
            "reduction_per_class": class_reductions(classes),
        },
    }


@torch.inference_mode()
def lpips_distance(
    pairs: list[ImagePair], device: torch.device, ranks: Ranks | None = None
) -> dict:
    """lpips: mean LPIPS (AlexNet) between base and edited images of the same prompt and seed."""
    lpips = _need("lpips", "lpips", EXTRA_TORCHVISION, " (and torchvision)")
    import numpy as np

    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def tensor(path: Path) -> torch.Tensor:
        (im,) = _open([path])
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return x[None].to(device)

    values = _across_ranks(
        pairs,
        ranks or Ranks(),
        lambda share: [float(net(tensor(p.base), tensor(p.edited))) for p in share],
    )
    return {
        "figures": {"lpips": sum(values) / len(values)},
        "model": "lpips AlexNet v0.1",
        "settings": {"pairs": len(values), "range": "[-1, 1] inputs"},
    }


FID_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's port of the TF Inception FID uses
FID_FEATURES = "2048"  # the pool3 features every published FID is computed on
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _fid_extractor(device: torch.device) -> Callable[[list[Path]], torch.Tensor]:
    """Paths → (N, 2048) float64 Inception pool3 features, torch-fidelity's extractor.

    Raises:
        UceError: torch-fidelity missing, or its Inception weights not obtainable (offline).
    """
    _need("torch_fidelity", "fid", EXTRA_TORCHVISION, " (and torchvision)")
    import numpy as np
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    url = getattr(inception, "URL_INCEPTION_V3", "torch-fidelity's Inception weights")
    try:
        net = inception.FeatureExtractorInceptionV3(FID_EXTRACTOR, [FID_FEATURES])
    except Exception as exc:  # the weights download fails offline (URLError, OSError, …)
        raise UceError(
            f"metric fid: torch-fidelity's Inception weights are not available here "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}) — download "
            f"{url} into {torch.hub.get_dir()}/checkpoints/ once"
        ) from None
    net = net.eval().to(device)

    def features(paths: list[Path]) -> torch.Tensor:
        out = []
        images = [torch.from_numpy(np.array(im, dtype=np.uint8)) for im in _open(paths)]
        start = 0
        while start < len(images):  # batches of equal-size images (the extractor resizes them)
            stop = start + 1
            while (
                stop < len(images)
                and stop - start < BATCH
                and images[stop].shape == images[start].shape
            ):
                stop += 1
            x = torch.stack([im.permute(2, 0, 1) for im in images[start:stop]]).to(device)
            with torch.inference_mode():
                (f,) = net(x)
            out.append(f.reshape(len(x), -1).to("cpu", torch.float64))
            start = stop
        return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)

    return features


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of two feature sets (N, d), float64: ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa Σb)^½.

    Σ is the unbiased covariance (as numpy's ``cov`` and torch-fidelity). tr (Σa Σb)^½ is the sum
    of the square roots of the eigenvalues of Σa^½ Σb Σa^½ (symmetric PSD, so ``eigh`` applies),
    which equals torch-fidelity's ``sqrtm`` trace without a complex matrix square root.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_root = middle.clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    return float(diff @ diff + cov_a.trace() + cov_b.trace() - 2 * tr_root)


def reference_images(reference: Path) -> list[Path]:
    """The image files of a FID reference folder, sorted (subfolders included).

    Raises:
        DataError: not a folder, or fewer than two images.
    """
    if not reference.is_dir():
        raise DataError(f"evaluate.images.reference: {reference} is not a folder of images")
    paths = sorted(p for p in reference.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise DataError(
            f"evaluate.images.reference: {reference} holds {len(paths)} image(s) — FID needs a "
            "reference set (thousands of images for a meaningful figure)"
        )
    return paths


def fid_score(
    pairs: list[ImagePair],
    reference: Path | None,
    device: torch.device,
    ranks: Ranks | None = None,
    against_base: bool = False,
    extractor: Callable[[list[Path]], torch.Tensor] | None = None,
) -> dict:
    """fid: FID between the edited images and a reference folder (the paper's FID-real); with
    ``against_base``, fid_base: against the base model's images of the same prompts (FID-SD).

    Each rank extracts the Inception features of its share of the edited and reference images;
    the features (not the images) are gathered in the one-process order and rank 0's figure is the
    one every rank reports.
    """
    ranks = ranks or Ranks()
    refs = [p.base for p in pairs] if against_base else reference_images(Path(str(reference)))
    features = extractor or _fid_extractor(device)

    def rows(share: list[Path]) -> list[torch.Tensor]:
        return list(features(share).float()) if share else []  # float32 on the wire

    edited = _across_ranks([p.edited for p in pairs], ranks, rows)
    real = _across_ranks(refs, ranks, rows)
    fid = frechet_distance(torch.stack(edited), torch.stack(real)) if ranks.main else None
    name = "fid_base" if against_base else "fid"
    return {
        "figures": {name: ranks.broadcast(fid)},
        "model": f"torch-fidelity {FID_EXTRACTOR}, {FID_FEATURES}-d pool features",
        "settings": {
            "reference": "the base model's images of the same prompts and seeds"
            if against_base
            else str(reference),
            "reference_images": len(refs),
            "edited_images": len(pairs),
            "gathered": "features across ranks (one-process order); statistics in float64",
        },
    }


def evaluate_images(
    run: Any,
    samples: Path | None,
    limit: int | None,
    device: str,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
    allow_pickle: bool = False,
    draw_into: Path | None = None,
) -> dict[str, Any]:
    """The image section of eval.json: draw or read the images, then every asked metric.

    A metric whose optional package is missing is skipped (``skipped``: metric → why), the
    others are computed. Under ``accelerate launch`` (``ranks``) every rank returns the same
    section. ``draw_into``: the folder to draw into instead of RUN/eval/samples (a further image
    set's).
    """
    from uce_cli.families.model import pick_device

    progress = progress or NullProgress()
    ranks = ranks or Ranks()
    spec = run.evaluate
    if spec.images is None or not spec.metrics:
        raise UceError(
            f"{run.path}: its recipe's evaluate: names no images/metrics — add evaluate.images and "
            "evaluate.metrics to compute image-level figures"
        )
    skipped: dict[str, str] = {}  # metric → why (its optional package is missing)
    for metric, module, extra in (
        ("nudenet", "nudenet", EXTRA),
        ("lpips", "lpips", EXTRA_TORCHVISION),
        ("fid", "torch_fidelity", EXTRA_TORCHVISION),
        ("fid_base", "torch_fidelity", EXTRA_TORCHVISION),
    ):
        if metric in spec.metrics:
            try:
                _need(module, metric, extra)  # known before any image is drawn
            except UceError as exc:
                skipped[metric] = str(exc)
                warnings.warn(
                    f"{exc}; skipped, the other metrics are computed", UceWarning, stacklevel=2
                )
    wanted = [m for m in spec.metrics if m not in skipped]
    if not wanted:  # nothing left to compute: no image is drawn
        return {"samples": None, "cases": {}, "images": 0, "prompts": 0, "figures": {},
                "metrics": {}, "sampling": {}, "skipped": skipped}  # fmt: skip
    if "fid" in wanted:
        reference_images(run.base_dir / (spec.images.reference or ""))
    rows, concepts = image_rows(run, limit)
    folder, manifest = sample_images(run, rows, samples, device, progress, ranks, draw_into)
    pairs = image_pairs(rows, concepts, folder, manifest, run)
    provenance = prompt_provenance(run, rows, pairs)
    torch_device = pick_device(device)
    if ranks.distributed and torch_device.type == "cuda":
        torch_device = ranks.state.device
    metrics: dict[str, dict] = {}
    figures: dict[str, float] = {}
    clip_want = {m for m in wanted if m in ("clip_score", "clip_accuracy")}
    jobs = []
    if clip_want:
        jobs.append(
            (
                "clip",
                lambda: clip_metrics(
                    pairs, spec.clip_model, clip_want, torch_device, ranks, allow_pickle
                ),
            )
        )
    if "imagenet_top1" in wanted:
        # Table 2's "erased" classes are the recipe's erased/moderated concepts, not the file's
        from uce_cli.judge.evaluate import edited_guides

        erased = set(edited_guides(run.plan))
        jobs.append(
            (
                "imagenet_top1",
                lambda: imagenet_top1(
                    pairs, spec.imagenet_model, torch_device, ranks, allow_pickle, erased
                ),
            )
        )
    if "attribute_deviation" in wanted:
        from uce_cli.judge.metrics import attribute_deviation_metric

        jobs.append(
            (
                "attribute_deviation",
                lambda: attribute_deviation_metric(
                    pairs, run.plan, spec.clip_model, torch_device, allow_pickle=allow_pickle
                ),
            )
        )
    if "nudenet" in wanted:
        jobs.append(("nudenet", lambda: nudenet_counts(pairs, spec.nudenet_threshold, ranks)))
    if "lpips" in wanted:
        jobs.append(("lpips", lambda: lpips_distance(pairs, torch_device, ranks)))
    if "fid" in wanted:
        reference = run.base_dir / (spec.images.reference or "")
        jobs.append(
            (
                "fid",  # features of every image at once: gathered, then rank 0's figure
                lambda: fid_score(pairs, reference, torch_device, ranks),
            )
        )
    if "fid_base" in spec.metrics:
        jobs.append(("fid_base", lambda: fid_score(pairs, None, torch_device, ranks, True)))
    for name, job in jobs:
        progress.start(f"metric {name}")
        t0 = time.perf_counter()
        result = job()
        seconds = time.perf_counter() - t0
        progress.finish()
        result["seconds"] = round(seconds, 3)
        result["images_per_second"] = round(2 * len(pairs) / seconds, 2) if seconds > 0 else None
        result["versions"] = _versions(
            "torch", "transformers", "nudenet", "lpips", "torch-fidelity"
        )
        result["inputs"] = provenance  # the prompt set, seeds and images it was computed from
        figures.update(result["figures"])
        metrics[name] = result
    from uce_cli.edit.prompts import file_stem

    cases: dict[str, str] = {}  # norm(concept) → the first case with images, for the plots
    for pair in pairs:
        if pair.concept:
            cases.setdefault(norm(pair.concept), file_stem(pair.case))
    first_cases = list(dict.fromkeys(file_stem(p.case) for p in pairs))[:4]
    return {
        "first_cases": first_cases,
        "samples": str(folder),
        "cases": cases,
        "images": 2 * len(pairs),
        "prompts": len(rows),
        "figures": figures,
        "metrics": metrics,
        "sampling": manifest.get("settings", {}),
        "skipped": skipped,
        "inputs": provenance,
    }


def prompt_provenance(run: Any, rows: list[PromptRow], pairs: list[ImagePair]) -> dict[str, Any]:
    """What a figure was computed from: model, prompt set (file, rows, sha256), seeds, images."""
    import hashlib

    from uce_cli.judge.prompts import prompt_set_path

    spec = run.evaluate.images
    path = prompt_set_path(spec.prompts, run.base_dir)
    try:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        sha = None
    seeds = sorted({p.seed for p in pairs})
    return {
        "model": run.base_spec,
        "edit": str(run.path),
        "prompt_set": {
            "file": spec.prompts.file,
            "path": str(path),
            "sha256": sha,
            "rows": len(rows),
            "where": dict(spec.prompts.where),
            "limit": spec.prompts.limit,
        },
        "seeds": {"first": seeds[0], "last": seeds[-1], "distinct": len(seeds)} if seeds else {},
        "images_per_prompt": spec.images_per_prompt,
        "images": 2 * len(pairs),
        "steps": spec.steps,
        "guidance": spec.guidance,
    }
