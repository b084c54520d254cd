"""``uce validate``: check recipes (schema and plan) without importing torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from uce_cli.cli._common import JsonOpt, handle_errors, print_error, print_json
from uce_cli.console import plural
from uce_cli.edit.plan import check_loop_work, plan_recipe
from uce_cli.errors import RecipeError, UceError


@handle_errors
def validate(
    recipes: Annotated[
        list[Path],
        typer.Argument(metavar="RECIPE", help="Recipe files to check.", show_default=False),
    ],
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the problems, no `ok` lines.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check recipes: schema, concept files, conflicts and the resolved plan. Reports every problem.

    Example: uce validate recipes/*.yaml
    """
    results = []
    failed = 0
    for path in recipes:
        try:
            plan = plan_recipe(path)
        except RecipeError as exc:
            failed += 1
            print_error(str(exc))
            results.append({"recipe": str(path), "ok": False, "problems": exc.problems})
            continue
        except UceError as exc:
            failed += 1
            print_error(f"{path}: {exc}")
            results.append({"recipe": str(path), "ok": False, "problems": [str(exc)]})
            continue
        summary = plan.summary()
        try:  # valid, but `uce apply` runs it only with --allow-long: say so now
            check_loop_work(plan)
        except RecipeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            summary["needs_allow_long"] = True
        results.append({"recipe": str(path), "ok": True, **summary})
        if not json_out and not quiet:
            print(
                f"ok {path}: {plural(summary['edit_prompts'], 'edit prompt')}, "
                f"{plural(summary['preserve_prompts'], 'preserve prompt')}, "
                f"{plan.alignment} alignment, model {plan.model}"
            )
    if json_out:
        print_json(results)
    if failed:
        raise typer.Exit(1)
