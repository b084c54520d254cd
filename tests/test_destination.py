"""Nothing lost: what --force may replace, filesystem errors, crash debris and its recovery, modes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app
from uce_cli.errors import OutputError, UceWarning
from uce_cli.weights import destination
from uce_cli.weights.destination import (
    MARKER_FILE,
    check_destination,
    finalize,
    recover_leftovers,
    resolve_destination,
    staging_dir,
)

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args: object, env: dict[str, str] | None = None):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_error(result, *needles: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".uce-" in p.name)


def fake_uce_output(folder: Path, files: dict[str, str] | None = None) -> Path:
    """A folder as uce leaves it: files plus an edit log listing them."""
    files = files if files is not None else {"a.txt": "old output", "sub/b.txt": "more"}
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    log = {
        "schema": 1,
        "versions": {"uce": "0.1.0"},
        "layers": {},
        "outputs": {rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in files.items()},
    }
    (folder / "edit_log.json").write_text(json.dumps(log))
    return folder


def recipe_for(model: Path | str) -> str:
    return f"model: {model}\nerase:\n  - concepts: [Kinkade]\npreserve:\n  - concepts: [Monet]\n"


# ---------------------------------------------------------------------------------------------
# Item 1: --force replaces only a uce output or an empty folder


def test_force_refuses_user_folder(tiny_model: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    recipe = write_recipe(victim, recipe_for(tiny_model))
    (victim / "thesis.tex").write_text("years of work")
    before = snapshot(victim)
    result = run("apply", recipe, "--out", victim, "--force")
    assert_error(result, f"output {victim} holds the input {recipe}")
    (tmp_path / "elsewhere.yaml").write_text(recipe.read_text())
    result = run("apply", tmp_path / "elsewhere.yaml", "--out", victim, "--force")
    assert_error(result, f"output {victim} already exists and is not a uce output")
    # without --force the hint is not "pass --force": that would delete the folder
    result = run("apply", tmp_path / "elsewhere.yaml", "--out", victim)
    assert_error(result, "is not a uce output")
    assert "pass --force" not in result.stderr
    assert snapshot(victim) == before


def test_force_refuses_cwd(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    work = fake_uce_output(
        tmp_path / "work"
    )  # even a uce output is not replaced while we sit in it
    before = snapshot(work)
    monkeypatch.chdir(work)
    assert_error(run("apply", recipe, "--out", ".", "--force"), "is the working folder")
    monkeypatch.chdir(work / "sub")
    assert_error(run("apply", recipe, "--out", "..", "--force"), "is the working folder")
    monkeypatch.chdir(tmp_path)  # the recipe's folder and the working folder at once
    assert_error(run("apply", recipe, "--out", ".", "--force"), "is the working folder")
    assert snapshot(work) == before and recipe.is_file()


def test_force_refuses_a_uce_output_holding_foreign_files(tmp_path: Path) -> None:
    out = fake_uce_output(tmp_path / "out")
    (out / "sub" / "my-notes.md").write_text("mine")
    with pytest.raises(
        OutputError, match="holds sub/my-notes.md, which is not part of that uce output"
    ):
        check_destination(out, None, force=True)
    (out / "sub" / "my-notes.md").unlink()
    check_destination(out, None, force=True)  # only uce's files: replaceable
    (out / "edit_log.json").write_text('{"schema": 1, "layers": {}}')  # not written by uce
    with pytest.raises(OutputError, match="is not a uce output"):
        check_destination(out, None, force=True)
    (out / "edit_log.json").write_text("[" * 100_000)  # hostile: deep nesting is no crash
    with pytest.raises(OutputError, match="is not a uce output"):
        check_destination(out, None, force=True)


def test_force_replaces_uce_output(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    out = fake_uce_output(tmp_path / "out")
    result = run("apply", recipe, "--out", out, "--force", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    log = json.loads((out / "edit_log.json").read_text())
    assert "layers" in log and not (out / "a.txt").exists()
    assert debris(tmp_path) == []


def test_force_refuses_an_evaluated_run_naming_its_eval_folder(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Issue 19 §13/§11: `uce eval RUN` writes RUN/eval/, which the run's edit log does not list:
    `apply --force` refuses it, naming eval/ (it used to delete it silently, and with it any user
    file put under eval/ once eval.json looked like a uce report)."""
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    out = tmp_path / "out"
    assert run("apply", recipe, "--out", out, "--quiet", "--device", "cpu").exit_code == 0
    assert run("eval", out, "--quiet", "--no-plots", "--device", "cpu").exit_code == 0
    (out / "eval" / "my-notes.md").write_text("mine")
    before = snapshot(out)
    result = run("apply", recipe, "--out", out, "--force", "--quiet", "--device", "cpu")
    assert_error(result, "holds eval/, the `uce eval` report of that run, which --force does not")
    assert snapshot(out) == before and debris(tmp_path) == []
    shutil.move(out / "eval", tmp_path / "kept-eval")
    result = run("apply", recipe, "--out", out, "--force", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert f"warning: --force: replacing the uce output {out}" in result.stderr  # said, not silent
    assert (tmp_path / "kept-eval" / "my-notes.md").read_text() == "mine"
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text('{"schema": 1}')
    assert_error(
        run("apply", recipe, "--out", out, "--force"), "holds eval/eval.json, which is not part"
    )
    assert (out / "eval" / "eval.json").read_text() == '{"schema": 1}'


def test_force_replaces_empty_folder(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    out = tmp_path / "empty"
    out.mkdir()
    assert_error(run("apply", recipe, "--out", out), "already exists — pass --force")
    result = run("apply", recipe, "--out", out, "--force", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert (out / "edit_log.json").is_file() and debris(tmp_path) == []


def test_force_rule_merge_transfer(tiny_model: Path, erased_model: Path, tmp_path: Path) -> None:
    edit = erased_model / "edit.safetensors"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "photo.jpg").write_bytes(b"\xff\xd8")
    for args in (
        ("merge", tiny_model, edit),
        ("transfer", erased_model / "operator.safetensors", "--model", tiny_model),
    ):
        assert_error(run(*args, "--out", victim, "--force"), "is not a uce output")
    assert (victim / "photo.jpg").read_bytes() == b"\xff\xd8"
    # the edit's own folder is a uce output, but it holds the input: replacing it would lose it
    before = snapshot(erased_model)
    assert_error(
        run("merge", tiny_model, edit, "--out", erased_model, "--force"),
        f"holds the input {edit}",
    )
    assert snapshot(erased_model) == before
    # a merge output is recognised as uce's own and is replaced with --force
    merged = tmp_path / "merged"
    assert run("merge", tiny_model, edit, "--out", merged, "--quiet").exit_code == 0
    assert_error(run("merge", tiny_model, edit, "--out", merged), "already exists — pass --force")
    again = run("merge", tiny_model, edit, "--out", merged, "--force", "--quiet")
    assert again.exit_code == 0, again.stderr
    assert debris(tmp_path) == []


def test_sample_never_overwrites_user_files(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    out.mkdir()
    (out / "manifest.json").write_text('{"my": "shipping manifest"}')
    result = run("sample", "--model", tiny_model, "--prompt", "a cat", "--out", out, "--steps", "1")
    assert_error(result, "manifest.json exists and was not written by uce sample")
    assert (out / "manifest.json").read_text() == '{"my": "shipping manifest"}'


def test_sample_never_overwrites_a_foreign_grid(
    tiny_model: Path, erased_model: Path, tmp_path: Path
) -> None:
    from PIL import Image

    out = tmp_path / "samples"
    (out / "grids").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(out / "grids" / "0.png")
    before = (out / "grids" / "0.png").read_bytes()
    result = run(
        "sample", "--edit", erased_model, "--model", tiny_model, "--compare", "--prompt", "a cat",
        "--out", out, "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu",
    )  # fmt: skip
    assert_error(result, "grids/0.png exists and was not drawn by uce sample")
    assert (out / "grids" / "0.png").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Item 6: filesystem cases


@pytest.mark.parametrize(
    ("where", "code", "text"),
    [
        ("staging", errno.EROFS, "Read-only file system"),
        ("writing", errno.ENOSPC, "No space left on device"),
        ("rename", errno.EACCES, "Permission denied"),
    ],
)
def test_readonly_out_clean_error(
    where: str,
    code: int,
    text: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tests run as root (chmod does not stop root), so the filesystem's refusal is injected."""
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    out = fake_uce_output(tmp_path / "out")
    before = snapshot(out)
    real_mkdtemp = tempfile.mkdtemp
    real_rename, real_replace = os.rename, os.replace

    def mkdtemp(*args: object, **kwargs: object) -> str:
        if where == "staging" and ".uce-tmp-" in str(kwargs.get("prefix", "")):
            raise OSError(code, text, str(kwargs.get("dir")))
        return real_mkdtemp(*args, **kwargs)  # type: ignore[arg-type]

    def sendfile(*args: object) -> int:
        # a full disk while copying the base's files into the output (shutil.copyfile and uce's
        # copy both go through sendfile; shutil then names the *source* file first)
        raise OSError(code, text)

    def renamer(real: object) -> object:
        def rename(src: object, dst: object, **kwargs: object) -> None:
            if where == "rename" and Path(str(src)).name.startswith(".out.uce-tmp-"):
                raise OSError(code, text, str(src), None, str(dst))
            real(src, dst, **kwargs)  # type: ignore[operator]

        return rename

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    if where == "writing":
        monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    result = run("apply", recipe, "--out", out, "--force", "--quiet", "--device", "cpu")
    assert_error(result, f"error: cannot write {out}: {text} — nothing was written")
    assert "the existing output is unchanged" in result.stderr
    assert str(tiny_model) not in result.stderr  # the output is named, not the base's file
    lines = [line for line in result.stderr.splitlines() if "--force: replacing" not in line]
    assert len(lines) == 1, lines
    assert snapshot(out) == before
    assert debris(tmp_path) == []


def test_name_too_long(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    out = tmp_path / ("n" * 240)  # fits the filesystem's 255, not with ".NAME.uce-tmp-XXXXXXXX"
    result = run("apply", recipe, "--out", out)
    assert_error(result, "is too long: 240 bytes, and uce needs 18 more")
    assert "n" * 61 not in result.stderr  # the name is shortened in the message
    assert not out.exists() and debris(tmp_path) == []


def test_impossible_output_names(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="contains a NUL byte"):
        resolve_destination(tmp_path / "a\x00b")
    with pytest.raises(OutputError, match="characters no file name can hold"):
        resolve_destination(tmp_path / "a\ud800b")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"{blocker} is not a folder"):
        check_destination(blocker / "deeper" / "out", None, force=False)


# ---------------------------------------------------------------------------------------------
# Items 6 and 7: the preserve cache is an optimisation; the builtin model's cache is not


def _preserve_entry() -> object:
    import torch

    from uce_cli.edit.cache import PreserveEntry

    return PreserveEntry(torch.eye(3, dtype=torch.float64), 3)


def test_cache_entry_is_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uce_cli.edit.cache import load_preserve, save_preserve

    monkeypatch.setenv("UCE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "preserve" / "k.safetensors").mkdir(parents=True)
    assert load_preserve("k") == (None, "miss")
    with pytest.warns(UceWarning, match=r"k\.safetensors: not a file\) — the run goes on"):
        assert save_preserve("k", _preserve_entry(), {}) is None
    (tmp_path / "cache" / "preserve" / "k.safetensors").rmdir()
    shutil.rmtree(tmp_path / "cache" / "preserve")
    (tmp_path / "cache" / "preserve").write_text("not a folder")  # `preserve/` is a file
    assert load_preserve("k") == (None, "miss")
    with pytest.warns(UceWarning, match="preserve: a file where a folder should be"):
        assert save_preserve("k", _preserve_entry(), {}) is None


def test_cache_dir_is_file(tiny_model: Path, tmp_path: Path) -> None:
    from uce_cli.edit.cache import load_preserve, save_preserve

    cache = tmp_path / "cache-file"
    cache.write_text("x")
    env = {**os.environ, "UCE_CACHE_DIR": str(cache)}
    # the builtin model lives in the cache: that is a clear error, not an internal one
    recipe = write_recipe(tmp_path, recipe_for("builtin:tiny-sd"))
    result = run("apply", recipe, "--out", tmp_path / "out", env=env)
    assert_error(result, f"{cache} is a file, not a folder — point UCE_CACHE_DIR at a folder")
    # the preserve cache is only an optimisation: a warning
    os.environ["UCE_CACHE_DIR"] = str(cache)  # restored by the autouse fixture's monkeypatch
    assert load_preserve("k") == (None, "miss")
    with pytest.warns(UceWarning, match="preserve statistics not cached"):
        assert save_preserve("k", _preserve_entry(), {}) is None
    assert cache.read_text() == "x"


def test_cache_unwritable_warns(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UCE_CACHE_DIR", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    real_open = os.open

    def full(path: str, flags: int, *args: object, **kwargs: object) -> int:
        # the preserve entry's temporary file becomes /dev/full: its write fails with ENOSPC
        folder = kwargs.get("dir_fd")
        where = os.readlink(f"/proc/self/fd/{folder}") if isinstance(folder, int) else ""
        if where.endswith("/preserve") and str(path).endswith(".uce-tmp"):
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", full)
    out = tmp_path / "out"
    result = run("apply", recipe, "--out", out, "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: preserve statistics not cached ("), (
        lines
    )
    assert "No space left on device) — the run goes on" in lines[0]
    assert (out / "edit_log.json").is_file()


# ---------------------------------------------------------------------------------------------
# Item 8: debris of interrupted runs, and its recovery


def _killed_run(out: Path, window: str) -> None:
    """Run uce's own staging/swap code in a child process and SIGKILL it at ``window``."""
    code = f"""
import os, signal
from pathlib import Path
from uce_cli.weights import destination
out, window = Path({str(out)!r}), {window!r}
stage = destination.staging_dir(out)
(stage / "new.txt").write_text("new output")
real = os.rename
def rename(src, dst):
    if window == "before-stage-rename" and Path(dst) == out:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    if window == "after-previous" and Path(dst).name == "previous":
        os.kill(os.getpid(), signal.SIGKILL)
    if window == "after-stage-rename" and Path(dst) == out:
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
if window != "staging":
    destination.finalize(stage, out, force=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_recover_after_kill_in_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _killed_run(out, "staging")
    (stage,) = debris(tmp_path)
    assert stage.startswith(".out.uce-tmp-") and (tmp_path / stage / MARKER_FILE).is_file()
    with pytest.warns(UceWarning, match=r"removed .*\.out\.uce-tmp-\w+, the unfinished output"):
        check_destination(out, None, force=False)
    assert debris(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize(
    ("window", "kept"),
    [
        ("after-previous", "old output"),  # out moved away, new output not yet in place
        ("before-stage-rename", "old output"),  # ... and the stage's own marker already gone
        ("after-stage-rename", "new output"),  # swap done, old output not yet deleted
    ],
)
def test_recover_after_kill_in_swap(window: str, kept: str, tmp_path: Path) -> None:
    out = fake_uce_output(tmp_path / "out")
    _killed_run(out, window)
    if kept == "old output":
        assert not out.exists()  # the state the issue describes: nothing under the final name
    assert any(".uce-old-" in name for name in debris(tmp_path))
    with pytest.warns(UceWarning) as caught:
        assert recover_leftovers(out)
    messages = " | ".join(str(w.message) for w in caught)
    assert debris(tmp_path) == [], messages
    if kept == "old output":
        assert f"restored {out}" in messages
        assert (out / "a.txt").read_text() == "old output" and not (out / "new.txt").exists()
    else:
        assert "restored" not in messages and "removed" in messages
        assert (out / "new.txt").read_text() == "new output" and not (out / "a.txt").exists()


def test_recovery_is_reported_by_the_cli(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    out = fake_uce_output(tmp_path / "out")
    _killed_run(out, "after-previous")
    result = run("apply", recipe, "--out", out)
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"warning: restored {out} from .out.uce-old-"), lines
    assert any(line.startswith("warning: removed ") for line in lines), lines
    assert lines[-1] == f"error: output {out} already exists — pass --force to replace it"
    assert result.exit_code == 1 and debris(tmp_path) == []


def test_live_debris_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    live = staging_dir(out)  # this process is alive
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = staging_dir(out)
        marker = json.loads((other / MARKER_FILE).read_text())
        marker.update(pid=sleeper.pid, start=destination._start_ticks(sleeper.pid))
        (other / MARKER_FILE).write_text(json.dumps(marker))
        remote = staging_dir(out)
        marker["host"] = "another-machine"
        (remote / MARKER_FILE).write_text(json.dumps(marker))
        unmarked = tmp_path / ".out.uce-tmp-abcd1234"
        unmarked.mkdir()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert recover_leftovers(out) == []
        messages = sorted(str(w.message) for w in caught)
        assert len(messages) == 4, messages
        assert sum("belongs to a running uce" in m for m in messages) == 2
        assert any(
            f"{remote} was left by pid {sleeper.pid} on host another-machine" in m for m in messages
        )
        assert any(f"{unmarked} has no uce run marker — left alone" in m for m in messages)
        assert all(p.is_dir() for p in (live, other, remote, unmarked))
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same leftovers once their process is gone
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        (done,) = recover_leftovers(out)
    assert done.startswith(f"removed {other}, the unfinished output of an interrupted run")
    assert not other.exists() and live.exists() and remote.exists()


def test_dead_pid_reused_counts_as_gone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stage = staging_dir(out)
    marker = json.loads((stage / MARKER_FILE).read_text())
    marker["start"] = "1"  # this pid runs, but it is not the process that wrote the marker
    (stage / MARKER_FILE).write_text(json.dumps(marker))
    if not destination._start_ticks(os.getpid()):
        pytest.skip("no /proc: process start times unknown")
    with pytest.warns(UceWarning, match="removed"):
        recover_leftovers(out)
    assert not stage.exists()


def test_ctrl_c_during_startup_is_one_line() -> None:
    code = (
        "import builtins\nreal = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'rich.table':\n        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "from uce_cli.cli import main\nmain()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 130
    assert done.stderr == "error: interrupted\n"


# ---------------------------------------------------------------------------------------------
# Item 10: file modes


def test_output_file_modes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uce_cli.commands.apply import run_apply
    from uce_cli.edit.plan import plan_recipe

    monkeypatch.setenv("UCE_CACHE_DIR", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    plan = plan_recipe(recipe)
    plan.formats = ["diffusers", "delta", "lora", "lora-kohya", "single-file", "operator"]
    previous = os.umask(0o022)
    try:
        out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=True).out
    finally:
        os.umask(previous)
    checked = 0
    for path in [out, *out.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
        checked += path.suffix == ".safetensors"
    assert checked >= 8  # every format's file and the preserve cache entry


def test_finalize_sets_modes_of_any_writer(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        stage = staging_dir(out)
        fd, name = tempfile.mkstemp(dir=stage)  # 0600, like safetensors' writer
        os.close(fd)
        finalize(stage, out, force=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / Path(name).name).stat().st_mode) == 0o640
    assert not (out / MARKER_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Item 15: a taken output fails before torch is imported


@pytest.mark.parametrize("command", ["apply", "merge", "transfer"])
def test_existing_output_fails_before_torch_import(
    command: str, erased_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    recipe = write_recipe(tmp_path, recipe_for("builtin:tiny-sd"))
    args = {
        "apply": ["apply", str(recipe)],
        "merge": ["merge", "builtin:tiny-sd", str(erased_model / "edit.safetensors")],
        "transfer": ["transfer", str(erased_model), "--model", "builtin:tiny-sd"],
    }[command] + ["--out", str(out)]
    code = (
        "import sys\nfrom uce_cli.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    exit_code, torch_loaded, diffusers_loaded = done.stdout.split()
    # fast because nothing heavy is imported (asserted), not timed
    assert (exit_code, torch_loaded, diffusers_loaded) == ("1", "False", "False"), done.stderr
    assert f"error: output {out} already exists — pass --force" in done.stderr
