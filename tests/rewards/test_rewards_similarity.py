"""Similarity metrics: hand-computed cases and slow reference loops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rftlab.rewards.similarity import bleu, cosine, fuzzy_ratio, lcs_length, rouge_l, rouge_n


def lcs_reference(a, b):
    """The textbook O(|a| |b|) dynamic programme."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_lcs_hand_computed():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # "BCBA" (CLRS 15.4)
    assert lcs_length("", "abc") == 0
    assert lcs_length(["the", "cat", "sat"], ["the", "sat"]) == 2


def test_lcs_against_the_reference_loop():
    rng = random.Random(0)
    pairs = [("".join(rng.choice("abcd") for _ in range(rng.randint(0, 70))),
              "".join(rng.choice("abcd") for _ in range(rng.randint(0, 70)))) for _ in range(60)]
    ours = torch.tensor([float(lcs_length(a, b)) for a, b in pairs])
    reference = torch.tensor([float(lcs_reference(a, b)) for a, b in pairs])
    torch.testing.assert_close(ours, reference)


def test_fuzzy_ratio_hand_computed():
    # kitten/sitting: LCS "ittn" = 4, ratio 2 * 4 / (6 + 7) = 8/13 (rapidfuzz's fuzz.ratio is 61.54)
    assert fuzzy_ratio("kitten", "sitting") == pytest.approx(8 / 13)
    assert fuzzy_ratio("", "") == 1.0 and fuzzy_ratio("abc", "abc") == 1.0 and fuzzy_ratio("a", "") == 0.0


def test_bleu_hand_computed():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # candidate "the cat sat" vs reference "the cat sat on the mat": precisions 3/3, 2/2, 1/1 (effective
    # order 3); brevity penalty exp(1 - 6/3) = e^-1.
    assert bleu("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1))
    # "the dog" vs "the cat": p1 = 1/2, p2 has no match -> exp smoothing 1 / (2 * 1); BP = 1;
    # BLEU = exp((log 0.5 + log 0.5) / 2) = 0.5
    assert bleu("the dog", "the cat") == pytest.approx(0.5)
    assert bleu("", "x") == 0.0


def test_rouge_hand_computed():
    # unigrams: cand {the, cat, sat} vs ref {the, cat, sat, down}: overlap 3, P = 1, R = 3/4, F = 6/7
    assert rouge_n("The cat sat", "the cat sat down", 1) == pytest.approx(6 / 7)
    # bigrams: cand {the cat, cat sat}, ref {the cat, cat sat, sat down}: P = 1, R = 2/3, F = 0.8
    assert rouge_n("The cat sat", "the cat sat down", 2) == pytest.approx(0.8)
    # LCS of "a b c d" and "a c d b" is "a c d" = 3: P = R = 3/4
    assert rouge_l("a b c d", "a c d b") == pytest.approx(0.75)
    assert rouge_n("x", "y", 1) == 0.0


def test_rouge_n_against_the_reference_loop():
    rng = random.Random(1)
    words = ["a", "b", "c", "d", "e"]
    cases = [(" ".join(rng.choice(words) for _ in range(rng.randint(1, 15))),
              " ".join(rng.choice(words) for _ in range(rng.randint(1, 15)))) for _ in range(40)]
    reference = []
    for cand, ref in cases:  # slow reference: clipped n-gram matches by removal from a list
        c, r = cand.split(), ref.split()
        c_grams = [tuple(c[i : i + 2]) for i in range(len(c) - 1)]
        r_grams = [tuple(r[i : i + 2]) for i in range(len(r) - 1)]
        pool, overlap = list(r_grams), 0
        for g in c_grams:
            if g in pool:
                pool.remove(g)
                overlap += 1
        p = overlap / len(c_grams) if c_grams else 0.0
        rc = overlap / len(r_grams) if r_grams else 0.0
        reference.append(2 * p * rc / (p + rc) if overlap else 0.0)
    ours = [rouge_n(c, r, 2) for c, r in cases]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(reference))


def test_cosine_with_an_embedder():
    vectors = {"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [-1.0, 0.0]}
    embed = lambda texts: [vectors[t] for t in texts]  # noqa: E731
    assert cosine("a", "b", embed) == pytest.approx(1 / math.sqrt(2))
    assert cosine("a", "c", embed) == 0.0  # negative similarity clipped to 0


def test_cosine_of_a_nan_embedding_scores_the_minimum():
    # min(1.0, nan) is 1.0 in Python: a broken embedder must not hand out full reward.
    from rftlab.rewards.similarity import cosine

    assert cosine("a", "b", lambda texts: [[float("nan"), 1.0], [1.0, 1.0]]) == 0.0
    assert cosine("a", "b", lambda texts: [[1.0, 0.0], [1.0, 0.0]]) == 1.0
