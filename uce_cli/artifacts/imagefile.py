"""The one loader of image files uce reads back from folders it is given (sample folders, runs):
every failure is one ``DataError`` naming the file.

An image in such a folder is input. It is read only as a regular file inside its folder (a symlink
out of it — to a system file, say — is refused), only up to a pixel count no uce image comes near
(a decompression bomb is refused from its header, before any pixel is decoded), and decoded in full
(a truncated or non-image file is said to be so, never mistaken for an image of other settings).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from uce_cli.errors import DataError

# 64 Mpixel: a 10-seed compare grid of 1024² images is 21 Mpixel; a 20000² PNG is 400 Mpixel.
MAX_PIXELS = 64 * 2**20


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_image_path(path: Path, root: Path | None = None) -> None:
    """Refuse what is not a regular image file inside ``root`` (symlinks may point inside it).

    Raises:
        DataError: missing, not a regular file, or a symlink leading outside ``root``.
    """
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if root is None or not _inside(target, Path(root).resolve()):
            where = f"outside {root}" if root is not None else "elsewhere"
            raise DataError(
                f"{path}: a symlink to {target}, {where} — uce reads images only inside the "
                "folder it is given; replace it with the image file"
            )
    if not path.exists():
        raise DataError(f"{path}: no such image file")
    if not path.is_file():
        raise DataError(
            f"{path}: not a regular file (a folder or a device) where an image should be"
        )


def read_image(
    path: Path, root: Path | None = None, mode: str | None = "RGB"
) -> tuple[Image.Image, dict[str, str]]:
    """An image decoded in full (converted to ``mode``; None keeps its own) and its PNG text.

    Args:
        path: the image file.
        root: the folder it must lie in (a symlink may point only inside it).
        mode: the PIL mode to convert to.

    Raises:
        DataError: a symlink out of ``root``, not a regular file, too many pixels, truncated, or
            not an image PIL reads — naming the file.
    """
    path = Path(path)
    check_image_path(path, root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise DataError(
                        f"{path}: {width}×{height} pixels, more than uce reads ({MAX_PIXELS} "
                        "pixels at most: a decompression bomb, or not an image uce drew)"
                    )
                im.load()  # decode every pixel now: a truncated file fails here, by name
                text = {
                    k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)
                }
                image = im.convert(mode) if mode is not None and im.mode != mode else im.copy()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on hostile bytes
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path}: truncated or not a readable image ({first}) — delete it (uce sample draws "
            "it again) or replace it"
        ) from None
    return image, text


def load_image(path: Path, root: Path | None = None) -> Image.Image:
    """An RGB image read by ``read_image``."""
    return read_image(path, root)[0]
