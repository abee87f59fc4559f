"""Entity-level scores: hand-checked spans and scores, and agreement with seqeval (test-only reference)
on random tag sequences, stray I- tags and type changes included."""

from __future__ import annotations

import random

import pytest
import torch

from peftcli.tasks.entities import entities, entity_scores
from peftcli.tasks.registry import SENTENCE_END, TASKS, sentences, token_predictions

seqeval_metrics = pytest.importorskip("seqeval.metrics")


@pytest.mark.parametrize(
    "tags,expected",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        (["O", "O"], []),
        (["B-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),  # two entities side by side
        (["I-PER", "I-PER", "O"], [("PER", 0, 1)]),  # a stray I- starts an entity
        (["B-PER", "I-ORG"], [("PER", 0, 0), ("ORG", 1, 1)]),  # a type change ends one and starts another
        (["O", "I-LOC"], [("LOC", 1, 1)]),
        (["B-MISC", "I-MISC", "I-MISC"], [("MISC", 0, 2)]),
    ],
)
def test_entity_spans_by_hand(tags: list[str], expected: list[tuple[str, int, int]]) -> None:
    assert entities(tags) == expected


def test_scores_by_hand() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # PER is cut short (wrong), LOC right, ORG missed, a spurious MISC: 1 correct of 3 predicted, 3 gold.
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-MISC"]]
    s = entity_scores(gold, pred)
    assert (s["precision"], s["recall"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert s["f1"] == pytest.approx(1 / 3)
    assert s["per_type"]["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert s["per_type"]["ORG"]["recall"] == 0.0 and s["per_type"]["MISC"]["support"] == 0
    assert entity_scores([["O"]], [["O"]])["f1"] == 0.0  # no entities: 0, as seqeval


def test_scores_equal_seqeval_on_random_sequences() -> None:
    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    for _ in range(40):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
        pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in s] for s in gold]
        ours = entity_scores(gold, pred)
        assert ours["precision"] == pytest.approx(seqeval_metrics.precision_score(gold, pred, zero_division=0))
        assert ours["recall"] == pytest.approx(seqeval_metrics.recall_score(gold, pred, zero_division=0))
        assert ours["f1"] == pytest.approx(seqeval_metrics.f1_score(gold, pred, zero_division=0))
        report = seqeval_metrics.classification_report(gold, pred, output_dict=True, zero_division=0)
        for type_, theirs in report.items():
            if type_ in ours["per_type"]:
                assert ours["per_type"][type_]["f1"] == pytest.approx(theirs["f1-score"])
                assert ours["per_type"][type_]["support"] == theirs["support"]


def test_predictions_keep_sentence_boundaries_and_metrics_read_them() -> None:
    names = ["O", "B-PER", "I-PER"]
    labels = torch.tensor([[-100, 1, 2, -100, 0, -100], [-100, 1, -100, -100, -100, -100]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0]]), 3).float()
    preds, gold = token_predictions(logits, {"labels": labels})
    assert gold.tolist() == [1, 2, 0, SENTENCE_END, 1, SENTENCE_END]
    assert sentences(preds, names) == [["B-PER", "I-PER", "O"], ["O"]]
    metrics = TASKS["token_classification"].metrics(1.0, 4.0, preds, gold, names)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert (metrics["precision"], metrics["recall"]) == (1.0, 0.5)
