"""Output plumbing: one-pass copy+patch+hash, the hash book, content hashes, atomic staging."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from uce_cli.artifacts.files import text_encoder_weights_sha256
from uce_cli.artifacts.outputs import HashBook, patch_safetensors, sha256_file, tensor_digests
from uce_cli.errors import OutputError


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(300, 70) for i in range(6)} | {"h": torch.randn(5).half()}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), {"note": "x"})
    return path


def test_patch_changes_only_the_patched_tensors(weights: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.safetensors"
    new = {"t2": torch.ones(300, 70), "h": torch.zeros(5).half(), "absent": torch.ones(1)}
    keys = patch_safetensors(weights, dst, new)
    assert sorted(keys) == ["h", "t2"]
    before, after = load_file(str(weights)), load_file(str(dst))
    assert torch.equal(after["t2"], new["t2"]) and torch.equal(after["h"], new["h"])
    assert all(torch.equal(before[k], after[k]) for k in before if k not in ("t2", "h"))
    assert weights.stat().st_size == dst.stat().st_size  # same header, same offsets
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"note": "x"}
    with pytest.raises(OutputError, match="t1: edited tensor \\(2, 2\\) does not fit"):
        patch_safetensors(weights, tmp_path / "bad", {"t1": torch.ones(2, 2)})
    assert not (tmp_path / "bad").exists()  # refused before copying


def test_hash_book(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = HashBook()
    assert book.known(weights) is None
    digest = book.sha256(weights)
    assert digest == sha256_file(weights) and book.known(weights) == digest
    calls = []
    monkeypatch.setattr("uce_cli.artifacts.outputs.sha256_file", lambda p: calls.append(p) or "x")
    assert book.sha256(weights) == digest and calls == []  # not read again
    weights.write_bytes(weights.read_bytes() + b" ")  # changed file → new identity
    assert book.known(weights) is None
    # a Hugging Face cache blob is named by its sha256
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"data")
    link = tmp_path / "snapshot.safetensors"
    link.symlink_to(blob)
    assert book.known(link) == "ab" * 32
    monkeypatch.undo()
    other = tmp_path / "other.bin"
    other.write_bytes(b"other")
    many = HashBook().sha256_many([other, weights, link])
    assert list(many) == [other, weights, link]
    assert many[other] == sha256_file(other) and many[link] == "ab" * 32


def test_tensor_digests_are_content_hashes(weights: Path) -> None:
    digests = tensor_digests(weights)
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            t = f.get_tensor(key)
            data = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            assert digests[key] == f"{t.dtype}|{list(t.shape)}|{data}"
    assert set(tensor_digests(weights, {"t0", "nope"})) == {"t0"}


def test_text_encoder_identity_ignores_layout_not_weights(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    other = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    file = other / "text_encoder" / "model.safetensors"
    tensors = load_file(str(file))
    save_file(dict(reversed(list(tensors.items()))), str(file), {"format": "pt", "extra": "y"})
    assert sha256_file(file) != sha256_file(tiny_model / "text_encoder" / "model.safetensors")
    assert text_encoder_weights_sha256(other) == text_encoder_weights_sha256(tiny_model)
    key = next(k for k in tensors if "layers.0" in k and k.endswith("weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(file))
    assert text_encoder_weights_sha256(other) != text_encoder_weights_sha256(tiny_model)
