"""Build tiny, seeded Stable Diffusion 1.x and 2.x pipelines for smoke tests: their images are noise,
but their on-disk diffusers layouts match real SD 1.x / 2.x folders so the real loading paths are
exercised."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from uce_cli.weights.destination import apply_default_modes

if TYPE_CHECKING:
    # Only for annotations: importing torch/diffusers/transformers costs seconds, and the CLI
    # imports this module on every start, so the real imports live inside the builders.
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

__all__ = [
    "TINY_CLIP_NAME",
    "TINY_MODEL_NAME",
    "build_tiny_pipeline",
    "build_tiny_sd2_pipeline",
    "build_tiny_tokenizer",
    "ensure_tiny_clip",
    "ensure_tiny_model",
    "write_tiny_clip",
    "write_tiny_model",
]

TINY_MODEL_NAME = "builtin:tiny-sd"
TINY_CLIP_NAME = "builtin:tiny-clip"  # a random CLIPModel: the debias loop's judge, offline

# Bump the suffix whenever the builder changes, so a cached folder from an older builder is
# never mistaken for the current one.
_CACHE_SUBDIR = "tiny-sd-v1"

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_END_OF_WORD = "</w>"
_MAX_LENGTH = 77
_MAX_MERGES = 300

# Words the BPE is trained on: the prompt templates UCE uses plus common subjects. Anything else
# (artist names, rare words) deliberately stays multi-token, as it would in the real CLIP vocab.
_TRAINING_WORDS: tuple[str, ...] = (
    # Template words ("painting by", "art by", "photo of", "style of", ...).
    "painting",
    "art",
    "artwork",
    "picture",
    "image",
    "photo",
    "portrait",
    "style",
    "by",
    "of",
    "in",
    "the",
    "a",
    "an",
    "and",
    "with",
    # Common subjects and concepts.
    "man",
    "woman",
    "dog",
    "cat",
    "doctor",
    "nurse",
    "male",
    "female",
    "nudity",
    "nude",
    "person",
    "people",
    "car",
    "truck",
    "garbage",
    "city",
    "tree",
    "house",
    "landscape",
    "mountain",
    "river",
    "sky",
    "sea",
    "flower",
    "bird",
    "horse",
    "church",
    "parachute",
    "golf",
    "ball",
    "fish",
    "chainsaw",
    "engine",
    "gas",
    "pump",
    "french",
    "horn",
    "cassette",
    "player",
    "red",
    "blue",
    "green",
    "old",
    "young",
    "beautiful",
    "drawing",
    "sketch",
    "color",
    "famous",
    "statue",
    "oil",
    "canvas",
    "digital",
    "street",
    "night",
    "forest",
    "ocean",
    "beach",
    "castle",
    "bridge",
    "boat",
    "train",
    "child",
    "girl",
    "boy",
    "face",
    "hand",
    "eye",
    "hair",
    "dress",
    "wearing",
    "standing",
    "sitting",
    "table",
    "chair",
    "room",
    "window",
    "garden",
    "sun",
    "moon",
    "cloud",
    "snow",
    "rain",
    "light",
    "dark",
    "white",
    "black",
    "yellow",
    "small",
    "detailed",
)


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2/CLIP's reversible map from every byte to a printable unicode character.

    Returns:
        A dict from each of the 256 byte values to a one-character string.
    """
    # Printable Latin-1 bytes map to themselves; the rest are shifted past 255 so that no
    # vocabulary symbol is whitespace or a control character (same table CLIP's vocab uses).
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {}
    shift = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return mapping


def _learn_merges(
    words: tuple[str, ...], byte_map: dict[int, str], max_merges: int
) -> list[tuple[str, str]]:
    """Learn BPE merges greedily and deterministically over a word list.

    Args:
        words: Lowercase training words; each counts once.
        byte_map: Byte-to-unicode table used to spell words as symbols.
        max_merges: Upper bound on the number of merges returned.

    Returns:
        Merge pairs in priority order.
    """
    # Spell words the way the CLIP tokenizer sees them: byte-level symbols with the
    # end-of-word suffix glued to the last symbol, so the learned merges actually fire.
    spelled: list[list[str]] = []
    for word in sorted(set(words)):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += _END_OF_WORD
        spelled.append(symbols)

    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        counts: dict[tuple[str, str], int] = {}
        for symbols in spelled:
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        # Ties are broken lexicographically so the vocab never depends on dict ordering.
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for index, symbols in enumerate(spelled):
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[index] = merged
    return merges


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build the tiny tokenizer's vocabulary and merges.

    Returns:
        The token-to-id vocabulary and the ordered merge pairs.
    """
    byte_map = _bytes_to_unicode()
    # Same id layout as CLIP: 256 byte symbols, the same with "</w>", merge results, then the
    # special tokens last. Every byte is present, so no input ever maps to the unknown token.
    symbols = list(byte_map.values())
    tokens = symbols + [s + _END_OF_WORD for s in symbols]
    merges = _learn_merges(_TRAINING_WORDS, byte_map, _MAX_MERGES)
    seen = set(tokens)
    for left, right in merges:
        joined = left + right
        if joined not in seen:
            seen.add(joined)
            tokens.append(joined)
    tokens += [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tiny_tokenizer(pad_token: str = _EOS) -> CLIPTokenizer:
    """Build a real CLIP byte-level BPE tokenizer with a small generated vocabulary.

    Template words ("painting", "by", "of", ...) are single tokens; unseen words such as artist
    names split into several tokens and never into the unknown token.

    Args:
        pad_token: SD 1.x pads with EOS (the default); SD 2.x's tokenizer pads with ``"!"``.

    Returns:
        A ``CLIPTokenizer`` with SD 1.x's special tokens and ``model_max_length=77``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab()
    # transformers 5 builds the backend from ``vocab``/``merges`` objects (``vocab_file`` is
    # ignored), so pass them directly. pad == eos == unk, exactly as in SD 1.x's tokenizer.
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=_EOS,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=pad_token,
        model_max_length=_MAX_LENGTH,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the block, restoring the caller's RNG state afterwards.

    Args:
        seed: Seed applied on entry.

    Yields:
        Nothing; the block runs with the seeded RNG.
    """
    import torch

    # fork_rng keeps building the tiny model from disturbing the caller's random stream;
    # devices=[] because weights are created on CPU and CUDA need not be touched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny, randomly initialized SD 1.x-shaped pipeline in memory.

    Args:
        seed: Seed for weight initialization; equal seeds give identical weights.

    Returns:
        A ``StableDiffusionPipeline`` on CPU without a safety checker.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()

    # Each component is seeded separately so its weights do not depend on the others'
    # construction order or parameter count.
    with _seeded(seed):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=_MAX_LENGTH,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    with _seeded(seed):
        # Cross-attention in the down, mid and up blocks gives 7 attn2 layers, so edits that
        # touch every cross-attention projection are exercised at several widths (32 and 64).
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    vae = _tiny_vae(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_vae(seed: int) -> object:
    """The tiny VAE both SD variants share (SD 1.x and 2.x use the same VAE architecture)."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        # Four blocks give SD's VAE scale factor of 8, so sample_size=8 latents decode to the
        # 64px default image and code assuming "latent = pixels / 8" behaves as on SD 1.x.
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
        )


def build_tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build a tiny SD 2.x-shaped pipeline: SD 2.1's structure at a small width.

    What makes it SD 2.x and not 1.x, as in stabilityai/stable-diffusion-2-1's configs: the text
    encoder is OpenCLIP converted to a ``CLIPTextModel`` (plain ``gelu``, a projection_dim), the
    tokenizer pads with ``"!"``, the UNet uses linear projections in its transformers
    (``use_linear_projection``) and per-block head counts (``attention_head_dim`` a list), and the
    scheduler predicts v (``prediction_type: v_prediction``).

    Args:
        seed: Seed for weight initialization; equal seeds give identical weights.

    Returns:
        A ``StableDiffusionPipeline`` on CPU without a safety checker.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer(pad_token="!")
    width = 48  # SD 2.x reads 1024-d; any width other than SD 1.x tiny's 32 catches mix-ups
    with _seeded(seed + 1):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=4 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=_MAX_LENGTH,
                hidden_act="gelu",
                projection_dim=width,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=1,  # SD 2.x's converted config says 1 (not the tokenizer's "!")
            )
        )
    with _seeded(seed + 1):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width,
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            norm_num_groups=32,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _write_sd_tokenizer_files(tokenizer_dir: Path) -> None:
    """Lay out the tokenizer folder like SD 1.x's: ``vocab.json`` and ``merges.txt``.

    Args:
        tokenizer_dir: The pipeline's ``tokenizer`` subfolder written by ``save_pretrained``.
    """
    vocab, merges = _tiny_vocab()
    (tokenizer_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False), encoding="utf-8"
    )
    # Byte-level symbols never contain a space, so "left right" lines are unambiguous.
    (tokenizer_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        encoding="utf-8",
    )
    # Real SD 1.x folders ship no tokenizer.json, so transformers must rebuild the tokenizer
    # from vocab.json/merges.txt; dropping ours makes smoke tests take that same path.
    (tokenizer_dir / "tokenizer.json").unlink(missing_ok=True)


def _build_in_temp_dir(parent: Path, name: str, seed: int, variant: str = "sd1") -> Path:
    """Save the tiny pipeline into a fresh hidden temp dir inside ``parent``.

    Args:
        parent: Directory that will hold the final folder; the temp dir is its sibling so the
            final rename stays on one filesystem and is atomic.
        name: Final folder name, used to label the temp dir.
        seed: Seed for weight initialization.
        variant: ``sd1`` or ``sd2`` (``build_tiny_sd2_pipeline``).

    Returns:
        The temp dir holding a complete diffusers folder.
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        # safetensors only, as on the Hub, so no pickle is ever loaded from the cache.
        build = build_tiny_sd2_pipeline if variant == "sd2" else build_tiny_pipeline
        build(seed).save_pretrained(tmp, safe_serialization=True)
        _write_sd_tokenizer_files(tmp / "tokenizer")
        # mkdtemp makes a private 0700 dir and safetensors writes 0600 files; the model folder
        # should be as readable as any other file.
        apply_default_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def write_tiny_model(dest: Path, seed: int = 0, variant: str = "sd1") -> Path:
    """Write the tiny pipeline as a diffusers folder at ``dest``.

    The folder is built in a sibling temp dir and renamed into place, so ``dest`` is either
    absent or complete, never half-written.

    Args:
        dest: Target folder; must not exist, or be an empty directory.
        seed: Seed for weight initialization.
        variant: ``sd1`` (the default) or ``sd2``.

    Returns:
        ``dest``.

    Raises:
        FileExistsError: If ``dest`` exists and is not an empty directory.
    """
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise FileExistsError(f"refusing to overwrite existing path: {dest}")
    tmp = _build_in_temp_dir(dest.parent, dest.name, seed, variant)
    try:
        # os.replace of a directory succeeds only onto a missing or empty directory, which is
        # exactly the "never clobber a model" guarantee wanted here.
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"refusing to overwrite existing path: {dest}") from exc
    return dest


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Return the cached tiny model folder, building it once if absent.

    Safe when several processes race: each builds into its own temp dir and renames it into
    place; a process whose rename loses the race discards its copy and uses the winner's.

    Args:
        cache_dir: Root of the tool's cache.

    Returns:
        ``cache_dir / "models" / "tiny-sd-v1"``.

    Raises:
        RuntimeError: If the target exists but is not a complete model folder.
    """
    dest = Path(cache_dir) / "models" / _CACHE_SUBDIR
    # model_index.json is written by save_pretrained, and the folder only ever appears via an
    # atomic rename, so its presence means the folder is complete.
    marker = dest / "model_index.json"
    if marker.is_file():
        return dest
    tmp = _build_in_temp_dir(dest.parent, dest.name, seed=0)
    try:
        os.replace(tmp, dest)
    except OSError:
        # Another process won the race (dest is now a non-empty dir); its copy is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    if not marker.is_file():
        raise RuntimeError(f"{dest} exists but is not a complete tiny model; delete it and retry")
    return dest


def write_tiny_clip(dest: Path, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPModel`` folder (model, the tiny CLIP tokenizer, a PIL image
    processor): the layout of ``openai/clip-vit-base-patch32``, loaded through ``from_pretrained``.

    Its judgements are arbitrary (random weights); it lets the debias loop run offline.
    """
    import transformers
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": _MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4,
        },
        projection_dim=16,
    )  # fmt: skip
    # The PIL image processor: transformers >= 5's default one needs torchvision.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None)
    processor_cls = processor_cls or transformers.CLIPImageProcessor
    dest = Path(dest)
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    try:
        tmp.chmod(0o755)
        with _seeded(seed):
            CLIPModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor_cls(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ).save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_built(dest: Path, write: Callable[[Path], Path]) -> Path:
    """Return the cached model folder ``dest``, building it once with ``write`` if absent.

    ``write`` builds in a temp folder renamed into place, so a process that loses the race to
    another one's rename just uses the winner's folder.
    """
    if (dest / "config.json").is_file():
        return dest
    try:
        write(dest)
    except OSError:
        pass  # another process won the race
    return dest


def ensure_tiny_clip(cache_dir: Path) -> Path:
    """Return the cached tiny CLIP folder, building it once if absent (race-safe like the model)."""
    return ensure_built(Path(cache_dir) / "models" / "tiny-clip-v1", write_tiny_clip)
