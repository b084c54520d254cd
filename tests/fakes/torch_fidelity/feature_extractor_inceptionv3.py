"""A deterministic small feature extractor with torch-fidelity's Inception interface (tests only)."""

from __future__ import annotations

import torch

URL_INCEPTION_V3 = "https://example.invalid/weights-inception.pth"
FEATURES = 16


class FeatureExtractorInceptionV3(torch.nn.Module):
    """uint8 images (B, 3, H, W) → a tuple with one (B, 16) feature tensor, as torch-fidelity's."""

    def __init__(self, name: str, features_list: list[str]) -> None:
        super().__init__()
        assert name == "inception-v3-compat" and features_list == ["2048"]
        generator = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(48, FEATURES)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(FEATURES, 48, generator=generator))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return (torch.tanh(self.proj(pooled)),)
