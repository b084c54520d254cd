"""Recipe schema: every problem reported at once, as `file: field.path: message — hint`."""

from __future__ import annotations

from pathlib import Path

import pytest

from uce_cli.edit.recipe import load_recipe, parse_recipe
from uce_cli.errors import RecipeError


def problems_of(data: object) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, "r.yaml")
    return info.value.problems


def test_minimal_recipe_defaults() -> None:
    recipe = parse_recipe({"model": "m", "erase": [{"concepts": ["x"]}]}, "r.yaml")
    assert recipe.alignment == "paper"
    assert recipe.layers.projections == ["to_k", "to_v"]
    assert recipe.output.formats == ["diffusers", "delta"]
    assert recipe.solver.lam is None and recipe.erase[0].templates == "none"


def test_all_problems_reported_at_once_with_paths_and_hints() -> None:
    problems = problems_of(
        {
            "model": "m",
            "alignment": "sideways",
            "erase": [{"concepts": ["a"], "guide": 5, "templatse": "art"}],
            "solver": {"lambda": -1, "erase_scale": -2},
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "r.yaml: alignment: must be 'paper' or 'last-token' (got 'sideways')" in text
    assert "r.yaml: erase.0.guide: must be a string or a list (got 5)" in text
    assert "r.yaml: erase.0: unknown key `templatse` — did you mean `templates`?" in text
    assert "r.yaml: solver.lambda: must be >= 0" in text
    assert "r.yaml: solver.erase_scale:" in text


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"erase": [{"concepts": ["x"]}]}, "(top level): missing required key `model` — add it"),
        ({"model": "m"}, "no edit section — add at least one of `erase`, `moderate` or `debias`"),
        ({"model": "m", "erase": [{"concepts": []}]}, "erase.0.concepts: empty concept list"),
        ({"model": "m", "erase": [{"concepts": ["  "]}]}, "erase.0.concepts: concept #0 is empty"),
        (
            {"model": "m", "erase": [{}]},
            "erase.0: give either `concepts` (a list) or `concepts_file`",
        ),
        (
            {"model": "m", "erase": [{"concepts": ["x"], "concepts_file": "f.txt"}]},
            "not both or neither",
        ),
        (
            {"model": "m", "erase": [{"concepts": ["x"], "templates": ["no slot"]}]},
            "exactly one {}",
        ),
        (
            {"model": "m", "erase": [{"concepts": ["x"], "templates": "paint"}]},
            "erase.0.templates: must be 'art', 'object' or 'none' or a list (got 'paint')",
        ),
        (
            {"model": "m", "moderate": [{"concepts": ["x"], "guide": "y"}]},
            "moderate.0: unknown key `guide`",
        ),
        (
            {"model": "m", "erase": [{"concepts": ["x"]}], "layers": {"projections": ["to_q"]}},
            "'to_k' or 'to_v'",
        ),
        (
            {"model": "m", "erase": [{"concepts": ["x"]}], "output": {"formats": ["zip"]}},
            "output.formats.0",
        ),
        (
            {"model": "m", "erase": [{"concepts": ["x"]}], "solver": {"preserve_scale": -1}},
            "must be >= 0",
        ),
        (
            {
                "model": "m",
                "debias": [{"concepts": ["d"], "attributes": {"male": 1}, "alphas": {"female": 1}}],
            },
            "give one alpha per attribute",
        ),
        ({"model": "m", "erase": "x"}, "erase: must be a list (got 'x')"),
    ],
)
def test_bad_recipes(data: dict, expected: str) -> None:
    text = "\n".join(problems_of(data))
    assert expected in text
    assert text.startswith("r.yaml: ")


@pytest.mark.parametrize("data", [None, [1, 2], "just text", 3])
def test_recipe_must_be_a_mapping(data: object) -> None:
    (problem,) = problems_of(data)
    assert "not a mapping" in problem


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\x00\xff\xfe")
    with pytest.raises(RecipeError, match="not a UTF-8 text file"):
        load_recipe(binary)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: m\nerase:\n  - concepts: [a, b\n  - x: y\n")
    with pytest.raises(RecipeError, match=r"broken\.yaml: line \d+, column \d+: YAML syntax error"):
        load_recipe(broken)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="the YAML tag !!python/object/apply:os.system is not"):
        load_recipe(evil)
