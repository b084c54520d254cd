"""Token alignment: the exact positions each mode uses (docs/design.md), on the tiny multi-token vocab."""

from __future__ import annotations

import pytest

from uce_cli.edit.encode import check_lengths, last_token_spans, paper_spans, token_counts
from uce_cli.errors import UceError
from uce_cli.weights.tiny import build_tiny_tokenizer

L = 77


@pytest.fixture(scope="module")
def counts() -> dict[str, int]:
    tok = build_tiny_tokenizer()
    prompts = [
        "painting by Kelly Mckernan",
        "art",
        "",
        "painting by cat",
        "painting by dog",
        "Kinkade",
    ]
    return token_counts(tok, prompts)


def test_token_counts_are_multi_token(counts: dict[str, int]) -> None:
    assert counts[""] == 2  # BOS, EOS
    assert counts["art"] == 3
    assert counts["Kinkade"] >= 5  # rare word → several BPE tokens
    assert counts["painting by Kelly Mckernan"] > 2 + 4


def test_paper_multi_token_source_single_token_guide(counts: dict[str, int]) -> None:
    source, [target] = paper_spans("painting by Kelly Mckernan", ["art"], counts, L)
    f_s = counts["painting by Kelly Mckernan"] - 2
    assert source.start == f_s and target.start == 1  # last word ↔ last word
    assert source.length == target.length == L - f_s  # K = 77 − max(f(s), f(t))
    assert source.start + source.length == L  # the source runs to the end (EOS, pads)
    assert target.start + target.length == 1 + L - f_s  # guide: same count, from its last word


def test_paper_guide_longer_than_source(counts: dict[str, int]) -> None:
    source, [target] = paper_spans("art", ["painting by Kelly Mckernan"], counts, L)
    f_t = counts["painting by Kelly Mckernan"] - 2
    assert (source.start, target.start) == (1, f_t)
    assert source.length == target.length == L - f_t


def test_paper_empty_guide_is_bos(counts: dict[str, int]) -> None:
    source, [target] = paper_spans("Kinkade", [""], counts, L)
    assert target.start == 0  # f("") = 0: the BOS position
    assert source.start == counts["Kinkade"] - 2
    assert source.length == target.length == L - source.start


def test_paper_equal_lengths(counts: dict[str, int]) -> None:
    assert counts["painting by cat"] == counts["painting by dog"]
    source, [target] = paper_spans("painting by cat", ["painting by dog"], counts, L)
    assert source.start == target.start == counts["painting by cat"] - 2
    assert source.length == L - source.start


def test_paper_several_targets_share_one_count(counts: dict[str, int]) -> None:
    source, targets = paper_spans("art", ["", "painting by Kelly Mckernan"], counts, L)
    k = L - (counts["painting by Kelly Mckernan"] - 2)
    assert [t.start for t in targets] == [0, counts["painting by Kelly Mckernan"] - 2]
    assert {source.length, *(t.length for t in targets)} == {k}


def test_last_token_one_vector(counts: dict[str, int]) -> None:
    source, [target] = last_token_spans("painting by Kelly Mckernan", [""], counts)
    assert (source.start, source.length) == (counts["painting by Kelly Mckernan"] - 2, 1)
    assert (target.start, target.length) == (0, 1)


def test_too_long_prompt_refused() -> None:
    tok = build_tiny_tokenizer()
    long_prompt = " ".join(["Kinkade"] * 30)
    counts = token_counts(tok, [long_prompt, "art"])
    with pytest.raises(
        UceError, match=r"erase\.0: prompt 'Kinkade Kinkade.*' has \d+ tokens, more than"
    ):
        check_lengths(counts, 77, {long_prompt: "erase.0"})
    check_lengths({"art": 3}, 77, {})  # within the limit: nothing raised
