"""Loading the base model: `model.dropout` turns off every dropout of the frozen base."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from peftcli.config.schema import ModelSpec
from peftcli.models.loading import load_base_model
from peftcli.tasks.registry import TASKS
from tests.conftest import VOCAB, make_tokenizer, sample_batch


def test_model_dropout_zero_makes_training_mode_deterministic(tmp_path: Path) -> None:
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
                        num_labels=2)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    batch = sample_batch("bert-cls", make_tokenizer())
    task = TASKS["sequence_classification"]

    def two_forwards(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
        model = load_base_model(spec, task, num_labels=2).train()
        with torch.no_grad():
            return model(**batch).logits, model(**batch).logits

    a, b = two_forwards(ModelSpec(name=str(tmp_path)))
    assert not torch.equal(a, b)  # the model's own dropout draws new masks each pass
    off = load_base_model(ModelSpec(name=str(tmp_path), dropout=0.0), task, num_labels=2)
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, torch.nn.Dropout))
    assert off.config.hidden_dropout_prob == 0.3  # the config (and so a merged model) keeps its values
    a, b = two_forwards(ModelSpec(name=str(tmp_path), dropout=0.0))
    assert torch.equal(a, b)
    off.eval()
    with torch.no_grad():
        torch.testing.assert_close(off(**batch).logits, a)  # dropout 0 in training = eval mode
