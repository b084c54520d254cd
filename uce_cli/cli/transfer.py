"""``uce transfer``: re-apply an edit operator to another model that shares its text encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uce_cli.cli._common import JsonOpt, QuietOpt, ThreadsOpt, handle_errors
from uce_cli.cli.merge import (
    AllowPickleOpt,
    ForceOpt,
    FormatOpt,
    LoraRankOpt,
    OutOpt,
    check_output,
    chosen_formats,
    report_written,
)


@handle_errors
def transfer(
    operator: Annotated[
        Path,
        typer.Argument(
            metavar="EDIT",
            help="operator.safetensors (or an output folder holding one).",
            show_default=False,
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            metavar="MODEL",
            help="The other model: diffusers folder, single file or hub id.",
            show_default=False,
        ),
    ],
    out_dir: OutOpt,
    formats: FormatOpt = None,
    lora_rank: LoraRankOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply an edit operator K to another checkpoint with the same text encoder (W_new = W_old·K).

    Refuses a model whose text encoder differs from the one K was computed with.

    Example: uce transfer runs/erase/operator.safetensors --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out runs/erase-sd15
    """
    names = chosen_formats(formats, ["diffusers", "delta"], lora_rank)
    check_output(out_dir, model, force, [operator])
    from uce_cli.commands.transfer import run_transfer

    result = run_transfer(
        operator, model, out_dir, names, force=force, lora_rank=lora_rank, allow_pickle=allow_pickle
    )
    report_written(result, quiet, json_out)
