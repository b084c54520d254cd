"""The files of ``uce attack`` (RUN/attack/): names, attack.md, and reading the figures back for
``expect:`` and ``uce eval --check``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uce_cli.errors import UceError

ATTACK_SCHEMA = 1
ATTACK_DIR = "attack"
ATTACK_JSON = "attack.json"
ATTACK_MD = "attack.md"
TI_DIR = "textual_inversion"
ATTACK_FIGURES = ("attack_recovery", "attack_recovery_aligned", "attack_recovery_discrete")


def render_markdown(report: dict[str, Any]) -> str:
    """attack.md: the figures, then one row per concept and its best prompts."""

    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [
        f"# uce attack — {report['run']}",
        "",
        "Share of the erasure gap an attacker undoes (1 = fully recovered, 0 = robust). "
        "See docs/metrics.md.",
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {k} | {fmt(v)} |" for k, v in report["figures"].items()),
        "",
        *(
            f"![attack recovery per concept and layer group]({p})\n"
            for p in report.get("plots") or []
        ),
        "| concept | guide | e* word | e* aligned | discrete | best prompt |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in report["concepts"].items():
        best = (c.get("discrete") or {}).get("best") or []
        lines.append(
            f"| {name} | {c['guide']!r} | {fmt(c['attack_recovery'])} | "
            f"{fmt(c['attack_recovery_aligned'])} | {fmt(c.get('attack_recovery_discrete'))} | "
            f"{best[0]['prompt'] if best else '—'} |"
        )
    files = report.get("textual_inversion") or []
    if files:
        lines += [
            "",
            "Textual-inversion files (e* at the word token; `pipe.load_textual_inversion(path)`):",
            *(f"- `{f}`" for f in files),
            "",
            "e* is an output-space vector (what the cross-attention k/v read). Loaded as a token it "
            "enters the text encoder's input instead, so a pipeline replays it only approximately; "
            "the exact replay feeds `prompt_embeds` with the word-token row replaced by e*.",
        ]
    images = report.get("images")
    if images:
        lines += ["", "## Images (edited model)", ""]
        if "skipped" in images:
            lines.append(f"Not drawn: {images['skipped']}.")
        else:
            lines.append(f"Judged: {images.get('judged')}.")
            for name, value in (images.get("figures") or {}).items():
                lines.append(f"- {name}: {fmt(value)}")
            lines += [""] + [
                f"- `{i['path']}` — {i['variant']}: {i['prompt']!r}, seed {i['seed']}"
                + (f", exposed {i['nudenet_exposed']}" if "nudenet_exposed" in i else "")
                for i in images.get("images", [])
            ]
    return "\n".join(lines) + "\n"


def read_attack_figures(run_path: Path) -> dict[str, float | None]:
    """The figures of RUN/attack/attack.json ({} when the run has not been attacked)."""
    path = Path(run_path) / ATTACK_DIR / ATTACK_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UceError(
            f"{path}: not a readable attack report ({exc}) — rerun `uce attack --force`"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != ATTACK_SCHEMA:
        raise UceError(f"{path}: not a uce attack report of schema {ATTACK_SCHEMA} — rerun it")
    return {k: v for k, v in (data.get("figures") or {}).items() if k in ATTACK_FIGURES}
