"""Nothing written outside the output (issue 19): links planted in output folders, the sample lock,
what --force may delete, incomplete launches, and the errors met on the way (HOME, pids, loops)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app
from uce_cli.errors import OutputError, UceWarning
from uce_cli.safe_files import UnsafePathError, create_dir, write_file, write_json
from uce_cli.weights import destination
from uce_cli.weights.destination import MARKER_FILE, check_destination, recover_leftovers

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
SAMPLE = ["sample", "--steps", "2", "--quiet", "--device", "cpu"]


def run(*args: object, env: dict[str, str] | None = None):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_error(result, *needles: str) -> None:  # noqa: ANN001
    """Exit 1, one `error:` line holding every needle, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.stdout)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def user_file(tmp_path: Path, text: str = "the user's own file\n") -> Path:
    """A file outside every output, which uce must never change."""
    path = tmp_path / "user" / "precious.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def recipe_for(model: Path | str) -> str:
    return f"model: {model}\nerase:\n  - concepts: [Kinkade]\npreserve:\n  - concepts: [Monet]\n"


def dead_pid() -> int:
    """A pid that ran and ended (its process is gone)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def marker(pid: int, **extra: object) -> dict[str, object]:
    return {"tool": "uce", "phase": "swap", "pid": pid, "host": socket.gethostname(), **extra}


# ---------------------------------------------------------------------------------------------
# §1 the safe writer itself


def test_write_file_refuses_a_link_at_the_destination(tmp_path: Path) -> None:
    precious = user_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").symlink_to(precious)
    with pytest.raises(UnsafePathError, match=r"eval\.json is a symbolic link where uce writes"):
        write_json(out / "eval.json", {"a": 1}, root=out)
    assert precious.read_text() == "the user's own file\n"
    assert [p.name for p in out.iterdir()] == ["eval.json"]  # no temporary file left behind


def test_create_dir_refuses_a_linked_folder_below_the_root(tmp_path: Path) -> None:
    victim = tmp_path / "user"
    victim.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "base").symlink_to(victim, target_is_directory=True)
    with pytest.raises(UnsafePathError, match=r"out/base is a symbolic link where uce writes its"):
        create_dir(out / "base" / "deeper", root=out)
    with pytest.raises(UnsafePathError, match="out/base is a symbolic link"):
        write_file(out / "base" / "x.png", b"png", root=out)
    assert list(victim.iterdir()) == []
    # The root itself may be reached through a link: that is the user's own choice.
    alias = tmp_path / "alias"
    alias.symlink_to(out, target_is_directory=True)
    write_file(alias / "grids" / "g.png", b"png", root=alias)
    assert (out / "grids" / "g.png").read_bytes() == b"png"


def test_write_file_replaces_a_regular_file_atomically_with_default_modes(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    hard = tmp_path / "hard-link"
    os.link(target, hard)
    write_file(target, "new")
    assert target.read_text() == "new" and hard.read_text() == "old"  # a new inode, not in place
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_full_disk_names_the_file_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def full(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".uce-tmp"):  # the temporary file writes to /dev/full: ENOSPC
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", full)
    target = tmp_path / "out" / "manifest.json"
    with pytest.raises(OSError) as caught:
        write_json(target, {"images": ["x" * 100_000]}, root=tmp_path / "out")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# §1 eval and sample through links planted in their folders


@pytest.fixture()
def run_folder(erased_model: Path, tmp_path: Path) -> Path:
    """A private copy of a finished run (eval writes into it)."""
    folder = tmp_path / "run"
    shutil.copytree(erased_model, folder)
    return folder


@pytest.mark.parametrize("name", [".eval.json.tmp", ".eval.md.tmp"])
def test_eval_never_writes_through_a_planted_temporary_name(
    run_folder: Path, tmp_path: Path, name: str
) -> None:
    precious = user_file(tmp_path)
    (run_folder / "eval").mkdir()
    (run_folder / "eval" / name).symlink_to(precious)
    result = run("eval", run_folder, "--quiet", "--no-plots", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert precious.read_text() == "the user's own file\n"
    assert json.loads((run_folder / "eval" / "eval.json").read_text())["schema"]


def test_eval_refuses_a_plot_that_is_a_link(run_folder: Path, tmp_path: Path) -> None:
    precious = user_file(tmp_path)
    (run_folder / "eval").mkdir()
    (run_folder / "eval" / "layers.png").symlink_to(precious)
    result = run("eval", run_folder, "--quiet", "--device", "cpu")
    assert_error(result, "eval/layers.png is a symbolic link where uce writes its own file")
    assert precious.read_text() == "the user's own file\n"


def test_eval_refuses_an_eval_folder_that_is_a_link(run_folder: Path, tmp_path: Path) -> None:
    victim = tmp_path / "user"
    victim.mkdir()
    (run_folder / "eval").symlink_to(victim, target_is_directory=True)
    result = run("eval", run_folder, "--quiet", "--no-plots", "--device", "cpu")
    assert_error(result, "eval is a symbolic link where uce writes its own folder")
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize(("sub", "compare"), [("base", False), ("grids", True)])
def test_sample_refuses_its_subfolders_as_links(
    erased_model: Path, tiny_model: Path, tmp_path: Path, sub: str, compare: bool
) -> None:
    victim = tmp_path / "user"
    victim.mkdir()
    out = tmp_path / "samples"
    out.mkdir()
    (out / sub).symlink_to(victim, target_is_directory=True)
    args = ["--edit", erased_model, "--compare"] if compare else ["--model", tiny_model]
    result = run(*SAMPLE, *args, "--prompt", "a cat", "--out", out)
    assert_error(result, f"samples/{sub} is a symbolic link where uce writes its own folder")
    assert list(victim.iterdir()) == []


def test_sample_refuses_an_image_that_is_a_link(tiny_model: Path, tmp_path: Path) -> None:
    precious = user_file(tmp_path)
    out = tmp_path / "samples"
    (out / "base").mkdir(parents=True)
    (out / "base" / "0-0.png").symlink_to(precious)
    result = run(*SAMPLE, "--model", tiny_model, "--prompt", "a cat", "--out", out)
    assert_error(result, "base/0-0.png is a symbolic link where uce writes its own file")
    assert precious.read_text() == "the user's own file\n"


# ---------------------------------------------------------------------------------------------
# §1 recovery never follows or moves a link


def test_recovery_never_restores_a_previous_that_is_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "user"
    victim.mkdir()
    (victim / "mine.txt").write_text("mine")
    out = tmp_path / "out"
    old = tmp_path / ".out.uce-old-abcd1234"
    old.mkdir()
    (old / MARKER_FILE).write_text(json.dumps(marker(dead_pid())))
    (old / "previous").symlink_to(victim, target_is_directory=True)
    with pytest.warns(UceWarning, match="previous is a symbolic link"):
        recover_leftovers(out)
    assert not out.exists() and not out.is_symlink()  # the link was not moved to the output
    assert (victim / "mine.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# §5 HOME unset, huge pids, link loops


def test_tilde_in_a_recipe_without_a_home_is_a_recipe_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, recipe_for("~/models/sd"))
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr("pwd.getpwuid", _no_user)  # no passwd entry either (containers)
    result = run("apply", recipe, "--out", tmp_path / "out", "--dry-run")
    assert_error(result, "recipe: model '~/models/sd': cannot expand '~'")


def _no_user(uid: int) -> None:
    raise KeyError(uid)


def test_marker_with_a_pid_beyond_pid_t_is_foreign(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = tmp_path / ".out.uce-old-abcd1234"
    old.mkdir()
    (old / MARKER_FILE).write_text(json.dumps(marker(2**64)))
    with pytest.warns(UceWarning, match="has no uce run marker — left alone"):
        assert recover_leftovers(out) == []
    assert old.is_dir()


def test_out_inside_a_symlink_loop_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    result = run("apply", recipe, "--out", tmp_path / "a" / "out")
    assert_error(result, "symbolic links loop there; choose another --out")


# ---------------------------------------------------------------------------------------------
# §13 --force replaces only what a valid uce log lists


@pytest.mark.parametrize(
    "outputs",
    [
        None,
        "missing",
        [],
        ["notes.txt"],
        {"notes.txt": "x"},
        {"notes.txt": "0" * 64, "../outside.txt": "0" * 64},
    ],
    ids=["null", "missing", "empty-list", "list", "not-a-digest", "escapes"],
)
def test_force_never_trusts_a_log_without_a_valid_file_list(
    tmp_path: Path, outputs: object
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's notes")
    log: dict[str, object] = {"schema": 1, "versions": {"uce": "0.1.0"}}
    if outputs != "missing":
        log["outputs"] = outputs
    (out / "edit_log.json").write_text(json.dumps(log))
    with pytest.raises(OutputError, match="is not a uce output"):
        check_destination(out, None, force=True)
    assert (out / "notes.txt").read_text() == "a user's notes"


# ---------------------------------------------------------------------------------------------
# §15 the sample folder lock and this run's rank manifests


def test_sample_refuses_a_folder_another_live_run_holds(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    out.mkdir()
    lock = out / destination.SAMPLE_LOCK
    lock.write_text(
        json.dumps(marker(os.getpid(), start=destination._start_ticks(os.getpid()), run="r1"))
    )
    result = run(*SAMPLE, "--model", tiny_model, "--prompt", "a cat", "--out", out)
    assert_error(result, "is being written by another uce sample", str(lock))
    assert sorted(p.name for p in out.iterdir()) == [destination.SAMPLE_LOCK]


def test_sample_takes_over_a_dead_runs_lock_and_ignores_other_runs_rank_manifests(
    tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "samples"
    (out / "base").mkdir(parents=True)
    (out / destination.SAMPLE_LOCK).write_text(json.dumps(marker(dead_pid(), run="old")))
    # A killed launched run of other settings left its rank manifest and an image of its own.
    (out / "base" / "9-5.png").write_bytes(b"not ours")
    stale = {"schema": 1, "rank": 1, "run": "old", "settings": {}, "images": [{"path": "base/9-5.png", "prompt": "other"}]}  # fmt: skip
    (out / "manifest.rank-1.json").write_text(json.dumps(stale))
    result = run(*SAMPLE, "--model", tiny_model, "--prompt", "a cat", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "took over" in result.stderr and "left by an interrupted run" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["path"] for e in manifest["images"]] == ["base/0-0.png"]
    assert not (out / destination.SAMPLE_LOCK).exists()  # released at the end


# ---------------------------------------------------------------------------------------------
# §16 a stray WORLD_SIZE is not a launch


def test_stray_world_size_fails_at_once_instead_of_waiting(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29531",
        "UCE_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    for name in ("RANK", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "uce_cli", *SAMPLE, "--model", "builtin:tiny-sd"]
    command += ["--prompt", "a cat", "--out", str(tmp_path / "samples")]
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a plain run with a stray WORLD_SIZE=2 waited for a second rank")
    assert done.returncode == 1, done.stderr
    assert "error: WORLD_SIZE=2 is set, but RANK, LOCAL_RANK are not set" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ---------------------------------------------------------------------------------------------
# §17 full disks and prompt files that are not files


def test_full_disk_under_the_preserve_cache_only_warns(tmp_path: Path) -> None:
    """A real failing write (RLIMIT_FSIZE: the kernel refuses the bytes) through the real writer."""
    code = textwrap.dedent(
        """
        import resource, signal, warnings, torch
        from uce_cli.edit.cache import PreserveEntry, save_preserve
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stored = save_preserve("k", PreserveEntry(torch.eye(64, dtype=torch.float64), 3), {})
        print(stored, "|", caught[0].message if caught else "no warning")
        """
    )
    env = {**os.environ, "UCE_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("None | preserve statistics not cached ("), done.stdout
    assert "File too large) — the run goes on" in done.stdout
    assert list((tmp_path / "cache" / "preserve").iterdir()) == []  # no partial entry


def test_prompts_file_that_is_a_folder_or_a_fifo_says_so(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "prompts.csv"
    folder.mkdir()
    result = run(*SAMPLE, "--model", tiny_model, "--prompts-file", folder, "--out", tmp_path / "s")
    assert_error(result, f"prompts file {folder} is a folder, not a regular file")
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    result = run(*SAMPLE, "--model", tiny_model, "--prompts-file", fifo, "--out", tmp_path / "s")
    assert_error(result, f"prompts file {fifo} is not a regular file (a pipe")


def test_full_disk_under_out_names_the_output_not_the_base(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))

    def sendfile(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", sendfile)
    out = tmp_path / "out"
    result = run(
        "apply", recipe, "--out", out, "--quiet", "--device", "cpu", "--format", "diffusers"
    )
    assert_error(result, f"cannot write {out}: No space left on device — nothing was written")
    assert str(tiny_model) not in result.stderr
    assert not out.exists()


def test_marker_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    """A marker that is a link (to a file holding a dead run's marker) is not uce's marker."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(marker(dead_pid())))
    stage = tmp_path / ".out.uce-tmp-abcd1234"
    stage.mkdir()
    (stage / MARKER_FILE).symlink_to(elsewhere)
    with pytest.warns(UceWarning, match="has no uce run marker — left alone"):
        recover_leftovers(tmp_path / "out")
    assert stage.is_dir()
