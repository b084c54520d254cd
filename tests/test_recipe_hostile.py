"""Hostile and careless recipes: each is a located recipe error (exit 1), never a hang or an internal error."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app
from uce_cli.edit.plan import expand, plan_recipe
from uce_cli.edit.recipe import MAX_SEED, load_recipe, parse_recipe
from uce_cli.errors import RecipeError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
PYDANTIC_WORDING = ("Input should", "Extra inputs", "Field required", "Value error", "[type=")


def recipe_problems(tmp_path: Path, text: str) -> str:
    """The problems of a recipe file, as ``uce validate`` prints them (exit 1, no traceback)."""
    recipe = write_recipe(tmp_path, text)
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: {recipe}: "), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    result.stderr.encode("utf-8")  # printable: no lone surrogate reached the terminal
    for wording in PYDANTIC_WORDING:
        assert wording not in result.stderr, result.stderr
    return result.stderr


ERASE = "erase:\n  - concepts: [x]\n"


# Item 4: templates are parsed, not counted.
@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("painting {{}}", "must contain exactly one {} where the concept goes, not 0"),
        ("{x}", "must use a plain {}"),
        ("{0}", "must use a plain {}"),
        ("{}}", "is not valid (Single '}' encountered"),
        ("{", "is not valid"),
        ("{:>999999999}", "must use a plain {}"),
        ("{!r}", "must use a plain {}"),
        ("{} and {}", "not 2"),
    ],
)
def test_template_escaped_braces_refused(tmp_path: Path, template: str, needle: str) -> None:
    text = recipe_problems(
        tmp_path, f"model: m\nerase:\n  - concepts: [a, b]\n    templates: [{template!r}]\n"
    )
    assert "erase.0.templates: template" in text and needle in text
    assert "— write {} once where the concept goes" in text


def test_template_literal_braces_keep_one_prompt_per_concept(tmp_path: Path) -> None:
    plan = plan_recipe(
        write_recipe(
            tmp_path, "model: m\nerase:\n  - concepts: [a, '{}']\n    templates: ['{{{}}} x']\n"
        )
    )
    assert [p.source for p in plan.pairs] == ["{a} x", "{{}} x"]
    assert expand("a {b}", ["<{}>"]) == ["<a {b}>"]  # the concept is inserted verbatim


# Item 5: bounded YAML.
def billion_laughs() -> str:
    lines = ["model: m", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    return "\n".join([*lines, "erase:\n  - concepts: *i\n"])


def test_alias_bomb_refused_fast(tmp_path: Path) -> None:
    bomb = billion_laughs()
    assert len(bomb) < 700  # ~10⁹ strings once expanded
    text = recipe_problems(tmp_path, bomb)  # refused at the node bound, never expanded
    assert "expands to more than 100,000 YAML nodes" in text
    assert len(text) < 400


def test_recursive_alias_refused(tmp_path: Path) -> None:
    text = recipe_problems(tmp_path, "model: m\nerase: &x\n  - concepts: *x\n")
    assert "alias *x refers to the collection that contains it" in text


def test_small_aliases_still_work(tmp_path: Path) -> None:
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            "model: m\nerase:\n  - concepts: &c [a, b]\n    guide: &g art\n"
            "moderate:\n  - concepts: [n]\n    templates: &t ['x {}']\n"
            "preserve:\n  - concepts: [p]\n    templates: *t\n",
        )
    )
    assert recipe.preserve[0].templates == ["x {}"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            f"model: m\n{ERASE}model: n\n",
            "line 4, column 1: duplicate key 'model' (first on line 1, again on line 4)",
        ),
        (
            "model: m\nerase:\n  - concepts: [a]\n    concepts: [b]\n",
            "duplicate key 'concepts' (first on line 3, again on line 4)",
        ),
        (f"model: m\n{ERASE}solver: {{lambda: 1, lambda: 2}}\n", "duplicate key 'lambda'"),
    ],
)
def test_duplicate_keys_refused(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in recipe_problems(tmp_path, text)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("!!set {a: null, b: null}", "!!set"),
        ("!!binary aGk=", "!!binary"),
        ("!!timestamp 2024-01-01", "!!timestamp"),
        ("!!python/object/apply:os.system ['true']", "!!python/object/apply:os.system"),
        ("!!omap [{a: 1}]", "!!omap"),
        ("!mine a", "!mine"),
        ("! a", "!"),
    ],
)
def test_tags_refused(tmp_path: Path, value: str, shown: str) -> None:
    text = recipe_problems(tmp_path, f"model: m\nerase:\n  - concepts: {value}\n")
    assert f"line 3, column 15: the YAML tag {shown} is not allowed in a recipe" in text


def test_plain_tags_allowed(tmp_path: Path) -> None:
    recipe = load_recipe(
        write_recipe(
            tmp_path, f"model: !!str m\n{ERASE}seed: !!int 7\nsolver: {{lambda: !!float 1}}\n"
        )
    )
    assert (recipe.model, recipe.seed, recipe.solver.lam) == ("m", 7, 1.0)


def test_long_input_truncated_in_message(tmp_path: Path) -> None:
    huge = "x" * 200_000
    text = recipe_problems(tmp_path, f"model: m\nerase: {huge}\n{huge[:1000]}: 1\n")
    assert "erase: must be a list (got 'xxxxxxxx" in text
    assert "unknown key `xxxx" in text
    assert max(len(line) for line in text.splitlines()) < 400
    big_list = "[" + ", ".join(["abc"] * 20_000) + "]"
    text = recipe_problems(tmp_path, f"model: {big_list}\n{ERASE}")
    assert "model: must be a string (got ['abc', 'abc'" in text
    assert max(len(line) for line in text.splitlines()) < 400


# Item 6: no internal errors.
@pytest.mark.parametrize(
    "body",
    [
        "erase: " + "[" * 10_000 + "]" * 10_000,
        "x:\n" + "".join("  " * i + "- \n" for i in range(1, 200)),
    ],
)
def test_deep_nesting(tmp_path: Path, body: str) -> None:
    assert "nested more than 50 levels deep" in recipe_problems(tmp_path, f"model: m\n{body}\n")


def test_deep_nesting_from_python() -> None:
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(RecipeError, match="nested too deeply"):
        parse_recipe({"model": "m", "erase": nested}, "r.yaml")


@pytest.mark.parametrize(
    ("seed", "needle"),
    [
        ("9" * 5000, "line 4, column 7: a number written with 5,000 characters is too large"),
        (str(2**64), f"seed: 18446744073709551616 is outside 0…{MAX_SEED}"),
        (str(2**63), f"seed: 9223372036854775808 is outside 0…{MAX_SEED}"),
        ("-1", "seed: -1 is outside"),
        ("1.5", "seed: must be a whole number (got 1.5)"),
        ("true", "seed: must be a whole number (got True)"),
        ("'3'", "seed: must be a whole number (got '3')"),
    ],
)
def test_huge_seed(tmp_path: Path, seed: str, needle: str) -> None:
    assert needle in recipe_problems(tmp_path, f"model: m\n{ERASE}seed: {seed}\n")


def test_largest_seed_accepted(tmp_path: Path) -> None:
    assert (
        load_recipe(write_recipe(tmp_path, f"model: m\n{ERASE}seed: {MAX_SEED}\n")).seed == MAX_SEED
    )


@pytest.mark.parametrize(
    ("body", "where", "shown"),
    [
        ('erase:\n  - concepts: ["a\\0b"]\n', "erase.0.concepts.0", "'a\\x00b'"),
        ('erase:\n  - concepts: ["\\ud800"]\n', "erase.0.concepts.0", "'\\ud800'"),
        (
            'erase:\n  - concepts: [a]\n    templates: ["x {} \\0"]\n',
            "erase.0.templates.0",
            "'x {} \\x00'",
        ),
        ('erase:\n  - concepts: [a]\n    guide: "\\e[31m"\n', "erase.0.guide", "'\\x1b[31m'"),
        (
            'debias:\n  - concepts: [d]\n    attributes: {"m\\0": 1}\n    alphas: {"m\\0": 1}\n',
            "debias.0.attributes",
            "'m\\x00'",
        ),
        (f'{ERASE}output: {{dir: "out\\0"}}\n', "output.dir", "'out\\x00'"),
        (f'{ERASE}revision: "\\udfff"\n', "revision", "'\\udfff'"),
    ],
)
def test_nul_and_surrogates(tmp_path: Path, body: str, where: str, shown: str) -> None:
    text = recipe_problems(tmp_path, f"model: m\n{body}")
    assert f"{where}: {shown} contains the character" in text


def test_nul_and_surrogate_model(tmp_path: Path) -> None:
    text = recipe_problems(tmp_path, f'model: "m\\0\\ud800"\n{ERASE}')
    assert "model: 'm\\x00\\ud800' contains the character '\\x00'" in text


def test_nul_in_concepts_file(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("a\nb\x00c\n")
    text = recipe_problems(tmp_path, "model: m\nerase:\n  - concepts_file: c.txt\n")
    assert "erase.0.concepts_file:" in text and "concept #1 'b\\x00c' contains a NUL" in text


# Item 2 (recipe side) and item 6: every number finite and in range.
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            "alphas: {male: -1e300, female: 0.3}",
            "debias.0.alphas: alpha of `male`: -1e+300 is outside -10…10",
        ),
        ("alphas: {male: .inf, female: 0.3}", "alpha of `male`: must be a finite number, not inf"),
        ("alphas: {male: .nan, female: 0.3}", "alpha of `male`: must be a finite number, not nan"),
        ("alphas: {male: 11, female: 0.3}", "|alpha| <= 10"),
        ("alphas: {male: true, female: 0.3}", "debias.0.alphas.male: must be a number (got True)"),
    ],
)
def test_nonfinite_alphas_refused(tmp_path: Path, body: str, needle: str) -> None:
    text = recipe_problems(
        tmp_path,
        f"model: m\ndebias:\n  - concepts: [d]\n    attributes: {{male: 0.5, female: 0.5}}\n    {body}\n",
    )
    assert needle in text


@pytest.mark.parametrize(
    ("attributes", "needle"),
    [
        ("{male: .nan, female: 0.5}", "ratio of `male`: must be a finite number, not nan"),
        ("{male: 1.5, female: -0.5}", "ratio of `male`: 1.5 is outside 0…1"),
        ("{male: 0.5, female: 0.4}", "debias.0.attributes: the desired ratios sum to 0.9, not 1"),
        ("{male: .inf, female: 0.5}", "must be a finite number, not inf"),
    ],
)
def test_bad_attribute_ratios_refused(tmp_path: Path, attributes: str, needle: str) -> None:
    text = recipe_problems(
        tmp_path,
        f"model: m\ndebias:\n  - concepts: [d]\n    attributes: {attributes}\n"
        "    alphas: {male: 0.3, female: 0.3}\n",
    )
    assert needle in text


@pytest.mark.parametrize("key", ["lambda", "erase_scale", "preserve_scale"])
@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (".nan", "must be a finite number, not nan"),
        (".inf", "must be a finite number, not inf"),
        ("-.inf", "must be a finite number, not -inf"),
        ("-1", "must be >= 0"),
        ("1e7", "1e+07 is outside 0…1e+06"),
        ("yes", "must be a number"),
    ],
)
def test_nonfinite_scales_refused(tmp_path: Path, key: str, value: str, needle: str) -> None:
    text = recipe_problems(tmp_path, f"model: m\n{ERASE}solver: {{{key}: {value}}}\n")
    assert f"solver.{key}: {needle}" in text
    if "outside" in needle or "finite" in needle:
        assert "scales are numbers in 0…1e+06" in text  # the hint states the bound


def test_exponent_numbers_read_as_numbers(tmp_path: Path) -> None:
    recipe = load_recipe(
        write_recipe(tmp_path, f"model: m\n{ERASE}solver: {{lambda: 1e-3, erase_scale: 2.5E+2}}\n")
    )
    assert (recipe.solver.lam, recipe.solver.erase_scale) == (0.001, 250.0)


class _FifoGuard(threading.Timer):
    """If a regression opens the FIFO, give it a writer (and EOF) after a while instead of hanging.

    ``reader_was_waiting`` says whether it had to: opening a FIFO's write end without blocking
    succeeds only while a reader has it open, so it is True exactly when uce opened the FIFO —
    what the tests assert, whatever the machine's load (no wall-clock bound).
    """

    reader_was_waiting = False

    def __init__(self, fifo: Path) -> None:
        super().__init__(30.0, self._open_writer)
        self.fifo = fifo

    def _open_writer(self) -> None:
        try:
            os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody is reading it
            return
        self.reader_was_waiting = True


def _unblock_fifo_later(fifo: Path) -> _FifoGuard:
    guard = _FifoGuard(fifo)
    guard.start()
    return guard


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_concepts_file_not_regular(tmp_path: Path, kind: str) -> None:
    if kind == "folder":
        target = tmp_path / "lists"
        target.mkdir()
    elif kind == "fifo":
        target = tmp_path / "c.txt"
        os.mkfifo(target)
    else:
        target = Path("/dev/null")
    timer = _unblock_fifo_later(target) if kind == "fifo" else None
    try:
        text = recipe_problems(tmp_path, f"model: m\nerase:\n  - concepts_file: {target}\n")
    finally:
        if timer is not None:
            timer.cancel()
    assert timer is None or not timer.reader_was_waiting  # never opened the FIFO
    assert "erase.0.concepts_file: concepts file" in text
    expected = "is a folder, not a regular file" if kind == "folder" else "is not a regular file"
    assert expected in text and "does not exist" not in text


def test_recipe_file_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    timer = _unblock_fifo_later(fifo)
    try:
        with pytest.raises(RecipeError, match="not a regular file"):
            load_recipe(fifo)
    finally:
        timer.cancel()
    assert not timer.reader_was_waiting  # never opened the FIFO


# Item 15: a missing local model is a recipe error, found without torch.
@pytest.mark.parametrize(
    "model",
    [
        "./nope",
        "../nope",
        "/no/such/uce/model",
        "~/no-such-uce-model",
        "a/b/c",
        "m.safetensors",
        "x.ckpt",
    ],
)
def test_local_model_path_missing(tmp_path: Path, model: str) -> None:
    text = recipe_problems(tmp_path / "r", f"model: {model}\n{ERASE}")
    assert "recipe.yaml: model: local path /" in text and "does not exist — check the path" in text
    assert Path(model).name in text


@pytest.mark.parametrize(
    "model", ["CompVis/stable-diffusion-v1-4", "builtin:tiny-sd", "m", "sub/base"]
)
def test_hub_ids_and_existing_paths_pass_offline(tmp_path: Path, model: str) -> None:
    (tmp_path / "sub" / "base").mkdir(parents=True)
    plan = plan_recipe(write_recipe(tmp_path, f"model: {model}\n{ERASE}"))
    expected = str(tmp_path / "sub" / "base") if model == "sub/base" else model
    assert plan.model == expected


def test_missing_model_found_without_torch(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: ./missing-model\n{ERASE}")
    code = (
        "import sys\nfrom uce_cli.cli import app\n"
        f"try:\n    app(['validate', {str(recipe)!r}])\nexcept SystemExit as e:\n    assert e.code == 1, e.code\n"
        "assert 'torch' not in sys.modules, 'validate imported torch'\nprint('no torch')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "no torch" in done.stdout
    assert "model: local path" in done.stderr and "missing-model does not exist" in done.stderr


# Item 17: the project's own wording.
def test_messages_use_project_wording(tmp_path: Path) -> None:
    text = recipe_problems(
        tmp_path,
        "alignment: sideways\nerase:\n  - concepts: [a, 1984]\n    templatse: art\n"
        "debias:\n  - concepts: [d]\nsolver: {lambda: abc}\nlayers: {projections: []}\n",
    )
    for needle in [
        "(top level): missing required key `model` — add it: hub id",
        "alignment: must be 'paper' or 'last-token' (got 'sideways')",
        "erase.0.concepts.1: must be a string (got 1984) — quote it to make it text",
        "erase.0: unknown key `templatse` — did you mean `templates`? allowed keys: concepts,",
        "debias.0: missing required key `attributes` — add it",
        "solver.lambda: must be a number (got 'abc')",
        "layers.projections: must not be empty",
    ]:
        assert needle in text, text


def test_counts_in_singular(tmp_path: Path, tiny_model: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_model}\nalignment: last-token\n{ERASE}")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.stderr
    assert ": 1 edit prompt, 0 preserve prompts, last-token alignment" in result.stdout
    result = runner.invoke(app, ["apply", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "1 concept, 1 prompt" in result.stdout
    assert "'x' → ''  [1 vector from token 1]" in result.stdout
    assert "1 edit prompt, 0 preserve prompts, 2 unique prompts to encode" in result.stdout


# Item 12: the paths as written stay on the plan for the edit log.
def test_recipe_paths_exposed(tmp_path: Path) -> None:
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "c.txt").write_text("a\n")
    (tmp_path / "lists" / "p.txt").write_text("p\n")
    plan = plan_recipe(
        write_recipe(
            tmp_path / "recipes",
            "model: ../models/base\nerase:\n  - concepts_file: ../lists/c.txt\n"
            "preserve:\n  - concepts_file: ../lists/p.txt\noutput: {dir: ../../elsewhere/out}\n",
        )
    )
    assert plan.recipe_paths == {
        "model": "../models/base",
        "erase.0.concepts_file": "../lists/c.txt",
        "preserve.0.concepts_file": "../lists/p.txt",
        "output.dir": "../../elsewhere/out",
    }
    assert plan.model == str((tmp_path / "models" / "base").resolve())
    assert plan.output_dir == tmp_path / "recipes" / "../../elsewhere/out"
