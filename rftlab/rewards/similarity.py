"""Text similarity metrics for the ``text_similarity`` grader: fuzzy match, BLEU, ROUGE-N/L, cosine.

Pure Python, no extra dependency. Each returns a float in [0, 1].
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (strings or token lists).

    Bit-parallel (Hyyrö 2004, "Bit-parallel LCS-length computation revisited", Alg. 2): one big-int
    update per element of ``b``. Bit ``i`` of ``v`` is 1 while ``a[i]`` is unmatched.

    >>> lcs_length("ABCBDAB", "BDCABA")
    4
    """
    if not a or not b:
        return 0
    masks: dict[Hashable, int] = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def fuzzy_ratio(a: str, b: str) -> float:
    """Indel similarity, as rapidfuzz's ``fuzz.ratio`` / 100: ``2 * LCS(a, b) / (|a| + |b|)``.

    >>> fuzzy_ratio("kitten", "sitting")  # LCS "ittn" = 4: 8 / 13
    0.6153846153846154
    """
    if not a and not b:
        return 1.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """Words and single punctuation marks."""
    return _WORD.findall(text.lower() if lowercase else text)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002, Eq. 1-2) with sacrebleu's "exp" smoothing.

    ``BLEU = BP * exp(mean_n log p_n)``, ``p_n`` the clipped n-gram precision, ``BP = min(1,
    exp(1 - r/c))``; an order with no match gets ``p_n = 1 / (2^k * total_n)`` for the k-th such
    order (Chen & Cherry 2014, method 3); a candidate shorter than ``max_n`` tokens averages only
    the orders it has (sacrebleu's effective order). Tokens: words and punctuation, case-sensitive.
    """
    cand, ref = tokenize(candidate), tokenize(reference)
    if not cand or not ref:
        return float(cand == ref)
    log_sum, k, orders = 0.0, 1, 0
    for n in range(1, max_n + 1):
        c_grams, r_grams = _ngrams(cand, n), _ngrams(ref, n)
        total = sum(c_grams.values())
        if total == 0:
            break  # "effective order" (sacrebleu's sentence_bleu): a short candidate uses fewer orders
        orders += 1
        matched = sum(min(count, r_grams[g]) for g, count in c_grams.items())
        if matched == 0:
            k *= 2
            precision = 1 / (k * total)
        else:
            precision = matched / total
        log_sum += math.log(precision)
    brevity = min(1.0, math.exp(1 - len(ref) / len(cand)))
    return brevity * math.exp(log_sum / orders)


def _f1(overlap: int, n_cand: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_cand, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_n(candidate: str, reference: str, n: int = 1) -> float:
    """ROUGE-N F1 (Lin 2004): clipped n-gram overlap; lowercase alphanumeric tokens, as rouge_score."""
    cand, ref = _rouge_tokens(candidate), _rouge_tokens(reference)
    c_grams, r_grams = _ngrams(cand, n), _ngrams(ref, n)
    overlap = sum((c_grams & r_grams).values())
    return _f1(overlap, sum(c_grams.values()), sum(r_grams.values()))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004, Sec. 3): LCS of the token sequences."""
    cand, ref = _rouge_tokens(candidate), _rouge_tokens(reference)
    return _f1(lcs_length(cand, ref), len(cand), len(ref))


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def cosine(candidate: str, reference: str, embedder: Callable[[list[str]], Sequence[Sequence[float]]]) -> float:
    """Cosine similarity of two embeddings from ``embedder(texts) -> vectors``, clipped to [0, 1]."""
    u, v = embedder([candidate, reference])
    dot = sum(x * y for x, y in zip(u, v))
    norm = math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))
    value = dot / norm if norm else 0.0
    # min(1.0, nan) is 1.0: a NaN from an embedder must score the minimum, not the maximum.
    return max(0.0, min(1.0, value)) if math.isfinite(value) else 0.0
