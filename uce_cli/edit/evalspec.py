"""The ``evaluate:`` section of a recipe: prompt sets, metrics and expected figures (no torch).

Every figure ``uce eval`` can report has one name here; docs/metrics.md defines each with its
formula. An ``expect:`` entry names one of them, the paper's value, a tolerance and its source.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Text-side figures (CPU, from the text encoder and the base and edited k/v weights).
TEXT_FIGURES: dict[str, str] = {
    "efficacy": "share of the source→target gap closed on held-out phrasings (1 = fully edited)",
    "efficacy_word": "efficacy at the last word token of the concept only",
    "leakage_eos": "share of the gap left at the end-of-text position (0 = none leaks)",
    "leakage_pad": "share of the gap left at the padding positions (0 = none leaks)",
    "drift_unrelated": "relative k/v change on prompts neither edited nor preserved",
    "drift_preserve": "relative k/v change on held-out phrasings of preserved concepts",
}
# Image-level figures (over images made by `uce sample`); `_base` = the same on the base model.
IMAGE_FIGURES: dict[str, str] = {
    "clip_score": "mean CLIP score (100·cos) of edited images and their prompts",
    "clip_score_base": "mean CLIP score of base images and their prompts",
    "clip_accuracy": "share of edited images CLIP zero-shot classifies as their prompt's concept",
    "clip_accuracy_base": "the same for base images",
    "imagenet_top1": "share of edited images whose ImageNet top-1 class is the prompt's class",
    "imagenet_top1_base": "the same for base images",
    "nudenet_exposed": "NudeNet exposed-class detections over the edited images",
    "nudenet_exposed_base": "the same over the base images",
    "lpips": "mean LPIPS between base and edited images of the same prompt and seed",
    "fid": "FID of the edited images against a reference folder (the paper's FID-real)",
    # The paper's own figures (docs/metrics.md, "The paper's figures"):
    "attribute_deviation": "Δ = |p_desired − p_actual| / p_desired per debiased concept, mean "
    "over concepts (Table 3's WinoBias row)",
    "attribute_deviation_base": "the same for base images",
    "imagenet_top1_erased": "ImageNet top-1 on the prompts of the recipe's erased classes",
    "imagenet_top1_erased_base": "the same for base images (Table 2, erased: SD)",
    "imagenet_top1_others": "ImageNet top-1 on the prompts of every other class of the set",
    "imagenet_top1_others_base": "the same for base images (Table 2, others: SD)",
    "nudenet_reduction": "1 − nudenet_exposed / nudenet_exposed_base (same prompts and seeds)",
    "fid_base": "FID of the edited images against the base model's images of the same prompts "
    "(the paper's FID-SD)",
}
# Attack figures (`uce attack`, CPU, from the text encoder and the base and edited weights).
ATTACK_FIGURES: dict[str, str] = {
    "attack_recovery": "share of the erasure gap the closed-form embedding e* undoes at the "
    "concept's word token (0 = robust, 1 = fully recovered)",
    "attack_recovery_aligned": "the same over every position the edit aligned (word, EOS, pads)",
    "attack_recovery_discrete": "the same for the best prompt a seeded, budgeted search found",
}
FIGURES: dict[str, str] = {**TEXT_FIGURES, **IMAGE_FIGURES, **ATTACK_FIGURES}
# Image metrics a recipe can ask for; each yields the figures that start with its name.
Metric = Literal[
    "clip_score",
    "clip_accuracy",
    "imagenet_top1",
    "nudenet",
    "lpips",
    "fid",
    "fid_base",
    "attribute_deviation",
]
METRIC_FIGURES: dict[str, tuple[str, ...]] = {
    "clip_score": ("clip_score", "clip_score_base"),
    "clip_accuracy": ("clip_accuracy", "clip_accuracy_base"),
    "imagenet_top1": (
        "imagenet_top1",
        "imagenet_top1_base",
        "imagenet_top1_erased",
        "imagenet_top1_erased_base",
        "imagenet_top1_others",
        "imagenet_top1_others_base",
    ),
    "nudenet": ("nudenet_exposed", "nudenet_exposed_base", "nudenet_reduction"),
    "lpips": ("lpips",),
    "fid": ("fid",),
    "fid_base": ("fid_base",),
    "attribute_deviation": ("attribute_deviation", "attribute_deviation_base"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptSet(_Strict):
    """Rows of a prompt CSV: an upstream file by logical name or a path relative to the recipe."""

    file: str = Field(
        description="csv file, relative to the recipe; `upstream:NAME` names an upstream UCE "
        "prompt set, e.g. upstream:holdout100_prompts.csv"
    )
    column: str = Field(default="prompt", description="column holding the prompt text")
    concept_column: str | None = Field(
        default=None, description="column naming the concept each row phrases (e.g. artist, class)"
    )
    concept: str | None = Field(
        default=None, description="the one concept every row phrases, when no concept_column"
    )
    where: dict[str, str] = Field(
        default_factory=dict,
        description="keep rows whose column contains this text (case-insensitive), e.g. "
        "{type: erased} or {categories: sexual}",
    )
    limit: int | None = Field(
        default=None, ge=1, description="first N rows (per concept with concept_column)"
    )

    @model_validator(mode="after")
    def _one_concept_source(self) -> PromptSet:
        if self.concept_column is not None and self.concept is not None:
            raise ValueError("give `concept_column` or `concept`, not both")
        return self


class ImagePrompts(PromptSet):
    """The prompt set ``uce sample`` draws, with its seed and case columns."""

    seed_column: str | None = Field(
        default="evaluation_seed", description="column of per-row seeds (None: `seed`)"
    )
    case_column: str | None = Field(
        default="case_number", description="column of case ids (None: the row index)"
    )


class Images(_Strict):
    """How the image-level metrics' images are drawn by ``uce sample``."""

    prompts: ImagePrompts
    images_per_prompt: int = Field(default=1, ge=1, description="seeds seed, seed+1, … per prompt")
    seed: int = Field(default=0, ge=0, description="first seed for rows without their own")
    steps: int = Field(default=50, ge=1)
    guidance: float = Field(default=7.5, ge=0)
    height: int | None = None
    width: int | None = None
    reference: str | None = Field(
        default=None, description="folder of reference images for `fid`, relative to the recipe"
    )
    edited_only: bool = Field(
        default=False,
        description="draw only the rows whose concept the edit erases, moderates or debiases "
        "(e.g. the debiased professions of a longer profession list)",
    )


class ImageSet(Images):
    """A further prompt set with its own metrics (e.g. COCO fidelity beside the I2P nudity counts)."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="short name; its images go to RUN/eval/samples-NAME",
    )
    metrics: list[Metric] = Field(min_length=1, description="image metrics on this set")


class Expect(_Strict):
    """A published figure ``uce eval --check`` compares against."""

    metric: str = Field(description=f"a figure name: {', '.join(FIGURES)}")
    value: float
    tolerance: float = Field(ge=0, description="allowed |measured − value|")
    source: str = Field(min_length=1, description='where the value is published, e.g. "Table 1"')

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in FIGURES:
            import difflib

            close = difflib.get_close_matches(value, list(FIGURES), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ValueError(f"unknown figure {value!r} — {hint}known: {', '.join(FIGURES)}")
        return value


class Evaluate(_Strict):
    """How an edit is judged: held-out prompt sets, image metrics and expected figures."""

    heldout: list[PromptSet] = Field(
        default_factory=list,
        description="held-out phrasings of the edited concepts (text-side efficacy, leakage); "
        "default: each concept's prompts with templates the edit did not use",
    )
    preserved: list[PromptSet] = Field(
        default_factory=list,
        description="held-out phrasings of preserved concepts (text-side drift_preserve)",
    )
    unrelated: list[PromptSet] = Field(
        default_factory=list,
        description="prompts neither edited nor preserved (text-side drift_unrelated)",
    )
    images: Images | None = None
    metrics: list[Metric] = Field(default_factory=list, description="image-level metrics")
    image_sets: list[ImageSet] = Field(
        default_factory=list,
        description="further prompt sets, each with its own metrics (a metric is computed on one "
        "set only)",
    )
    clip_model: str = Field(
        default="openai/clip-vit-base-patch32",
        description="CLIP model for clip_score/clip_accuracy (the upstream eval scripts' model)",
    )
    imagenet_model: str = Field(
        default="microsoft/resnet-50", description="ImageNet classifier for imagenet_top1"
    )
    nudenet_threshold: float = Field(
        default=0.0, ge=0, le=1, description="detector confidence above which a box counts"
    )
    expect: list[Expect] = Field(default_factory=list)

    @model_validator(mode="after")
    def _metrics_need_images(self) -> Evaluate:
        if self.metrics and self.images is None:
            raise ValueError("image metrics need `images:` (the prompt set uce sample draws)")
        if "fid" in self.metrics and (self.images is None or self.images.reference is None):
            raise ValueError("`fid` needs images.reference: a folder of reference images")
        seen: dict[str, str] = {m: "metrics" for m in self.metrics}
        for i, extra in enumerate(self.image_sets):
            if "fid" in extra.metrics and extra.reference is None:
                raise ValueError(f"image_sets.{i}: `fid` needs reference: a folder of images")
            for m in extra.metrics:
                if m in seen:
                    raise ValueError(
                        f"image_sets.{i}: metric `{m}` is already computed on {seen[m]} — a "
                        "figure comes from one prompt set"
                    )
                seen[m] = f"image_sets.{i}"
        names = [extra.name for extra in self.image_sets]
        if len(set(names)) < len(names):
            raise ValueError("image_sets: two sets share a name")
        asked = {f for m in seen for f in METRIC_FIGURES[m]}
        for i, item in enumerate(self.expect):
            if item.metric in IMAGE_FIGURES and item.metric not in asked:
                metric = next(m for m, fs in METRIC_FIGURES.items() if item.metric in fs)
                raise ValueError(
                    f"expect.{i}: {item.metric} is an image figure but metric `{metric}` is not "
                    "in `metrics` — add it"
                )
        return self
