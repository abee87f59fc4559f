"""Our adapters against HF peft (the reference, test-only): the same weights give the same outputs,
ours load in HF peft, and HF peft's load in ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peftcli.methods import METHODS
from peftcli.models.adapters import adapter_config, adapter_state, load_adapter, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, randomize_trainable

LORA_SETTINGS = [
    {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
    {
        "rank": 2,
        "alpha": 16,
        "target_modules": ["q_proj", "v_proj", "query", "value", "c_attn", "q", "v"],
        "use_rslora": True,
    },
]


def _present_targets(model: torch.nn.Module, targets: list[str] | str) -> list[str] | str:
    if isinstance(targets, str):
        return targets
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [t for t in targets if t in names]


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("settings", LORA_SETTINGS, ids=["all-linear", "attention-rslora"])
def test_our_lora_loads_in_hf_peft_with_equal_outputs(arch: str, settings: dict, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    settings = {**settings, "target_modules": _present_targets(model, settings["target_modules"])}
    params, adapted = adapt(model, METHODS["lora"], task.name, **settings)
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    ours = logits(model, batch)
    save_adapter(tmp_path, adapter_state(model), adapter_config(METHODS["lora"], params, adapted, task, "tiny", None))

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("settings", LORA_SETTINGS, ids=["all-linear", "attention-rslora"])
def test_hf_peft_lora_loads_in_ours_with_equal_outputs(arch: str, settings: dict, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    base = tiny_model(arch)
    config = LoraConfig(
        task_type=task.peft_task_type,
        r=settings["rank"],
        lora_alpha=settings["alpha"],
        target_modules=_present_targets(base, settings["target_modules"]),
        use_rslora=settings.get("use_rslora", False),
    )
    theirs = get_peft_model(base, config)
    randomize_trainable(theirs, seed=3)
    batch = sample_batch(arch, tokenizer)
    expected = logits(theirs, batch)
    theirs.save_pretrained(tmp_path)

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, task)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-6, atol=1e-6)
    # Both count the same trainable parameters.
    n_trainable, _ = theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == n_trainable
