"""Auto-preserve's seeded perturbations (``auto: {top: N, augment: …}``, a one-operator DPA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PlainEncoder, apply_recipe, write_recipe
from tests.test_nullspace import AUTO_RECIPE, NULL_SPACE
from tests.test_solve import kv_weights
from uce_cli.edit.plan import plan_recipe
from uce_cli.edit.recipe import dump_recipe, load_recipe, recipe_sha256
from uce_cli.errors import RecipeError

AUGMENT = "{copies: 3, scale: 0.2, directions: 2, seed: 1}"


def augmented(augment: str = AUGMENT) -> str:
    """AUTO_RECIPE with ``augment`` on its auto group."""
    return AUTO_RECIPE.replace("auto: {top: 3}", f"auto: {{top: 3, augment: {augment}}}")


def run(model: Path, folder: Path, body: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The edit log and the delta of one apply."""
    out = apply_recipe(model, folder, body=body)
    log = json.loads((out / "edit_log.json").read_text())
    return log, load_file(str(out / "edit.safetensors"))


def test_augment_is_seeded_recorded_and_constrained(tiny_model: Path, tmp_path: Path) -> None:
    logs, deltas = zip(
        *(run(tiny_model, tmp_path / r, augmented() + NULL_SPACE) for r in ("a", "b")), strict=True
    )
    assert logs[0]["solver"]["auto_preserve"] == logs[1]["solver"]["auto_preserve"]
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    [auto] = logs[0]["solver"]["auto_preserve"]
    settings = {"copies": 3, "scale": 0.2, "directions": 2, "seed": 1}
    assert auto["augment"] == settings | {"vectors": {"text": 3 * 3}}
    assert logs[0]["recipe"]["preserve"][1]["auto"]["augment"] == settings

    # Under null-space the copies span the chosen vectors plus the r weakest directions of the
    # stacked W_old, whatever the seed: both are kept exactly (rebuilt by hand here).
    old = kv_weights(tiny_model)
    h_w = sum(w.double().T @ w.double() for w in old.values())
    v = torch.linalg.eigh(h_w).eigenvectors[:, :2]
    enc = PlainEncoder(tiny_model)
    hidden, f = enc.embed(auto["chosen"])
    x = torch.stack([hidden[i, f[i]] for i in range(3)]).double()
    xi = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    copies = (x + x.norm(dim=1, keepdim=True) * (xi @ v.T) * (0.2 / 2**0.5)).reshape(-1, 32)
    for k, w in old.items():
        dw = deltas[0][f"unet.{k}"].double() - w.double()
        assert float((copies @ dw.T).norm() / (copies @ w.double().T).norm()) < 1e-5, k
        assert float((v.T @ dw.T).norm() / (v.T @ w.double().T).norm()) < 1e-5, k
    plain_log, plain = run(tiny_model, tmp_path / "p", AUTO_RECIPE + NULL_SPACE)
    assert any(not torch.equal(deltas[0][k], plain[k]) for k in plain)
    # ... and only those two directions leave the free space (copies count once for τ)
    assert logs[0]["solver"]["kept_rank"] == plain_log["solver"]["kept_rank"] - 2

    # Under least squares the draw itself matters: the same seed, the same edit; another, another.
    ls = [run(tiny_model, tmp_path / f"ls{i}", augmented(AUGMENT.replace("1}", s)))[1]
          for i, s in enumerate(("1}", "1}", "2}"))]  # fmt: skip
    assert all(torch.equal(ls[0][k], ls[1][k]) for k in plain)
    assert any(not torch.equal(ls[0][k], ls[2][k]) for k in plain)


def test_augment_off_leaves_recipe_log_and_edit_as_they_were(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = write_recipe(tmp_path, f"model: {tiny_model}\n{AUTO_RECIPE}{NULL_SPACE}")
    # The normalized recipe (hence its hash) is what it was before `augment` existed.
    recipe = load_recipe(path)
    assert dump_recipe(recipe)["preserve"][1]["auto"] == {"top": 3}
    log, delta = run(tiny_model, tmp_path / "off", AUTO_RECIPE + NULL_SPACE)
    assert log["recipe"]["preserve"][1]["auto"] == {"top": 3}
    assert set(log["solver"]["auto_preserve"][0]) == {
        "section",
        "top",
        "candidates",
        "chosen",
        "drift",
    }
    assert log["recipe_sha256"] == recipe_sha256(recipe)
    # A vector and its copies share one vector's weight: with scale 0 the copies are the vector
    # itself, and the edit is the plain one up to rounding (least squares and null space).
    for solver in ("", NULL_SPACE):
        _, same = run(
            tiny_model, tmp_path / f"s0{len(solver)}", augmented("{copies: 3, scale: 0}") + solver
        )
        _, plain = run(tiny_model, tmp_path / f"p{len(solver)}", AUTO_RECIPE + solver)
        assert set(same) == set(plain) == set(delta)
        for k in plain:
            assert float((same[k].double() - plain[k].double()).norm()) <= 1e-5 * float(
                plain[k].double().norm()
            ), (solver, k)


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ("{copies: 0}", r"preserve\.1\.auto\.augment\.copies: must be >= 1 \(got 0\)"),
        ("{copies: 2, scale: -0.5}", r"preserve\.1\.auto\.augment\.scale: must be >= 0"),
        ("{copies: 2, scale: .nan}", r"preserve\.1\.auto\.augment\.scale"),
        ("{scale: 0.1}", r"preserve\.1\.auto\.augment: missing required key `copies`"),
        ("{copies: 2, sigma: 1}", r"preserve\.1\.auto\.augment: unknown key `sigma`"),
    ],
)
def test_augment_bad_values_are_recipe_errors(
    tiny_model: Path, tmp_path: Path, augment: str, message: str
) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_model}\n{augmented(augment)}")
    with pytest.raises(RecipeError, match=message):
        plan_recipe(recipe)


def test_augment_directions_beyond_the_width_name_the_field(
    tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(RecipeError, match=r"preserve\.1\.auto\.augment\.directions: 33 .* 32"):
        apply_recipe(tiny_model, tmp_path, body=augmented("{copies: 1, directions: 33}"))
