"""``uce merge``: apply a delta, LoRA or operator to a base model and write the edited model.

Also home of the options every edit-writing command shares (``--format``, ``--lora-rank``,
``--allow-pickle``), so ``apply``, ``merge`` and ``transfer`` read alike.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from uce_cli.cli._common import JsonOpt, QuietOpt, ThreadsOpt, handle_errors, print_json
from uce_cli.console import err
from uce_cli.edit.recipe import OUTPUT_FORMATS
from uce_cli.errors import UceError
from uce_cli.weights.destination import check_destination, resolve_destination

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
        metavar="N",
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
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="DIR", help="Output folder.", show_default=False)
]
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


def check_output(out_dir: Path, model: str, force: bool, inputs: list[Path]) -> None:
    """Check ``--out`` before torch is imported: a taken or unsafe folder fails at once.

    A local model folder is passed on for the overlap check only if it is a pipeline folder: a
    folder that is not one gets its own, clearer error when it is opened.
    """
    local = Path(model).expanduser()
    base = local if (local / "model_index.json").is_file() else None
    check_destination(resolve_destination(out_dir), base, force, inputs=inputs)


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
            metavar="MODEL",
            help="Base model: diffusers folder, single file, hub id or builtin:tiny-sd.",
            show_default=False,
        ),
    ],
    edit: Annotated[
        Path,
        typer.Argument(
            metavar="EDIT",
            help="The edit: delta, LoRA or operator file (or a folder holding one).",
            show_default=False,
        ),
    ],
    out_dir: OutOpt,
    formats: FormatOpt = None,
    lora_rank: LoraRankOpt = None,
    allow_pickle: AllowPickleOpt = False,
    allow_other_base: Annotated[
        bool,
        typer.Option(
            "--allow-other-base",
            help="Merge a delta made for another base (it replaces this base's k/v with that "
            "base's edited ones; `uce transfer` with the operator gives the exact edit).",
        ),
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply a delta, LoRA or operator to a base model and write the result (default: a diffusers folder).

    A delta is refused on a base other than the one it was made for (its k/v hash differs): use
    `uce transfer` with the edit's operator there. A LoRA made for another base is applied with a
    warning.

    Example: uce merge CompVis/stable-diffusion-v1-4 runs/erase/edit.safetensors --out runs/merged
    """
    names = chosen_formats(formats, ["diffusers"], lora_rank)
    check_output(out_dir, base, force, [edit])
    from uce_cli.commands.transfer import run_merge

    result = run_merge(
        base,
        edit,
        out_dir,
        names,
        force=force,
        lora_rank=lora_rank,
        allow_pickle=allow_pickle,
        allow_other_base=allow_other_base,
    )
    report_written(result, quiet, json_out)
