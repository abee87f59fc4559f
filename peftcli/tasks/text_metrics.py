"""Metrics of generated text against references: ROUGE-L (F) and exact match.

ROUGE-L (Lin 2004, https://aclanthology.org/W04-1013/) scores the longest common subsequence (LCS) of
the two token lists: precision = LCS / len(generated), recall = LCS / len(reference), F = their harmonic
mean, 0 when either side has no token. Tokens are as Google's rouge_score makes them without stemming:
lower-cased text, every run of characters outside [a-z0-9] a separator. The corpus score is the mean F
over examples (rouge_score's per-example scores averaged; HF `evaluate` reports a bootstrap estimate of
the same mean). Exact match compares the same token lists, so case, punctuation and spacing do not count.
"""

from __future__ import annotations

import re

NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def tokens(text: str) -> list[str]:
    return NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure of one generated text against its reference."""
    gen, ref = tokens(generated), tokens(reference)
    if not gen or not ref:
        return 0.0
    lcs = lcs_length(ref, gen)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(gen), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(generated: str, reference: str) -> float:
    return float(tokens(generated) == tokens(reference))


def generation_scores(generated: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L F and exact match over a corpus of (generated, reference) pairs."""
    n = max(len(references), 1)
    return {
        "rouge_l": sum(rouge_l(g, r) for g, r in zip(generated, references)) / n,
        "exact_match": sum(exact_match(g, r) for g, r in zip(generated, references)) / n,
    }
