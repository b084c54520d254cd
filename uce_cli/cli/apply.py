"""``uce apply``: run a recipe and write the edited model, delta and edit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.cli._common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    handle_errors,
    print_json,
)
from uce_cli.cli.merge import (
    AllowPickleOpt,
    FormatOpt,
    LoraRankOpt,
    check_output,
    chosen_formats,
)
from uce_cli.console import RichProgress, err, out, plural, silence_third_party
from uce_cli.distributed import init_ranks, launched_rank, launched_world
from uce_cli.edit.plan import check_loop_work, override_model, plan_recipe
from uce_cli.errors import OutputError
from uce_cli.weights.hub import check_hub_model
from uce_cli.weights.modelspec import is_hub_id


def _render_dry_run(report: dict) -> None:
    table = Table(title=f"plan ({report['alignment']} alignment) — nothing will be written")
    table.add_column("section", style="bold")
    table.add_column("first prompts (source → target)")
    for section, pairs in report["first_pairs"].items():
        lines = []
        for item in pairs:
            target = " + ".join(f"{w:g}·'{t}'" if w != 1 else f"'{t}'" for t, w in item["targets"])
            vec = (
                f"  [{plural(item['vectors'], 'vector')} from token {item['source_start']}]"
                if "vectors" in item
                else ""
            )
            alpha = f"  (α {item['alpha']})" if "alpha" in item else ""
            lines.append(f"'{item['source']}' → {target}{vec}{alpha}")
        counts = report["sections"][section]
        table.add_row(
            f"{section}\n{plural(counts['concepts'], 'concept')}, "
            f"{plural(counts['prompts'], 'prompt')}",
            "\n".join(lines),
        )
    preserve = ", ".join(f"'{p}'" for p in report["first_preserve"])
    table.add_row(f"preserve\n{plural(report['preserve_prompts'], 'prompt')}", preserve or "(none)")
    out.print(table)
    out.print(
        f"model {report['model']}; {plural(report['edit_prompts'], 'edit prompt')}, "
        f"{plural(report['preserve_prompts'], 'preserve prompt')}, "
        f"{plural(report['unique_prompts'], 'unique prompt')} to encode; "
        f"λ={report['lambda']:g} s_e={report['erase_scale']:g} "
        f"s_p={report['preserve_scale']:.4g}; projections {', '.join(report['projections'])}"
    )
    work = report.get("debias_loop_work")
    if work is not None:
        out.print(
            f"debias loop: at most {work['rounds']} rounds × {work['prompts']} prompts × "
            f"{work['images_per_prompt']} images × {work['steps']} steps = "
            f"{work['image_steps']:,} image sampling steps (ceiling {work['ceiling']:,}; "
            "--allow-long runs beyond it)"
        )
    vectors = report["vectors"]
    if not isinstance(vectors, dict):
        out.print(f"vectors: {vectors}")
        return
    # One group: its counts; several (FLUX, SD3): {group: counts}, one line each.
    groups = (
        {"": vectors} if "edit_vectors" in vectors else {f" ({g})": v for g, v in vectors.items()}
    )
    for name, v in groups.items():
        out.print(
            f"vectors{name}: {v['edit_vectors']} edit ({v['per_edit_prompt_min']}–"
            f"{v['per_edit_prompt_max']} per prompt), {v['preserve_vectors']} preserve "
            f"({v['per_preserve_prompt']} per prompt)"
        )


@handle_errors
def apply(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="The recipe (YAML).", show_default=False)
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="Output folder (default: output.dir of the recipe).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output folder.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the resolved plan; load no weights, write nothing."),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="MODEL",
            help="Edit this model instead of the recipe's (hub id, folder, builtin:tiny-sd).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Prompts per encoder pass.")
    ] = 32,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor store cached preserve statistics.")
    ] = False,
    formats: FormatOpt = None,
    lora_rank: LoraRankOpt = None,
    allow_pickle: AllowPickleOpt = False,
    allow_long: Annotated[
        bool,
        typer.Option(
            "--allow-long",
            help="Run a debias loop whose work at most (rounds × prompts × images × steps) is "
            "beyond the ceiling --dry-run shows.",
        ),
    ] = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply a recipe: encode its prompts once, solve every layer in closed form, write the outputs.

    Example: uce apply recipes/quickstart.yaml --out runs/quickstart
    (--model builtin:tiny-sd runs any recipe on the tiny offline model.)
    """
    plan = plan_recipe(recipe, out_dir)
    if model is not None:
        override_model(plan, model)
    # Under `accelerate launch` an edit is seconds of work on rank 0; only the debias loop's
    # sampling (`alphas: auto`) is split across the ranks.
    world, rank = launched_world(), launched_rank()
    together = world > 1 and plan.loop is not None and not dry_run
    if world > 1 and not together:
        if rank != 0:
            err.print(f"rank {rank}/{world}: uce apply runs on rank 0 only — nothing to do here")
            return
        err.print(f"rank 0/{world}: uce apply is one process — running on rank 0 only")
    # --format replaces output.formats
    plan.formats = chosen_formats(formats, plan.formats, lora_rank)
    check_loop_work(plan, allow_long)
    if dry_run:
        from uce_cli.commands.apply import describe_plan

        report = describe_plan(plan)
        print_json(report) if json_out else _render_dry_run(report)
        return
    # The destination is checked before the runner imports torch: a taken --out fails at once.
    destination = out_dir or plan.output_dir
    if destination is None:
        raise OutputError("no output folder — pass --out DIR or set output.dir in the recipe")
    check_output(destination, plan.model, force, [recipe])
    if is_hub_id(plan.model):  # a hub id that is neither cached nor reachable fails at once too
        check_hub_model(plan.model, plan.revision)
    from uce_cli.commands.apply import run_apply

    silence_third_party()
    ranks = init_ranks(getattr(device, "value", device)) if together else None
    if ranks is not None:
        err.print(
            f"rank {ranks.rank}/{ranks.world}: debias loop images split across {ranks.world} "
            "processes; rank 0 solves and writes the outputs"
        )
    with RichProgress(enabled=not quiet and (ranks is None or ranks.main)) as progress:

        def on_iteration(record: dict) -> None:
            """The debias loop's live table: items, current ratios and α."""
            from uce_cli.cli.show import iteration_table

            progress.show(iteration_table(record))

        result = run_apply(
            plan,
            out_dir,
            force,
            getattr(device, "value", device),
            getattr(dtype, "value", dtype),
            batch_size,
            progress,
            use_cache=not no_cache,
            lora_rank=lora_rank,
            allow_pickle=allow_pickle,
            on_iteration=on_iteration,
            ranks=ranks,
            allow_long=allow_long,
        )
    if result is None:  # a rank other than 0 of the debias loop: rank 0 reports
        return
    log = result.log
    layers = log["layers"].values()
    summary = {
        "out": str(result.out),
        "layers": len(log["layers"]),
        "residual_before": max(m["residual_before"] for m in layers),
        "residual_after": max(m["residual_after"] for m in layers),
        "preserve_drift": max(m["preserve_drift"] for m in layers),
        "timings": log["timings"],
        "outputs": list(log["outputs"]),
    }
    if json_out:
        print_json(summary)
        return
    if "debias" in log:
        summary["debias"] = {
            k: log["debias"][k] for k in ("stopped", "iterations_run", "edits", "preserve_added")
        }
    if not quiet:
        err.print(
            f"[green]edited {summary['layers']} layers[/green] in {sum(log['timings'].values()):.1f} s"
        )
    print(result.out)
    if "debias" in summary:
        loop = summary["debias"]
        out.print(
            f"debias loop: {loop['stopped']} after {loop['iterations_run']} iterations, "
            f"{loop['edits']} edits; `uce show {result.out}` lists them"
        )
    out.print(
        f"edit residual (worst layer) {summary['residual_before']:.4f} → {summary['residual_after']:.4f}; "
        f"preserve drift ≤ {summary['preserve_drift']:.2e}; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in log["timings"].items())
    )
