"""``uce verify``: compare two edits tensor by tensor; exit 1 when they differ beyond the tolerance."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.cli._common import (
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    handle_errors,
    print_error,
    print_json,
)
from uce_cli.cli.merge import AllowPickleOpt
from uce_cli.console import err, out


def _short(key: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`` → ``down_blocks.0.attentions.0/tb0/to_k``."""
    return (
        key.removesuffix(".weight").replace(".transformer_blocks.", "/tb").replace(".attn2.", "/")
    )


def _json_row(row: dict) -> dict:
    """A row for --json: a NaN/inf error (a non-finite tensor) becomes null, which JSON can hold."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


@handle_errors
def verify(
    edit: Annotated[
        str,
        typer.Argument(
            metavar="EDIT",
            help="The edit to check: any format, a model folder, a single file or a hub id.",
            show_default=False,
        ),
    ],
    against: Annotated[
        str,
        typer.Option(
            "--against",
            metavar="EDIT",
            help="The reference it must equal (same choices).",
            show_default=False,
        ),
    ],
    rtol: Annotated[
        float,
        typer.Option(
            "--rtol", min=0.0, metavar="FLOAT", help="Largest accepted ‖A − B‖/‖B‖ per tensor."
        ),
    ] = 1e-3,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="MODEL",
            help="Base model, needed for LoRA and operator sides.",
            show_default=False,
        ),
    ] = None,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare two edits' cross-attention k/v tensors; print a per-layer table; exit 1 beyond --rtol.

    Example: uce verify runs/recreated --against published/edit.safetensors --rtol 1e-3
    """
    if not math.isfinite(rtol):
        raise typer.BadParameter(f"{rtol} is not a finite number (e.g. 1e-3)", param_hint="--rtol")
    from uce_cli.commands.verify import compare_edits

    result = compare_edits(edit, against, rtol, base, allow_pickle)
    if json_out:
        print_json(
            {
                "ok": not result.failed,
                "rtol": rtol,
                "tensors": [_json_row(r.__dict__) for r in result.rows],
                "only_edit": result.only_edit,
                "only_reference": result.only_reference,
            }
        )
    else:
        table = Table(title=f"{edit} vs {against} (rtol {rtol:g})")
        table.add_column("tensor", overflow="fold")
        for column in ("shape", "‖A−B‖/‖B‖", "‖A−B‖/‖ΔW‖", ""):
            table.add_column(column, justify="right", no_wrap=True)
        for r in result.rows:
            table.add_row(
                _short(r.key),
                "×".join(map(str, r.shape)),
                f"{r.rel_error:.3e}",
                "—" if r.rel_to_edit is None else f"{r.rel_to_edit:.3e}",
                "ok" if r.ok else "[red]DIFF[/red]",
            )
        out.print(table)
        for label, keys in (
            ("only in the edit", result.only_edit),
            ("only in the reference", result.only_reference),
        ):
            if keys and not quiet:
                err.print(
                    f"{len(keys)} tensors {label}, not compared (pass --base to complete partial edits)"
                )
    if result.failed:
        worst = result.worst
        print_error(
            f"{len(result.failed)} of {len(result.rows)} tensors differ beyond rtol {rtol:g}; worst "
            f"{worst.key} (relative error {worst.rel_error:.3e})"
        )
        raise typer.Exit(1)
    if not json_out:
        out.print(
            f"match: {len(result.rows)} tensors within rtol {rtol:g} (worst {result.worst.rel_error:.2e})"
        )
