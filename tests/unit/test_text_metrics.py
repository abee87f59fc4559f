"""ROUGE-L and exact match: hand-checked examples, and Google's rouge_score (test-only) where installed."""

from __future__ import annotations

import random

import pytest

from peftcli.tasks.text_metrics import exact_match, generation_scores, lcs_length, rouge_l, tokens


def test_tokens_are_lower_cased_alphanumeric_runs() -> None:
    assert tokens("The CAT's hat, 2 times!") == ["the", "cat", "s", "hat", "2", "times"]
    assert tokens("  ...  ") == []


def test_lcs_by_hand() -> None:
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example (CLRS): "bcba"
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["a", "b"], ["b", "a"]) == 1


def test_rouge_l_by_hand() -> None:
    # Lin 2004's example: reference "police killed the gunman", candidate "police kill the gunman":
    # LCS = 3 (police, the, gunman), P = R = 3/4, F = 0.75.
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # LCS 2 of 2 generated (P = 1) and of 4 reference tokens (R = 0.5): F = 2/3.
    assert rouge_l("the gunman", "police killed the gunman") == pytest.approx(2 / 3)
    assert rouge_l("Positive.", "positive") == 1.0
    assert rouge_l("", "positive") == 0.0
    assert rouge_l("negative", "positive") == 0.0


def test_exact_match_ignores_case_punctuation_and_spacing() -> None:
    assert exact_match("  Positive! ", "positive") == 1.0
    assert exact_match("positive review", "positive") == 0.0
    scores = generation_scores(["positive", "good film", "bad"], ["positive", "a good film", "good"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)


def test_rouge_l_equals_rouge_score() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "Dog", "ran", "fast,", "home.", "a", "it's", "2024"]
    for _ in range(200):
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        gen = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        assert rouge_l(gen, ref) == pytest.approx(scorer.score(ref, gen)["rougeL"].fmeasure, abs=1e-12)
