"""``uce eval``: judge an edit — text-side figures, image metrics over `uce sample` images, --check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.cli._common import DeviceOpt, JsonOpt, QuietOpt, ThreadsOpt, handle_errors, print_json
from uce_cli.cli.merge import AllowPickleOpt
from uce_cli.console import RichProgress, err, out, silence_third_party
from uce_cli.errors import UceError


def figures_table(report: dict) -> Table:
    """The report's figures, and its expectations when it has any."""
    from uce_cli.edit.evalspec import FIGURES
    from uce_cli.judge.report import fmt

    table = Table(title="eval")
    for column in ("figure", "value", "meaning"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, value in report.get("figures", {}).items():
        table.add_row(name, fmt(value), FIGURES.get(name, ""))
    return table


def expect_table(rows: list[dict]) -> Table:
    """Expected against measured figures."""
    from uce_cli.judge.report import fmt

    table = Table(title="expect: paper vs measured")
    for column in ("figure", "paper", "measured", "±", "source", "ok"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["metric"],
            fmt(row["expected"]),
            fmt(row["measured"]) if row["measured"] is not None else "not computed",
            fmt(row["tolerance"]),
            row["source"],
            "yes" if row["ok"] else "NO",
        )
    return table


@handle_errors
def eval_(
    run: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="An output folder of `uce apply`.", show_default=False),
    ],
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Compare with the recipe's expect: and exit 1 naming each figure out of "
            "tolerance (checks an existing eval/eval.json unless --force recomputes it).",
        ),
    ] = False,
    images: Annotated[
        bool,
        typer.Option(
            "--images",
            help="Also compute the recipe's image metrics: draws evaluate.images with `uce "
            "sample` into RUN/eval/samples (resumable), or reads --samples.",
        ),
    ] = False,
    samples: Annotated[
        Path | None,
        typer.Option(
            "--samples",
            metavar="DIR",
            help="A `uce sample --compare` folder to score (implies --images).",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=1, metavar="N", help="Image metrics on the first N prompts only."
        ),
    ] = None,
    plots: Annotated[
        bool, typer.Option("--plots/--no-plots", help="Write PNG plots (needs matplotlib).")
    ] = True,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="With --check: pass when the recipe has no expect: entries (without it, a "
            "check with nothing to check fails).",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Recompute and replace an existing eval/.")
    ] = False,
    allow_pickle: AllowPickleOpt = False,
    device: DeviceOpt = "auto",
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=1, metavar="N", help="Prompts per encoder pass."),
    ] = 32,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Judge an edit: efficacy, leakage and drift from the weights (CPU, seconds); image metrics
    over `uce sample` images with --images; --check against the recipe's expect:.

    Example: uce eval runs/quickstart && uce eval runs/quickstart --check
    """
    from uce_cli.judge.evaluate import (
        EVAL_DIR,
        EVAL_JSON,
        build_report,
        check_eval_folder,
        check_expectations,
        evaluate_text,
        open_run,
        read_report,
        with_attack,
        write_report,
    )

    silence_third_party()
    opened = open_run(run)
    if check and not opened.evaluate.expect and not allow_empty:
        raise UceError(
            f"{run}: its recipe's evaluate: has no expect: entries, so --check has nothing to "
            "check — add expect: to the recipe, or pass --allow-empty to let an empty check pass"
        )
    existing = None
    if check and not force and not images and samples is None:
        existing = read_report(opened.path)  # checked as it is, without recomputing
    else:
        check_eval_folder(opened.path)
    if existing is not None:
        report = with_attack(existing, opened.path)
        report["expect"] = check_expectations(report, opened.evaluate.expect)
    else:
        from uce_cli.distributed import init_ranks

        # Under `accelerate launch` the images are drawn and scored across the ranks; rank 0
        # writes the report.
        ranks = init_ranks(getattr(device, "value", device))
        with RichProgress(enabled=not quiet and ranks.main) as progress:
            text = evaluate_text(opened, getattr(device, "value", device), batch_size, progress)
            image_part = None
            if images or samples is not None:
                from uce_cli.judge.imagesets import evaluate_image_sets

                image_part = evaluate_image_sets(
                    opened,
                    samples,
                    limit,
                    getattr(device, "value", device),
                    progress,
                    ranks,
                    allow_pickle=allow_pickle,
                )
        if not ranks.main:
            return
        report = build_report(opened, text, image_part)
        if image_part and (existing is None or force):  # else write_report refuses
            from uce_cli.judge.plots import copy_concept_grids

            report["grids"] = copy_concept_grids(opened.path / EVAL_DIR, report)
        if plots:
            from uce_cli.judge.plots import write_plots

            report["plots"] = write_plots(opened.path / EVAL_DIR, report, opened.path)
        write_report(opened, report, force)
        if not quiet:
            err.print(f"wrote {opened.path / EVAL_DIR / EVAL_JSON}")
    failed = [row for row in report["expect"] if not row["ok"]]
    if json_out:
        print_json(report)
    else:
        out.print(figures_table(report))
        if report["expect"]:
            out.print(expect_table(report["expect"]))
    if check:
        if not report["expect"]:
            err.print("no expect: entries in the recipe — nothing to check (--allow-empty)")
        if failed:
            from uce_cli.judge.expectations import failure_line

            missing = sum(r["measured"] is None for r in failed)
            what = (
                f"{len(failed)} figure(s) out of tolerance"
                if not missing
                else (f"{len(failed) - missing} figure(s) out of tolerance, {missing} not computed")
            )
            raise UceError(f"{what}: {'; '.join(failure_line(r) for r in failed)}")
