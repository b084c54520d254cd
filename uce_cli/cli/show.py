"""``uce show``: an edit log as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.cli._common import JsonOpt, handle_errors, print_json
from uce_cli.console import out
from uce_cli.editlog import read_edit_log


def _fmt(value: object, spec: str) -> str:
    """A figure, or "—" where this kind of log has none (merge/transfer logs lack residuals)."""
    return format(value, spec) if isinstance(value, int | float) else "—"


def layer_table(layers: dict[str, dict]) -> Table:
    """Per-layer figures of an edit log."""
    table = Table(title="layers", show_lines=False)
    for column in (
        "layer",
        "shape",
        "‖ΔW‖/‖W‖",
        "residual before",
        "residual after",
        "preserve drift",
    ):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name, m in layers.items():
        table.add_row(
            name.removesuffix(".weight"),
            "×".join(str(s) for s in m.get("shape", [])),
            _fmt(m.get("rel_delta"), ".3e"),
            _fmt(m.get("residual_before"), ".4f"),
            _fmt(m.get("residual_after"), ".4f"),
            _fmt(m.get("preserve_drift"), ".3e"),
        )
    return table


def summary_table(log: dict) -> Table:
    """Model, plan, solver and timings of an edit log."""
    table = Table(show_header=False, title="edit")
    table.add_column("field", style="bold")
    table.add_column("value")
    plan = log.get("plan", {})
    solver = log.get("solver", {})
    rows = {
        "base model": log.get("base_model", {}).get("spec", "?"),
        "recipe": f"{log.get('recipe_file', '?')} (sha256 {log.get('recipe_sha256', '?')[:12]})",
        "alignment": plan.get("alignment", "?"),
        "edit prompts / vectors": f"{plan.get('edit_prompts')} / {plan.get('edit_vectors')}",
        "preserve prompts / vectors": f"{plan.get('preserve_prompts')} / {plan.get('preserve_vectors')}",
        "λ, s_e, s_p": f"{solver.get('lambda', '—')}, {solver.get('erase_scale', '—')}, "
        f"{_fmt(solver.get('preserve_scale'), '.4g')}",
        "operator rank": f"{solver.get('operator_rank')} of {solver.get('width')}",
        "timings (s)": ", ".join(f"{k} {v:.2f}" for k, v in log.get("timings", {}).items()),
        "versions": ", ".join(f"{k} {v}" for k, v in log.get("versions", {}).items()),
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


@handle_errors
def show(
    path: Annotated[
        Path, typer.Argument(help="An output folder of `uce apply`, or its edit_log.json.")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Show an edit log: what was edited, with which scales, and per-layer figures.

    Example: uce show runs/quickstart
    """
    log = read_edit_log(path)
    if json_out:
        print_json(log)
        return
    out.print(summary_table(log))
    out.print(layer_table(log["layers"]))
    if path.is_dir():
        from uce_cli.cli.eval import expect_table, figures_table
        from uce_cli.evaluate import read_report

        report = read_report(path)
        if report is not None:
            out.print(figures_table(report))
            if report.get("expect"):
                out.print(expect_table(report["expect"]))
