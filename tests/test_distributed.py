"""Tests for runs under ``accelerate launch``: two CPU processes draw a one-process run's images."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests import test_eval_images
from uce_cli.cli import app
from uce_cli.distributed import Ranks, init_ranks

pytest.importorskip(
    "accelerate", reason="accelerate is not installed (pip install '.[distributed]')"
)

runner = CliRunner()
# test_eval_images' tiny random CLIP and ResNet, and its evaluated run.
tiny_clip = test_eval_images.tiny_clip
tiny_resnet = test_eval_images.tiny_resnet
eval_run = test_eval_images._run
PROMPTS = [f"a painting number {i}" for i in range(5)]


def free_port() -> int:
    """A TCP port nobody listens on now (two tests launching at once must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --multi_gpu --num_processes N -m uce_cli …`` on the CPU."""
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "uce_cli", *(str(a) for a in args),
    ]  # fmt: skip
    # a hang guard (a rank waiting forever), not a speed bound: generous for a loaded machine
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, env=os.environ)


def write_prompts(folder: Path) -> Path:
    """Five prompts with their own seeds."""
    path = folder / "prompts.csv"
    lines = ["case_number,prompt,evaluation_seed"]
    lines += [f"{i},{p},{3 * i}" for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def images_of(folder: Path) -> dict[str, bytes]:
    """Every PNG under ``folder`` (images and grids), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


@pytest.fixture(scope="module")
def runs(erased_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One compare run drawn by one process and by two launched ones, same prompts and seeds."""
    root = tmp_path_factory.mktemp("distributed")
    prompts = write_prompts(root)
    args = ["--edit", erased_model, "--compare", "--prompts-file", prompts, "--n", "2"]
    args += ["--steps", "2", "--device", "cpu", "--quiet"]
    # torchrun gives each process one thread (OMP_NUM_THREADS=1); the thread count changes CPU
    # float rounding, so the reference is drawn with one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = runner.invoke(app, ["sample", *map(str, args), "--out", str(root / "one")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.stderr
    two = launch(2, "sample", *args, "--out", root / "two")
    return {"root": root, "args": args, "one": root / "one", "two": root / "two", "proc": two}


def test_two_processes_draw_the_one_process_images_byte_for_byte(runs: dict) -> None:
    proc = runs["proc"]
    assert proc.returncode == 0, proc.stderr
    one, two = images_of(runs["one"]), images_of(runs["two"])
    assert len(one) == 5 * 2 * 2 + 5  # base + edited for 5 prompts × 2 seeds, 5 grids
    assert two == one
    # Rows 0, 2, 4 are rank 0's, rows 1, 3 rank 1's: 4 images per row.
    assert "rank 0/2: 12 images (12 generated, 0 already there)" in proc.stderr
    assert "rank 1/2: 8 images (8 generated, 0 already there)" in proc.stderr
    assert proc.stdout.count("20 images (20 generated, 0 already there)") == 1  # rank 0 reports


def test_merged_manifest_is_complete_and_ordered_as_one_process_writes_it(runs: dict) -> None:
    assert runs["proc"].returncode == 0, runs["proc"].stderr
    one = json.loads((runs["one"] / "manifest.json").read_text())
    two = json.loads((runs["two"] / "manifest.json").read_text())
    assert two == one
    assert [e["path"] for e in two["images"]] == sorted(e["path"] for e in two["images"])
    assert len(two["images"]) == 20 and len(two["grids"]) == 5
    assert not list(runs["two"].glob("manifest.rank-*.json"))  # merged, then removed


def test_killed_rank_resumes_with_another_number_of_processes(runs: dict) -> None:
    assert runs["proc"].returncode == 0, runs["proc"].stderr
    out = runs["root"] / "killed"
    shutil.copytree(runs["two"], out)
    # Rank 1 died before drawing rows 1 and 3 (its images are gone), and before the merge: only
    # its rank manifest of what it had drawn, rows 0/2/4 are in manifest.json.
    for path in [*out.glob("*/1-*.png"), *out.glob("*/3-*.png")]:
        path.unlink()
    (out / "manifest.rank-1.json").write_text('{"images": []}')
    proc = launch(3, "sample", *runs["args"], "--out", out)
    assert proc.returncode == 0, proc.stderr
    # Three ranks now: rows 0, 3 → rank 0; rows 1, 4 → rank 1; row 2 → rank 2.
    assert "rank 0/3: 8 images (4 generated, 4 already there)" in proc.stderr
    assert "rank 1/3: 8 images (4 generated, 4 already there)" in proc.stderr
    assert "rank 2/3: 4 images (0 generated, 4 already there)" in proc.stderr
    assert images_of(out) == images_of(runs["one"])
    merged = json.loads((out / "manifest.json").read_text())
    assert merged == json.loads((runs["one"] / "manifest.json").read_text())


def test_without_a_launch_one_rank_and_no_accelerate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = init_ranks("cpu")
    assert (ranks.rank, ranks.world, ranks.state) == (0, 1, None)
    assert ranks.gather("x") == ["x"] and ranks.broadcast(3) == 3
    code = (
        "import sys, uce_cli.distributed as d; d.init_ranks(); print('accelerate' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "False", done.stderr


def test_rows_go_to_rank_index_modulo_world() -> None:
    rows = list(range(7))
    assert [Ranks(rank=r, world=3).share(rows) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


def test_apply_under_a_launch_runs_on_rank_0_only(tiny_model: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_model}\nerase:\n  - concepts: [Kelly Mckernan]\n")
    proc = launch(2, "apply", recipe, "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "rank 0/2: uce apply is one process — running on rank 0 only" in proc.stderr
    assert "rank 1/2: uce apply runs on rank 0 only — nothing to do here" in proc.stderr
    assert (tmp_path / "out" / "edit.safetensors").is_file()
    assert "already exists" not in proc.stderr  # one process wrote the folder, not two


def test_eval_images_scored_across_two_ranks_gives_one_process_figures(
    tiny_model: Path, tiny_clip: Path, tiny_resnet: Path, tmp_path: Path
) -> None:
    pytest.importorskip("nudenet", reason="nudenet is not installed (pip install '.[eval]')")
    metrics = "clip_score, clip_accuracy, imagenet_top1, nudenet"
    figures = {}
    for processes in (1, 2):
        run = eval_run(tiny_model, tmp_path / str(processes), tiny_clip, tiny_resnet, metrics)
        args = ["eval", run, "--images", "--device", "cpu", "-q", "--no-plots"]
        if processes == 1:  # one thread, as torchrun gives each launched process
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                done = runner.invoke(app, [str(a) for a in args])
            finally:
                torch.set_num_threads(threads)
            assert done.exit_code == 0, done.stderr
        else:
            proc = launch(2, *args)
            assert proc.returncode == 0, proc.stderr
        report = json.loads((run / "eval" / "eval.json").read_text())
        assert report["images"]["images"] == 8
        figures[processes] = report["images"]["figures"]
    assert set(figures[2]) == set(figures[1]) and len(figures[1]) == 13, sorted(figures[1])
    for name, value in figures[1].items():
        assert figures[2][name] == pytest.approx(value, abs=1e-5), name


def test_fid_features_gathered_across_two_ranks_give_the_one_process_figure(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank extracts its share of the features (tests/fakes' extractor); rank 0's FID is the
    one-process FID and every rank's report says so."""
    test_eval_images.use_fake_fidelity(monkeypatch)
    figures = {}
    for processes in (1, 2):
        run = test_eval_images.fid_run(tiny_model, tmp_path / str(processes))
        args = ["eval", run, "--images", "--device", "cpu", "-q", "--no-plots"]
        if processes == 1:
            done = runner.invoke(app, [str(a) for a in args])
            assert done.exit_code == 0, done.stderr
        else:
            path = os.pathsep.join([str(test_eval_images.FAKES), os.environ.get("PYTHONPATH", "")])
            monkeypatch.setenv("PYTHONPATH", path)
            proc = launch(2, *args)
            assert proc.returncode == 0, proc.stderr
        report = json.loads((run / "eval" / "eval.json").read_text())
        figures[processes] = report["images"]["metrics"]["fid"]
    assert figures[2]["settings"]["edited_images"] == 4
    assert figures[2]["settings"]["reference_images"] == 6
    assert figures[2]["figures"]["fid"] == pytest.approx(figures[1]["figures"]["fid"], rel=1e-5)


def test_per_pair_values_come_back_in_one_process_order() -> None:
    from uce_cli.judge.images import _across_ranks

    pairs = list(range(7))
    seen = []

    def score(share: list[int]) -> list[int]:
        seen.append(share)
        return [10 * p for p in share]

    class Rank0Of3(Ranks):
        def gather(self, obj: list[int]) -> list[list[int]]:
            return [obj, score(pairs[1::3]), score(pairs[2::3])]  # what ranks 1 and 2 send

    assert _across_ranks(pairs, Rank0Of3(rank=0, world=3), score) == [10 * p for p in pairs]
    assert seen[0] == [0, 3, 6]  # rank 0 scored only its share


def test_debias_loop_across_two_ranks_ends_at_the_one_process_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    recipe = Path(__file__).parents[1] / "recipes" / "debias-loop-tiny.yaml"
    args = ["apply", str(recipe), "--device", "cpu", "--quiet", "--no-cache"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun gives each launched process
    try:
        one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.stderr
    proc = launch(2, *args, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    assert "rank 1/2: debias loop images split across 2 processes" in proc.stderr
    log = {n: json.loads((tmp_path / n / "edit_log.json").read_text()) for n in ("one", "two")}
    sampled = [log[n]["debias"]["iterations"][0]["images_sampled"] for n in ("one", "two")]
    assert sampled == [30, 30]  # 3 prompts × 2 seeds × 5 images: both ranks' counted
    ratios = [[it["items"] for it in log[n]["debias"]["iterations"]] for n in ("one", "two")]
    assert ratios[0] == ratios[1] and log["two"]["debias"]["edits"] >= 1
    a, b = (load_file(tmp_path / n / "edit.safetensors") for n in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
