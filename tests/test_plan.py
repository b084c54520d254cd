"""Plan resolution: templates per alignment mode, files, duplicates, conflicts, scales."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, write_recipe
from uce_cli.edit.plan import TEMPLATE_SETS, EditPair, plan_recipe
from uce_cli.errors import RecipeError


def plan_of(tmp_path: Path, text: str):  # noqa: ANN201
    return plan_recipe(write_recipe(tmp_path, text))


def test_paper_mode_expands_sources_only(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path, "model: m\nerase:\n  - concepts: [Kelly Mckernan]\n    templates: art\n"
    )
    assert [p.source for p in plan.pairs] == ["Kelly Mckernan"] + [
        t.format("Kelly Mckernan") for t in TEMPLATE_SETS["art"]
    ]
    assert {p.targets for p in plan.pairs} == {(("art", 1.0),)}  # art templates → guide "art"
    assert plan.preserve == [""]  # "" is always preserved in paper mode
    assert (plan.lam, plan.erase_scale, plan.preserve_scale) == (0.5, 1.0, 1.0)


def test_last_token_mode_expands_guides_alike(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path,
        "model: m\nalignment: last-token\nerase:\n  - concepts: [cat]\n    templates: object\n    guide: dog\n",
    )
    pairs = {p.source: p.targets[0][0] for p in plan.pairs}
    assert pairs["cat"] == "dog" and pairs["photo of cat"] == "photo of dog"
    assert plan.preserve == []
    assert (plan.lam, plan.erase_scale, plan.preserve_scale) == (0.5, 1.0, 1.0)


def test_moderate_and_default_guides(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path,
        "model: m\nalignment: last-token\nmoderate:\n  - concepts: [nudity]\n    templates: object\n"
        "erase:\n  - concepts: [car]\n",
    )
    assert all(p.targets == (("", 1.0),) for p in plan.pairs)  # "" is never template-expanded
    assert len(plan.pairs) == 1 + 6


def test_custom_templates_exactly_as_listed(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path, 'model: m\nerase:\n  - concepts: [x]\n    templates: ["a {} here", "{}!"]\n'
    )
    assert [p.source for p in plan.pairs] == ["a x here", "x!"]


def test_guide_broadcast_and_per_concept(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, "model: m\nerase:\n  - concepts: [a, b]\n    guide: [g1, g2]\n")
    assert [(p.source, p.targets[0][0]) for p in plan.pairs] == [("a", "g1"), ("b", "g2")]
    with pytest.raises(RecipeError, match=r"erase\.0\.guide: 2 guides for 3 concepts"):
        plan_of(tmp_path, "model: m\nerase:\n  - concepts: [a, b, c]\n    guide: [g1, g2]\n")


def test_duplicates_removed_and_scale_auto(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path,
        "model: m\nerase:\n  - concepts: [a, a, b]\n  - concepts: [b]\n"
        "preserve:\n  - concepts: [p, q, p]\n  - concepts: [q, r]\n",
    )
    assert [p.source for p in plan.pairs] == ["a", "b"]
    assert plan.preserve == ["", "p", "q", "r"]
    assert plan.preserve_scale == pytest.approx(max(0.1, 1 / (1 + 3)))
    assert plan.prompts() == ["a", "", "b", "p", "q", "r"]


def test_conflicts_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        plan_of(
            tmp_path,
            "model: m\nerase:\n  - concepts: [Kelly Mckernan]\nmoderate:\n  - concepts: [kelly  mckernan]\n"
            "preserve:\n  - concepts: [KELLY MCKERNAN, other]\n",
        )
    text = str(info.value)
    assert "moderate.0: prompt 'kelly  mckernan' is already edited" not in text  # different prompt
    assert "preserve.0: 'KELLY MCKERNAN' is both preserved and edited (erase.0)" in text
    assert "exclude_edited" in text
    with pytest.raises(RecipeError, match="already edited by erase.0 with another target"):
        plan_of(
            tmp_path,
            "model: m\nerase:\n  - concepts: [x]\n    guide: y\nmoderate:\n  - concepts: [x]\n",
        )


def test_exclude_edited(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path,
        "model: m\nerase:\n  - concepts: [a]\npreserve:\n  - concepts: [a, b]\n    exclude_edited: true\n",
    )
    assert plan.preserve == ["", "b"]
    assert plan.sections["preserve.0"] == {"concepts": 1, "excluded": 1, "prompts": 1}


def test_concept_files(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("alpha\n\n beta \nalpha\n")
    (tmp_path / "c.csv").write_text('name,artist\n1,"Van, Gogh"\n2,Monet\n3,Monet\n')
    plan = plan_of(
        tmp_path,
        "model: m\nerase:\n  - concepts_file: c.txt\npreserve:\n  - concepts_file: c.csv\n    column: artist\n",
    )
    assert [p.source for p in plan.pairs] == ["alpha", "beta"]
    assert plan.preserve == ["", "Van, Gogh", "Monet"]


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("concepts_file: nope.txt", "erase.0.concepts_file: concepts file"),
        ("concepts_file: c.csv", "is a csv: set `column` to one of: name, artist"),
        (
            "concepts_file: c.csv\n    column: painter",
            "has no column 'painter' — columns: name, artist",
        ),
        ("concepts_file: c.txt\n    column: x", "is not a csv, so `column` does not apply"),
        ("concepts_file: empty.txt", "lists no concepts"),
        ("concepts_file: upstream:nope.csv", "unknown upstream data file 'nope.csv'"),
    ],
)
def test_concept_file_errors(tmp_path: Path, group: str, expected: str) -> None:
    (tmp_path / "c.csv").write_text("name,artist\n1,Monet\n")
    (tmp_path / "c.txt").write_text("x\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(RecipeError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        plan_of(tmp_path, f"model: m\nerase:\n  - {group}\n")


def test_debias_pairs_replace_the_concept(tmp_path: Path) -> None:
    """Attribute prompts replace the concept (the published code); α is norm-relative in paper mode."""
    plan = plan_of(
        tmp_path,
        'model: m\ndebias:\n  - concepts: [doctor]\n    templates: ["image of {}"]\n'
        "    attributes: {male: 0.5, female: 0.5}\n    alphas: {male: 0.25, female: 0.5}\n",
    )
    assert plan.pairs == [
        EditPair(
            "debias.0",
            "doctor",
            "image of doctor",
            (
                ("image of doctor", 1.0),
                ("image of male", 0.25),
                ("image of female", 0.5),
            ),
            relative=True,
            attributes=("male", "female"),
        )
    ]
    assert plan.per_layer and plan.loop is None
    auto = plan_of(
        tmp_path,
        "model: m\nalignment: last-token\ndebias:\n  - concepts: [d]\n    attributes: [a, b, c]\n"
        "    alphas: auto\n",
    )
    assert [p.source for p in auto.pairs] == ["d"]
    assert auto.pairs[0].targets == (("d", 1.0), ("a", 0.0), ("b", 0.0), ("c", 0.0))
    assert auto.pairs[0].desired == (1 / 3, 1 / 3, 1 / 3) and not auto.pairs[0].relative
    assert auto.loop is not None and auto.loop.max_iterations == 30 and not auto.per_layer


def test_paths_relative_to_recipe(tmp_path: Path) -> None:
    (tmp_path / "models" / "base").mkdir(parents=True)
    plan = plan_of(
        tmp_path, "model: models/base\nerase:\n  - concepts: [x]\noutput:\n  dir: ../out\n"
    )
    assert plan.model == str((tmp_path / "models" / "base").resolve())
    assert plan.output_dir == tmp_path / ".." / "out"
    hub = plan_of(tmp_path, "model: CompVis/stable-diffusion-v1-4\nerase:\n  - concepts: [x]\n")
    assert hub.model == "CompVis/stable-diffusion-v1-4"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the upstream data mirror")
def test_upstream_concepts_file(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path,
        "model: m\nerase:\n  - concepts: [Thomas Kinkade]\npreserve:\n"
        "  - concepts_file: upstream:artists1734_prompts.csv\n    column: artist\n    exclude_edited: true\n",
    )
    assert plan.sections["preserve.0"]["excluded"] == 1
    assert len(plan.preserve) == 1 + 1733
