"""The plot of ``uce attack`` (RUN/attack/attack.png, matplotlib from the `eval` extra): per
concept and layer group, the recovery of e* (word token, aligned) and of the best found prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uce_cli.judge.plots import _pyplot
from uce_cli.safe_files import open_new

ATTACK_PNG = "attack.png"


def check_plotting() -> None:
    """Raise the one-line error of a missing matplotlib before any work is done.

    Raises:
        UceError: matplotlib is not installed (``--no-plots`` skips the plot).
    """
    _pyplot()


def write_attack_plot(folder: Path, report: dict[str, Any]) -> str:
    """Write ``folder/attack.png`` (folder: the attack's staging folder); return its name.

    Bars per (concept, group): ``attack_recovery`` (e* at the word token) and
    ``attack_recovery_aligned``; the best found prompt's ``attack_recovery_discrete`` is one figure
    per concept (over all groups), drawn hatched beside each of its groups.
    """
    plt = _pyplot()
    labels: list[str] = []
    series: dict[str, list[float]] = {"e* word": [], "e* aligned": [], "best prompt": []}
    groups = report["settings"]["groups"]
    for concept, entry in report["concepts"].items():
        for g in groups:
            figures = entry["groups"].get(g, {})
            labels.append(concept if len(groups) == 1 else f"{concept}\n{g}")
            series["e* word"].append(_value(figures.get("attack_recovery")))
            series["e* aligned"].append(_value(figures.get("attack_recovery_aligned")))
            series["best prompt"].append(_value(entry.get("attack_recovery_discrete")))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4), dpi=100)
    for i, (name, values) in enumerate(series.items()):
        if all(v != v for v in values):  # nothing measured (no search): no bars, no legend entry
            continue
        xs = [x + (i - 1) * width for x in range(len(labels))]
        hatch = "//" if name == "best prompt" else None
        label = f"{name} (all groups)" if name == "best prompt" and len(groups) > 1 else name
        ax.bar(xs, values, width, label=label, hatch=hatch)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30 if len(labels) > 6 else 0)
    ax.set_ylim(min([0.0, *(v for vs in series.values() for v in vs if v == v)]), 1.05)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("attack_recovery (1 = back fully, 0 = robust)")
    ax.set_title("share of the erasure gap the attacker undoes")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = folder / ATTACK_PNG
    with open_new(path, folder) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return ATTACK_PNG


def _value(v: Any) -> float:
    """A figure as a float; a missing one as NaN (no bar)."""
    return float("nan") if v is None else float(v)
