"""Where an output may go: destination checks, staging folders, run markers and crash recovery.

Torch-free, so the CLI refuses a bad ``--out`` before it loads a model.

**What ``--force`` may replace.** An existing output folder is replaced only when it is empty or
is itself a uce output: its ``edit_log.json`` is a JSON object written by uce (``schema`` and
``versions.uce``, as every ``uce apply``/``merge``/``transfer`` log has) whose ``outputs`` is a
non-empty map of relative file names to sha256 digests (a log without it, or of any other shape,
proves nothing), and every file in the folder is that log or one it lists — file by file, links
never. A folder holding anything else (the working folder, a recipe's folder, ``$HOME``, a uce
output into which other files were put, the ``eval/`` that ``uce eval`` wrote into a run) is
refused, naming the folder and the first foreign file. The working folder (or one holding it) and
a folder holding one of the command's inputs are refused even when uce wrote them. A replacement
is announced (``warning: --force: replacing …``). A ``uce sample`` folder (``manifest.json``) is
never replaced: sample resumes into it and only ever adds or rewrites its own images, grids and
manifest (``check_sample_out``), one run at a time (``lock_sample_out``).

Every file is written through ``uce_cli.safe_files`` (never through a link planted in a folder).

**Staging and the swap.** Outputs are written into ``.NAME.uce-tmp-XXXXXXXX`` beside ``NAME``
(same filesystem, so renames are atomic); it holds a marker file ``.uce-run.json`` (pid, host,
boot id, process start time, timestamp, phase). When the output is complete, file modes are set
to the umask's and the marker is removed, then:

- without an old output, the staging folder is renamed to ``NAME``;
- with ``--force``, an ``.NAME.uce-old-XXXXXXXX`` folder is made with its own marker (phase
  ``swap``, naming the staging folder), ``NAME`` is renamed to ``old/previous``, the staging folder
  to ``NAME``, then ``previous``, the marker and the old folder are deleted, in that order.

**Recovery.** Before a destination is checked, leftovers of earlier runs into it are examined. A
leftover is *ours to fix* when its marker names this host and a process that is gone (pid not
running, or running with another start time, or another boot). An interrupted run is rolled back,
as if it had never started:

- an old folder with ``previous`` while ``NAME`` is missing (killed inside the swap): ``previous``
  is renamed back to ``NAME``;
- an old folder with ``previous`` while ``NAME`` exists (killed after the swap, before the
  clean-up), or without ``previous`` (killed before or after it): the old folder is deleted;
- a staging folder (killed while writing, or inside the swap — its output is then discarded in
  favour of the restored one): it is deleted, as is an unmarked staging folder that a dead old
  folder's marker names (killed between removing its marker and renaming it).

Each action is reported as a ``UceWarning`` (the CLI prints ``warning: …``). Leftovers of a live
process, of another host, or without a readable marker (a marker that is a link, or names a pid
no process can have, is not one) are left alone, with a warning naming them. Recovery never
follows or moves a link: an old folder whose ``previous`` is one is left alone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from uce_cli.errors import OutputError, UceWarning
from uce_cli.paths import expand_home
from uce_cli.safe_files import create_dir, link_refusal, write_file

EDIT_LOG_FILE = "edit_log.json"
SAMPLE_MANIFEST = "manifest.json"
MARKER_FILE = ".uce-run.json"
PREVIOUS = "previous"
# mkdtemp's random part is 8 characters; the longest name uce puts beside NAME is ".NAME.uce-old-XXXXXXXX".
_SUFFIX_BYTES = len(".") + len(".uce-old-") + 8
_MAX_LOG_BYTES = 256 << 20
_MAX_MARKER_BYTES = 64 << 10
_MAX_PID = 2**31 - 1  # pid_t; a marker naming a larger pid is not one uce wrote
# Room kept for the deepest file uce writes inside an output (e.g. "text_encoder/model.safetensors").
_INNER_PATH_BYTES = 96


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both already resolved)."""
    return path == folder or folder in path.parents


def resolve_destination(out: Path | str) -> Path:
    """``out`` made absolute (user folder expanded, symlinks resolved), refusing impossible names.

    Raises:
        OutputError: a NUL byte or characters no file name can hold.
    """
    text = str(out)
    if "\x00" in text:
        raise OutputError(
            f"output path {_short(text)!r} contains a NUL byte — choose another --out"
        )
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        raise OutputError(
            f"output path {_short(text)!r} holds characters no file name can hold — choose another --out"
        ) from None
    path = expand_home(text, "--out", OutputError)
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # "Symlink loop from …" (RuntimeError before 3.13)
        raise OutputError(
            f"output path {_short(text)!r} cannot be resolved ({exc}) — symbolic links loop "
            "there; choose another --out"
        ) from None


def check_destination(
    out: Path,
    base_root: Path | None,
    force: bool,
    inputs: list[Path] | tuple[Path, ...] = (),
) -> None:
    """Refuse an output that uce must not write: see the module docstring for the rules.

    Leftovers of interrupted runs into ``out`` are recovered first.

    Args:
        out: the output folder (resolved: ``resolve_destination``).
        base_root: the base model folder, when known; the output may neither hold nor sit in it.
        force: replace an existing uce output.
        inputs: files the command reads (recipe, edit file); an output holding one is refused.

    Raises:
        OutputError: naming the path and what to do.
    """
    out = resolve_destination(out)
    _check_name_length(out)
    recover_leftovers(out)
    if base_root is not None:
        base = Path(base_root).resolve()
        if _inside(out, base) or _inside(base, out):
            raise OutputError(
                f"output {out} overlaps the base model folder {base} — the base model is never "
                "modified; choose an output folder outside it"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder — choose another --out")
        if _inside(Path.cwd().resolve(), out):
            raise OutputError(
                f"output {out} is the working folder or holds it — uce will not replace it; "
                "choose another --out"
            )
        for item in inputs:
            resolved = Path(item).expanduser().resolve()
            if _inside(resolved, out):
                raise OutputError(
                    f"output {out} holds the input {resolved} — replacing it would delete that "
                    "input; choose another --out"
                )
        refusal = replace_refusal(out)
        if refusal is not None:
            raise OutputError(refusal)
        if not force:
            raise OutputError(f"output {out} already exists — pass --force to replace it")
        replaced = describe_replacement(out)
        if replaced is not None:
            _note(replaced)
    anchor = out.parent
    while not (anchor.exists() or anchor.is_symlink()) and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(f"cannot create {out}: {anchor} is not a folder")


def replace_refusal(out: Path) -> str | None:
    """Why the existing folder ``out`` may not be replaced, or None if it is empty or a uce output."""
    try:
        with os.scandir(out) as entries:
            if next(entries, None) is None:
                return None
    except OSError as exc:
        return f"output {out} cannot be read ({exc.strerror}) — choose another --out"
    log = read_uce_log(out / EDIT_LOG_FILE)
    known = listed_outputs(log) if log is not None else None
    if known is None:
        return (
            f"output {out} already exists and is not a uce output (no edit_log.json written by "
            "uce with the list of its outputs) — --force replaces only the files an earlier uce "
            "output lists, or an empty folder; choose another --out"
        )
    known.add(EDIT_LOG_FILE)
    unreadable: list[OSError] = []
    for folder, dirs, files in os.walk(out, onerror=unreadable.append):
        here = Path(folder)
        links = [d for d in dirs if (here / d).is_symlink()]
        for name in sorted([*files, *links]):
            rel = (here / name).relative_to(out).as_posix()
            if rel in known and not (here / name).is_symlink():
                continue
            if rel.startswith(f"{EVAL_SUBDIR}/") and _is_uce_eval(out / EVAL_SUBDIR / "eval.json"):
                return (
                    f"output {out} holds {EVAL_SUBDIR}/, the `uce eval` report of that run, which "
                    "--force does not replace (its edit log does not list it) — move or delete "
                    f"{out / EVAL_SUBDIR} first, or choose another --out"
                )
            what = (
                "a symbolic link" if (here / name).is_symlink() else "not part of that uce output"
            )
            return (
                f"output {out} holds {_short(rel)}, which is {what} — --force replaces only the "
                "files its edit log lists: move it out or choose another --out"
            )
    if unreadable:
        return f"output {out} cannot be read ({unreadable[0]}) — choose another --out"
    return None


def listed_outputs(log: dict[str, Any]) -> set[str] | None:
    """The files a valid uce edit log lists (``outputs``: relative file name → sha256), or None
    when ``outputs`` is missing or of any other shape (then the log proves nothing)."""
    listed = log.get("outputs")
    if not isinstance(listed, dict) or not listed:
        return None
    names: set[str] = set()
    for name, digest in listed.items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            return None
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name != Path(name).as_posix():
            return None
        names.add(name)
    return names


def describe_replacement(out: Path) -> str | None:
    """What ``--force`` is about to replace in ``out`` (None when nothing is there), one line."""
    log = read_uce_log(out / EDIT_LOG_FILE)
    known = listed_outputs(log) if log is not None else None
    if known is None:
        return None
    return (
        f"--force: replacing the uce output {out} ({len(known)} files its edit log lists, and the "
        "log)"
    )


EVAL_SUBDIR = "eval"  # where `uce eval` writes inside a run (uce_cli.judge.evaluate.EVAL_DIR)


def _is_uce_eval(path: Path) -> bool:
    """True when ``path`` is a regular file holding a uce eval report (a schema and uce's version)."""
    return _uce_record(path) is not None


def read_uce_log(path: Path) -> dict[str, Any] | None:
    """The edit log at ``path`` if it is a regular file written by uce, else None."""
    return _uce_record(path)


def _uce_record(path: Path) -> dict[str, Any] | None:
    """A JSON object uce wrote (``schema`` and ``versions.uce``) at ``path``, a small regular file."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MAX_LOG_BYTES:
            return None
        record = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or "schema" not in record:
        return None
    versions = record.get("versions")
    return record if isinstance(versions, dict) and "uce" in versions else None


def check_sample_out(out: Path) -> None:
    """Refuse a ``uce sample`` folder that would overwrite files uce did not write.

    Sample never deletes: it adds images under ``base/``, ``edited/`` and ``grids/`` and rewrites
    its ``manifest.json``, so an existing ``manifest.json`` must be one uce wrote.

    Raises:
        OutputError: ``out`` is a file, or holds a ``manifest.json`` that is not uce's.
    """
    out = resolve_destination(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder — choose another --out")
    manifest = out / SAMPLE_MANIFEST
    if not (manifest.exists() or manifest.is_symlink()):
        return
    if manifest.is_symlink():
        raise OutputError(link_refusal(manifest))
    ok = False
    try:
        if manifest.is_file() and manifest.stat().st_size <= _MAX_LOG_BYTES:
            data = json.loads(manifest.read_bytes())
            ok = (
                isinstance(data, dict)
                and "schema" in data
                and isinstance(data.get("images"), list)
                and isinstance(data.get("settings"), dict)
                and "uce_version" in data["settings"]
            )
    except (OSError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise OutputError(
            f"{manifest} exists and was not written by uce sample — sampling would overwrite it; "
            "choose another --out"
        )


def _check_name_length(out: Path) -> None:
    """Refuse a name or path too long once uce's staging suffix is added (ENAMETOOLONG up front)."""
    anchor = out.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
        path_max = os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    name = len(os.fsencode(out.name))
    if name + _SUFFIX_BYTES > name_max:
        raise OutputError(
            f"output folder name {_short(out.name)!r} is too long: {name} bytes, and uce needs "
            f"{_SUFFIX_BYTES} more for its staging folder beside it (the filesystem allows "
            f"{name_max}) — choose a name of at most {name_max - _SUFFIX_BYTES} bytes"
        )
    length = len(os.fsencode(str(out))) + _SUFFIX_BYTES + _INNER_PATH_BYTES
    if length > path_max:
        raise OutputError(
            f"output path {_short(str(out))!r} is too long for this filesystem ({path_max} bytes "
            "with the files uce writes inside it) — choose a shorter --out"
        )


# ---------------------------------------------------------------------------------------------
# Staging, markers, the swap


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir``/``open`` would under the umask.

    Writers that go through a private temporary file (safetensors' ``save_file``,
    ``tempfile.mkstemp``/``mkdtemp``) leave 0600/0700; an output should read like any other file.
    """
    mask = _umask()
    if not root.is_dir():
        root.chmod((0o666 | root.stat().st_mode & 0o111) & ~mask)
        return
    root.chmod(0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(0o777 & ~mask)
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                keep_exec = path.stat().st_mode & 0o111
                path.chmod((0o666 | keep_exec) & ~mask)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def _marker(phase: str, out: Path, **extra: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "tool": "uce",
        "phase": phase,
        "out": str(out),
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start": _start_ticks(pid),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    write_file(folder / MARKER_FILE, json.dumps(marker, indent=2) + "\n")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The run marker in ``folder``, or None when missing or not one uce wrote."""
    return _read_marker_file(folder / MARKER_FILE)


def _read_marker_file(path: Path) -> dict[str, Any] | None:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        marker = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("tool") != "uce"
        or type(marker.get("pid")) is not int
        or not 0 < marker["pid"] <= _MAX_PID
        or not isinstance(marker.get("host"), str)
    ):
        return None
    return marker


def owner_state(marker: dict[str, Any]) -> str:
    """``gone`` (the run that wrote the marker has ended), ``alive``, or ``elsewhere`` (other host)."""
    if marker["host"] != socket.gethostname():
        return "elsewhere"
    boot = _boot_id()
    if marker.get("boot_id") and boot and marker["boot_id"] != boot:
        return "gone"  # the machine restarted since
    pid = marker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # a process of another user runs with that pid: compare start times below
    except OSError:
        return "alive"
    recorded = marker.get("start")
    current = _start_ticks(pid)
    if recorded and current and recorded != current:
        return "gone"  # the pid now belongs to another process
    return "alive"


def _fresh_dir(out: Path, kind: str, marker: dict[str, Any]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.uce-{kind}-", dir=out.parent))
    try:
        _write_marker(folder, marker)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _is_destination(path: Path, out: Path) -> bool:
    """Whether ``path`` is ``out``, inside it, one of its parents, or inside uce's folders beside it."""
    if _inside(out, path) or _inside(path, out):
        return True
    try:
        first = path.relative_to(out.parent).parts[0]
    except (ValueError, IndexError):
        return False
    return first.startswith(f".{out.name}.uce-")


def describe_os_error(out: Path, exc: OSError) -> str:
    """A one-line message for a filesystem error met while writing ``out``."""
    reason = exc.strerror or str(exc)
    # A copy's error names its source first (shutil.copyfile sets filename=src, filename2=dst):
    # a full, read-only or over-quota filesystem is always the destination's.
    names = [n for n in (exc.filename, exc.filename2) if isinstance(n, str)]
    where = Path(os.path.abspath(names[0])) if names else None
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
    if any(_is_destination(Path(os.path.abspath(n)), out) for n in names) or full:
        where = None
    if where is not None and not _is_destination(where, out):
        return f"{where}: {reason}"  # not the destination's fault (e.g. an unreadable input)
    hint = {
        errno.ENOSPC: "free some space or choose another --out",
        errno.EDQUOT: "free some space or choose another --out",
        errno.EROFS: "choose an --out on a writable filesystem",
        errno.EACCES: "choose an --out you may write to",
        errno.EPERM: "choose an --out you may write to",
        errno.ENAMETOOLONG: "choose a shorter --out",
    }.get(exc.errno or 0, "choose another --out")
    kept = " (the existing output is unchanged)" if out.exists() else ""
    return f"cannot write {out}: {reason} — nothing was written{kept}; {hint}"


def staging_dir(out: Path) -> Path:
    """A fresh, marked, hidden folder beside ``out`` (same filesystem, so the final rename is atomic).

    Raises:
        OutputError: the folder cannot be created (read-only, full, no permission…).
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = _fresh_dir(out, "tmp", _marker("staging", out))
        stage.chmod(0o777 & ~_umask())  # mkdtemp makes a private 0700 folder
    except OSError as exc:
        raise OutputError(describe_os_error(out, exc)) from None
    return stage


def abandon_stage(stage: Path, out: Path, exc: BaseException) -> None:
    """Delete an unfinished staging folder after ``exc``; an ``OSError`` is raised as an
    ``OutputError`` naming ``out`` (the caller re-raises anything else).

    Raises:
        OutputError: ``exc`` was a filesystem error (full, read-only, no permission…).
    """
    shutil.rmtree(stage, ignore_errors=True)
    if isinstance(exc, OSError):
        raise OutputError(describe_os_error(out, exc)) from exc


def _delete_old(old: Path) -> None:
    """Delete an old folder so that, if killed midway, what is left still carries its marker."""
    shutil.rmtree(old / PREVIOUS, ignore_errors=True)
    (old / MARKER_FILE).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def finalize(stage: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to ``out``; with ``force`` an old output is swapped out.

    Raises:
        OutputError: ``out`` appeared meanwhile (without ``force``) or is no longer replaceable.
        OSError: a rename failed; the old output is then back in place.
    """
    apply_default_modes(stage)
    if not (out.exists() or out.is_symlink()):
        (stage / MARKER_FILE).unlink(missing_ok=True)
        try:
            os.rename(stage, out)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise OutputError(
                f"output {out} appeared while writing — choose another --out"
            ) from None
        return
    if not force:
        raise OutputError(f"output {out} appeared while writing — pass --force to replace it")
    refusal = replace_refusal(out) if out.is_dir() else f"output {out} is not a folder"
    if refusal is not None:
        raise OutputError(refusal)
    old = _fresh_dir(out, "old", _marker("swap", out, stage=stage.name))
    try:
        os.rename(out, old / PREVIOUS)
        (stage / MARKER_FILE).unlink(missing_ok=True)
        os.rename(stage, out)
    except BaseException:
        _undo_swap(old, out)
        raise
    _delete_old(old)


def _undo_swap(old: Path, out: Path) -> None:
    """Put the old output back if the swap stopped half-way, then delete the old folder."""
    previous = old / PREVIOUS
    if previous.is_dir() and not previous.is_symlink() and not (out.exists() or out.is_symlink()):
        os.rename(previous, out)
    _delete_old(old)


# ---------------------------------------------------------------------------------------------
# The sample folder's lock

SAMPLE_LOCK = ".uce-sample.lock"


def lock_sample_out(out: Path) -> str:
    """Take ``out``'s lock for one ``uce sample`` run: ``.uce-sample.lock``, created ``O_EXCL``,
    holds a run marker (pid, host, start time) and a fresh run id.

    A lock left by a process that is gone (``owner_state``) is taken over, with a warning; a live
    one, or a file there uce did not write, is refused.

    Returns:
        The run id (it tags the run's rank manifests).

    Raises:
        OutputError: another run holds the folder, or the lock cannot be created.
    """
    create_dir(out)
    path = out / SAMPLE_LOCK
    marker = _marker("sample", out, run=secrets.token_hex(8))
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            if path.is_symlink():
                raise OutputError(link_refusal(path)) from None
            held = _read_marker_file(path)
            if held is None or not isinstance(held.get("run"), str):
                raise OutputError(
                    f"{path} exists and is not a uce sample lock — delete it if no uce sample is "
                    f"writing {out}, or choose another --out"
                ) from None
            state = owner_state(held)
            if state != "gone":
                where = "" if state == "alive" else f" on host {_short(held['host'], 40)}"
                raise OutputError(
                    f"{out} is being written by another uce sample (pid {held['pid']}{where}; "
                    f"lock {path}) — wait for it to finish or choose another --out"
                ) from None
            if _read_marker_file(path) == held:  # still the dead run's (not taken meanwhile)
                path.unlink(missing_ok=True)
                _note(f"took over {path}, left by an interrupted run (pid {held['pid']})")
            continue
        except OSError as exc:
            raise OutputError(describe_os_error(out, exc)) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(marker, indent=2) + "\n")
        return marker["run"]
    raise OutputError(f"{path}: another uce sample keeps taking the lock — choose another --out")


def unlock_sample_out(out: Path, run: str) -> None:
    """Release the lock ``lock_sample_out`` took (only if it is still this run's)."""
    path = out / SAMPLE_LOCK
    held = _read_marker_file(path)
    if held is not None and held.get("run") == run:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Recovery


def _note(message: str) -> None:
    warnings.warn(message, UceWarning, stacklevel=3)


def _leftovers(out: Path) -> tuple[list[Path], list[Path]]:
    """(old folders, staging folders) uce may have left beside ``out``."""
    pattern = re.compile(re.escape(f".{out.name}.uce-") + r"(tmp|old)-[A-Za-z0-9_]{8}")
    old: list[Path] = []
    stages: list[Path] = []
    try:
        with os.scandir(out.parent) as entries:
            for entry in entries:
                found = pattern.fullmatch(entry.name)
                if found and entry.is_dir(follow_symlinks=False):
                    (old if found.group(1) == "old" else stages).append(Path(entry.path))
    except OSError:
        return [], []
    return sorted(old), sorted(stages)


def _left_alone(folder: Path, marker: dict[str, Any] | None, state: str, out: Path) -> None:
    if marker is None:
        _note(
            f"{folder} has no uce run marker — left alone; delete it if no uce run is writing {out}"
        )
    elif state == "alive":
        _note(f"{folder} belongs to a running uce (pid {marker['pid']}) — left alone")
    else:
        _note(
            f"{folder} was left by pid {marker['pid']} on host {_short(marker['host'], 40)} — left "
            f"alone; delete it if no uce run there is writing {out}"
        )


def recover_leftovers(out: Path) -> list[str]:
    """Roll back interrupted runs into ``out`` whose leftovers are provably theirs (module docstring).

    Returns:
        What was done, one sentence per action (each also issued as a ``UceWarning``).
    """
    old_dirs, stages = _leftovers(out)
    if not old_dirs and not stages:
        return []
    done: list[str] = []

    def act(message: str) -> None:
        done.append(message)
        _note(message)

    claimed: set[str] = set()  # unmarked staging folders named by a dead run's old folder
    for old in old_dirs:
        marker = read_marker(old)
        state = owner_state(marker) if marker is not None else "unknown"
        if state != "gone":
            _left_alone(old, marker, state, out)
            continue
        assert marker is not None
        run = f"interrupted run (pid {marker['pid']}, {marker.get('created', '?')})"
        if isinstance(marker.get("stage"), str):
            claimed.add(marker["stage"])
        previous = old / PREVIOUS
        restored = False
        if previous.is_symlink():
            _note(
                f"{link_refusal(previous, 'folder')} — not restored; {old} is left alone, delete "
                "it by hand"
            )
            continue
        try:
            if previous.is_dir() and not (out.exists() or out.is_symlink()):
                os.rename(previous, out)
                restored = True
        except OSError as exc:
            _note(f"could not restore {out} from {old} ({exc.strerror}) — left as it is")
            continue
        _delete_old(old)
        if restored:
            act(f"restored {out} from {old.name}, left by an {run}")
        elif old.exists():
            _note(f"could not delete {old}, left by an {run} — delete it by hand")
        else:
            act(f"removed {old}, left by an {run}")
    for stage in stages:
        marker = read_marker(stage)
        if marker is None and stage.name in claimed:
            shutil.rmtree(stage, ignore_errors=True)
            act(f"removed {stage}, the unfinished output of an interrupted run")
            continue
        state = owner_state(marker) if marker is not None else "unknown"
        if state != "gone":
            _left_alone(stage, marker, state, out)
            continue
        assert marker is not None
        shutil.rmtree(stage, ignore_errors=True)
        act(
            f"removed {stage}, the unfinished output of an interrupted run "
            f"(pid {marker['pid']}, {marker.get('created', '?')})"
        )
    return done
