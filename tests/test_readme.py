"""The README and docs/design.md say what happens: shipped files, links and printed output are real."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DESIGN = (REPO / "docs" / "design.md").read_text()
runner = CliRunner()


def fenced_blocks(text: str, lang: str | None = None) -> list[tuple[int, str]]:
    """(start offset, body) of each fenced block, only those opened with ```lang if given."""
    blocks, opened, offset = [], None, 0
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if opened is None:
                opened, body, start = line[3:].strip(), [], offset
            else:
                if lang is None or opened == lang:
                    blocks.append((start, "".join(body)))
                opened = None
        elif opened is not None:
            body.append(line)
        offset += len(line)
    return blocks


def test_readme_recipe_is_shipped_file() -> None:
    claims = list(re.finditer(r"This is `(recipes/[\w.-]+\.yaml)`, as shipped", README))
    assert claims, "the README shows no shipped recipe"
    blocks = fenced_blocks(README, "yaml")
    for claim in claims:
        start, body = next((s, b) for s, b in blocks if s > claim.start())
        assert body == (REPO / claim.group(1)).read_text(), f"README block != {claim.group(1)}"


def test_readme_recipe_snippets_validate(tmp_path: Path) -> None:
    for i, (_, body) in enumerate(fenced_blocks(README, "yaml")):
        text = body if body.startswith(("model:", "#")) else f"model: builtin:tiny-sd\n{body}"
        recipe = write_recipe(tmp_path, text, f"snippet{i}.yaml")
        result = runner.invoke(app, ["validate", str(recipe)])
        assert result.exit_code == 0, (body, result.stderr)


@pytest.mark.parametrize("name", ["README.md", "docs/design.md", "uce_cli/data/SOURCE.md"])
def test_readme_links_exist(name: str) -> None:
    """Every relative link and every repository path a document names exists; no outside docs."""
    text = (REPO / name).read_text()
    base = (REPO / name).parent
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+:|#", t)]
    for target in links:
        assert (base / target.split("#")[0]).exists(), f"{name} links to missing {target}"
    paths = re.findall(r"`((?:docs|recipes|scripts|tests|uce_cli|\.ci)/[^`\s]*)`", text)
    for path in paths:
        found = list(REPO.glob(path)) if "*" in path else [REPO / path]
        assert found and all(p.exists() for p in found), f"{name} names missing {path}"
    assert "DESIGN" not in text, f"{name} cites DESIGN, which is not in the repository"
    assert not (REPO / "docs" / "README-formats-section.md").exists()
    assert not (REPO / "docs" / "README-sample-section.md").exists()


def test_readme_sample_prints_what_it_says(
    erased_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `uce sample` command prints the lines the README shows (timing aside)."""
    command = next(
        line for _, b in fenced_blocks(README) for line in b.splitlines() if "uce sample" in line
    )
    shown = next(b for _, b in fenced_blocks(README) if b.startswith("samples/grids/"))
    shutil.copytree(erased_model, tmp_path / "runs" / "quickstart")
    monkeypatch.chdir(tmp_path)
    args = re.findall(r'"[^"]*"|\S+', command)[1:]
    args = [a.strip('"') for a in args] + ["--steps", "2"]  # steps: speed only
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    timing = re.compile(r"\d+\.\d+ s per image")
    got = [timing.sub("T s per image", line) for line in result.stdout.splitlines()]
    assert got == [timing.sub("T s per image", line) for line in shown.splitlines()]
    # The images the README names, with seed 1's next to them, all listed in the manifest.
    named = set(re.findall(r"`samples/(\w+/0-0\.png)`", README))
    assert named == {"base/0-0.png", "edited/0-0.png"}
    expected = named | {"base/0-1.png", "edited/0-1.png"}
    manifest = json.loads(Path("samples/manifest.json").read_text())
    assert {image["path"] for image in manifest["images"]} == expected
    assert all((Path("samples") / image).is_file() for image in expected)


@pytest.mark.parametrize(
    ("mode", "target", "vectors", "preserve_vectors"),
    [("paper", "art", 64, 77), ("last-token", "painting by art", 1, 0)],
)
def test_design_doc_worked_example(
    tmp_path: Path, mode: str, target: str, vectors: int, preserve_vectors: int
) -> None:
    """docs/design.md §4: the figures of the worked token example are the tiny model's."""
    recipe = write_recipe(
        tmp_path,
        f"model: builtin:tiny-sd\nalignment: {mode}\nerase:\n  - concepts: [Kelly Mckernan]\n"
        '    templates: ["painting by {}"]\n    guide: art\n',
    )
    result = runner.invoke(app, ["apply", str(recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (pair,) = report["first_pairs"]["erase.0"]
    assert pair["source"] == "painting by Kelly Mckernan" and pair["targets"] == [[target, 1.0]]
    assert (pair["source_start"], pair["vectors"]) == (13, vectors)
    assert report["vectors"]["preserve_vectors"] == preserve_vectors
    assert "`m = 77 − max(13, 1) = 64`" in DESIGN
    assert "13 `an` ↔ 1 `art`" in DESIGN and "13 `an` ↔ target\n  position 3 `art`" in DESIGN
