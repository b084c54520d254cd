"""eval.md: an evaluation report as Markdown tables a person reads (eval.json holds the numbers)."""

from __future__ import annotations

from typing import Any

from uce_cli.edit.evalspec import FIGURES


def fmt(value: Any) -> str:
    """A figure as the report prints it; "—" where there is none."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: figures, expectations, worst/best concepts, per-layer table."""
    lines = [
        f"# uce eval — {report['run']}",
        "",
        f"Base model `{report['base_model']}`, recipe `{report.get('recipe_file')}` "
        f"(sha256 {str(report.get('recipe_sha256'))[:12]}), uce {report['versions'].get('uce')}. "
        "Every figure is defined in docs/metrics.md.",
        "",
        *(f"> **Note:** {note}\n" for note in report.get("notices", [])),
        "| figure | value | meaning |",
        "| --- | ---: | --- |",
    ]
    for name, value in report["figures"].items():
        lines.append(f"| `{name}` | {fmt(value)} | {FIGURES[name]} |")
    if report.get("expect"):
        lines += ["", "## Paper vs measured (recipe `expect:`)", ""]
        lines += expect_markdown(report["expect"])
    text = report.get("text")
    if text:
        lines += ["", "## Text side", ""]
        lines.append(
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in text["counts"].items())
            + f"; {text['seconds']:.1f} s."
        )
        edited = text["concepts"].get("edited", {})
        if edited:
            ranked = sorted(edited.items(), key=lambda kv: _key(kv[1].get("efficacy")))
            shown = ranked if len(ranked) <= 10 else ranked[:5] + ranked[-5:]
            title = "Edited concepts" if len(ranked) <= 10 else "Edited concepts (5 worst, 5 best)"
            lines += ["", f"### {title}", ""]
            lines += [
                "| concept | prompts | efficacy | efficacy (word) | leakage EOS | leakage pad |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for name, m in shown:
                lines.append(
                    f"| {name} | {m['prompts']} | {fmt(m['efficacy'])} | {fmt(m['efficacy_word'])} "
                    f"| {fmt(m['leakage_eos'])} | {fmt(m['leakage_pad'])} |"
                )
        lines += ["", "### Per layer", ""]
        names = [
            "efficacy",
            "efficacy_word",
            "leakage_eos",
            "leakage_pad",
            "drift_preserve",
            "drift_unrelated",
        ]
        lines += ["| layer | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        for layer, m in text["layers"].items():
            short = layer.removesuffix(".weight")
            lines.append(f"| {short} | " + " | ".join(fmt(m.get(n)) for n in names) + " |")
        for note in text.get("notes", []):
            lines.append(f"\nNote: {note}")
    images = report.get("images")
    if images and images.get("samples"):
        lines += ["", "## Images", ""]
        lines.append(f"{images['images']} images from `{images['samples']}`.")
        lines += ["", "| metric | model | settings |", "| --- | --- | --- |"]
        for name, m in images["metrics"].items():
            settings = ", ".join(f"{k} {v}" for k, v in m.get("settings", {}).items())
            lines.append(f"| {name} | {m.get('model', '—')} | {settings} |")
    lines += grids_markdown(report.get("grids") or [])
    plots = report.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def expect_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The expect: rows as a table: paper value, measured, tolerance, source, ok, and why not."""
    lines = [
        "| figure | paper | measured | ± | source | ok |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        measured = fmt(row["measured"]) if row["measured"] is not None else "not computed"
        lines.append(
            f"| `{row['metric']}` | {fmt(row['expected'])} | {measured} | "
            f"{fmt(row['tolerance'])} | {row['source']} | {'yes' if row['ok'] else '**NO**'} |"
        )
    lines += [f"\n`{r['metric']}`: {r['reason']}" for r in rows if r.get("reason")]
    return lines


def grids_markdown(grids: list[dict[str, str]]) -> list[str]:
    """The before/after grids (base left, edited right, as `uce sample --compare` draws them)."""
    if not grids:
        return []
    lines = [
        "",
        "## Before / after",
        "",
        "Base and edited images of the same prompt and seeds (`uce sample --compare` grids, each labelled).",
    ]
    for g in grids:
        label = g["concept"] or f"case {g['case']}"
        where = "" if g["set"] == "images" else f" ({g['set']})"
        lines += ["", f"**{label}**{where}", "", f"![{label}]({g['path']})"]
    return lines


def _key(value: float | None) -> float:
    return float("inf") if value is None else value
