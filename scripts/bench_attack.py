"""Plain UCE against `harden:` rounds 1/2/3 under the closed-form and the discrete attack (issue 17).

For each recipe (quickstart, erase-artists-10, moderate-nudity) on each model — the builtin tiny
model, and an SD-1.4-architecture text path with random weights (CLIP ViT-L/14's text config, the
32 cross-attention k/v shapes of SD 1.4's UNet: 10×320, 10×640, 12×1280 rows by 768; text path
only, no UNet is built) — the edit is solved plain and with 1, 2, 3 hardening rounds, and each
result is measured:

  attack_recovery           e* at the concept's word token (γ auto), mean over concepts
  attack_recovery_aligned   e* at every position the paper alignment pairs (word, EOS, pads)
  attack_recovery_discrete  best prompt of the seeded search (``--budget`` prompts per concept)
  efficacy, drift_preserve, drift_unrelated   uce eval's text figures (docs/metrics.md)
  apply_s                   the solve (plain) or solve + rounds (hardened), encode excluded

Random weights make every figure algebraic (how the closed forms interact on these matrices), not
semantic: whether images of an erased concept come back needs trained weights and images (the GPU
recipe recipes/attack-nudity-i2p.yaml). erase-artists-10 keeps only the first ``--preserve``
prompts of its 1,734-artist preserve list (the encoder is the cost on 2 CPU cores).

Usage:
    python scripts/bench_attack.py --quick                 # the tiny model only
    python scripts/bench_attack.py --budget 16 --preserve 50
Prints a Markdown table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from uce_cli.edit.adversary import attack_embeddings, normal_matrices, recovery  # noqa: E402
from uce_cli.edit.harden import attack_rows, harden_edit  # noqa: E402
from uce_cli.edit.plan import resolve_plan  # noqa: E402
from uce_cli.edit.recipe import Harden, load_recipe  # noqa: E402
from uce_cli.edit.solve import Scales, solve_edit  # noqa: E402
from uce_cli.edit.stats import collect_statistics  # noqa: E402

RECIPES = {
    "quickstart": ROOT / "recipes" / "quickstart.yaml",
    "erase-artists-10": ROOT / "recipes" / "published" / "erase-artists-10.yaml",
    "moderate-nudity": ROOT / "recipes" / "moderate-nudity.yaml",
}
UNRELATED = [
    "a photo of a dog on a beach",
    "a red car parked in a city street",
    "a bowl of fruit on a wooden table",
    "a mountain landscape at sunrise",
    "a portrait of an old man",
    "a bird sitting on a branch",
]
SD14_ROWS = [320] * 10 + [640] * 10 + [1280] * 12  # the 32 attn2 k/v matrices of SD 1.4


def tiny_model() -> tuple[object, dict[str, torch.Tensor]]:
    """The builtin tiny model's text path and its k/v weights."""
    from uce_cli.families.model import open_model, open_text_path

    model = open_model("builtin:tiny-sd")
    return open_text_path(model, torch.device("cpu"), torch.float32), model.read_kv()


def full_size_model() -> tuple[object, dict[str, torch.Tensor]]:
    """A random CLIP ViT-L/14 text path and random SD-1.4-shaped k/v weights (seed 0)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from uce_cli.families.base import Group
    from uce_cli.families.sd import CLIPTextPath
    from uce_cli.weights.full_size import CLIP_L_TEXT, randomized
    from uce_cli.weights.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    config = CLIPTextConfig(
        **CLIP_L_TEXT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.device("meta"):
        encoder = CLIPTextModel(config)
    encoder = randomized(encoder).eval()
    # to_empty leaves buffers uninitialized; position ids are 0…76 (from_pretrained rebuilds them)
    for name, buffer in encoder.named_buffers():
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    path = CLIPTextPath(tok, encoder, Group("text", 768, "CLIP ViT-L/14 last hidden state"))
    g = torch.Generator().manual_seed(0)
    weights = {
        f"attn{i // 2}.{'to_k' if i % 2 == 0 else 'to_v'}.weight": torch.randn(r, 768, generator=g)
        * 0.02
        for i, r in enumerate(SD14_ROWS)
    }
    return path, weights


def plan_of(name: str, preserve: int) -> object:
    """The recipe's plan, its preserve list cut to ``preserve`` prompts (plus "")."""
    path = RECIPES[name]
    plan = resolve_plan(load_recipe(path), path)
    if len(plan.preserve) > preserve + 1:
        plan.preserve = plan.preserve[: preserve + 1]
    return plan


def figures(text_path, plan, old, new, vectors, bound, budget, seed) -> dict[str, float]:  # noqa: ANN001
    """attack and text figures of one edit."""
    from uce_cli.judge.attack import SearchSettings, discrete_search
    from uce_cli.judge.evaluate import edited_guides
    from uce_cli.judge.prompts import DEFAULT_HELDOUT_TEMPLATES
    from uce_cli.judge.text import DriftPrompt, HeldOutPrompt, TextInputs, text_figures

    normal = normal_matrices(old, new)
    rec, aligned, disc = [], [], []
    for cv in vectors:
        e, _ = attack_embeddings(normal, cv.word["text"], None, bound)
        rec.append(recovery(normal, e, cv.word["text"]))
        e, _ = attack_embeddings(normal, cv.aligned["text"], None, bound)
        aligned.append(recovery(normal, e, cv.aligned["text"]))
        if budget:
            found = discrete_search(
                text_path, {"text": normal}, cv, SearchSettings(seed, budget, 3, 8), 32
            )
            disc.append(found["best"][0]["attack_recovery"] if found.get("best") else float("nan"))
    inputs = TextInputs(
        heldout=[
            HeldOutPrompt(t.format(c), c, g)
            for c, g in edited_guides(plan).values()
            for t in DEFAULT_HELDOUT_TEMPLATES
        ],
        preserved=[DriftPrompt(p, p) for p in plan.preserve if p][:20],
        unrelated=[DriftPrompt(p, p) for p in UNRELATED],
    )
    text = text_figures(inputs, text_path, old, new, 32)["figures"]
    return {
        "attack_recovery": sum(rec) / len(rec),
        "attack_recovery_aligned": sum(aligned) / len(aligned),
        "attack_recovery_discrete": sum(disc) / len(disc) if disc else float("nan"),
        "efficacy": text.get("efficacy"),
        "drift_preserve": text.get("drift_preserve"),
        "drift_unrelated": text.get("drift_unrelated"),
    }


def bench(model_name: str, loaded, recipe: str, args) -> list[dict]:  # noqa: ANN001
    """The four rows (plain, harden 1/2/3) of one model and recipe."""
    from uce_cli.judge.attack import concept_vectors
    from uce_cli.judge.evaluate import edited_guides

    text_path, old = loaded
    plan = plan_of(recipe, args.preserve)
    t0 = time.perf_counter()
    stats, _, _ = collect_statistics(plan, text_path, torch.device("cpu"))
    rows_g = attack_rows(plan, text_path)
    encode_s = time.perf_counter() - t0
    vectors, bounds = concept_vectors(text_path, list(edited_guides(plan).values()), 32)
    scales = Scales(plan.lam, plan.erase_scale, plan.preserve_scale)
    out = []
    for rounds in (0, 1, 2, 3):
        t0 = time.perf_counter()
        if rounds == 0:
            new, _, _ = solve_edit(old, stats["text"], scales)
        else:
            spec = Harden(rounds=rounds, tolerance=0.0)
            new, _, _, _ = harden_edit(old, stats["text"], scales, rows_g["text"], spec)
        apply_s = time.perf_counter() - t0
        row = {
            "model": model_name,
            "recipe": recipe,
            "edit": "plain" if rounds == 0 else f"harden {rounds}",
            **figures(text_path, plan, old, new, vectors, bounds["text"], args.budget, args.seed),
            "apply_s": apply_s,
            "encode_s": encode_s,
            "preserve_prompts": len(plan.preserve),
        }
        out.append(row)
        print(json.dumps(row), file=sys.stderr)
    return out


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--budget", type=int, default=32, help="search budget per concept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preserve", type=int, default=50, help="preserve prompts kept at most")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rows = []
    models = {"tiny": tiny_model}
    if not args.quick:
        models["sd14-random"] = full_size_model
    for model_name, build in models.items():
        loaded = build()
        for recipe in RECIPES:
            rows += bench(model_name, loaded, recipe, args)
    cols = [
        "model",
        "recipe",
        "edit",
        "attack_recovery",
        "attack_recovery_aligned",
        "attack_recovery_discrete",
        "efficacy",
        "drift_preserve",
        "drift_unrelated",
        "apply_s",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps({"rows": rows, "budget": args.budget, "preserve": args.preserve}))


if __name__ == "__main__":
    main()
