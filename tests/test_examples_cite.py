"""What the shipped examples cite from the README exists there: a section by its heading, a
paragraph by its bold title."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_titles() -> set[str]:
    text = (REPO / "README.md").read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", text, re.M)}
    bold = {m.group(1).strip() for m in re.finditer(r"\*\*([^*]+?)\*\*", text)}
    return headings | bold


def citations() -> list[tuple[str, str]]:
    """(file, quoted title) for every "…" in a comment that cites the README, joined across lines."""
    found = []
    for path in sorted((REPO / "examples").rglob("*")):
        if not path.is_file():
            continue
        comment = " ".join(
            line.lstrip("# ").rstrip()
            for line in path.read_text().splitlines()
            if line.startswith("#")
        )
        for match in re.finditer(r"README,? ([^()]*)", comment):
            found += [(path.name, title) for title in re.findall(r'"([^"]+)"', match.group(1))]
    return found


def test_examples_cite_readme_sections_that_exist() -> None:
    cited = citations()
    assert cited, "no example cites the README"
    titles = readme_titles()
    missing = [(name, title) for name, title in cited if title not in titles]
    assert missing == [], missing
