"""Sizes bounded at the door (issue 19 items 6 and 16): a huge recipe, concept, concepts file or
plan, and a debias loop whose work is out of proportion, are refused in one line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app
from uce_cli.edit.plan import MAX_LOOP_WORK, check_loop_work, loop_work, plan_recipe
from uce_cli.edit.recipe import MAX_RECIPE_BYTES
from uce_cli.errors import RecipeError

runner = CliRunner()

DEBIAS = """model: builtin:tiny-sd
debias:
  - concepts: [doctor]
    templates: ["{}", "image of {}"]
    attributes: {male: 0.5, female: 0.5}
    alphas: auto
"""


def _one_line_error(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize("command", [["validate"], ["apply", "--dry-run"]])
def test_recipe_over_1_mb_is_refused_before_parsing(tmp_path: Path, command: list[str]) -> None:
    # A valid recipe behind one long comment line: it parses, so only the size refuses it.
    text = "#" + "x" * MAX_RECIPE_BYTES + "\nmodel: builtin:tiny-sd\nerase:\n  - concepts: [a]\n"
    recipe = write_recipe(tmp_path, text)
    _one_line_error([*command, str(recipe)], str(recipe), "1,000,000 bytes (1 MB)")


def test_recipe_just_under_the_limit_is_read(tmp_path: Path) -> None:
    text = "model: builtin:tiny-sd\nerase:\n  - concepts: [a]\n"
    recipe = write_recipe(tmp_path, "#" + "x" * (MAX_RECIPE_BYTES - len(text) - 2) + "\n" + text)
    assert recipe.stat().st_size <= MAX_RECIPE_BYTES
    assert runner.invoke(app, ["validate", str(recipe)]).exit_code == 0


def test_images_per_seed_times_seeds_is_bounded_at_validation(tmp_path: Path) -> None:
    seeds = list(range(50))
    recipe = write_recipe(
        tmp_path, DEBIAS + f"debias_loop:\n  seeds: {seeds}\n  images_per_seed: 100000\n"
    )
    _one_line_error(
        ["validate", str(recipe)], "debias_loop", "50 seeds × images_per_seed 100000 = 5,000,000"
    )


def test_loop_batch_size_is_bounded(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, DEBIAS + "debias_loop:\n  batch_size: 1000000000\n")
    _one_line_error(["validate", str(recipe)], "debias_loop.batch_size")


def test_dry_run_prints_the_loop_work_estimate(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, DEBIAS + "debias_loop:\n  seeds: [0, 1]\n  images_per_seed: 3\n  steps: 4\n"
    )
    result = runner.invoke(app, ["apply", "--dry-run", str(recipe)])
    assert result.exit_code == 0, result.stderr
    # 30 rounds (default) × 2 prompts × 6 images × 4 steps
    assert (
        "30 rounds × 2 prompts × 6 images × 4 steps = 1,440 image sampling steps" in result.stdout
    )
    work = loop_work(plan_recipe(recipe))
    assert work is not None and work["image_steps"] == 1440 and work["ceiling"] == MAX_LOOP_WORK


def test_loop_beyond_the_ceiling_needs_allow_long(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        DEBIAS + "debias_loop:\n  max_iterations: 10000\n  steps: 10000\n  seeds: [0]\n"
        "  images_per_seed: 1\n",
    )
    for command in (["apply", "--dry-run"], ["apply", "--out", str(tmp_path / "out")]):
        _one_line_error(
            [*command, str(recipe)],
            str(recipe),
            "up to 200,000,000 image sampling steps",
            "--allow-long",
        )
    assert not (tmp_path / "out").exists()
    allowed = runner.invoke(app, ["apply", "--dry-run", "--allow-long", str(recipe)])
    assert allowed.exit_code == 0, allowed.stderr
    assert "200,000,000 image sampling steps" in allowed.stdout
    # the library entry point refuses too, before opening the model
    from uce_cli.commands.apply import run_apply

    with pytest.raises(RecipeError, match="--allow-long"):
        run_apply(plan_recipe(recipe), out=tmp_path / "out2", device="cpu")
    check_loop_work(plan_recipe(recipe), allow_long=True)  # no error


def test_published_debias_loop_is_within_the_ceiling() -> None:
    recipe = (
        Path(__file__).resolve().parents[1] / "recipes/published/debias-gender-professions.yaml"
    )
    work = loop_work(plan_recipe(recipe))
    assert work is not None and work["image_steps"] == 5_550_000 <= MAX_LOOP_WORK


def test_long_inline_concept_is_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "model: m\nerase:\n  - concepts: [" + "a" * 5000 + "]\n")
    _one_line_error(["validate", str(recipe)], "erase.0.concepts", "5,000 characters long")


def test_huge_concept_in_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("a" * 5000 + "\n")
    recipe = write_recipe(tmp_path, "model: m\nerase:\n  - concepts_file: big.txt\n")
    _one_line_error(["validate", str(recipe)], "big.txt", "concept #0 is 5,000 characters long")


def test_concepts_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "huge.txt"
    with big.open("wb") as f:
        f.truncate(20 * 2**20)  # 20 MB (sparse): a concept of NULs, never read
    recipe = write_recipe(tmp_path, "model: m\nerase:\n  - concepts_file: huge.txt\n")
    _one_line_error(["validate", str(recipe)], str(big), "larger than 16 MB")


def test_too_many_concepts_in_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "many.txt").write_text("".join(f"c{i}\n" for i in range(100_001)))
    recipe = write_recipe(tmp_path, "model: m\nerase:\n  - concepts_file: many.txt\n")
    _one_line_error(["validate", str(recipe)], "lists 100,001 concepts", "100,000")


def test_too_many_prompts_is_refused_before_they_are_built(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("".join(f"c{i}\n" for i in range(40_000)))
    recipe = write_recipe(
        tmp_path,
        "model: m\nerase:\n  - concepts_file: c.txt\n    templates: art\n"
        "preserve:\n  - concepts_file: c.txt\n    templates: object\n",
    )
    with pytest.raises(RecipeError, match="more than 200,000 prompts"):
        plan_recipe(recipe)


def test_validate_warns_of_a_loop_beyond_the_ceiling(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, DEBIAS + "debias_loop:\n  max_iterations: 10000\n  steps: 10000\n"
    )
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"warning: {recipe}: debias_loop: up to ")
    assert "--allow-long" in result.stderr and result.stdout.startswith(f"ok {recipe}")
