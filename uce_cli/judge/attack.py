"""``uce attack RUN``: how easily an erased concept comes back — the closed-form embedding attack
(e*, ``edit.adversary``) and a seeded, budgeted discrete prompt search, per erased/moderated
concept and per group of edited layers; written to ``RUN/attack/`` atomically.

Figures (docs/metrics.md): ``attack_recovery`` (e* at the concept's last word token),
``attack_recovery_aligned`` (e* at every position the paper alignment pairs: last word, EOS, pads)
and ``attack_recovery_discrete`` (the best prompt the search found, its aligned positions against
the concept's). Each is 1 − ‖W_new x − W_old c‖ / ‖W_new c − W_old c‖ over the group's layers
(k and v together), averaged over groups, then over concepts.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from uce_cli.artifacts.editlog import package_versions
from uce_cli.artifacts.outputs import abandon_stage, finalize, staging_dir, write_json
from uce_cli.distributed import Ranks
from uce_cli.edit.adversary import (
    Normal,
    attack_embeddings,
    gaps,
    normal_matrices,
    recovery,
)
from uce_cli.edit.encode import aligned_spans, encode_prompts
from uce_cli.errors import OutputError, UceError
from uce_cli.families.base import TextPath, Tokens
from uce_cli.judge.attack_report import (
    ATTACK_DIR,
    ATTACK_FIGURES,
    ATTACK_JSON,
    ATTACK_MD,
    ATTACK_SCHEMA,
    TI_DIR,
    render_markdown,
)
from uce_cli.judge.evaluate import Run, edited_guides, edited_weights, open_run
from uce_cli.progress import NullProgress, Progress


@dataclass(frozen=True)
class SearchSettings:
    """The discrete search's knobs: a seed, a budget of scored prompts, prompt length, population."""

    seed: int = 0
    budget: int = 256  # distinct prompts scored, at most (each is one encoder row)
    length: int = 4  # words per prompt
    population: int = 16


@dataclass
class ConceptVectors:
    """One concept's encoded prompt and guide, per group: word row, aligned rows, guide rows."""

    concept: str
    guide: str
    word: dict[str, torch.Tensor]  # group → (1, d)
    aligned: dict[str, torch.Tensor]  # group → (K, d): last word onwards
    tokens: dict[str, Tokens]  # group → the concept prompt's Tokens


def _rows(hidden: torch.Tensor, start: int, length: int) -> torch.Tensor:
    return hidden[start : start + length].to("cpu", torch.float64)


def _encode(text_path: TextPath, prompts: list[str], batch_size: int) -> dict[str, dict]:
    """group → prompt → (L, d) hidden states (float64, CPU)."""
    out: dict[str, dict[str, torch.Tensor]] = {g.name: {} for g in text_path.groups}
    for batch, hidden in encode_prompts(text_path, prompts, batch_size):
        for g in text_path.groups:
            for prompt, h in zip(batch, hidden[g.name], strict=True):
                out[g.name][prompt] = h.to("cpu", torch.float64)
    return out


def concept_vectors(
    text_path: TextPath, pairs: list[tuple[str, str]], batch_size: int
) -> tuple[list[ConceptVectors], dict[str, float]]:
    """Every concept's vectors per group, and each group's norm bound for γ auto (the largest norm
    of a real token vector among the concepts' and guides' prompts; BOS left out)."""
    prompts = list(dict.fromkeys(p for pair in pairs for p in pair))
    tokens = text_path.tokens(prompts)
    hidden = _encode(text_path, prompts, batch_size)
    bounds: dict[str, float] = {}
    for g in text_path.groups:
        norms = []
        for prompt in prompts:
            t = tokens[g.name][prompt]
            first = 1 if t.seen > 1 else 0
            norms.append(float(hidden[g.name][prompt][first : max(t.seen, 1)].norm(dim=1).max()))
        bounds[g.name] = max(norms)
    vectors = []
    for concept, guide in pairs:
        word, aligned, toks = {}, {}, {}
        for g in text_path.groups:
            t = tokens[g.name][concept]
            src, _ = aligned_spans(concept, [guide], tokens[g.name], "paper")
            word[g.name] = _rows(hidden[g.name][concept], t.last_word, 1)
            aligned[g.name] = _rows(hidden[g.name][concept], src.start, src.length)
            toks[g.name] = t
        vectors.append(ConceptVectors(concept, guide, word, aligned, toks))
    return vectors, bounds


def tokenizer_of(text_path: TextPath) -> Any | None:
    """The text path's first tokenizer (for the search vocabulary), or None."""
    tok = getattr(text_path, "tokenizer", None)
    if tok is None:
        many = getattr(text_path, "tokenizers", None) or []
        tok = many[0] if many else None
    return tok


def search_vocabulary(tokenizer: Any, concept: str) -> list[str]:
    """Whole-word entries of the tokenizer's vocabulary, less the concept's own words and tokens.

    CLIP BPE marks a word's end with ``</w>``; SentencePiece marks its start with ``▁``.
    """
    own_words = {w for w in re.findall(r"[a-z]+", concept.lower())}
    own_ids = set(tokenizer(concept)["input_ids"]) - set(tokenizer.all_special_ids)
    words = []
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if index in own_ids:
            continue
        if token.endswith("</w>"):
            word = token[:-4]
        elif token.startswith("▁"):
            word = token[1:]
        else:
            continue
        if len(word) >= 2 and word.isalpha() and word.isascii() and word.lower() not in own_words:
            words.append(word)
    return list(dict.fromkeys(words))


def _aligned_score(normal: Normal, x: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """(Σ gap(x, c), Σ gap(c, c)) over paired rows (x and c cut to the same length)."""
    k = min(x.shape[0], c.shape[0])
    return float(gaps(normal, x[:k], c[:k]).sum()), float(gaps(normal, c[:k], c[:k]).sum())


def discrete_search(
    text_path: TextPath,
    normals: dict[str, Normal],
    target: ConceptVectors,
    settings: SearchSettings,
    batch_size: int,
) -> dict[str, Any]:
    """A Ring-A-Bell-style genetic search over word sequences, seeded and budgeted.

    Score of a prompt p: 1 − sqrt(Σ_groups gap(X_p, X_c) / Σ_groups gap(X_c, X_c)) with X the
    aligned rows (last word onwards) — the share of the erasure gap p undoes. The concept's own
    tokens and words are excluded from the vocabulary, and a candidate that re-tokenizes into one
    of them is never scored.
    """
    tokenizer = tokenizer_of(text_path)
    if tokenizer is None:
        return {"skipped": "this family's text path exposes no tokenizer vocabulary"}
    vocab = search_vocabulary(tokenizer, target.concept)
    if len(vocab) < 2:
        return {"skipped": "the tokenizer has fewer than 2 whole-word entries to search"}
    own_ids = set(tokenizer(target.concept)["input_ids"]) - set(tokenizer.all_special_ids)
    gen = torch.Generator().manual_seed(settings.seed)
    scores: dict[str, float] = {}
    rejected = 0

    def score(prompts: list[str]) -> None:
        nonlocal rejected
        fresh = []
        for p in dict.fromkeys(prompts):
            if p in scores or len(scores) + len(fresh) >= settings.budget:
                continue
            if own_ids & set(tokenizer(p)["input_ids"]):
                scores[p] = float("-inf")  # re-tokenized into the concept's own tokens
                rejected += 1
                continue
            fresh.append(p)
        if not fresh:
            return
        tokens = text_path.tokens(fresh)
        hidden = _encode(text_path, fresh, batch_size)
        for p in fresh:
            after = before = 0.0
            for g, normal in normals.items():
                t = tokens[g][p]
                k = min(t.seen - t.last_word, target.aligned[g].shape[0])
                x = _rows(hidden[g][p], t.last_word, k)
                a, b = _aligned_score(normal, x, target.aligned[g])
                after, before = after + a, before + b
            scores[p] = 1.0 - (after / before) ** 0.5 if before > 0 else 1.0

    def draw(n: int) -> torch.Tensor:
        return torch.randint(len(vocab), (n, settings.length), generator=gen)

    def text(ids: torch.Tensor) -> list[str]:
        return [" ".join(vocab[i] for i in row.tolist()) for row in ids]

    pop = draw(settings.population)
    generations = 0
    stale = 0
    while len(scores) < settings.budget and stale < 20:
        seen_before = len(scores)
        score(text(pop))
        generations += 1
        ranked = sorted(range(len(pop)), key=lambda i: -scores.get(text(pop[i : i + 1])[0], -1e9))
        elite = pop[ranked[: max(2, settings.population // 2)]]
        parents = torch.randint(len(elite), (settings.population, 2), generator=gen)
        mask = torch.rand(settings.population, settings.length, generator=gen) < 0.5
        children = torch.where(mask, elite[parents[:, 0]], elite[parents[:, 1]])
        mutate = torch.rand(settings.population, settings.length, generator=gen) < (
            1.0 / settings.length
        )
        children = torch.where(mutate, draw(settings.population), children)
        pop = torch.cat([elite, children])[: settings.population]
        stale = stale + 1 if len(scores) == seen_before else 0
    best = sorted(((s, p) for p, s in scores.items() if s > float("-inf")), reverse=True)[:5]
    return {
        "best": [{"prompt": p, "attack_recovery": s} for s, p in best],
        "scored": len(scores) - rejected,
        "rejected": rejected,
        "budget": settings.budget,
        "generations": generations,
        "vocabulary": len(vocab),
        "seed": settings.seed,
        "length": settings.length,
        "population": settings.population,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def attack_run(
    run: Run,
    gamma: float | None = None,
    search: SearchSettings | None = SearchSettings(),
    device: str = "auto",
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The attack report of a run, and e* per concept and group (word token).

    Raises:
        UceError: the run erases or moderates no concept.
    """
    from uce_cli.families.model import open_model, open_text_path, pick_device

    progress = progress or NullProgress()
    t0 = time.perf_counter()
    pairs = list(edited_guides(run.plan).values())
    if not pairs:
        raise UceError(
            f"{run.path}: its recipe erases or moderates no concept — `uce attack` measures how "
            "erased concepts come back"
        )
    progress.start("load model")
    old, new, edit_sha = edited_weights(run)
    base = open_model(run.base_spec, run.base_revision)
    text_path = open_text_path(base, pick_device(device), torch.float32)
    progress.finish()
    group_of = {t.key: t.group for t in base.kv}
    normals = {}
    for g in text_path.groups:
        keys = [k for k in old if group_of.get(k) == g.name]
        if keys:
            normals[g.name] = normal_matrices({k: old[k] for k in keys}, {k: new[k] for k in keys})
    progress.start("attack", len(pairs), "concepts")
    vectors, bounds = concept_vectors(text_path, pairs, batch_size)
    concepts: dict[str, Any] = {}
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    for cv in vectors:
        per_group: dict[str, Any] = {}
        embeddings[cv.concept] = {}
        for g, normal in normals.items():
            e_w, g_w = attack_embeddings(normal, cv.word[g], gamma, bounds[g])
            e_a, _ = attack_embeddings(normal, cv.aligned[g], gamma, bounds[g])
            embeddings[cv.concept][g] = e_w[0]
            per_group[g] = {
                "attack_recovery": recovery(normal, e_w, cv.word[g]),
                "attack_recovery_aligned": recovery(normal, e_a, cv.aligned[g]),
                "gamma": float(g_w[0]),
                "norm_ratio": float(e_w.norm() / cv.word[g].norm().clamp_min(1e-300)),
                "norm_bound_ratio": float(e_w.norm() / bounds[g]),
                "positions": int(cv.aligned[g].shape[0]),
            }
        entry: dict[str, Any] = {"guide": cv.guide, "groups": per_group}
        for name in ("attack_recovery", "attack_recovery_aligned"):
            entry[name] = _mean([v[name] for v in per_group.values()])
        if search is not None:
            entry["discrete"] = discrete_search(text_path, normals, cv, search, batch_size)
            best = entry["discrete"].get("best") or []
            entry["attack_recovery_discrete"] = best[0]["attack_recovery"] if best else None
        concepts[cv.concept] = entry
        progress.advance(1)
    progress.finish()
    text_path.release()
    figures = {
        name: _mean([c[name] for c in concepts.values() if c.get(name) is not None])
        for name in ATTACK_FIGURES
    }
    report = {
        "schema": ATTACK_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "run": str(run.path),
        "recipe_sha256": run.log.get("recipe_sha256"),
        "base_model": run.base_spec,
        "edit_sha256": edit_sha,
        "figures": figures,
        "concepts": concepts,
        "settings": {
            "gamma": "auto" if gamma is None else gamma,
            "gamma_rule": "auto: per vector, the smallest γ with ‖e*‖ ≤ the largest norm of a "
            "real token vector (BOS left out) of the concepts' and guides' prompts (or ‖c‖ if "
            "larger)",
            "norm_bounds": bounds,
            "groups": list(normals),
            "search": None if search is None else search.__dict__,
            "layer_sum": "k and v of every edited layer of a group, summed (as the model reads)",
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return report, embeddings


def textual_inversion_files(
    text_path_groups: list[str], embeddings: dict[str, dict[str, torch.Tensor]], width: int | None
) -> dict[str, dict[str, torch.Tensor]]:
    """file name → {token: (1, d) float32} for one-group families whose text group is the token
    embedding width of its encoder (SD 1.x/2.x); empty otherwise."""
    if len(text_path_groups) != 1 or width is None:
        return {}
    [g] = text_path_groups
    files = {}
    for concept, per_group in embeddings.items():
        e = per_group.get(g)
        if e is None or e.shape[0] != width:
            continue
        slug = re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept"
        files[f"{slug}.safetensors"] = {f"<uce-attack-{slug}>": e.to(torch.float32)[None]}
    return files


def token_embedding_width(run: Run) -> int | None:
    """The input token-embedding width of a one-encoder family's text encoder (config), or None."""
    from uce_cli.families.model import open_model

    base = open_model(run.base_spec, run.base_revision)
    config = base.root / "text_encoder" / "config.json"
    if not config.is_file() or (base.root / "text_encoder_2").exists():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    return data.get("hidden_size")


def write_attack(
    run: Run,
    report: dict[str, Any],
    ti_files: dict[str, dict[str, torch.Tensor]],
    force: bool,
    draw: Callable[[Path], dict[str, Any]] | None = None,
    plots: bool = False,
) -> Path:
    """Write RUN/attack/ (attack.json, attack.md, textual-inversion files) through a staging
    folder renamed into place: an interrupted attack leaves nothing partial. ``plots``: also
    attack.png (``judge.attack_plot``), embedded in attack.md.

    Raises:
        OutputError: RUN/attack exists and ``force`` is not given, or it cannot be written.
    """
    from uce_cli.safe_files import write_file
    from uce_cli.weights.files import sha256_file
    from uce_cli.weights.tensorfile import save_tensors

    out = run.path / ATTACK_DIR
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{out} exists — pass --force to recompute it")
    stage = staging_dir(out)
    try:
        if ti_files:
            (stage / TI_DIR).mkdir()
            for name, tensors in ti_files.items():
                save_tensors(tensors, stage / TI_DIR / name, {"format": "pt", "uce": "attack e*"})
        report["textual_inversion"] = [f"{TI_DIR}/{n}" for n in ti_files]
        if draw is not None:  # images are drawn into the stage too: all or nothing
            report["images"] = draw(stage)
        if not ti_files:
            report["textual_inversion_note"] = (
                "textual-inversion files are written for one-encoder CLIP families (SD 1.x/2.x), "
                "whose token-embedding width is the width the edited layers read; this model's "
                "text groups are not one encoder's output"
            )
        if plots:
            from uce_cli.judge.attack_plot import write_attack_plot

            report["plots"] = [write_attack_plot(stage, report)]
        write_file(stage / ATTACK_MD, render_markdown(report))
        # the files this report lists are the ones `--force` may replace later (destination.py)
        report["outputs"] = {
            p.relative_to(stage).as_posix(): sha256_file(p)
            for p in sorted(stage.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        write_json(stage / ATTACK_JSON, report)
        finalize(stage, out, force)
    except BaseException as exc:
        abandon_stage(stage, out, exc)
        raise
    return out


def run_attack_command(
    run_path: Path,
    gamma: float | None = None,
    search: SearchSettings | None = SearchSettings(),
    device: str = "auto",
    batch_size: int = 32,
    force: bool = False,
    progress: Progress | None = None,
    images: bool = False,
    steps: int | None = None,
    per_variant: int = 2,
    plots: bool = False,
    ranks: Ranks | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    """Open a run, attack it, write RUN/attack/ (with ``images``: the image side too, drawn on
    the edited model; ``judge.attack_images``; with ``plots``: attack.png); returns the folder and
    the report.

    Under ``accelerate launch`` (``ranks``) rank 0 attacks and sends every rank the report; with
    ``images`` the ranks draw and judge the images together into rank 0's staging folder; rank 0
    writes RUN/attack/ and the other ranks return no folder (without ``images`` they do nothing).
    """
    ranks = ranks or Ranks()
    run = open_run(run_path)
    out = run.path / ATTACK_DIR
    if (out.exists() or out.is_symlink()) and not force:  # refuse before any work
        raise OutputError(f"{out} exists — pass --force to recompute it")
    if not ranks.main and not images:
        return None, {}
    if plots and ranks.main:  # a missing matplotlib is said before any work
        from uce_cli.judge.attack_plot import check_plotting

        check_plotting()
    if ranks.main:
        try:
            report, embeddings = attack_run(run, gamma, search, device, batch_size, progress)
            ti = textual_inversion_files(
                report["settings"]["groups"], embeddings, token_embedding_width(run)
            )
            report["expect"] = attack_expectations(run, report["figures"])
        except BaseException as exc:
            if images and ranks.distributed:  # the other ranks wait for the report: tell them
                ranks.broadcast(f"rank 0 failed: {exc}")
            raise
    if images and ranks.distributed:  # only --images has the other ranks take part
        sent = ranks.broadcast((report, embeddings) if ranks.main else None)
        if isinstance(sent, str):
            raise UceError(sent)
        report, embeddings = sent
    draw = None
    started: list[bool] = []  # draw was called: the other ranks have the staging folder
    if images:
        from uce_cli.judge.attack_images import attack_images

        def draw(stage: Path) -> dict[str, Any]:
            started.append(True)
            stage = ranks.broadcast(stage)
            return attack_images(
                run, report, embeddings, stage, device, steps, per_variant, progress, ranks
            )

        if not ranks.main:
            stage = ranks.broadcast(None)
            if stage is None:
                raise UceError("rank 0 stopped before the attack images were drawn")
            attack_images(run, report, embeddings, stage, device, steps, per_variant, None, ranks)
            return None, report
    try:
        return write_attack(run, report, ti, force, draw, plots), report
    except BaseException:
        if draw is not None and ranks.distributed and not started:
            ranks.broadcast(None)  # stopped before drawing: release the waiting ranks
        raise


def attack_expectations(run: Run, figures: dict[str, float | None]) -> list[dict[str, Any]]:
    """The recipe's ``expect:`` rows that name attack figures, checked against ``figures``."""
    from uce_cli.judge.evaluate import expectation_row

    return [
        expectation_row(item, figures.get(item.metric))
        for item in run.evaluate.expect
        if item.metric in ATTACK_FIGURES
    ]
