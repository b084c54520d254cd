"""The import layering (issue 11): data flows down, and no module imports one above it.

Read with the AST, every import counts (module level and inside functions; only ``if
TYPE_CHECKING:`` blocks, which never run, are left out). The packages are the layers, top to
bottom:

    cli/ → commands/ (apply, debias, sample, transfer, verify) and judge/ (prompt sets, text
    figures, images, classifiers, report) → artifacts/ (formats,
    outputs, edit log, reports) with the edit's statistics and solve → edit/ (recipe → plan →
    encode) → families/model.py (opens a model through its family) → families/ → weights/ (files,
    headers, hub, tiny models) → errors and other leaves

A module may import modules of its own layer or below. A module is placed by the longest prefix
below that names it, so a new module in a package is in that package's layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "uce_cli"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("uce_cli.cli", "uce_cli.__main__")),
    ("commands, judging", ("uce_cli.commands", "uce_cli.judge")),
    (
        "artifacts, statistics, solve",
        (
            "uce_cli.artifacts",
            "uce_cli.edit.stats",
            "uce_cli.edit.cache",
            "uce_cli.edit.solve",
            "uce_cli.edit.harden",
        ),
    ),
    ("encode, plan, recipe", ("uce_cli.edit",)),
    ("model", ("uce_cli.families.model",)),
    ("families", ("uce_cli.families",)),
    ("weights I/O", ("uce_cli.weights",)),
    (
        "errors and leaves",
        (
            "uce_cli.errors",
            "uce_cli.paths",
            "uce_cli.progress",
            "uce_cli.console",
            "uce_cli.distributed",
            "uce_cli.grid",
            "uce_cli",
        ),
    ),
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def layer_of(module: str) -> int:
    """Index of the layer whose longest matching prefix names ``module`` (-1: none)."""
    best, found = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("uce_cli"):
                found.add(node.module)
                found.update(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if f"{node.module}.{a.name}" in known
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("uce_cli"))
    return found


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {
        name: {m for m in imports_of(path, known) if m != name and m != "uce_cli"}
        for name, path in known.items()
    }


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in module_names() if layer_of(m) < 0)
    assert not unplaced, f"add these modules to a layer in tests/test_layers.py: {unplaced}"


def test_no_module_imports_one_above_it() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if layer_of(target) < layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_families_and_weights_io_never_import_the_edit_pipeline() -> None:
    """The explicit form of the rule for the two bottom layers the family helpers write into."""
    forbidden = (
        "uce_cli.edit.plan",
        "uce_cli.edit.stats",
        "uce_cli.edit.solve",
        "uce_cli.commands.apply",
        "uce_cli.cli",
    )
    bottom = {
        name
        for name in module_names()
        if LAYERS[layer_of(name)][0] in ("families", "weights I/O", "model")
    }
    assert {"uce_cli.families.sd", "uce_cli.weights.files", "uce_cli.families.model"} <= bottom
    bad = [
        f"{name} imports {target}"
        for name in sorted(bottom)
        for target in sorted(graph()[name])
        if target.startswith(forbidden) or target.startswith("uce_cli.artifacts.formats")
    ]
    assert not bad, bad


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" → ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The AST reader finds function-level imports and skips TYPE_CHECKING blocks."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from uce_cli.commands.apply import run_apply\n"
        "def f():\n    from uce_cli.edit.plan import plan_recipe\n"
    )
    found = imports_of(source, {})
    assert found == {"uce_cli.edit.plan"}
    assert layer_of("uce_cli.edit.plan") < layer_of("uce_cli.families.sdxl")
