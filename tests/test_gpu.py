"""Device paths that need a CUDA GPU (marked ``gpu``; skipped where none is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_recipe
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-5), ("fp16", 2e-2), ("bf16", 5e-2)])
def test_cuda_apply_matches_cpu(
    tiny_model: Path, tmp_path: Path, dtype: str, tolerance: float
) -> None:
    """Encoding on CUDA (fp32/fp16/bf16) with float64 Gram matrices on the GPU gives the CPU edit."""
    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\nerase:\n  - concepts: [Kelly Mckernan, Kinkade]\n    templates: art\n"
        "preserve:\n  - concepts: [Claude Monet, a dog]\n",
    )
    plan = plan_recipe(recipe)
    cpu = run_apply(plan, out=tmp_path / "cpu", device="cpu", dtype="fp32", use_cache=False)
    gpu = run_apply(plan, out=tmp_path / "gpu", device="cuda", dtype=dtype, use_cache=False)
    assert gpu.log["device"].startswith("cuda")
    a, b = load_file(str(cpu.out / UNET_FILE)), load_file(str(gpu.out / UNET_FILE))
    for key in cpu.log["layers"]:
        name = key.removeprefix("unet.")
        rel = float((a[name] - b[name]).norm() / a[name].norm())
        assert rel < tolerance, (key, rel)
