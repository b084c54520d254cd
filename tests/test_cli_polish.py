"""What every command shares: -h, one metavar vocabulary, the common options, output that is not cut."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # name → the command Typer built

# The metavar vocabulary: what a value is, the same word in every command.
METAVARS = {"RECIPE", "DIR", "MODEL", "EDIT", "FILE", "N", "FLOAT", "TEXT", "FORMAT", "CLASS"}
CHOICES = re.compile(r"^<\w+(\|\w+)+>$")  # Typer's rendering of an enum, e.g. <auto|cpu|cuda|mps>


def test_help_short_flag_everywhere() -> None:
    assert set(COMMANDS) == {
        "validate",
        "apply",
        "show",
        "merge",
        "transfer",
        "verify",
        "sample",
        "eval",
        "compare",
        "attack",
    }
    for args in ([], *([name] for name in COMMANDS)):
        result = runner.invoke(app, [*args, "-h"])
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout.startswith("Usage: uce"), (args, result.stdout)
        assert "-h, --help" in result.stdout, args
        assert result.stdout == runner.invoke(app, [*args, "--help"]).stdout


def metavars() -> dict[tuple[str, str], str]:
    """(command, option or argument position) → the metavar its help shows."""
    found = {}
    for name in COMMANDS:
        text = runner.invoke(app, [name, "-h"], env={"COLUMNS": "250"}).stdout
        usage = text.splitlines()[0]
        for i, arg in enumerate(usage.split("[OPTIONS]")[1].split()):
            found[(name, f"arg{i}")] = arg.removesuffix("...").strip("{}[]")
        for match in re.finditer(r"^ {2}(?:-\w, )?(--[\w-]+)(?: (\S+))? {2,}", text, re.M):
            if match.group(2):
                found[(name, match.group(1))] = match.group(2)
    return found


def test_metavars_consistent() -> None:
    found = metavars()
    for (command, label), metavar in found.items():
        assert metavar in METAVARS or CHOICES.match(metavar), f"uce {command} {label}: {metavar}"
    by_option: dict[str, set[str]] = {}
    for (_, label), metavar in found.items():
        if label.startswith("--"):
            by_option.setdefault(label, set()).add(metavar)
    assert {k: v for k, v in by_option.items() if len(v) > 1} == {}
    expected = {
        ("validate", "arg0"): "RECIPE",
        ("apply", "arg0"): "RECIPE",
        ("apply", "--out"): "DIR",
        ("show", "arg0"): "DIR",
        ("merge", "arg0"): "MODEL",
        ("merge", "arg1"): "EDIT",
        ("transfer", "arg0"): "EDIT",
        ("transfer", "--model"): "MODEL",
        ("verify", "arg0"): "EDIT",
        ("verify", "--base"): "MODEL",
        ("sample", "--edit"): "EDIT",
        ("sample", "--prompts-file"): "FILE",
        ("sample", "--steps"): "N",
        ("apply", "--batch-size"): "N",
    }
    assert {k: found[k] for k in expected} == expected


# Where the common options mean something: --json everywhere; --quiet wherever something is
# printed besides the result; --device/--dtype/--batch-size where a model is run.
COMMON = {
    "validate": {"--json", "--quiet"},
    "apply": {"--json", "--quiet", "--device", "--dtype", "--batch-size", "--no-cache"},
    "show": {"--json"},
    "merge": {"--json", "--quiet"},
    "transfer": {"--json", "--quiet"},
    "verify": {"--json", "--quiet"},
    "sample": {"--json", "--quiet", "--device", "--dtype", "--batch-size"},
    # eval encodes in float32 always, so its figures do not depend on a compute dtype
    "eval": {"--json", "--quiet", "--device", "--batch-size"},
    "compare": {"--json", "--quiet"},
    # attack encodes in float32 too (its figures compare with eval's)
    "attack": {"--json", "--quiet", "--device", "--batch-size"},
}


def test_common_options_present() -> None:
    for name, command in COMMANDS.items():
        options = {opt for param in command.params for opt in param.opts}
        assert COMMON[name] <= options, (name, COMMON[name] - options)
        if "--quiet" in options:
            assert "-q" in options, name


def test_validate_quiet_prints_only_problems(tmp_path: Path) -> None:
    good = write_recipe(tmp_path, "model: builtin:tiny-sd\nerase:\n  - concepts: [x]\n", "g.yaml")
    result = runner.invoke(app, ["validate", "-q", str(good)])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    bad = write_recipe(tmp_path, "model: builtin:tiny-sd\nerase: 3\n", "b.yaml")
    result = runner.invoke(app, ["validate", "-q", str(good), str(bad)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {bad}: erase")


def test_show_piped_not_truncated(erased_model: Path) -> None:
    """Piped into another program, `uce show` prints every layer name whole, one row each."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run(
        [sys.executable, "-m", "uce_cli", "show", str(erased_model)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,  # a hang guard, not a speed bound
    )
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    layers = json.loads((erased_model / "edit_log.json").read_text())["layers"]
    assert len(layers) == 14
    for key in layers:
        name = key.removesuffix(".weight")
        rows = [line for line in done.stdout.splitlines() if f" {name} " in line]
        assert len(rows) == 1, (name, done.stdout)


def test_show_narrow_terminal_folds_names(erased_model: Path) -> None:
    result = runner.invoke(app, ["show", str(erased_model)], env={"COLUMNS": "60"})
    assert result.exit_code == 0
    assert "…" not in result.stdout
    text = re.sub(r"[│┃\s]", "", result.stdout)
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in text.replace("unet.", "")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e309", "1001"])
def test_sample_guidance_nan(erased_model: Path, tmp_path: Path, value: str) -> None:
    out = tmp_path / "samples"
    result = runner.invoke(
        app,
        [
            "sample",
            "--edit",
            str(erased_model),
            "-p",
            "x",
            f"--guidance={value}",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: --guidance ") and "from 0 to 1000" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_sample_steps_and_counts_are_usage_errors(erased_model: Path, tmp_path: Path) -> None:
    for option in ("--steps=-1", "--n=0", "--batch-size=0", "--seed=-1", "--height=0"):
        result = runner.invoke(app, ["sample", "--edit", str(erased_model), "-p", "x", option])
        assert result.exit_code == 2, (option, result.output)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_verify_rtol_must_be_finite(erased_model: Path, value: str) -> None:
    result = runner.invoke(
        app, ["verify", str(erased_model), "--against", str(erased_model), f"--rtol={value}"]
    )
    assert result.exit_code == 2, result.output
    assert "--rtol" in result.stderr


def test_full_disk_while_sampling_is_one_line(
    erased_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while writing images is the machine's problem, said in one line (not an
    internal error); a programming OSError stays an internal error."""
    import errno

    from uce_cli import grid

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s" / "x.png"))

    monkeypatch.setattr(grid.Image.Image, "save", full)
    args = ["sample", "--edit", str(erased_model), "-p", "x", "--steps", "2", "--out"]
    result = runner.invoke(app, [*args, str(tmp_path / "s")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write or read "), lines
    assert "No space left on device — free some disk space" in lines[0]
    assert "internal error" not in result.stderr

    def bug(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(grid.Image.Image, "save", bug)
    result = runner.invoke(app, [*args, str(tmp_path / "t")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: internal error: OSError"), result.stderr
