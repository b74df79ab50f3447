"""Shaping rewards: hand-computed cases, and the soft overlong penalty against rftlab.core's."""

from __future__ import annotations

import pytest
import torch

from rftlab.core import overlong_penalty
from rftlab.rewards import LengthPenalty, RepetitionPenalty, SoftOverlong, soft_overlong


def test_length_penalty_hand_computed():
    # max_length 4 words, coef 2: 6 words -> -2 * (6 - 4) / 4 = -1.0; 3 words -> 0.
    reward = LengthPenalty(max_length=4, coef=2.0, unit="words")
    assert reward(["a b c", "a b c d e f"]) == [0.0, -1.0]


def test_length_in_tokens_uses_the_tokenizer(tokenizer):
    text = "hello world, hello world"
    n = len(tokenizer.encode(text, add_special_tokens=False))
    reward = LengthPenalty(max_length=n - 1, unit="tokens", tokenizer=tokenizer)
    assert reward([text]) == [pytest.approx(-1 / (n - 1))]


def test_soft_overlong_hand_computed():
    # max_len 10, cache 4: soft limit 6. L=6 -> 0; L=8 -> (6-8)/4 = -0.5; L=10 -> -1; L=11 -> -1.
    reward = SoftOverlong(max_len=10, cache_len=4, unit="chars")
    assert reward(["a" * 6, "a" * 8, "a" * 10, "a" * 11]) == [0.0, -0.5, -1.0, -1.0]


def test_soft_overlong_matches_core_tensor_version():
    lengths = torch.arange(0, 40)
    reference = overlong_penalty(lengths, max_len=32, cache_len=8)
    ours = torch.tensor([soft_overlong(int(n), 32, 8) for n in lengths])
    torch.testing.assert_close(ours, reference)


def test_repetition_penalty_hand_computed():
    # "a b a b a", bigrams ab ba ab ba: 2 unique of 4 -> (1 - 2/4) * -1 = -0.5.
    reward = RepetitionPenalty(ngram_size=2, max_penalty=-1.0)
    assert reward(["a b a b a", "a b c d", "a"]) == [-0.5, 0.0, 0.0]


def test_repetition_penalty_reference_loop():
    texts = ["the cat the cat the cat sat", "one two three one two three four", "x y z"]
    reward = RepetitionPenalty(ngram_size=3, max_penalty=-0.5)
    expected = []
    for text in texts:  # slow reference: count distinct trigrams by hand
        words, seen, total = text.split(), [], 0
        for i in range(len(words) - 2):
            total += 1
            if words[i : i + 3] not in seen:
                seen.append(words[i : i + 3])
        expected.append((1 - len(seen) / total) * -0.5)
    torch.testing.assert_close(torch.tensor(reward(texts)), torch.tensor(expected))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: LengthPenalty(max_length=0), "max_length"),
        (lambda: LengthPenalty(max_length=4, coef=-1), "coef"),
        (lambda: LengthPenalty(max_length=4, unit="bytes"), "unit"),
        (lambda: LengthPenalty(max_length=4, unit="tokens"), "tokenizer"),
        (lambda: SoftOverlong(max_len=4, cache_len=4, unit="chars"), "cache_len"),
        (lambda: RepetitionPenalty(ngram_size=0), "ngram_size"),
        (lambda: RepetitionPenalty(max_penalty=1.0), "max_penalty"),
    ],
)
def test_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()
