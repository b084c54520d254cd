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


class ClipClassifier:
    """A CLIP model that scores images against text labels, loaded once and reused."""

    def __init__(
        self,
        model_id: str,
        device: torch.device,
        batch_size: int = 50,
        role: str = "debias_loop.classifier",
    ) -> None:
        """Load the model, tokenizer and image processor (``role``: the recipe field naming it).

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
        source = model_id
        if model_id.startswith("builtin:"):
            from uce_cli.paths import cache_dir
            from uce_cli.weights.tiny import TINY_CLIP_NAME, ensure_tiny_clip

            if model_id != TINY_CLIP_NAME:
                raise UceError(
                    f"{role}: unknown builtin '{model_id}' — the builtin judge "
                    f"is {TINY_CLIP_NAME} (random weights, for offline smoke runs)"
                )
            source = str(ensure_tiny_clip(cache_dir()))
        try:
            self.model = CLIPModel.from_pretrained(source).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.processor = processor_cls.from_pretrained(source)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UceError(
                f"{role}: cannot load the CLIP classifier '{model_id}' ({first}) — "
                f"{'`alphas: auto`' if role == 'debias_loop.classifier' else 'the metric'} needs "
                f"it: fetch it once with `hf download {model_id}` (then it loads offline from the "
                f"Hugging Face cache), or set {role} to a local folder holding a CLIPModel"
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
