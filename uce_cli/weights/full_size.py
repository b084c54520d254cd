"""Full-size-architecture models with random weights, for the benchmark scripts: the real CLIP text
configs the families use, and a fast random initialiser (meta device, then one fill per tensor)."""

from __future__ import annotations

from typing import Any

# CLIP ViT-L/14's text config (SD 1.x, SDXL's and SD3's text_encoder, FLUX.1's CLIP).
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# OpenCLIP ViT-bigG/14's text tower (SDXL's and SD3's text_encoder_2).
OPENCLIP_BIGG_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


def randomized(module: Any) -> Any:
    """Materialize a meta-device module with N(0, 0.02) weights (norm weights 1, biases 0)."""
    import torch

    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return module
