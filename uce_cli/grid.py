"""Images on disk: PNGs that carry their parameters, and labelled before/after grids of them."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from uce_cli.safe_files import open_new

GRID_MIN_PANEL = 256  # grid panels are upscaled (nearest) to at least this many pixels


def write_png(
    image: Image.Image, path: Path, text: dict[str, str], root: Path | None = None
) -> None:
    """Write a PNG with ``text`` chunks atomically, never through a link (``safe_files.open_new``;
    ``root``: the output folder, below which every folder must be uce's own)."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)  # non-Latin-1 values become iTXt (UTF-8) chunks
    with open_new(path, root) as f:
        image.save(f, format="PNG", pnginfo=info)


@dataclass(frozen=True)
class GridLayout:
    """Where everything sits in a compare grid: rows are models, columns are seeds."""

    panel: tuple[int, int]  # (width, height) of one upscaled image
    header: int  # height of the prompt text above the panels
    label: int  # height of the label strip under each panel
    pad: int
    rows: int
    cols: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid."""
        w = self.cols * self.panel[0] + (self.cols + 1) * self.pad
        h = self.header + self.rows * (self.panel[1] + self.label + self.pad) + self.pad
        return w, h

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the panel at ``row``, ``col``."""
        left = self.pad + col * (self.panel[0] + self.pad)
        top = self.header + self.pad + row * (self.panel[1] + self.label + self.pad)
        return left, top, left + self.panel[0], top + self.panel[1]


def grid_layout(image_size: tuple[int, int], rows: int, cols: int, header_lines: int) -> GridLayout:
    """The layout of a grid of ``rows`` × ``cols`` images of ``image_size`` (width, height)."""
    scale = max(1, -(-GRID_MIN_PANEL // max(image_size)))  # integer factor: crisp nearest upscale
    panel = (image_size[0] * scale, image_size[1] * scale)
    return GridLayout(panel, header=8 + 18 * header_lines, label=22, pad=8, rows=rows, cols=cols)


def _grid_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def make_grid(
    prompt: str, rows: list[tuple[str, list[tuple[int, Image.Image]]]], caption: str
) -> tuple[Image.Image, list[str]]:
    """A labelled grid: the prompt (and ``caption``) on top, one row per model, one column per seed.

    Args:
        prompt: shown wrapped (at most three lines, then "…").
        rows: ``(model label, [(seed, image), …])`` per row, same seeds in every row.
        caption: one more header line (model and edit).

    Returns:
        The grid image and its panel labels, row by row.
    """
    cols = len(rows[0][1])
    image_size = rows[0][1][0][1].size
    probe = grid_layout(image_size, len(rows), cols, 1)
    chars = max(20, probe.size[0] // 8)
    flat = " ".join(prompt.split()) or "(empty prompt)"
    lines = textwrap.wrap(flat, chars, max_lines=3, placeholder=" …") + [caption[: chars + 10]]
    layout = grid_layout(image_size, len(rows), cols, len(lines))
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    font = _grid_font()
    for i, line in enumerate(lines):
        draw.text((layout.pad, 6 + 18 * i), _drawable(line, font), fill="black", font=font)
    labels = []
    for r, (name, images) in enumerate(rows):
        for c, (seed, image) in enumerate(images):
            box = layout.box(r, c)
            grid.paste(image.convert("RGB").resize(layout.panel, Image.Resampling.NEAREST), box[:2])
            label = f"{name} · seed {seed}"
            draw.text((box[0], box[3] + 4), _drawable(label, font), fill="black", font=font)
            labels.append(label)
    return grid, labels


def _drawable(text: str, font: object) -> str:
    # The bitmap fallback font encodes Latin-1 only; FreeType draws missing glyphs as boxes.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")
