"""The builtin judges of offline smoke runs: a tiny random ResNet image classifier with ImageNet's
label names for the ImageNette classes (``builtin:tiny-resnet``), built once into the cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_RESNET_NAME = "builtin:tiny-resnet"
# ImageNet-1k indices and label names of the ten ImageNette classes (Table 2 of the paper).
IMAGENETTE_LABELS: dict[int, str] = {
    0: "tench, Tinca tinca",
    217: "English springer, English springer spaniel",
    482: "cassette player",
    491: "chain saw, chainsaw",
    497: "church, church building",
    566: "French horn, horn",
    569: "garbage truck, dustcart",
    571: "gas pump, gasoline pump, petrol pump, island dispenser",
    574: "golf ball",
    701: "parachute, chute",
}


def write_tiny_resnet(dest: Path, seed: int = 0) -> Path:
    """Save a random 1000-class ResNetForImageClassification and its (PIL) processor to ``dest``."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from uce_cli.weights.tiny import _seeded

    labels = {i: IMAGENETTE_LABELS.get(i, f"class {i}") for i in range(1000)}
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=1000,
        id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)
        with _seeded(seed):
            ResNetForImageClassification(config).save_pretrained(tmp)
        ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_tiny_resnet(cache_dir: Path) -> Path:
    """Return the cached tiny ResNet folder, building it once if absent."""
    from uce_cli.weights.tiny import ensure_built

    return ensure_built(Path(cache_dir) / "models" / "tiny-resnet-v1", write_tiny_resnet)


def builtin_judge_folder(model_id: str, cache_dir: Path) -> Path | None:
    """The local folder of a builtin judge id (tiny CLIP or tiny ResNet); None for other ids."""
    from uce_cli.weights.tiny import TINY_CLIP_NAME, ensure_tiny_clip

    if model_id == TINY_CLIP_NAME:
        return ensure_tiny_clip(cache_dir)
    if model_id == TINY_RESNET_NAME:
        return ensure_tiny_resnet(cache_dir)
    return None
