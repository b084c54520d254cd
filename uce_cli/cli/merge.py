"""``uce merge``: apply a delta, LoRA or operator to a base model and write the edited model.

Also home of the options every edit-writing command shares (``--format``, ``--lora-rank``,
``--allow-pickle``), so ``apply``, ``merge`` and ``transfer`` read alike.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from uce_cli.cli._common import JsonOpt, QuietOpt, handle_errors, print_json
from uce_cli.console import err
from uce_cli.errors import UceError
from uce_cli.recipe import OUTPUT_FORMATS

Format = Enum("Format", {name: name for name in OUTPUT_FORMATS}, type=str)  # type: ignore[misc]

FormatOpt = Annotated[
    list[Format] | None,
    typer.Option(
        "--format",
        metavar="FORMAT",
        help="Output format, repeatable: " + ", ".join(OUTPUT_FORMATS) + ".",
        show_default=False,
    ),
]
LoraRankOpt = Annotated[
    int | None,
    typer.Option(
        "--lora-rank",
        min=1,
        help="Truncate LoRA factors to this rank (default: exact rank).",
        show_default=False,
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Accept pickle .ckpt/.bin/.pt inputs, loaded with torch.load(weights_only=True).",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]


def chosen_formats(
    formats: list[Format] | None, default: list[str], lora_rank: int | None
) -> list[str]:
    """The ``--format`` values (or ``default``), refusing ``--lora-rank`` without a LoRA format."""
    names = (
        list(dict.fromkeys(getattr(f, "value", f) for f in formats)) if formats else list(default)
    )
    if lora_rank is not None and not any(n.startswith("lora") for n in names):
        raise UceError(
            "--lora-rank applies to the LoRA formats — add --format lora (or lora-kohya)"
        )
    return names


def report_written(result: dict, quiet: bool, json_out: bool) -> None:
    """Print a merge/transfer result: the folder on stdout (or JSON), a summary on stderr."""
    if json_out:
        print_json(result)
        return
    if not quiet:
        err.print(
            f"[green]wrote {result['layers']} edited layers[/green] as {', '.join(result['formats'])}"
        )
    print(result["out"])


@handle_errors
def merge(
    base: Annotated[
        str,
        typer.Argument(
            help="Base model: diffusers folder, single file, hub id or builtin:tiny-sd.",
            show_default=False,
        ),
    ],
    edit: Annotated[
        Path,
        typer.Argument(
            help="The edit: delta, LoRA or operator file (or a folder holding one).",
            show_default=False,
        ),
    ],
    out_dir: OutOpt,
    formats: FormatOpt = None,
    lora_rank: LoraRankOpt = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Apply a delta, LoRA or operator to a base model and write the result (default: a diffusers folder).

    Example: uce merge CompVis/stable-diffusion-v1-4 runs/erase/edit.safetensors --out runs/merged
    """
    from uce_cli.formats.transfer import run_merge

    names = chosen_formats(formats, ["diffusers"], lora_rank)
    result = run_merge(
        base, edit, out_dir, names, force=force, lora_rank=lora_rank, allow_pickle=allow_pickle
    )
    report_written(result, quiet, json_out)
