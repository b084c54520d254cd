"""The upstream concept lists ship with uce: recipes naming them validate with no network, no mirror."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import SHARED_DATA, write_recipe
from uce_cli.cli import app
from uce_cli.edit.plan import plan_recipe
from uce_cli.edit.upstream import (
    DATA_DIR,
    FETCHED_ON_DEMAND,
    SHIPPED_FILES,
    SHIPPED_FROM,
    SHIPPED_ONLY,
    upstream_source,
)
from uce_cli.errors import DataError

REPO = Path(__file__).resolve().parents[1]
FIVE = "info/erased-5artists-towards_art-preserve_true-sd_1_4-method_replace.txt"


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No mirror, an empty cache, and any download attempt fails the test."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.delenv("UCE_DATA_MIRROR", raising=False)
    monkeypatch.setenv("UCE_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_shipped_recipes_validate_offline(offline: None) -> None:
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    result = CliRunner().invoke(app, ["validate", *map(str, recipes)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("ok ") == len(recipes)
    # 5 artists × 6 prompts; the 1734 shipped artists less the four of them it lists, plus "".
    assert "erase-5-artists.yaml: 30 edit prompts, 1731 preserve prompts" in result.stdout


def test_upstream_column_reads_the_shipped_list(offline: None, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        "model: builtin:tiny-sd\nerase:\n  - concepts: [Kelly Mckernan]\npreserve:\n"
        "  - concepts_file: upstream:artists1734_prompts.csv\n    column: artist\n"
        "    exclude_edited: true\n",
    )
    preserve = plan_recipe(recipe).preserve
    assert preserve[:3] == ["", "A.J.Casson", "Aaron Douglas"]
    assert len(preserve) == 1 + 1734 - 1  # "" always, Kelly Mckernan excluded


@pytest.mark.parametrize(
    ("name", "count", "first"),
    [
        ("artists1734.txt", 1734, "A.J.Casson"),
        ("professions.txt", 225, "attendant"),
        ("imagenette-classes.txt", 10, "tench"),
        ("i2p-categories.txt", 7, "violence"),
        ("holdout100-artists.txt", 100, "Alasdair McLellan"),
        (FIVE, 5, "Albert Watson"),
    ],
)
def test_shipped_list_by_name(
    offline: None, tmp_path: Path, name: str, count: int, first: str
) -> None:
    recipe = write_recipe(
        tmp_path, f"model: builtin:tiny-sd\nerase:\n  - concepts_file: upstream:{name}\n"
    )
    concepts = list(dict.fromkeys(p.concept for p in plan_recipe(recipe).pairs))
    assert len(concepts) == count
    assert concepts[0] == first


def test_shipped_list_refuses_a_column(offline: None) -> None:
    path, column = upstream_source("artists1734.txt", "artist")
    assert path == DATA_DIR / "artists1734.txt" and column == "artist"  # plan: "not a csv"


def test_large_prompt_sets_are_still_fetched(offline: None) -> None:
    with pytest.raises(AssertionError, match="network access attempted"):
        upstream_source("coco_30k.csv", "prompt")


def test_shipped_data_has_licence_and_source() -> None:
    assert "MIT License" in (DATA_DIR / "LICENSE.upstream").read_text()
    source = (DATA_DIR / "SOURCE.md").read_text()
    assert "28c81ed5a3e41277c1a0dc55f738e7ab188e9718" in source
    shipped = sorted(str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*.txt") if p.is_file())
    assert shipped == sorted([*SHIPPED_FROM, *SHIPPED_ONLY])
    lists = [p for p in DATA_DIR.rglob("*") if p.is_file() and "upstream" not in p.parts]
    assert sum(p.stat().st_size for p in lists) < 200_000
    # the unchanged prompt sets the published recipes name: about 1.1 MB, with their licence
    assert "MIT License" in (DATA_DIR / "upstream" / "LICENSE.upstream").read_text()
    copies = [p for p in (DATA_DIR / "upstream").rglob("*.csv")]
    assert sorted(str(p.relative_to(DATA_DIR / "upstream")) for p in copies) == sorted(
        SHIPPED_FILES
    )
    assert sum(p.stat().st_size for p in copies) < 1_200_000
    for name in SHIPPED_FILES:
        assert f"`{name.split('/')[0]}" in source or "prompts_dir/" in source


def test_package_data_globs_cover_the_shipped_files() -> None:
    """A wheel (not only an editable install) carries every file of uce_cli/data/."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["uce_cli"]
    package = REPO / "uce_cli"
    for path in DATA_DIR.rglob("*"):
        if path.is_file():
            rel = str(path.relative_to(package))
            assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), (
                f"{rel} is not in pyproject's package-data"
            )


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the upstream data mirror")
def test_shipped_lists_match_the_upstream_files() -> None:
    def column(name: str, col: str) -> list[str]:
        text = (SHARED_DATA / name).read_text(encoding="utf-8-sig")
        values = [(row.get(col) or "").strip() for row in csv.DictReader(io.StringIO(text))]
        return list(dict.fromkeys(v for v in values if v))

    for shipped, (source, col) in SHIPPED_FROM.items():
        if col is None:
            expected = [c.strip() for c in json.loads((SHARED_DATA / source).read_text())]
        else:
            expected = column(source, col)
        assert lines(DATA_DIR / shipped) == expected, shipped
    categories = [
        c.strip() for v in column("unsafe-prompts4703.csv", "categories") for c in v.split(",")
    ]
    assert lines(DATA_DIR / "i2p-categories.txt") == list(dict.fromkeys(categories))


def test_unknown_upstream_name_lists_the_shipped_ones(offline: None) -> None:
    with pytest.raises(DataError, match="artists1734.txt"):
        upstream_source("nope.csv", None)


def _recipe_upstream_names() -> dict[tuple[str, str | None, bool], str]:
    """(upstream name, column, is a prompt set) → the first recipe naming it, over recipes/."""
    from uce_cli.edit.recipe import load_recipe

    names: dict[tuple[str, str | None, bool], str] = {}
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        recipe = load_recipe(path)
        files = [(g.concepts_file, g.column, False) for s in ("erase", "moderate", "debias",
                 "preserve") for g in getattr(recipe, s)]  # fmt: skip
        ev = recipe.evaluate
        if ev is not None:
            files += [(ps.file, None, True) for ps in [*ev.heldout, *ev.preserved, *ev.unrelated]]
            if ev.images is not None:
                files.append((ev.images.prompts.file, None, True))
        for f, column, prompt_set in files:
            if f and f.startswith("upstream:"):
                names.setdefault((f.removeprefix("upstream:"), column, prompt_set), path.name)
    return names


def test_every_upstream_file_a_recipe_names_reads_offline_but_coco_and_i2p(
    offline: None,
) -> None:
    """A fresh clone with no network and no mirror: only COCO-30k and I2P need fetching."""
    from uce_cli.edit.upstream import upstream_file

    names = _recipe_upstream_names()
    assert ("imagenette.csv", None, True) in names and ("coco_30k.csv", None, True) in names
    for (name, column, prompt_set), recipe in names.items():
        if name in FETCHED_ON_DEMAND:
            with pytest.raises(AssertionError, match="network access attempted"):
                upstream_file(name)
            continue
        path = upstream_file(name) if prompt_set else upstream_source(name, column)[0]
        assert path.is_file() and path.is_relative_to(DATA_DIR), (recipe, name)
