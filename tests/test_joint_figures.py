"""The figures behind the FLUX decision (docs/families.md), recomputed on the tiny FLUX: the
projection edit meets its own residual/drift figures, the upstream bias-in-targets variant does
worse on the layer outputs, and the edit moves the transformer's output toward the guide."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from uce_cli.families.flux import FluxFamily

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "joint_edit_figures.py"


@pytest.fixture(scope="module")
def figures_module() -> object:
    spec = importlib.util.spec_from_file_location("joint_edit_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["paper", "last-token"])
def test_flux_edit_meets_its_figures(
    mode: str, figures_module: object, tiny_flux: Path, tmp_path: Path
) -> None:
    text, new, data = figures_module.text_side(FluxFamily, tiny_flux, mode, tmp_path)
    for key, f in text.items():
        assert f["residual_after"] < 0.1 * f["residual_before"], (key, f)
        assert f["preserve_drift"] < 0.2, (key, f)
        # targets W·c* (bias untouched) vs the 2025 upstream targets W·c* + b, on outputs W c + b
        assert f["upstream_output_residual"] > 2 * f["ours_output_residual"], (key, f)
        assert f["upstream_output_preserve_drift"] > f["ours_output_preserve_drift"], (key, f)
    down = figures_module.flux_downstream(tiny_flux, new, data)
    seq = "image output, sequence path only"
    before, after = down["none"]["gap"][seq], down["context_embedder only"]["gap"][seq]
    assert after < (0.5 if mode == "paper" else 0.95) * before
    full = "image output (velocity)"
    # last-token moves one vector per prompt: a small step (docs/families.md)
    assert (
        down["both"]["gap"][full] < (0.5 if mode == "paper" else 0.95) * down["none"]["gap"][full]
    )
