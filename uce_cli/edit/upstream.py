"""The upstream UCE data files: small concept lists shipped with uce, prompt sets fetched pinned.

A recipe names one as ``upstream:NAME``. The concept lists recipes use (artists, professions,
ImageNette classes, I2P categories, the erase lists of the published runs) ship in
``uce_cli/data/`` as plain text, and the prompt sets the published recipes' ``evaluate:`` names
(ImageNette, professions, the artist runs' ``prompts_dir`` files) ship byte for byte in
``uce_cli/data/upstream/``: none of them needs the network. The two large prompt sets (COCO-30k
captions, I2P) are read from a local mirror folder when ``UCE_DATA_MIRROR`` points at one,
otherwise downloaded once from the upstream repository at a pinned commit into the uce cache. Every
upstream file, shipped or fetched, is checked against the sha256 below.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from uce_cli.errors import DataError
from uce_cli.paths import cache_dir
from uce_cli.safe_files import write_file

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

UPSTREAM_REPO = "rohitgandikota/unified-concept-editing"
UPSTREAM_COMMIT = "28c81ed5a3e41277c1a0dc55f738e7ab188e9718"
UPSTREAM_PREFIX = "upstream:"
MIRROR_ENV = "UCE_DATA_MIRROR"

# sha256 of every file of the upstream ``data/`` folder at UPSTREAM_COMMIT.
UPSTREAM_SHA256: dict[str, str] = {
    "adjective_prompts.csv": "56b29069faf5aa46f407dce6b68ab43d47cd93a066b4db579ab2d1e7890fc960",
    "all_artists_prompts.csv": "f2b5b4af24d95606fe8972f52be30974effecf9b9b68f8ab4466b7c205bdefb8",
    "art_prompts.csv": "80983daa394cd10e1e4fcd832512f884b0cb8ecb5ae2633dd00ee517df688c14",
    "artists1734_prompts.csv": "7e31b4d01bdef4101d3c7e865e37b3f087459ec00e195059e245d70474b3ca63",
    "artists_sd.txt": "1ef0caa1b70c2e4f42cb89dc8671d114cd49bbda9c54f39216c3bd2ee03531a0",
    "artwork_prompts.csv": "bfbc1a7a92fab22aecdd03d4e0f28c9c793280d58de732615eb8ac8b96373432",
    "biases_compare.csv": "6758d85ccd6f7aefa473bcc360850377b5d54d4e07780138bd9a6601a6aa2a9d",
    "big_artist_prompts.csv": "a17a182d939aadaa641aa3fd495fe325d845d9677f6d86b6cc0b08e6d6beab33",
    "coco_30k.csv": "87a3f463164120ca2d1efdbc251f443c7b0043214f767cd1852419d295db9ab5",
    "doctor_prompts.csv": "e8fb84a86fd70baa6cf87f0880aba315f31f1c1a6bc537901755d1a0ee932078",
    "famous_art_prompts.csv": "b894f59f9c2c8e1f03ac206d5d9f32fdd241b4035a7ec6b748858f24b3d8f61d",
    "gender_bias.csv": "817d659fa50481c76c8fcacc4198634f333dd6633a4528162ed979852c7c399a",
    "generic_artists_prompts.csv": "d0a7b5d39c0c5b319bb65783e95daadc3efa14b41728bd35071296685dee0b75",
    "holdout100_prompts.csv": "d529b57a81abf7ff04c7ba69aed2847f852620deabdb68298f94a152c6d073f2",
    "imagenet_prompts.csv": "c7675ce6faae0b2554b81eae3f275fc954a178eeaf91ad55814d847d77b664af",
    "imagenette.csv": "6f82b5a186f7c44e443052dac15bafe07b4d4e821e7435288642b5756d705b5c",
    "info/erased--towards_van9gogh-preserve_false-sd_1_4-method_replace.txt": "055539df4a0b804c58caf46c0cd2941af10d64c1395ddd8e50b5f55d945841e6",
    "info/erased--towards_van9gogh-preserve_false-sd_1_4-method_tensor.txt": "055539df4a0b804c58caf46c0cd2941af10d64c1395ddd8e50b5f55d945841e6",
    "info/erased-1000artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "57f93ceeb41fa24ca84479d58754062906b55b9dfaa6e9f64aa0417ba19557e2",
    "info/erased-100artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "f6feb125a4425f4a61e5dd5dd4fe11c8a98fafce7616a31943369a734ead5c59",
    "info/erased-10artists-towards_art-preserve_true-sd_1_4-method_replace-seq.txt": "fa17ca4858daddccc71326dde64ba00496fef02d4a9051020e0e6192fa9fffc0",
    "info/erased-10artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "5905ffd705bb4d3aa32793be43c8a48753d075c5c6e5423d88b5c50362258313",
    "info/erased-1500artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "d971eebc0e88a943075cd0e9740f8ed175f0d64fa50fe79494a21266b54ac9c7",
    "info/erased-1artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "0071ec36a43ded859c01a6692fe935dd7e1fc8f38a9919a4e0e0585c25355e8a",
    "info/erased-500artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "2c6f6e10473ad1921597498d750ae21905f74635348f517f56ac5827a1568806",
    "info/erased-50artists-towards_art-preserve_true-sd_1_4-method_replace-seq.txt": "72d4965b3e7841db756df6cda370548e3e333851e23f0c727b51b13455e19dd0",
    "info/erased-50artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "8b1ad8b3ec47f0b4954fdee3ab66739468fc6cec18e3e3204b0702f5fef813e9",
    "info/erased-5artists-towards_art-preserve_true-sd_1_4-method_replace.txt": "0785843b60ca0cc7cd755b4f7c1418639dbb09fe0466d667b992391fdcb3c4da",
    "info/erased-art-towards_van9gogh-preserve_false-sd_1_4-method_tensor.txt": "8a97fe471a458ed677dc6453f156352d76ae3e03f1b1e545c7662f10bc418c2b",
    "info/erased-cat-towards_grumpy cat-preserve_false-sd_1_4-method_replace.txt": "066f70cb15aeb49ac2c61fba5393c8033e33ca23f571387e9a6df8914a7ff111",
    "info/erased-chewbacca-towards_bear-preserve_false-sd_1_4-method_replace.txt": "56cba3e6014b31ba3cd02271c7263669e31067f9c90b20380a26b678868b04be",
    "info/erased-chewbacca-towards_bear-preserve_true-sd_1_4-method_replace.txt": "56cba3e6014b31ba3cd02271c7263669e31067f9c90b20380a26b678868b04be",
    "info/erased-grumpy9cat-towards_garfield9cat-preserve_false-sd_1_4-method_replace.txt": "dc74662bb1fe1bd7bcd0a71af8b0615beadcda60a8f35f2425bf6874a1506b0f",
    "info/erased-grumpy9cat-towards_hello9kitty-preserve_false-sd_1_4-method_replace.txt": "dc74662bb1fe1bd7bcd0a71af8b0615beadcda60a8f35f2425bf6874a1506b0f",
    "info/erased-hermione9granger-towards_girl-preserve_false-sd_1_4-method_replace.txt": "6cf87b8c50c4ecfa620f532dd7ea6f8a1a602fb5350e0a4e441234caac04f5e6",
    "info/erased-imagenette-towards_uncond-preserve_false-sd_1_4-method_replace.txt": "cdfa3f8a955371dae8409c9326c2150dc6ea218f686dc9c97c435baf68e6c9ed",
    "info/erased-poorly9drawn9hand-towards_realistic959fingered9hand-preserve_false-sd_1_4-method_replace.txt": "69484be017692309f31b1b3fee05bd33680b211b884e36d428497416d654acf6",
    "info/erased-poorly9drawn9hand-towards_realistic9hand-preserve_false-sd_1_4-method_replace.txt": "69484be017692309f31b1b3fee05bd33680b211b884e36d428497416d654acf6",
    "info/erased-poorly9drawn9hand-towards_uncond-preserve_false-sd_1_4-method_replace.txt": "69484be017692309f31b1b3fee05bd33680b211b884e36d428497416d654acf6",
    "info/erased-ugly-towards_uncond-preserve_false-sd_1_4-method_replace.txt": "05a8cb958019266a41cc088c99176c69c33a7dc81b20f7d643ec62e7a4265d04",
    "info/universal-10artists-towards_uncond-preserve_true-sd_1_4-method_replace.txt": "5905ffd705bb4d3aa32793be43c8a48753d075c5c6e5423d88b5c50362258313",
    "info/universal-nudity-towards_uncond-preserve_true-sd_1_4-method_replace.txt": "2c7b1c0adcc561b06ad05a02375e8141c9e2dbdce3de26ad44489f9452f6e3a4",
    "kelly_prompts.csv": "78f60bf745f4233a39a57a1d2eccaf8c2a94813c4150918f1c4be42bf846af30",
    "niche_art_prompts.csv": "50304469d99a1e6914c8db677dc684679647732444e4f6ee2ebeab70021d5475",
    "original_bias.csv": "563e5693c7071ac0b639aa1f540d7bec3bc75d11935f672a65393011de5bc48a",
    "profession1000_prompts.csv": "fcf159ae211320f5ac3d2fe9828fb944bfdbd30f2b5752898d2409dd46999518",
    "profession10_prompts.csv": "4b523cecf2b0053d08423bd63fe3a9d26e2d5e331f0f58965ac77012fdebcd1c",
    "profession200_prompts.csv": "8f201dca4b3f99c4f6c8e8626a450673968b4fa69bf8ad8b866b95942abcd4b2",
    "profession_prompts.csv": "d09548502888792daa6cc86fe157836f83cfdf12ac646231b305705a7c8534fb",
    "prompts_dir/erased-1000artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "f52f33533f2477a69ccd076e32987e891ef5c96cc2ed3a70ad0eccf264ce6377",
    "prompts_dir/erased-100artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "54beacc68760a1a264de3501f3cd69d423eb696dcb7122d9967d7bb560ca22ae",
    "prompts_dir/erased-10artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "4860acb9dc2966f6245135f69366b0b478a77b0d5a29ac6d6d91bc8a76cf60a7",
    "prompts_dir/erased-1500artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "4e65b785c53502f42145b1a55c92e31c9b02abb4094a7562b3a005af89393b89",
    "prompts_dir/erased-1artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "30cce986071a5a89464530955589e9214f4b4cd90c28d2401b218cae8c90c2f3",
    "prompts_dir/erased-500artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "991482814e578304f549115a0ac6ee40f11a5338b609a4001b9935173aed1170",
    "prompts_dir/erased-50artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "68ec907cd1b5184db628269623af9b863eeafbd8fd95b9996fb36ea707b08309",
    "prompts_dir/erased-5artists-towards_art-preserve_true-sd_1_4-method_replace.csv": "77bb0943dbba8a61996b8d8da84961b2f2eda3e82687ede262d6bd859d6f790c",
    "race_prompts.csv": "d373777d819acf2270ed2d56536add5cc27dd060b654418a659917a8c72e6bea",
    "short_niche_art_prompts.csv": "200e8c522d95ba8eac01dd43e589769aff0c0143beeb8925bb646a84641a7f26",
    "small_imagenet_prompts.csv": "4ab01d9e98b0a23082b9cdbf52815cc639201fe6ba33b6ed8bbab58984c9fb2d",
    "test_artists_prompts.csv": "cefff7d848580b750e96fff48a45c669fbd10f4ddec4478a389eb1156ed9ada7",
    "test_profession_prompts.csv": "04c5006c66bf9c9097d5c0719ce35997136e02b29f32c1b5f6560e82ce8161c8",
    "train_profession_prompts.csv": "b99f1fc631c1d336e95d74f49c55cb7fbe6b901287bef376471ffa107beb87ca",
    "unsafe-prompts4703.csv": "6c1821aeeb20beb276b4e20ce4c4b801f9106dc935bafc9f6fd5e12aa2651e6f",
    "vangogh_prompts.csv": "c299f14b2945ed88b88966cc3460a9d9aeb3b0dd51c585ed454c6d6601d24f87",
}

# The concept lists shipped in DATA_DIR (data/SOURCE.md says how each was derived): name → the
# upstream file and column whose values it holds exactly, so reading that file by that column
# reads the shipped list instead. The I2P categories are split out of a column, so they are only
# reachable by their own name.
SHIPPED_FROM: dict[str, tuple[str, str | None]] = {
    "artists1734.txt": ("artists1734_prompts.csv", "artist"),
    "holdout100-artists.txt": ("holdout100_prompts.csv", "artist"),
    "professions.txt": ("profession_prompts.csv", "profession"),
    "imagenette-classes.txt": ("imagenette.csv", "class"),
    # The published runs' erase lists are JSON upstream, one concept per line here.
    **{name: (name, None) for name in UPSTREAM_SHA256 if name.startswith("info/")},
}
SHIPPED_ONLY = ("i2p-categories.txt",)
# Upstream files shipped unchanged in DATA_DIR / "upstream" (data/SOURCE.md): every prompt set a
# published recipe names, except the two large ones, which stay fetched on demand.
SHIPPED_FILES: tuple[str, ...] = (
    "imagenette.csv",
    "profession_prompts.csv",
    "train_profession_prompts.csv",
    *(
        f"prompts_dir/erased-{n}artists-towards_art-preserve_true-sd_1_4-method_replace.csv"
        for n in (1, 5, 10, 50, 100, 500, 1000)
    ),
)
FETCHED_ON_DEMAND = ("coco_30k.csv", "unsafe-prompts4703.csv")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def upstream_source(name: str, column: str | None) -> tuple[Path, str | None]:
    """Where to read ``upstream:NAME`` and by which column: a shipped list, else the data file.

    Args:
        name: a shipped list (``artists1734.txt``, ``info/…``) or an upstream data file.
        column: the csv column the recipe reads, or None.

    Returns:
        A local path and the column to read from it: reading an upstream file by the column a
        shipped list holds gives that list and no column.

    Raises:
        DataError: unknown name, checksum mismatch, or the file cannot be fetched.
    """
    if name in SHIPPED_FROM or name in SHIPPED_ONLY:
        return DATA_DIR / name, column
    for shipped, source in SHIPPED_FROM.items():
        if source == (name, column):
            return DATA_DIR / shipped, None
    return upstream_file(name), column


def _fetch(url: str) -> bytes:
    """The body at ``url`` (the one network access of this module, replaced in tests)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def upstream_file(name: str) -> Path:
    """Return a local, checksum-verified copy of one upstream data file.

    Args:
        name: path inside the upstream ``data/`` folder, e.g. ``artists1734_prompts.csv``.

    Raises:
        DataError: unknown name, checksum mismatch, or the file cannot be fetched.
    """
    expected = UPSTREAM_SHA256.get(name)
    if expected is None:
        known = sorted(n for n in [*UPSTREAM_SHA256, *SHIPPED_FROM, *SHIPPED_ONLY] if "/" not in n)
        raise DataError(
            f"unknown upstream data file '{name}' — known files: {', '.join(known)} "
            "(and the published erase lists info/…)"
        )
    if name in SHIPPED_FILES:
        shipped = DATA_DIR / "upstream" / name
        if _sha256(shipped) != expected:
            raise DataError(
                f"shipped data file {shipped} does not match the pinned sha256 — reinstall uce"
            )
        return shipped
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        path = Path(mirror).expanduser() / name
        if not path.is_file():
            raise DataError(
                f"{MIRROR_ENV}={mirror} has no file '{name}' — fix the mirror or unset it"
            )
        if _sha256(path) != expected:
            raise DataError(f"mirror file {path} does not match the pinned sha256 — re-copy it")
        return path
    cached = cache_dir() / "data" / UPSTREAM_COMMIT[:12] / name
    if cached.is_file() and _sha256(cached) == expected:
        return cached
    url = f"https://raw.githubusercontent.com/{UPSTREAM_REPO}/{UPSTREAM_COMMIT}/data/{name}"
    try:
        payload = _fetch(url)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(
            f"cannot download upstream data file '{name}' ({exc}) — "
            f"offline? point {MIRROR_ENV} at a folder holding the upstream data files"
        ) from exc
    if hashlib.sha256(payload).hexdigest() != expected:
        raise DataError(f"downloaded '{name}' does not match the pinned sha256 — not cached")
    write_file(cached, payload, root=cached.parent)  # never through a link (safe_files)
    return cached
