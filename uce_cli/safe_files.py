"""Writing uce's own files and folders without ever following a link someone planted there.

Every file uce writes goes through here: ``write_file``/``write_json`` for bytes and JSON,
``open_new`` for writers that take a file object (PIL's ``Image.save``, matplotlib's ``savefig``),
``copy_file`` for copies, ``create_dir`` for folders. The rules:

- the folders between ``root`` (the output folder the user named, which may itself be reached
  through a link) and the file are walked one name at a time with ``O_NOFOLLOW``, each opened
  relative to the one above it: a symbolic link (or a file) where uce expects its own folder is
  refused, naming it, and a folder swapped for a link half-way cannot redirect the write;
- a file is written into a fresh temporary file created ``O_CREAT|O_EXCL|O_NOFOLLOW`` in its
  destination folder, then renamed over the destination (``rename`` replaces a directory entry; it
  never writes through it). A destination that is a symbolic link or a folder is refused, naming it;
- nothing is ever opened for writing through an existing name.

Without ``root`` only the file's own folder is trusted as given; callers writing inside an output
folder pass that folder as ``root``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from uce_cli.errors import OutputError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(OutputError):
    """A link, file or folder sits where uce would write its own file or folder."""


def link_refusal(path: Path, kind: str = "file") -> str:
    """The one-line refusal for a symbolic link found where uce writes its own ``kind``."""
    return (
        f"{path} is a symbolic link where uce writes its own {kind} — uce never writes through a "
        "link; remove the link or choose another --out"
    )


def _kind_at(name: str, dir_fd: int) -> int | None:
    """``st_mode`` of ``name`` in the folder ``dir_fd`` (not following a link), None if absent."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def _os_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc} — choose another --out")


def _open_root(root: Path) -> int:
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(
                f"{root} cannot be reached: symbolic links loop there — choose another --out"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise UnsafePathError(
                f"{root} is not a folder — uce needs a folder there; choose another --out"
            ) from None
        raise


def _walk(folder: Path, root: Path | None, create: bool) -> int:
    """An open descriptor of ``folder``, reached from ``root`` one name at a time without following
    a link (missing folders created when ``create``); the caller closes it.

    Raises:
        UnsafePathError: a link or a non-folder on the way below ``root``.
        OSError: the folder cannot be created or opened.
    """
    root = folder if root is None else Path(root)
    parts = folder.relative_to(root).parts  # ValueError: a caller's mistake, not the user's
    if create:
        root.mkdir(parents=True, exist_ok=True)  # the folder the user named: its links are theirs
    fd = _open_root(root)
    here = Path(root)
    try:
        for part in parts:
            here = here / part
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            mode = _kind_at(part, fd)
            if mode is not None and stat.S_ISLNK(mode):
                raise UnsafePathError(link_refusal(here, "folder"))
            if mode is not None and not stat.S_ISDIR(mode):
                raise UnsafePathError(
                    f"{here} is not a folder — uce writes its own folder there; move it away "
                    "or choose another --out"
                )
            try:
                inner = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link meanwhile
                    raise UnsafePathError(link_refusal(here, "folder")) from None
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_no_links(path: Path, root: Path, kind: str = "folder") -> None:
    """Refuse ``path`` (a ``kind``: folder or file) and every folder between ``root`` and it when
    any of them is a symbolic link or, above ``path``, not a folder. Missing names are fine: uce
    creates them.

    Raises:
        UnsafePathError: naming the first offending path.
    """
    path, root = Path(path), Path(root)
    here = root
    for part in path.relative_to(root).parts:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise UnsafePathError(link_refusal(here, "folder" if here != path else kind))
        if here != path and not stat.S_ISDIR(mode):
            raise UnsafePathError(f"{here} is not a folder — move it away or choose another --out")


def create_dir(path: Path, root: Path | None = None) -> Path:
    """Create the folder ``path`` and any missing folders between ``root`` and it.

    Args:
        path: the folder.
        root: the output folder the user named (may be reached through a link; created if missing).
            Every name below it must be a real folder. None: ``path`` itself is trusted as given.

    Raises:
        UnsafePathError: a symbolic link or a file where a folder belongs.
        OutputError: the folder cannot be created (read-only, full, no permission…).
    """
    path = Path(path)
    try:
        os.close(_walk(path, root, create=True))
    except OSError as exc:
        raise _os_error(path, exc) from None
    return path


@contextmanager
def open_new(path: Path, root: Path | None = None, text: bool = False) -> Iterator[IO[Any]]:
    """A new file that becomes ``path`` when the ``with`` block ends without an error.

    The file is created ``O_EXCL|O_NOFOLLOW`` under a random name in ``path``'s folder (mode as
    ``open`` under the umask) and renamed over ``path`` at the end; on an error it is deleted and
    ``path`` is left as it was.

    Args:
        path: the destination; an existing regular file is replaced.
        root: see ``create_dir``; the folders up to ``path``'s are created.
        text: a UTF-8 text file instead of a binary one.

    Raises:
        UnsafePathError: ``path`` is a symbolic link or a folder, or a link is on the way.
        OSError: writing failed (the caller names the output: ``describe_os_error``).
    """
    path = Path(path)
    dir_fd = _walk(path.parent, root, create=True)
    try:
        mode = _kind_at(path.name, dir_fd)
        if mode is not None and stat.S_ISLNK(mode):
            raise UnsafePathError(link_refusal(path))
        if mode is not None and stat.S_ISDIR(mode):
            raise UnsafePathError(
                f"{path} is a folder where uce writes its own file — move it away or choose "
                "another --out"
            )
        tmp = f".{path.name[:40]}.{secrets.token_hex(4)}.uce-tmp"
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o666, dir_fd=dir_fd)
        try:
            with os.fdopen(
                fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})
            ) as f:
                yield f
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as exc:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(path)  # a failed write (a full disk) names the file, not an fd
            raise
    finally:
        os.close(dir_fd)


def write_file(path: Path, data: bytes | str, root: Path | None = None) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically, never through a link (``open_new``)."""
    with open_new(path, root) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(
    path: Path, payload: Any, root: Path | None = None, ensure_ascii: bool = False
) -> Path:
    """Write ``payload`` as indented JSON (UTF-8, a final newline) to ``path`` (``write_file``)."""
    return write_file(path, json.dumps(payload, indent=2, ensure_ascii=ensure_ascii) + "\n", root)


def copy_into(src: Path, f: IO[bytes], dst: Path) -> None:
    """Copy the file ``src`` into the new file ``f`` (``open_new``) by the kernel's ``sendfile``.

    Raises:
        OSError: naming ``src`` when it cannot be read, ``dst`` when it cannot be written (a full
            disk is the destination's).
    """
    f.flush()
    with open(src, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(f.fileno(), source.fileno(), offset, min(size - offset, 1 << 30))
            except OSError as exc:
                if offset == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                    source.seek(0)
                    shutil.copyfileobj(source, f, 1 << 24)  # no sendfile on this filesystem
                    return
                raise OSError(exc.errno, exc.strerror, str(dst)) from None
            if sent == 0:
                break
            offset += sent
    os.lseek(f.fileno(), 0, os.SEEK_END)


def copy_file(src: Path, dst: Path, root: Path | None = None) -> Path:
    """Copy ``src`` to a new file ``dst`` (``open_new``: never through a link, atomically)."""
    with open_new(dst, root) as f:
        copy_into(src, f, Path(dst))
    return Path(dst)
