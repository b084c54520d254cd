"""Measure what an attn2-only UCE edit of SDXL leaves on the pooled text path, and what a closed-form
edit of add_embedding.linear_1's text columns changes (docs/families.md, "SDXL").

On the tiny SDXL model (uce_cli/weights/tiny_sdxl.py, seed 0; random weights: the figures say how the
closed forms behave on SDXL's data flow, not what real SDXL images would show), it erases a concept
(object templates, guide ""), preserves a few others, in both alignment modes, and solves in float64
with the formula written out here (DESIGN §1, paper Eq. 7 + λ):

    W = (λ·W_old + s_e·Σ W_old c*_i c_iᵀ + s_p·Σ W_old c_j c_jᵀ) · (λ·I + s_e·Σ c_i c_iᵀ + s_p·Σ c_j c_jᵀ)⁻¹

for the text group (every attn2 to_k/to_v, vectors = the concatenated penultimate states) and for
the pooled group (the first d2' columns W_t of add_embedding.linear_1, one pooled vector per prompt).
It then reports, on held-out phrasings (the eval templates, never used by the edit):

  text efficacy / leakage_eos / leakage_pad   as docs/metrics.md defines them (mean over layers)
  pooled efficacy   1 − ‖W_t' p(h) − W_t p(g)‖ / ‖W_t p(h) − W_t p(g)‖ summed over held-out h
  pooled drift      ‖(W_t' − W_t) p‖ / ‖W_t p‖ over held-out phrasings of preserved / unrelated concepts
  pooled share      ‖W_t (p(h) − p(g))‖ / ‖add_embedding.linear_1(x_g)‖: the concept's part of the
                    path's output relative to the whole (bias and time ids included; time ids of a
                    1024² image)

Usage:  python scripts/sdxl_pooled_path.py [--concept cat] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uce_cli.families.sdxl import POOLED_KEY, SdxlFamily  # noqa: E402
from uce_cli.judge.prompts import DEFAULT_HELDOUT_TEMPLATES  # noqa: E402
from uce_cli.weights.tiny_sdxl import write_tiny_sdxl  # noqa: E402

OBJECT = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
PRESERVE = ("dog", "car", "horse", "tree", "house", "bird")
UNRELATED = ("a boat on the sea", "a red flower in the garden", "an old church at night")


def closed_form(
    w_old: torch.Tensor,
    c_src: torch.Tensor,
    c_tgt: torch.Tensor,
    c_keep: torch.Tensor,
    lam: float,
    s_e: float,
    s_p: float,
) -> torch.Tensor:
    """Eq. 7 + λ in float64: rows of c_src map to W_old·(rows of c_tgt); rows of c_keep stay."""
    w = w_old.double()
    a, b, p = c_src.double(), c_tgt.double(), c_keep.double()
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    lhs = lam * w + s_e * (w @ b.T) @ a + s_p * (w @ p.T) @ p  # (d_out, d_in)
    m = lam * eye + s_e * a.T @ a + s_p * p.T @ p  # (d_in, d_in), symmetric
    return torch.linalg.solve(m, lhs.T).T  # lhs · M⁻¹


def measure(root: Path, concept: str, mode: str) -> dict[str, float]:
    """The figures of one alignment mode (see the module docstring)."""
    family = SdxlFamily(root, json.loads((root / "model_index.json").read_text()))
    path = family.text_path(torch.device("cpu"), torch.float32)
    sources = [concept] + [t.format(concept) for t in OBJECT]
    guides = [""] * len(sources) if mode == "paper" else [""] + [t.format("") for t in OBJECT]
    keep = list(dict.fromkeys([*PRESERVE, ""])) if mode == "paper" else list(PRESERVE)
    heldout = [t.format(concept) for t in DEFAULT_HELDOUT_TEMPLATES]
    kept_held = [t.format(c) for c in PRESERVE for t in DEFAULT_HELDOUT_TEMPLATES]
    prompts = list(dict.fromkeys([*sources, *guides, *keep, *heldout, *kept_held, *UNRELATED]))
    tokens = path.tokens(prompts)["text"]
    enc = path.encode(prompts)
    row = {p: i for i, p in enumerate(prompts)}
    text, pooled = enc["text"][:, :, :], enc["pooled"][:, 0, :]
    seen = path.max_tokens

    def rows(s: str, t: str, paper: bool) -> tuple[torch.Tensor, torch.Tensor]:
        fs, ft = tokens[s].last_word, tokens[t].last_word
        k = seen - max(fs, ft) if paper else 1
        return text[row[s], fs : fs + k], text[row[t], ft : ft + k]

    pairs = [rows(s, g, mode == "paper") for s, g in zip(sources, guides, strict=True)]
    c_src = torch.cat([a for a, _ in pairs])
    c_tgt = torch.cat([b for _, b in pairs])
    if mode == "paper":
        c_keep = torch.cat([text[row[p], :seen] for p in keep])
        lam, s_e, s_p = 0.5, 1.0, max(0.1, 1 / (1 + len(keep)))
    else:
        c_keep = torch.stack([text[row[p], tokens[p].last_word] for p in keep])
        lam, s_e, s_p = 0.5, 1.0, 1.0

    from safetensors import safe_open

    unet_file = root / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(unet_file), framework="pt") as f:
        keys = [k for k in f.keys() if family.group_of(k)]  # noqa: SIM118
        weights = {k: f.get_tensor(k).double() for k in keys}
        bias = f.get_tensor("add_embedding.linear_1.bias").double()
    figures: dict[str, list[float]] = {
        "efficacy": [],
        "leakage_eos": [],
        "leakage_pad": [],
        "drift_preserved": [],
        "drift_unrelated": [],
    }
    x_kept = torch.cat([text[row[p], :seen] for p in kept_held]).double().T  # (d, n·77)
    x_unrel = torch.cat([text[row[p], :seen] for p in UNRELATED]).double().T
    held_pairs = [rows(h, "", True) for h in heldout]  # evaluated as docs/metrics.md pairs
    for key in keys:
        if key == POOLED_KEY:
            continue
        w = weights[key]
        w_new = closed_form(w, c_src, c_tgt, c_keep, lam, s_e, s_p)
        num = {"all": 0.0, "eos": 0.0, "pad": 0.0}
        den = dict.fromkeys(num, 0.0)
        for a, b in held_pairs:
            after = ((w_new @ a.double().T - w @ b.double().T) ** 2).sum(0)
            before = ((w @ a.double().T - w @ b.double().T) ** 2).sum(0)
            for name, sl in (("all", slice(None)), ("eos", slice(1, 2)), ("pad", slice(2, None))):
                num[name] += float(after[sl].sum())
                den[name] += float(before[sl].sum())
        figures["efficacy"].append(1 - (num["all"] / den["all"]) ** 0.5)
        figures["leakage_eos"].append((num["eos"] / den["eos"]) ** 0.5)
        figures["leakage_pad"].append((num["pad"] / den["pad"]) ** 0.5)
        for name, x in (("drift_preserved", x_kept), ("drift_unrelated", x_unrel)):
            figures[name].append(float(((w_new - w) @ x).norm() / (w @ x).norm()))

    d_pool = family.groups()[1].width
    w_full = weights[POOLED_KEY]  # (d_out, d_pool + time)
    w_t = w_full[:, :d_pool]
    p_src = torch.stack([pooled[row[s]] for s in sources])
    p_tgt = torch.stack([pooled[row[g]] for g in guides])
    p_keep = torch.stack([pooled[row[p]] for p in keep])
    w_t_new = closed_form(w_t, p_src, p_tgt, p_keep, 0.5, 1.0, s_p)
    p_g = pooled[row[""]].double()
    gap_before = sum(float(((w_t @ (pooled[row[h]].double() - p_g)) ** 2).sum()) for h in heldout)
    gap_after = sum(
        float(((w_t_new @ pooled[row[h]].double() - w_t @ p_g) ** 2).sum()) for h in heldout
    )
    trained_before = float(((w_t @ (p_src - p_tgt).double().T) ** 2).sum())
    trained_after = float(((w_t_new @ p_src.double().T - w_t @ p_tgt.double().T) ** 2).sum())

    def drift(ps: list[str]) -> float:
        x = torch.stack([pooled[row[p]].double() for p in ps]).T
        return float(((w_t_new - w_t) @ x).norm() / (w_t @ x).norm())

    # the path's whole output for the guide: text part + bias + embedded time ids (1024², no crop)
    unet_cfg = json.loads((root / "unet" / "config.json").read_text())
    from diffusers.models.embeddings import Timesteps

    proj = Timesteps(unet_cfg["addition_time_embed_dim"], True, 0)
    time_ids = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
    t_emb = proj(time_ids).reshape(-1).double()
    out_g = w_t @ p_g + w_full[:, d_pool:] @ t_emb + bias
    share = [float((w_t @ (pooled[row[h]].double() - p_g)).norm() / out_g.norm()) for h in heldout]
    mean = {k: sum(v) / len(v) for k, v in figures.items()}
    return {
        "text_efficacy": mean["efficacy"],
        "text_leakage_eos": mean["leakage_eos"],
        "text_leakage_pad": mean["leakage_pad"],
        "text_drift_preserved": mean["drift_preserved"],
        "text_drift_unrelated": mean["drift_unrelated"],
        "pooled_efficacy_attn2_only": 0.0 * gap_before,  # W_t is not touched: exactly 0
        "pooled_efficacy_trained_prompts": 1 - (trained_after / trained_before) ** 0.5,
        "pooled_efficacy_with_pooled_edit": 1 - (gap_after / gap_before) ** 0.5,
        "pooled_drift_preserved": drift(kept_held),
        "pooled_drift_unrelated": drift(list(UNRELATED)),
        "pooled_share": sum(share) / len(share),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="cat")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny_sdxl(Path(tmp) / "tiny-sdxl")
        result = {mode: measure(root, args.concept, mode) for mode in ("paper", "last-token")}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    names = list(next(iter(result.values())))
    print(f"{'figure':36s} {'paper':>10s} {'last-token':>10s}")
    for name in names:
        print(f"{name:36s} {result['paper'][name]:10.4f} {result['last-token'][name]:10.4f}")


if __name__ == "__main__":
    main()
