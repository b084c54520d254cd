"""``uce apply``: run a recipe and write the edited model, delta and edit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.cli._common import DeviceOpt, DtypeOpt, JsonOpt, QuietOpt, handle_errors, print_json
from uce_cli.cli.merge import AllowPickleOpt, FormatOpt, LoraRankOpt, chosen_formats
from uce_cli.console import RichProgress, err, out, silence_third_party
from uce_cli.plan import override_model, plan_recipe


def _render_dry_run(report: dict) -> None:
    table = Table(title=f"plan ({report['alignment']} alignment) — nothing will be written")
    table.add_column("section", style="bold")
    table.add_column("first prompts (source → target)")
    for section, pairs in report["first_pairs"].items():
        lines = []
        for item in pairs:
            target = " + ".join(f"{w:g}·'{t}'" if w != 1 else f"'{t}'" for t, w in item["targets"])
            vec = (
                f"  [{item['vectors']} vectors from token {item['source_start']}]"
                if "vectors" in item
                else ""
            )
            lines.append(f"'{item['source']}' → {target}{vec}")
        counts = report["sections"][section]
        table.add_row(
            f"{section}\n{counts['concepts']} concepts, {counts['prompts']} prompts",
            "\n".join(lines),
        )
    preserve = ", ".join(f"'{p}'" for p in report["first_preserve"])
    table.add_row(f"preserve\n{report['preserve_prompts']} prompts", preserve or "(none)")
    out.print(table)
    out.print(
        f"model {report['model']}; {report['edit_prompts']} edit prompts, "
        f"{report['preserve_prompts']} preserve prompts, {report['unique_prompts']} unique prompts to "
        f"encode; λ={report['lambda']:g} s_e={report['erase_scale']:g} "
        f"s_p={report['preserve_scale']:.4g}; projections {', '.join(report['projections'])}"
    )
    vectors = report["vectors"]
    if isinstance(vectors, dict):
        out.print(
            f"vectors: {vectors['edit_vectors']} edit ({vectors['per_edit_prompt_min']}–"
            f"{vectors['per_edit_prompt_max']} per prompt), {vectors['preserve_vectors']} preserve "
            f"({vectors['per_preserve_prompt']} per prompt)"
        )
    else:
        out.print(f"vectors: {vectors}")


@handle_errors
def apply(
    recipe: Annotated[Path, typer.Argument(help="The recipe (YAML).", show_default=False)],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: output.dir of the recipe)."),
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
            help="Edit this model instead of the recipe's (hub id, folder, builtin:tiny-sd).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Prompts per encoder pass.")
    ] = 32,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor store cached preserve statistics.")
    ] = False,
    formats: FormatOpt = None,
    lora_rank: LoraRankOpt = None,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Apply a recipe: encode its prompts once, solve every layer in closed form, write the outputs.

    Example: uce apply recipes/quickstart.yaml --out runs/quickstart
    (--model builtin:tiny-sd runs any recipe on the tiny offline model.)
    """
    plan = plan_recipe(recipe, out_dir)
    if model is not None:
        override_model(plan, model)
    # --format replaces output.formats
    plan.formats = chosen_formats(formats, plan.formats, lora_rank)
    if dry_run:
        from uce_cli.runner import describe_plan

        report = describe_plan(plan)
        print_json(report) if json_out else _render_dry_run(report)
        return
    from uce_cli.runner import run_apply

    silence_third_party()
    with RichProgress(enabled=not quiet) as progress:
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
        )
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
    if not quiet:
        err.print(
            f"[green]edited {summary['layers']} layers[/green] in {sum(log['timings'].values()):.1f} s"
        )
    print(result.out)
    out.print(
        f"edit residual (worst layer) {summary['residual_before']:.4f} → {summary['residual_after']:.4f}; "
        f"preserve drift ≤ {summary['preserve_drift']:.2e}; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in log["timings"].items())
    )
