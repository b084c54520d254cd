"""Several evaluated runs of one recipe family side by side (e.g. erase-artists-1 … 1000 → Table 1
re-drawn): one table with the paper's value beside each measured figure, as Markdown, JSON and one
plot of each expected figure against the number of erased concepts, the paper's curve beside."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from uce_cli.errors import OutputError, UceError

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare.png"
MAX_PLOTTED = 6


def compare_runs(paths: list[Path]) -> dict[str, Any]:
    """One row per run (its figures, the paper's value of each, the number of edited concepts).

    Raises:
        UceError: a folder is not an ``uce apply`` output, or has not been evaluated yet.
    """
    from uce_cli.judge.evaluate import check_expectations, edited_guides, open_run, read_report

    if len(paths) < 2:
        raise UceError("compare needs two or more runs — give their folders")
    rows = []
    for path in paths:
        run = open_run(path)
        report = read_report(run.path)
        if report is None:
            raise UceError(f"{run.path}: not evaluated yet — run `uce eval {run.path}` first")
        debiased = {p.concept for p in run.plan.pairs if p.section.startswith("debias")}
        expect = check_expectations(report, run.evaluate.expect)
        rows.append(
            {
                "run": str(run.path),
                "name": run.path.name,
                "recipe": report.get("recipe_file"),
                "base_model": run.base_spec,
                "erased": len(edited_guides(run.plan)),
                "debiased": len(debiased),
                "figures": {k: v for k, v in report.get("figures", {}).items() if v is not None},
                "paper": {r["metric"]: r["expected"] for r in expect},
                "tolerance": {r["metric"]: r["tolerance"] for r in expect},
                "source": {r["metric"]: r["source"] for r in expect},
                "ok": {r["metric"]: r["ok"] for r in expect},
            }
        )
    rows.sort(key=lambda r: (r["erased"], r["debiased"], r["name"]))
    expected = list(dict.fromkeys(m for r in rows for m in r["paper"]))
    measured = list(dict.fromkeys(m for r in rows for m in r["figures"]))
    figures = expected + [m for m in measured if m not in expected]
    notes = []
    if len({r["base_model"] for r in rows}) > 1:
        notes.append("the runs edit different base models: their figures are not comparable")
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": rows,
        "figures": figures,
        "expected_figures": expected,
        "notes": notes,
    }


def render_compare_markdown(table: dict[str, Any]) -> str:
    """The comparison as Markdown: one row per run, each figure as `measured (paper)`."""
    from uce_cli.judge.report import fmt

    figures = table["figures"]
    lines = [
        "# uce compare",
        "",
        "Each cell: measured (paper ± tolerance, **NO** when out of it); figures are defined in "
        "docs/metrics.md.",
        "",
        "| run | erased | debiased | " + " | ".join(f"`{f}`" for f in figures) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(figures),
    ]
    for row in table["runs"]:
        cells = []
        for f in figures:
            cell = fmt(row["figures"].get(f))
            if f in row["paper"]:
                flag = "" if row["ok"][f] else " **NO**"
                cell += f" ({fmt(row['paper'][f])} ± {fmt(row['tolerance'][f])}){flag}"
            cells.append(cell)
        lines.append(
            f"| {row['name']} | {row['erased']} | {row['debiased']} | " + " | ".join(cells) + " |"
        )
    sources = sorted({s for row in table["runs"] for s in row["source"].values()})
    if sources:
        lines += ["", "Sources: " + "; ".join(sources) + "."]
    lines += [f"\nNote: {n}" for n in table["notes"]]
    if table.get("plot"):
        lines += ["", f"![{table['plot']}]({table['plot']})"]
    return "\n".join(lines) + "\n"


def plot_compare(path: Path, table: dict[str, Any]) -> str | None:
    """Each expected figure (else each measured one, at most six) against the number of erased
    concepts: measured as dots and line, the paper's values as a dashed line beside."""
    from uce_cli.judge.plots import _pyplot

    figures = (table["expected_figures"] or table["figures"])[:MAX_PLOTTED]
    if not figures:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(figures), figsize=(4 * len(figures), 3.5), dpi=100)
    axes = axes if len(figures) > 1 else [axes]
    xs_all = [r["erased"] for r in table["runs"]]
    for ax, name in zip(axes, figures, strict=True):
        measured = [
            (r["erased"], r["figures"][name]) for r in table["runs"] if name in r["figures"]
        ]
        paper = [(r["erased"], r["paper"][name]) for r in table["runs"] if name in r["paper"]]
        if measured:
            ax.plot(*zip(*measured, strict=True), marker="o", label="measured")
        if paper:
            ax.plot(*zip(*paper, strict=True), marker="s", linestyle="--", label="paper")
        if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel("erased concepts")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def write_compare(out: Path, table: dict[str, Any], force: bool, plot: bool = True) -> list[Path]:
    """Write compare.json, compare.md (and compare.png) into ``out``; refuse to replace without
    ``force``. Returns the written paths."""
    from uce_cli.artifacts.outputs import write_json

    out = Path(out).expanduser()
    if (out / COMPARE_JSON).exists() and not force:
        raise OutputError(f"{out / COMPARE_JSON} exists — pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot:
        name = plot_compare(out / COMPARE_PNG, table)
        if name:
            table["plot"] = name
            written.append(out / name)
    write_json(out / COMPARE_JSON, table)
    md = out / COMPARE_MD
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(render_compare_markdown(table), encoding="utf-8")
    tmp.replace(md)
    return [out / COMPARE_JSON, md, *written]
