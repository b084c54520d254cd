"""``uce compare``: several evaluated runs of one recipe family in one table, the paper beside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.cli._common import JsonOpt, QuietOpt, handle_errors, print_json
from uce_cli.console import err, out


def compare_table(table: dict) -> Table:
    """One row per run; each figure as measured (paper)."""
    from uce_cli.judge.report import fmt

    rich = Table(title="compare: measured (paper)")
    for column in ("run", "erased", *table["figures"]):
        rich.add_column(column)
    for row in table["runs"]:
        cells = []
        for f in table["figures"]:
            cell = fmt(row["figures"].get(f))
            if f in row["paper"]:
                cell += f" ({fmt(row['paper'][f])}){'' if row['ok'][f] else ' NO'}"
            cells.append(cell)
        rich.add_row(row["name"], str(row["erased"]), *cells)
    return rich


@handle_errors
def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="DIR",
            help="Two or more `uce apply` outputs already judged by `uce eval`.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", metavar="DIR", help="Where compare.md, compare.json and compare.png go."
        ),
    ] = Path("compare"),
    plots: Annotated[
        bool, typer.Option("--plots/--no-plots", help="Write compare.png (needs matplotlib).")
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing comparison.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Several runs of one recipe family side by side (e.g. erase-artists-1 … 1000: Table 1
    re-drawn), the paper's value beside each figure, and each figure against the number of erased
    concepts.

    Example: uce compare runs/erase-artists-1 runs/erase-artists-10 runs/erase-artists-100
    """
    from uce_cli.judge.compare import compare_runs, write_compare

    table = compare_runs(runs)
    written = write_compare(out_dir, table, force, plots)
    if json_out:
        print_json(table)
    else:
        out.print(compare_table(table))
    if not quiet:
        for path in written:
            err.print(f"wrote {path}")
