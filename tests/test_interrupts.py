"""Ctrl-C is an interruption wherever it lands, even inside pydantic (issue 19 item 17): pydantic-core
wraps a KeyboardInterrupt raised while it builds a validator in a ``SchemaError``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import typer
from pydantic_core import SchemaError, SchemaValidator, core_schema
from typer.testing import CliRunner

import uce_cli.edit.recipe as recipe_module
from tests.conftest import write_recipe
from uce_cli.cli import app
from uce_cli.cli._common import handle_errors
from uce_cli.errors import is_interrupt

REPO = Path(__file__).resolve().parents[1]


class _CtrlC:
    """A literal whose repr is interrupted (Ctrl-C lands while pydantic-core builds the literal
    validator): pydantic-core reports it as a SchemaError."""

    def __repr__(self) -> str:
        raise KeyboardInterrupt


def _wrapped_interrupt() -> SchemaError:
    try:
        SchemaValidator(core_schema.literal_schema([_CtrlC()]))
    except SchemaError as exc:
        return exc
    raise AssertionError("pydantic-core no longer wraps it: this test needs another trigger")


def test_pydantic_core_wraps_ctrl_c_and_uce_recognises_it() -> None:
    exc = _wrapped_interrupt()
    assert is_interrupt(exc) and is_interrupt(KeyboardInterrupt())
    assert not is_interrupt(SchemaError("Error building validator: ValueError: x"))


def test_a_wrapped_ctrl_c_in_a_command_exits_130() -> None:
    @handle_errors
    def command() -> None:
        raise _wrapped_interrupt()

    with pytest.raises(typer.Exit) as stop, mock.patch("sys.stderr") as stderr:
        command()
    assert stop.value.exit_code == 130
    assert "interrupted" in "".join(str(c.args[0]) for c in stderr.write.call_args_list)


def test_a_wrapped_ctrl_c_while_validating_a_recipe_is_a_keyboard_interrupt(tmp_path: Path) -> None:
    def build_interrupted(*args: object, **kwargs: object) -> None:
        raise _wrapped_interrupt()

    with mock.patch.object(recipe_module.Recipe, "model_validate", build_interrupted):
        with pytest.raises(KeyboardInterrupt):
            recipe_module.parse_recipe({"model": "m"}, "r.yaml")
        recipe = write_recipe(tmp_path, "model: m\nerase:\n  - concepts: [a]\n")
        result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 130 and result.stderr == "error: interrupted\n", result.stderr


def test_ctrl_c_inside_a_validator_propagates(tmp_path: Path) -> None:
    def interrupted(template: str) -> None:
        raise KeyboardInterrupt

    with mock.patch.object(recipe_module, "split_template", interrupted):
        with pytest.raises(KeyboardInterrupt):
            recipe_module.parse_recipe(
                {"model": "m", "erase": [{"concepts": ["a"], "templates": ["{} x"]}]}, "r.yaml"
            )


def test_a_wrapped_ctrl_c_while_the_cli_loads_exits_130() -> None:
    """Ctrl-C while the CLI's models are defined (at import): one line, exit 130."""
    code = (
        "import pydantic._internal._model_construction as mc\n"
        "from pydantic_core import SchemaValidator, core_schema\n"
        "class C:\n"
        "    def __repr__(self): raise KeyboardInterrupt\n"
        "def interrupted(*a, **k):\n"
        "    SchemaValidator(core_schema.literal_schema([C()]))\n"
        "mc.create_schema_validator = interrupted\n"
        "import sys\n"
        "sys.modules.pop('uce_cli.cli', None)\n"
        "from uce_cli.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "validate", "x.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr == "error: interrupted\n"
