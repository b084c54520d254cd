"""``uce show``: an edit log as tables (and the debias loop's ratios as a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from uce_cli.artifacts.editlog import read_edit_log
from uce_cli.cli._common import JsonOpt, handle_errors, print_json
from uce_cli.console import out
from uce_cli.errors import UceError
from uce_cli.safe_files import open_new


def _fmt(value: object, spec: str) -> str:
    """A figure, or "—" where this kind of log has none (merge/transfer logs lack residuals)."""
    return format(value, spec) if isinstance(value, int | float) else "—"


def layer_table(layers: dict[str, dict]) -> Table:
    """Per-layer figures of an edit log."""
    table = Table(title="layers", show_lines=False)
    for column in (
        "layer",
        "shape",
        "‖ΔW‖/‖W‖",
        "residual before",
        "residual after",
        "preserve drift",
    ):
        if column == "layer":  # a narrow terminal folds a long name, never cuts it
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right")
    for name, m in layers.items():
        table.add_row(
            name.removesuffix(".weight"),
            "×".join(str(s) for s in m.get("shape", [])),
            _fmt(m.get("rel_delta"), ".3e"),
            _fmt(m.get("residual_before"), ".4f"),
            _fmt(m.get("residual_after"), ".4f"),
            _fmt(m.get("preserve_drift"), ".3e"),
        )
    return table


def summary_table(log: dict) -> Table:
    """Model, plan, solver and timings of an edit log."""
    table = Table(show_header=False, title="edit")
    table.add_column("field", style="bold")
    table.add_column("value")
    plan = log.get("plan", {})
    solver = log.get("solver", {})
    rows = {
        "base model": log.get("base_model", {}).get("spec", "?"),
        "recipe": f"{log.get('recipe_file', '?')} (sha256 {log.get('recipe_sha256', '?')[:12]})",
        "alignment": plan.get("alignment", "?"),
        "edit prompts / vectors": f"{plan.get('edit_prompts')} / {plan.get('edit_vectors')}",
        "preserve prompts / vectors": f"{plan.get('preserve_prompts')} / {plan.get('preserve_vectors')}",
        "λ, s_e, s_p": f"{solver.get('lambda', '—')}, {solver.get('erase_scale', '—')}, "
        f"{_fmt(solver.get('preserve_scale'), '.4g')}",
        "operator rank": f"{solver.get('operator_rank')} of {solver.get('width')}"
        if solver.get("operator_rank") is not None
        else solver.get("form", "—"),
        "timings (s)": ", ".join(f"{k} {v:.2f}" for k, v in log.get("timings", {}).items()),
        "versions": ", ".join(f"{k} {v}" for k, v in log.get("versions", {}).items()),
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def iteration_table(record: dict) -> Table:
    """One debias-loop iteration: per item its ratios, gap, α and status."""
    table = Table(title=f"debias loop — iteration {record['iteration']}")
    for column in ("item", "ratios", "gap", "α", "status"):
        table.add_column(column, justify="left" if column in ("item", "status") else "right")
    sampled = set(record.get("sampled", []))
    for item in record.get("items", []):
        status = "converged" if item["converged"] else "debiasing"
        if item["prompt"] not in sampled:
            status += " (not sampled)"
        table.add_row(
            item["prompt"],
            " ".join(f"{a} {r:.2f}" for a, r in item["ratios"].items()),
            _fmt(item["gap"], ".3f"),
            " ".join(f"{a} {v:+.4f}" for a, v in item["alpha"].items()),
            status,
        )
    return table


def loop_table(debias: dict) -> Table:
    """The debias loop's iterations: images, converged items, worst gap and seconds."""
    table = Table(title=f"debias loop — stopped: {debias.get('stopped')}")
    for column in (
        "iteration",
        "images",
        "converged",
        "worst gap",
        "sample s",
        "classify s",
        "solve s",
    ):
        table.add_column(column, justify="right")
    for record in debias.get("iterations", []):
        items = record.get("items", [])
        seconds = record.get("seconds", {})
        table.add_row(
            str(record["iteration"]),
            str(record.get("images_sampled")),
            f"{len(record.get('converged', []))}/{len(items)}",
            _fmt(max((i["gap"] for i in items), default=None), ".3f"),
            *(_fmt(seconds.get(k), ".2f") for k in ("sample", "classify", "solve")),
        )
    return table


def write_ratio_plot(debias: dict, path: Path) -> None:
    """PNG: each attribute's ratio per item over the iterations, with the desired ratio dashed.

    Raises:
        UceError: matplotlib is not installed (it is the ``debias`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UceError(
            "writing the plot needs matplotlib — pip install 'uce-cli[debias]'"
        ) from None
    iterations = debias.get("iterations", [])
    if not iterations:
        raise UceError("the debias loop of this log recorded no iteration — nothing to plot")
    attributes = list(iterations[0]["items"][0]["ratios"]) if iterations[0]["items"] else []
    fig, axes = plt.subplots(
        1, len(attributes), figsize=(4.5 * len(attributes), 3.6), squeeze=False, sharey=True
    )
    from matplotlib.ticker import MaxNLocator

    prompts = [item["prompt"] for item in iterations[0]["items"]]
    markers = "osD^vP*Xph"
    for ax, attribute in zip(axes[0], attributes, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for n, prompt in enumerate(prompts):
            xs, ys = [], []
            for record in iterations:
                item = next(i for i in record["items"] if i["prompt"] == prompt)
                if attribute in item["ratios"]:
                    xs.append(record["iteration"])
                    ys.append(item["ratios"][attribute])
            # distinct markers and sizes keep items with equal ratios visible on top of each other
            ax.plot(
                xs, ys, marker=markers[n % len(markers)], markersize=max(3, 10 - 1.5 * (n % 5)),
                linestyle=("-", "--", ":", "-.")[n % 4], label=prompt,
            )  # fmt: skip
        ax.set_title(f"share of '{attribute}'")
        ax.set_xlabel("iteration")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    desired = iterations[0]["items"][0].get("desired", {})
    for ax, attribute in zip(axes[0], attributes, strict=True):
        if attribute in desired:
            ax.axhline(desired[attribute], color="black", linestyle="--", linewidth=1)
    axes[0][0].set_ylabel("ratio of images (CLIP)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    with open_new(path) as f:  # never through a link (uce_cli.safe_files)
        fig.savefig(f, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)


@handle_errors
def show(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help="An output folder of `uce apply`, or its edit_log.json."
        ),
    ],
    json_out: JsonOpt = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Write the debias loop's ratios per item over iterations to this PNG "
            "(needs the `debias` extra: matplotlib).",
        ),
    ] = None,
) -> None:
    """Show an edit log: what was edited, with which scales, and per-layer figures.

    Example: uce show runs/quickstart
    """
    log = read_edit_log(path)
    if plot is not None:
        if "debias" not in log:
            raise UceError(
                f"{path}: no debias loop in this edit log (alphas: auto) — nothing to plot"
            )
        write_ratio_plot(log["debias"], plot)
    if json_out:
        print_json(log)
        return
    out.print(summary_table(log))
    out.print(layer_table(log["layers"]))
    if "debias" in log:
        out.print(loop_table(log["debias"]))
        if log["debias"].get("iterations"):
            out.print(iteration_table(log["debias"]["iterations"][-1]))
    if plot is not None:
        out.print(f"ratio plot written to {plot}")
    if path.is_dir():
        from uce_cli.cli.eval import expect_table, figures_table
        from uce_cli.judge.evaluate import read_report

        report = read_report(path)
        if report is not None:
            out.print(figures_table(report))
            if report.get("expect"):
                out.print(expect_table(report["expect"]))
