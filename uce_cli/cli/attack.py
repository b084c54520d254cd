"""``uce attack``: how easily an erased concept comes back — closed-form e* and a prompt search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.cli._common import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    handle_errors,
    print_json,
)
from uce_cli.console import RichProgress, err, out, silence_third_party
from uce_cli.errors import UceError


def _gamma(value: str) -> float | None:
    """``auto`` → None; a number ≥ 0 → itself."""
    if value == "auto":
        return None
    try:
        gamma = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number or auto") from None
    if not gamma >= 0 or gamma == float("inf"):
        raise typer.BadParameter(f"{value!r}: gamma must be a finite number >= 0, or auto")
    return gamma


def concepts_table(report: dict) -> Table:
    """One row per attacked concept: its recoveries and the best prompt found."""
    from uce_cli.judge.report import fmt

    table = Table(title="attack (share of the erasure gap undone; 0 = robust)")
    for column in ("concept", "e* word", "e* aligned", "discrete", "best prompt"):
        table.add_column(column)
    for name, c in report["concepts"].items():
        best = (c.get("discrete") or {}).get("best") or []
        table.add_row(
            name,
            fmt(c["attack_recovery"]),
            fmt(c["attack_recovery_aligned"]),
            fmt(c.get("attack_recovery_discrete")),
            best[0]["prompt"] if best else "—",
        )
    return table


@handle_errors
def attack(
    run: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="An output folder of `uce apply`.", show_default=False),
    ],
    gamma: Annotated[
        str,
        typer.Option(
            "--gamma",
            metavar="FLOAT",
            help="Ridge γ ≥ 0 of the embedding attack, or auto: ‖e*‖ kept within real token norms.",
        ),
    ] = "auto",
    budget: Annotated[
        int,
        typer.Option(
            "--budget", min=0, metavar="N", help="Prompts the search may score (0: no search)."
        ),
    ] = 256,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the prompt search.")] = 0,
    length: Annotated[
        int, typer.Option("--length", min=1, max=20, metavar="N", help="Words per searched prompt.")
    ] = 4,
    images: Annotated[
        bool,
        typer.Option(
            "--images",
            help="Also sample the edited model with each concept's prompt, with e* injected and "
            "with the best found prompt (SD 1.x/2.x), judged with the recipe's metrics (nudenet, "
            "clip_accuracy, clip_score, imagenet_top1); split over the ranks under accelerate "
            "launch.",
        ),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, metavar="N", help="Sampling steps (default: the recipe's)."),
    ] = None,
    per_variant: Annotated[
        int,
        typer.Option("--per-variant", min=1, metavar="N", help="Images (seeds) per variant."),
    ] = 2,
    force: Annotated[
        bool, typer.Option("--force", help="Recompute and replace an existing RUN/attack/.")
    ] = False,
    plots: Annotated[
        bool,
        typer.Option("--plots/--no-plots", help="Write attack.png (needs matplotlib)."),
    ] = True,
    device: DeviceOpt = "auto",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Prompts per encoder pass.")
    ] = 32,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Attack an edit: the closed-form embedding e* (RECE) and a seeded, budgeted prompt search
    (Ring-A-Bell-style) per erased concept; writes RUN/attack/ (attack.json, attack.md,
    attack.png, textual-inversion files of e*). Exit 1 when the recipe's expect: names an attack figure out of
    tolerance.

    Example: uce attack runs/quickstart --budget 256 --seed 0
    """
    from uce_cli.distributed import init_ranks
    from uce_cli.judge.attack import SearchSettings, run_attack_command

    silence_third_party()
    search = SearchSettings(seed=seed, budget=budget, length=length) if budget > 0 else None
    # Under `accelerate launch` the --images are drawn and judged across the ranks; rank 0
    # attacks and writes RUN/attack/.
    ranks = init_ranks(getattr(device, "value", device))
    with RichProgress(enabled=not quiet and ranks.main) as progress:
        folder, report = run_attack_command(
            run,
            _gamma(gamma),
            search,
            getattr(device, "value", device),
            batch_size,
            force,
            progress,
            images,
            steps,
            per_variant,
            plots,
            ranks,
        )
    if not ranks.main:
        return
    failed = [row for row in report["expect"] if not row["ok"]]
    if json_out:
        print_json(report)
    else:
        from uce_cli.cli.eval import expect_table

        out.print(concepts_table(report))
        if report["expect"]:
            out.print(expect_table(report["expect"]))
        if not quiet:
            err.print(f"wrote {folder}")
    if failed:
        raise UceError(
            "attack figures out of tolerance: "
            + ", ".join(f"{r['metric']} = {r['measured']}" for r in failed)
        )
