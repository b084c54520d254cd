"""Which models uce opens: unsupported families refused by name, broken indexes, hub ids offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app
from uce_cli.errors import ModelError
from uce_cli.families.model import open_model

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def assert_one_error_line(result, *needles: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def edit_index(folder: Path, **changes: object) -> None:
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("class_name", "extra", "family"),
    [
        ("StableDiffusionXLPipeline", ["text_encoder_2", "tokenizer_2"], "SDXL"),
        ("StableDiffusionPipeline", ["text_encoder_2", "tokenizer_2"], "two text encoders"),
        ("PixArtAlphaPipeline", ["transformer"], "PixArt"),
        ("FluxPipeline", ["text_encoder_2", "transformer"], "FLUX"),
        ("StableDiffusion3Pipeline", ["text_encoder_3", "transformer"], "Stable Diffusion 3"),
    ],
)
def test_two_text_encoders_refused(
    model_copy: Path, tmp_path: Path, class_name: str, extra: list[str], family: str
) -> None:
    for name in extra:  # a real second component folder, as an SDXL-shaped pipeline has
        source = "tokenizer" if name.startswith("tokenizer") else "text_encoder"
        shutil.copytree(model_copy / source, model_copy / name)
    edit_index(
        model_copy,
        _class_name=class_name,
        **{n: ["transformers", "CLIPTextModelWithProjection"] for n in extra},
    )
    with pytest.raises(ModelError, match=family):
        open_model(str(model_copy))
    recipe = write_recipe(tmp_path, f"model: {model_copy}\nerase:\n  - concepts: [Kinkade]\n")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert_one_error_line(result, family, str(model_copy), "Stable Diffusion 1.x/2.x")
    assert not (tmp_path / "out").exists()


def test_other_text_encoder_class_refused(model_copy: Path) -> None:
    edit_index(model_copy, text_encoder=["transformers", "T5EncoderModel"])
    with pytest.raises(ModelError, match="T5EncoderModel"):
        open_model(str(model_copy))


@pytest.mark.parametrize("text", ["[]", '"x"', "null", "3", "{", '{"unet": ', "\xff\xfe"])
def test_model_index_not_object(model_copy: Path, tmp_path: Path, text: str) -> None:
    (model_copy / "model_index.json").write_bytes(text.encode("latin-1"))
    recipe = write_recipe(tmp_path, f"model: {model_copy}\nerase:\n  - concepts: [Kinkade]\n")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert_one_error_line(result, str(model_copy / "model_index.json"))
    assert "internal error" not in result.stderr


def test_hub_model_from_local_cache_offline(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id already in the Hugging Face cache opens offline, without asking the Hub."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someone--tiny-sd"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    model = open_model("someone/tiny-sd")
    assert model.root == repo / "snapshots" / commit
    assert len(model.kv) == 14


# Runs `python -m uce_cli ARGS` counting every socket connection it attempts; at exit it writes
# them, and whether torch was imported, to $UCE_TEST_REPORT. What makes a hub typo fail fast is
# asserted from these (no retry loop, no request offline, nothing heavy imported), not timed.
COUNT_CONNECTS = """
import atexit, json, os, runpy, socket, sys
attempts = []
real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
def connect(self, address):
    attempts.append(repr(address))
    return real_connect(self, address)
def connect_ex(self, address):
    attempts.append(repr(address))
    return real_connect_ex(self, address)
socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
def report():
    with open(os.environ["UCE_TEST_REPORT"], "w") as f:
        json.dump({"connects": attempts, "torch": "torch" in sys.modules}, f)
atexit.register(report)
sys.argv = ["uce", *sys.argv[1:]]
runpy.run_module("uce_cli", run_name="__main__", alter_sys=True)
"""


def run_cli(
    args: list[str], env: dict[str, str], report: Path
) -> tuple[dict, subprocess.CompletedProcess]:
    """Run the CLI in a child that records its connection attempts and imports (a hang guard only)."""
    done = subprocess.run(
        [sys.executable, "-c", COUNT_CONNECTS, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "UCE_TEST_REPORT": str(report)},
        timeout=600,
    )
    return json.loads(report.read_text()), done


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE=1", "unreachable endpoint"])
def test_hub_typo_offline_fast(tmp_path: Path, network: str) -> None:
    """A hub id that is not cached, with no network: one line, at most one request, no retries,
    torch never imported."""
    recipe = write_recipe(
        tmp_path, "model: nobody/stable-difusion-typo\nerase:\n  - concepts: [x]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "UCE_DEBUG"))}
    env.update(UCE_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_CACHE=str(tmp_path / "hf"))
    if network == "HF_HUB_OFFLINE=1":
        env["HF_HUB_OFFLINE"] = "1"
        why = "HF_HUB_OFFLINE is set"
        expected_connects: list[str] = []  # offline: no request at all
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: connection refused
        why = "http://127.0.0.1:9 cannot be reached"
        expected_connects = [repr(("127.0.0.1", 9))]  # one request, no retry
    report, done = run_cli(
        ["apply", str(recipe), "--out", str(tmp_path / "out")], env, tmp_path / "report.json"
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines == [lines[0]] and lines[0].startswith("error: cannot fetch model"), done.stderr
    assert (
        "nobody/stable-difusion-typo" in lines[0]
        and "not in the local Hugging Face cache" in lines[0]
    )
    assert why in lines[0]
    assert report == {"connects": expected_connects, "torch": False}


def test_hub_typo_unreachable_fails_fast_in_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that opens a model (merge, transfer, verify, sample) gets the same error
    after one connection attempt (no retry loop), however many times it asks."""
    import socket

    from huggingface_hub import constants

    from uce_cli.weights import hub

    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        attempts.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    hub._probe.cache_clear()
    try:
        for _ in range(2):
            with pytest.raises(ModelError, match="cannot be reached"):
                open_model("nobody/stable-difusion-typo")
    finally:
        hub._probe.cache_clear()
    assert attempts == [("127.0.0.1", 9)]
