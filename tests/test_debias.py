"""Debias as the published code does it: the one-pass target against a float64 transcription of
paper-era ``train_debias.py``, Algorithm 1 with a scripted judge against a float64 re-computation
of the same iterations, the loop through the real sampling and a tiny CLIP, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import PlainEncoder, write_recipe
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe
from uce_cli.errors import RecipeError, UceError

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def kv_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / UNET_FILE), framework="pt") as f:
        return {
            k: f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118
            if ".attn2.to_" in k and k.endswith(("to_k.weight", "to_v.weight"))
        }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Published(PlainEncoder):
    """float64 transcription of paper-era train_debias.py's edit_model (one pass, given weights).

    Per layer: for each edit prompt, encode [prompt] + attribute prompts, take positions
    f … 77 − (farthest − f) of each, T ← W·C and, per attribute in order,
    T += α_j·‖T‖·u_j with u_j = W·A_j/‖W·A_j‖ (``relative``; ``absolute``: T += α_j·W·A_j);
    mat1 += Σ T cᵀ, mat2 += Σ c cᵀ; then every retain text with all 77 positions at
    ``preserve_scale``; W ← mat1·mat2⁻¹.
    """

    def layer(
        self,
        w: torch.Tensor,
        edits: list[tuple[str, list[str], list[float]]],
        retain: list[str],
        relative: bool,
        lamb: float = 0.5,
        erase_scale: float = 1.0,
        preserve_scale: float = 0.1,
        erase: tuple[tuple[str, str], ...] = (),
    ) -> torch.Tensor:
        w = w.double()
        mat1 = lamb * w.clone()
        mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
        for source, guide in erase:  # train_erase.py's pairs: last word ↔ last word, EOS ↔ EOS, …
            emb, f = self.embed([source, guide])
            k = 77 - max(f)
            for c, g in zip(emb[0, f[0] : f[0] + k], emb[1, f[1] : f[1] + k], strict=True):
                mat1 += erase_scale * torch.outer(w @ g, c)
                mat2 += erase_scale * torch.outer(c, c)
        for old_text, new_texts, weights in edits:
            emb, f = self.embed([old_text, *new_texts])
            farthest = max(f)
            context = emb[0, f[0] : 77 - (farthest - f[0])]
            target = (emb[0] @ w.T)[f[0] : 77 - (farthest - f[0])]
            for j in range(len(new_texts)):
                u = (emb[j + 1] @ w.T)[f[j + 1] : 77 - (farthest - f[j + 1])]
                if relative:
                    u = u / u.norm()
                    target += (weights[j] * target.norm()) * u  # in place: ‖T‖ after the last add
                else:
                    target += weights[j] * u
            for c, v in zip(context, target, strict=True):
                mat1 += erase_scale * torch.outer(v, c)
                mat2 += erase_scale * torch.outer(c, c)
        for text in retain:
            emb, _ = self.embed([text])
            for c in emb[0]:
                mat1 += preserve_scale * torch.outer(w @ c, c)
                mat2 += preserve_scale * torch.outer(c, c)
        return torch.linalg.solve(mat2.T, mat1.T).T  # mat1 · mat2⁻¹


@pytest.fixture(scope="module")
def published(tiny_model: Path) -> Published:
    return Published(tiny_model)


# Three attributes, two of them several tokens long in the tiny vocabulary (asian, latino).
ATTRIBUTES = {"black": 0.3, "asian": 0.3, "latino": 0.4}
ALPHAS = {"black": 0.4, "asian": -0.25, "latino": 0.15}


@pytest.mark.parametrize("alpha_scale", ["relative", "absolute"])
def test_one_pass_target_matches_the_published_code(
    alpha_scale: str, tiny_model: Path, published: Published, tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path,
        f"""
model: {tiny_model}
debias:
  - concepts: [doctor, nurse]
    templates: ["image of {{}}", "{{}}"]
    attributes: {json.dumps(ATTRIBUTES)}
    alphas: {json.dumps(ALPHAS)}
    alpha_scale: {alpha_scale}
preserve:
  - concepts: [lawyer, a photo of a dog]
output: {{formats: [delta, lora]}}
""",
    )
    plan = plan_recipe(recipe)
    assert (plan.lam, plan.erase_scale, plan.preserve_scale) == (0.5, 1.0, 0.1)
    assert plan.preserve == ["lawyer", "a photo of a dog"]  # no "" (the debias script has none)
    out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=False).out
    new = _delta(out)
    edits = [
        (f"image of {c}", [f"image of {a}" for a in ATTRIBUTES], list(ALPHAS.values()))
        for c in ("doctor", "nurse")
    ] + [(c, list(ATTRIBUTES), list(ALPHAS.values())) for c in ("doctor", "nurse")]
    old = kv_weights(tiny_model)
    worst = max(
        rel(
            new[key],
            published.layer(w, edits, ["lawyer", "a photo of a dog"], alpha_scale == "relative"),
        )
        for key, w in old.items()
    )
    assert worst < 1e-6, worst
    log = json.loads((out / "edit_log.json").read_text())
    per_layer = alpha_scale == "relative"
    assert (log["solver"]["operator_rank"] is None) == per_layer
    assert max(m["residual_after"] for m in log["layers"].values()) < max(
        m["residual_before"] for m in log["layers"].values()
    )


def _delta(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "edit.safetensors"), framework="pt") as f:
        return {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


class ScriptedJudge:
    """A deterministic classifier: per item (its first label), the number of images it calls the
    first attribute, call after call; records what it was asked."""

    def __init__(self, script: dict[str, list[int]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, images: list, labels: list[str]) -> torch.Tensor:
        assert all(hasattr(im, "size") for im in images)  # PIL images from the real sampling
        first = self.script[labels[0]].pop(0)
        self.calls.append((labels[0], len(images)))
        probs = torch.tensor([[0.1, 0.9]] * len(images))
        probs[:first] = torch.tensor([0.9, 0.1])
        return probs


LOOP = (
    "debias_loop: {seeds: [0, 1], images_per_seed: 2, steps: 2, batch_size: 8, max_iterations: 5}"
)


def _loop_recipe(tiny_model: Path, folder: Path, extra: str = "") -> Path:
    return write_recipe(
        folder,
        f"""
model: {tiny_model}
{extra}
debias:
  - concepts: [doctor]
    templates: ["image of {{}}", "{{}}"]
    attributes: {{male: 0.5, female: 0.5}}
    alphas: auto
preserve:
  - concepts: [lawyer]
{LOOP}
output: {{formats: [delta]}}
""",
    )


def test_loop_with_a_scripted_judge_matches_a_float64_recomputation(
    tiny_model: Path, published: Published, tmp_path: Path
) -> None:
    # "image of doctor": 3/4 male → 1/4 → 2/4 (done); "doctor": 2/4 at once (done, preserved).
    judge = ScriptedJudge({"image of male": [3, 1, 2], "male": [2]})
    seen: list[dict] = []
    plan = plan_recipe(_loop_recipe(tiny_model, tmp_path))
    out = run_apply(
        plan, out=tmp_path / "out", device="cpu", use_cache=False, classifier=judge,
        on_iteration=seen.append,
    ).out  # fmt: skip
    assert judge.calls == [
        ("image of male", 4),
        ("male", 4),
        ("image of male", 4),
        ("image of male", 4),
    ]
    log = json.loads((out / "edit_log.json").read_text())["debias"]
    assert [r["iteration"] for r in log["iterations"]] == [1, 2, 3] and seen == log["iterations"]
    assert log["stopped"] == "converged" and log["edits"] == 2
    assert log["preserve_added"] == ["doctor"]
    assert [r["sampled"] for r in log["iterations"]] == [
        ["image of doctor", "doctor"], ["image of doctor"], ["image of doctor"]
    ]  # fmt: skip
    alphas = [[item["alpha"]["male"] for item in r["items"]] for r in log["iterations"][:2]]
    assert alphas == [pytest.approx([-0.025, 0.0]), pytest.approx([0.025, 0.0])]
    first = log["iterations"][0]["items"]
    assert first[0]["ratios"] == {"male": 0.75, "female": 0.25} and first[1]["converged"]
    assert all(r["images_sampled"] == 4 * len(r["sampled"]) for r in log["iterations"])
    assert set(log["iterations"][0]["seconds"]) == {"sample", "classify", "solve"}

    # The same two edits in float64, each from the previous weights (rounded to fp32 as stored).
    new = _delta(out)
    worst = 0.0
    for key, w in kv_weights(tiny_model).items():
        for a in (-0.025, 0.025):
            edits = [
                ("image of doctor", ["image of male", "image of female"], [a, -a]),
                ("doctor", ["male", "female"], [0.0, 0.0]),
            ]
            w = published.layer(w, edits, ["lawyer", "doctor"], relative=True).float()
        worst = max(worst, rel(new[key], w))
    assert worst < 1e-6, worst

    # `uce show` lists the iterations and writes the ratio plot
    from PIL import Image
    from typer.testing import CliRunner

    from uce_cli.cli import app

    png = tmp_path / "ratios.png"
    shown = CliRunner().invoke(app, ["show", str(out), "--plot", str(png)])
    if importlib.util.find_spec("matplotlib") is None:  # the `debias` extra is not installed
        assert shown.exit_code == 1 and "pip install 'uce-cli[debias]'" in shown.stderr
        return
    assert shown.exit_code == 0, shown.output
    assert "debias loop — stopped: converged" in shown.stdout
    assert "image of doctor" in shown.stdout and "male 0.50" in shown.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uce_cli.weights.tiny import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_classifier_scores_images_as_clip_does(tiny_clip: Path) -> None:
    from PIL import Image
    from transformers import CLIPModel

    from uce_cli.judge.classify import ClipClassifier, label_ratios

    images = [Image.new("RGB", (64, 64), color) for color in ("red", "blue", "white")]
    labels = ["image of male", "image of female", "image of black"]
    clf = ClipClassifier(str(tiny_clip), torch.device("cpu"), batch_size=2)
    probs = clf(images, labels)
    assert probs.shape == (3, 3)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-6)
    # the same numbers from CLIPModel's own forward pass on the processor's inputs
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    text = clf.tokenizer(labels, padding=True, return_tensors="pt")
    pixels = clf.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(**text, pixel_values=pixels).logits_per_image.softmax(1)
    assert torch.allclose(probs, expected, atol=1e-5)
    # ratios: an image counts for every label at its maximum (ties count for each)
    tie = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    assert label_ratios(tie).tolist() == [0.5, 0.5, 0.25]


def test_loop_with_tiny_clip_through_real_sampling(
    tiny_model: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    recipe = _loop_recipe(tiny_model, tmp_path)
    text = recipe.read_text().replace(
        "max_iterations: 5", f"max_iterations: 2, classifier: {tiny_clip}"
    )
    recipe.write_text(text)
    plan = plan_recipe(recipe)
    out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=False).out
    log = json.loads((out / "edit_log.json").read_text())["debias"]
    assert log["settings"]["classifier"] == str(tiny_clip)
    for record in log["iterations"]:
        for item in record["items"]:
            ratios = list(item["ratios"].values())
            assert all(r * 4 == int(r * 4) for r in ratios) and sum(ratios) >= 1  # 4 images, ties
            gap = max(abs(r - 0.5) for r in ratios)
            assert item["gap"] == pytest.approx(gap)
            expected = [0.1 * (0.5 - r) for r in ratios] if gap > 0.05 else [0.0, 0.0]
            assert list(item["alpha"].values()) == pytest.approx(expected)
    changed = rel(
        _delta(out)[next(iter(kv_weights(tiny_model)))], next(iter(kv_weights(tiny_model).values()))
    )
    assert (changed > 0) == (log["edits"] > 0)


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (
            "concepts: [doctor]\n    attributes: {male: 0.5, female: 0.6}\n    alphas: auto",
            "debias.0.attributes: the desired ratios sum to 1.1, not 1",
        ),
        (
            "concepts: [doctor]\n    attributes: [Doctor, female]\n    alphas: auto",
            "debias.0.attributes: 'Doctor' is the concept itself",
        ),
        (
            'concepts: [doctor]\n    templates: ["{} of a doctor"]\n    attributes: [male, female]\n'
            "    alphas: auto",
            "debias.0.templates: '{} of a doctor' already contains 'doctor' outside {}",
        ),
        (
            'concepts: [doctor]\n    templates: ["image of a person"]\n    attributes: [male]\n'
            "    alphas: auto",
            "debias.0.templates: template 'image of a person' must contain exactly one {}",
        ),
        (
            "concepts: [doctor]\n    attributes: [male, female]\n    alphas: {male: 1, female: 1}\n"
            "output: {formats: [delta, operator]}",
            "output.formats: the operator format needs an edit W_new = W_old·K, but debias.0 uses "
            "norm-relative debias targets",
        ),
        (
            "concepts: [doctor]\n    attributes: [male, female]\n    alphas: {male: 1, female: 1}\n"
            "debias_loop: {steps: 3}",
            "`debias_loop` is set but no debias group has `alphas: auto`",
        ),
    ],
)
def test_bad_debias_input(group: str, expected: str, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: m\ndebias:\n  - {group}\n")
    with pytest.raises(RecipeError) as info:
        plan_recipe(recipe)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_auto_without_classifier_offline_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from uce_cli.cli import app

    recipe = _loop_recipe(tiny_model, tmp_path)
    result = CliRunner().invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: debias_loop.classifier: cannot load")
    assert "hf download openai/clip-vit-base-patch32" in lines[0]
    assert not (tmp_path / "out").exists()


def test_relative_debias_has_no_operator(tiny_model: Path, tmp_path: Path) -> None:
    """LoRA works from the per-layer result; the operator format and transfer refuse clearly."""
    from uce_cli.commands.transfer import run_transfer

    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\ndebias:\n  - concepts: [doctor]\n    attributes: [male, female]\n"
        "    alphas: {male: 0.3, female: 0.3}\noutput: {formats: [delta, lora]}\n",
    )
    plan = plan_recipe(recipe)
    out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=False).out
    from safetensors.torch import load_file

    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    delta = _delta(out)
    old = kv_weights(tiny_model)
    key = next(iter(old))
    module = "unet." + key.removesuffix(".weight")
    dw = lora[f"{module}.lora_B.weight"].double() @ lora[f"{module}.lora_A.weight"].double()
    assert rel(old[key].double() + dw, delta[key]) < 1e-6
    plan.formats = ["operator"]
    with pytest.raises(UceError, match="operator format needs an edit W_new = W_old·K"):
        run_apply(plan, out=tmp_path / "out2", device="cpu", use_cache=False)
    with pytest.raises(UceError, match="norm-relative debias targets"):
        run_transfer(out, str(tiny_model), tmp_path / "out3", ["delta"])


def test_ctrl_c_writes_nothing_and_says_how_far(
    tiny_model: Path, tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import uce_cli.commands.debias
    from uce_cli.cli import app

    recipe = _loop_recipe(tiny_model, tmp_path)
    recipe.write_text(recipe.read_text().replace("max_iterations: 5", f"classifier: {tiny_clip}"))
    calls = []

    def judge_then_interrupt(probs: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 2:  # two items in iteration 1, then Ctrl-C in iteration 2
            raise KeyboardInterrupt
        return torch.tensor([1.0, 0.0], dtype=torch.float64)  # all "male": far from 0.5

    monkeypatch.setattr(uce_cli.commands.debias, "label_ratios", judge_then_interrupt)
    result = CliRunner().invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == (
        "error: interrupted after iteration 1 of 30 — nothing was written (the output is "
        "written once, when the loop ends)"
    )
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unified_recipe_edits_everything_in_every_iteration(
    tiny_model: Path, published: Published, tmp_path: Path
) -> None:
    """erase + fixed-α debias + auto debias + preserve: one solve per iteration holds them all."""
    recipe = write_recipe(
        tmp_path,
        f"""
model: {tiny_model}
erase:
  - concepts: [Kinkade]
    guide: art
debias:
  - concepts: [doctor]
    templates: ["image of {{}}"]
    attributes: {{male: 0.5, female: 0.5}}
    alphas: auto
  - concepts: [nurse]
    attributes: [male, female]
    alphas: {{male: 0.2, female: 0.1}}
preserve:
  - concepts: [lawyer]
{LOOP}
output: {{formats: [delta]}}
""",
    )
    plan = plan_recipe(recipe)
    assert plan.preserve == ["", "lawyer"] and plan.preserve_scale == 0.5  # erase present: paper
    judge = ScriptedJudge({"image of male": [3, 1, 2]})
    out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=False, classifier=judge).out
    log = json.loads((out / "edit_log.json").read_text())
    assert log["debias"]["edits"] == 2 and log["debias"]["stopped"] == "converged"
    new = _delta(out)
    worst = 0.0
    for key, w in kv_weights(tiny_model).items():
        for a in (-0.025, 0.025):
            edits = [
                ("image of doctor", ["image of male", "image of female"], [a, -a]),
                ("nurse", ["male", "female"], [0.2, 0.1]),
            ]
            w = published.layer(
                w, edits, ["", "lawyer"], relative=True, preserve_scale=0.5,
                erase=(("Kinkade", "art"),),
            ).float()  # fmt: skip
        worst = max(worst, rel(new[key], w))
    assert worst < 1e-6, worst


def test_last_token_loop_is_one_operator(tiny_model: Path, tmp_path: Path) -> None:
    """last-token: absolute α, so each iteration is W·K_t and the written operator is Π K_t."""
    from uce_cli.artifacts.operator import read_operator

    recipe = _loop_recipe(tiny_model, tmp_path, extra="alignment: last-token")
    recipe.write_text(recipe.read_text().replace("formats: [delta]", "formats: [delta, operator]"))
    judge = ScriptedJudge({"image of male": [3, 1, 2], "male": [2]})
    out = run_apply(
        plan_recipe(recipe), out=tmp_path / "out", device="cpu", use_cache=False, classifier=judge
    ).out
    assert json.loads((out / "edit_log.json").read_text())["debias"]["edits"] == 2
    k = read_operator(out / "operator.safetensors").k.double()
    new = _delta(out)
    for key, w in kv_weights(tiny_model).items():
        assert rel(new[key], w.double() @ k) < 1e-6, key
