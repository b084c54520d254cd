"""``uce sample``: seeded images from a model and an edit, and before/after grids."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uce_cli.cli._common import (
    Device,
    Dtype,
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    handle_errors,
    print_error,
    print_json,
)
from uce_cli.console import RichProgress, err, out, plural
from uce_cli.interrupt import stop_listening
from uce_cli.weights.destination import check_sample_out


def sample(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            metavar="MODEL",
            help="Base model: hub id, diffusers folder or builtin:tiny-sd "
            "(default: the base named by --edit).",
            show_default=False,
        ),
    ] = None,
    edit: Annotated[
        Path | None,
        typer.Option(
            "--edit",
            "-e",
            metavar="EDIT",
            help="An output folder of `uce apply`, or its edit.safetensors.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt", "-p", metavar="TEXT", help="A prompt; repeat for more.", show_default=False
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts-file",
            metavar="FILE",
            help="CSV with a 'prompt' column; 'evaluation_seed' and "
            "'case_number' are used when present (e.g. coco_30k.csv).",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=1, metavar="N", help="Only the first N prompts.", show_default=False
        ),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Output folder; rerun to resume.")
    ] = Path("samples"),
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="Base and edited with the same seeds, and a grid per prompt."
        ),
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", min=0, metavar="N", help="Seed of prompts without their own.")
    ] = 0,
    n: Annotated[
        int,
        typer.Option(
            "--n", "-n", min=1, metavar="N", help="Images per prompt (seeds seed, seed+1, …)."
        ),
    ] = 1,
    steps: Annotated[
        int, typer.Option("--steps", min=1, metavar="N", help="Denoising steps.")
    ] = 50,
    guidance: Annotated[
        float, typer.Option("--guidance", metavar="FLOAT", help="Classifier-free guidance scale.")
    ] = 7.5,
    height: Annotated[
        int | None,
        typer.Option(
            "--height",
            min=8,
            metavar="N",
            help="Image height (default: the model's).",
            show_default=False,
        ),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(
            "--width",
            min=8,
            metavar="N",
            help="Image width (default: the model's).",
            show_default=False,
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            metavar="CLASS",
            help="A diffusers scheduler class, e.g. EulerDiscreteScheduler (default: the model's).",
            show_default=False,
        ),
    ] = None,
    negative_prompt: Annotated[
        str | None,
        typer.Option(
            "--negative-prompt",
            metavar="TEXT",
            help="Negative prompt for every image.",
            show_default=False,
        ),
    ] = None,
    allow_empty: Annotated[
        bool,
        typer.Option("--allow-empty-prompts", help="Accept empty prompts (unconditional images)."),
    ] = False,
    device: Annotated[
        Device,
        typer.Option("--device", help="Where to sample: auto picks CUDA, then MPS, then CPU."),
    ] = Device.auto,
    dtype: Annotated[
        Dtype,
        typer.Option(
            "--dtype",
            help="Pipeline dtype (auto: fp16 on CUDA — bf16 for T5/Gemma models — else fp32).",
        ),
    ] = Dtype.auto,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Images per pipeline call.")
    ] = 1,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Sample images from a model or an edit; with --compare, base and edited side by side.

    Images, grids and manifest.json go to --out; images already there are skipped, so a rerun
    resumes. Every PNG carries prompt, seed, model and edit hash as PNG text.

    Under `accelerate launch` the prompts are split across the processes (row i to rank
    i % processes); every image is the one a single process would draw.

    Example: uce sample --edit runs/quickstart --compare --prompt "painting by Kelly Mckernan"
    """
    # Usage errors (exit 2) are raised here, outside the library-error boundary of _run.
    if bool(prompt) == (prompts_file is not None):
        raise typer.BadParameter("give --prompt (repeatable) or --prompts-file, one of the two")
    if model is None and edit is None:
        raise typer.BadParameter("give --model, --edit, or both", param_hint="--model")
    if compare and edit is None:
        raise typer.BadParameter(
            "--compare needs --edit (the edited model to compare)", param_hint="--compare"
        )
    options = dict(  # SampleOptions, built in _run: importing uce_cli.commands.sample loads torch
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        scheduler=scheduler,
        negative_prompt=negative_prompt,
        n=n,
        seed=seed,
        batch_size=batch_size,
        device=device.value,
        dtype=dtype.value,
    )
    _run(
        model,
        edit,
        list(prompt or []),
        prompts_file,
        limit,
        allow_empty,
        out_dir,
        compare,
        options,
        quiet,
        json_out,
    )


@handle_errors
def _run(
    model: str | None,
    edit: Path | None,
    prompts: list[str],
    prompts_file: Path | None,
    limit: int | None,
    allow_empty: bool,
    out_dir: Path,
    compare: bool,
    options: dict[str, Any],
    quiet: bool,
    json_out: bool,
) -> None:
    """Read the prompts, sample, render the result."""
    check_sample_out(out_dir)  # before torch is imported: a wrong --out fails at once
    from uce_cli.commands.sample import SampleOptions, run_sample
    from uce_cli.distributed import init_ranks
    from uce_cli.edit.prompts import prompts_from_text, read_prompts_csv

    if prompts_file is not None:
        rows = read_prompts_csv(prompts_file, limit, allow_empty)
    else:
        rows = prompts_from_text(prompts[:limit], allow_empty)
    ranks = init_ranks(options["device"])
    try:
        with RichProgress(enabled=not quiet and ranks.main) as progress:
            result = run_sample(
                rows, out_dir, model, edit, compare, SampleOptions(**options), progress, ranks
            )
    except KeyboardInterrupt:
        stop_listening()
        print_error(f"interrupted — the images already written stay in {out_dir}; rerun to resume")
        raise typer.Exit(130) from None
    if result.share is not None:
        err.print(result.share.line(), highlight=False)
    if not ranks.main:
        return  # rank 0 reports the whole run
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    per_image = result.seconds_per_image
    summary = {
        "out": str(result.out),
        "manifest": str(result.manifest),
        "images": len(result.images),
        "generated": result.generated,
        "skipped": result.skipped,
        "grids": [str(p) for p in result.grids],
        "seconds": round(result.seconds, 3),
        "seconds_per_image": None if per_image is None else round(per_image, 4),
    }
    if json_out:
        print_json(summary)
        return
    for grid in result.grids:
        print(grid)
    print(result.manifest)
    rate = f"; {per_image:.2f} s per image" if per_image is not None else ""
    out.print(
        f"{plural(summary['images'], 'image')} ({result.generated} generated, "
        f"{result.skipped} already there){rate}; {plural(len(result.grids), 'grid')}",
        highlight=False,
    )
