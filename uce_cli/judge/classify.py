"""Zero-shot image classification with CLIP: the judge of the debias loop (Algorithm 1).

As the published loop does it: the labels are the attribute prompts of an item (``image of male``,
``image of female``), the probabilities are the softmax of CLIP's image-text logits, and an image
counts for every label that reaches its maximum (``probs >= max``, so a tie counts for both).
The tokenizer and the (slow, PIL-based) image processor are loaded separately: the "fast" image
processors import torchvision, which the CPU machines here cannot import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from uce_cli.errors import UceError

# images, labels → (N, J) probabilities (or any scores: only the argmax counts)
Classifier = Callable[[list[Image.Image], list[str]], torch.Tensor]


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def judge_source(
    model_id: str, field: str, allow_pickle: bool = False, clip: bool = True
) -> tuple[str, dict[str, object]]:
    """Where a judge model loads from, and the ``from_pretrained`` options that keep it safe.

    ``builtin:tiny-clip`` is uce's random CLIP (offline smoke runs); a local folder must hold a
    model of the right kind, in safetensors unless ``allow_pickle`` (pickles can run code when
    loaded — the rule uce applies to every model); a hub id loads from the Hugging Face cache.

    Args:
        model_id: the recipe's value.
        field: the recipe field, for messages (``evaluate.clip_model``).
        allow_pickle: ``--allow-pickle``: accept ``pytorch_model.bin`` (read ``weights_only``).
        clip: the judge must be a CLIP model (``config.json``'s ``model_type`` says so).

    Raises:
        UceError: an unknown builtin, a local folder that is not a CLIP model, or one that holds
            only pickled weights without ``allow_pickle``.
    """
    from pathlib import Path

    from uce_cli.weights.tiny import TINY_CLIP_NAME
    from uce_cli.weights.tiny_judges import TINY_RESNET_NAME

    options: dict[str, object] = {} if allow_pickle else {"use_safetensors": True}
    if model_id.startswith("builtin:"):
        known = TINY_CLIP_NAME if clip else TINY_RESNET_NAME
        if model_id != known:
            raise UceError(
                f"{field}: unknown builtin '{model_id}' — the builtin judge here is {known} "
                "(random weights, for offline smoke runs)"
            )
        from uce_cli.paths import cache_dir
        from uce_cli.weights.tiny_judges import builtin_judge_folder

        return str(builtin_judge_folder(model_id, cache_dir())), options
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        return model_id, options  # a hub id
    config = folder / "config.json"
    if clip:
        import json

        try:
            kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError, RecursionError):
            kind = None
        if kind != "clip":
            what = f"a '{kind}' model" if isinstance(kind, str) else "no readable config.json"
            raise UceError(
                f"{field}: {folder} holds {what}, not a CLIP model — the judge must be a "
                "CLIPModel folder (config.json with model_type 'clip', weights, tokenizer and "
                "preprocessor_config.json), or a hub id of one such as openai/clip-vit-base-patch32"
            )
    safe = any((folder / name).is_file() for name in SAFE_WEIGHTS)
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
    if pickled and not safe and not allow_pickle:
        raise UceError(
            f"{field}: {folder / pickled[0]} is a pickle, which can run code when loaded — "
            "convert it to model.safetensors, or pass --allow-pickle to load it with "
            "torch.load(weights_only=True)"
        )
    return str(folder), options


def load_advice(model_id: str, first: str) -> str:
    """What to do when a judge does not load: fetch a hub id; fix a local folder."""
    from pathlib import Path

    if Path(model_id).expanduser().is_dir() or model_id.startswith("builtin:"):
        return f"does not load from that folder ({first}) — fix or replace it"
    return (
        f"is not available here ({first}) — fetch it once with `hf download {model_id}` "
        "(then it loads offline from the Hugging Face cache), or point the recipe at a local folder"
    )


class ClipClassifier:
    """A CLIP model that scores images against text labels, loaded once and reused."""

    def __init__(
        self,
        model_id: str,
        device: torch.device,
        batch_size: int = 50,
        allow_pickle: bool = False,
        field: str = "debias_loop.classifier",
    ) -> None:
        """Load the model, tokenizer and image processor.

        Raises:
            UceError: the model is not available (offline and not cached, or a bad folder) —
                naming the model to fetch.
        """
        import transformers
        from transformers import AutoTokenizer, CLIPModel

        # The PIL image processor: the default one would need torchvision (transformers ≥ 5
        # names the PIL one apart; older versions' CLIPImageProcessor is the PIL one).
        processor_cls = (
            getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        )

        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        source, options = judge_source(model_id, field, allow_pickle)
        try:
            self.model = CLIPModel.from_pretrained(source, **options).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.processor = processor_cls.from_pretrained(source)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UceError(
                f"{field}: cannot load the CLIP classifier '{model_id}': it "
                f"{load_advice(model_id, first)}"
            ) from None

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], labels: list[str]) -> torch.Tensor:
        """(N, J) label probabilities of each image: softmax of CLIP's logits_per_image."""
        text = self.tokenizer(labels, padding=True, return_tensors="pt").to(self.device)
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[i : i + self.batch_size], return_tensors="pt")
            logits = self.model(
                input_ids=text["input_ids"],
                attention_mask=text["attention_mask"],
                pixel_values=pixels["pixel_values"].to(self.device, self.model.dtype),
            ).logits_per_image  # (B, J)
            out.append(logits.softmax(dim=1))
        return torch.cat(out).float().cpu()


def label_ratios(probs: torch.Tensor) -> torch.Tensor:
    """Share of images per label: an image counts for every label at its maximum (float64, (J,))."""
    mask = probs >= probs.max(dim=1, keepdim=True).values
    return mask.double().mean(dim=0)
