"""Plots of an evaluation report (PNG via matplotlib, from the `eval` extra): efficacy against
specificity per concept, figures per layer, and the image grids of the worst and best concepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uce_cli.errors import UceError
from uce_cli.safe_files import create_dir, open_new

CONCEPTS_PNG = "concepts.png"
LAYERS_PNG = "layers.png"
GRID_PNG = "worst-best.png"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UceError(
            'plots need matplotlib — pip install "uce-cli[eval]", or pass --no-plots'
        ) from None
    return plt


def write_plots(folder: Path, report: dict[str, Any], run: Path) -> list[str]:
    """Write the report's PNGs into ``folder``; return their names (relative to it)."""
    text = report.get("text")
    if not text:
        return []
    plt = _pyplot()
    create_dir(folder, run)  # never through a link planted in the run (safe_files)
    written = [
        _concepts_plot(plt, folder / CONCEPTS_PNG, text),
        _layers_plot(plt, folder / LAYERS_PNG, text),
    ]
    grid = _worst_best_grid(folder / GRID_PNG, report)
    if grid:
        written.append(grid)
    return [w for w in written if w]


def _concepts_plot(plt: Any, path: Path, text: dict[str, Any]) -> str:
    """One dot per concept, higher is better: efficacy of edited concepts, 1 − drift of the others."""
    columns = [
        ("edited\nefficacy", [m["efficacy"] for m in text["concepts"].get("edited", {}).values()]),
        ("preserved\n1 − drift", [1 - v for v in text["concepts"].get("preserve", {}).values() if v is not None]),
        ("unrelated\n1 − drift", [1 - v for v in text["concepts"].get("unrelated", {}).values() if v is not None]),
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for x, (_label, values) in enumerate(columns):
        values = [v for v in values if v is not None]
        if not values:
            continue
        jitter = [x + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]
        ax.scatter(jitter, values, s=12, alpha=0.6)
        ax.hlines(sum(values) / len(values), x - 0.3, x + 0.3, colors="black")
    ax.set_xticks(range(len(columns)), [c[0] for c in columns])
    ax.set_ylabel("per concept (1 = ideal)")
    ax.set_title("efficacy vs specificity per concept (bar: mean)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with open_new(path, path.parent) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path.name


def _layers_plot(plt: Any, path: Path, text: dict[str, Any]) -> str:
    """Each figure across the layers, in the UNet's order (down → mid → up)."""
    layers = list(text["layers"])
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for name in ("efficacy", "leakage_eos", "leakage_pad", "drift_preserve", "drift_unrelated"):
        values = [text["layers"][k].get(name) for k in layers]
        if any(v is not None for v in values):
            ax.plot(
                range(len(layers)),
                [float("nan") if v is None else v for v in values],
                marker=".",
                label=name,
            )
    ax.set_xticks(
        range(len(layers)),
        [k.split(".attn2.")[-1].split(".")[0] + f" {i}" for i, k in enumerate(layers)],
        rotation=90,
        fontsize=6,
    )
    ax.set_xlabel("cross-attention projection (UNet order)")
    ax.set_title("per-layer figures")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with open_new(path, path.parent) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path.name


def _worst_best_grid(path: Path, report: dict[str, Any]) -> str | None:
    """The `uce sample` before/after grids of the worst and the best edited concept with images."""
    from PIL import Image, ImageDraw

    images = report.get("images")
    text = report.get("text")
    if not images or not text:
        return None
    grids = Path(images["samples"]) / "grids"
    from uce_cli.judge.prompts import norm

    cases = images.get("cases", {})  # norm(concept) → first case id with images
    ranked = sorted(
        (m["efficacy"], c) for c, m in text["concepts"].get("edited", {}).items()
        if m.get("efficacy") is not None and norm(c) in cases
    )  # fmt: skip
    if not ranked:
        return None
    picks = (
        [("worst", ranked[0][1]), ("best", ranked[-1][1])]
        if len(ranked) > 1
        else [("only", ranked[0][1])]
    )
    panels = []
    for label, concept in picks:
        file = grids / f"{cases[norm(concept)]}.png"
        if file.is_file():
            with Image.open(file) as im:
                panels.append((f"{label}: {concept}", im.convert("RGB")))
    if not panels:
        return None
    width = max(im.width for _, im in panels)
    canvas = Image.new("RGB", (width, sum(im.height + 20 for _, im in panels)), "white")
    y = 0
    draw = ImageDraw.Draw(canvas)
    for label, im in panels:
        draw.text((4, y + 4), label, fill="black")
        canvas.paste(im, (0, y + 20))
        y += im.height + 20
    with open_new(path, path.parent) as f:
        canvas.save(f, format="PNG")
    return path.name
