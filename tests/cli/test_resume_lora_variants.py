"""LoRA's variants resume exactly: train 12 steps straight, or 5, stop, resume and train 7, and the run
ends with the same adapter bytes, evals and logged losses.

What each case puts at stake: DoRA's magnitudes (trainable, in the optimizer) and its cached row norms
(a buffer rebuilt, not saved); PiSSA's and OLoRA's residual base (rebuilt on resume: with the fast
SVD, from the seeded generator) and the rank-2r conversion of every saved adapter; LoRA+'s parameter
groups at two learning rates, which the optimizer and schedule state must map onto again.
"""

from __future__ import annotations

import json

import pytest
import yaml

from peftcli.training.run import run_train
from tests.cli.test_resume import outcome
from tests.conftest import tiny_recipe

CASES = {
    "dora-dropout": ({"name": "lora", "rank": 4, "use_dora": True, "dropout": 0.1}, {}),
    "pissa-fast-svd": ({"name": "lora", "rank": 4, "init": "pissa", "pissa_niter": 2}, {}),
    "olora-dora": ({"name": "lora", "rank": 4, "init": "olora", "use_dora": True}, {}),
    "loraplus": ({"name": "lora", "rank": 4}, {"lr": 1e-3, "loraplus_lr_ratio": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_variants_resume_to_the_same_bytes(case: str, tmp_path, tiny_dirs, tiny_data) -> None:
    method, optimizer = CASES[case]
    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(tmp_path / "run"))
    recipe["method"] = method
    recipe["optimizer"] |= optimizer
    recipe["train"] = {
        "batch_size": 8,
        "max_steps": 12,
        "save_every": 5,
        "eval_every": 4,
        "log_every": 1,
        "seed": 0,
        "mixed_precision": "no",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_train(path, [])
    finished = outcome(tmp_path / "run")
    if method.get("init") in ("pissa", "olora"):  # saved for the original base, at rank 2r
        assert finished["config"]["r"] == 8 and finished["config"]["init_lora_weights"] is True
        step5 = json.loads((tmp_path / "run" / "checkpoints" / "step-5" / "adapter_config.json").read_text())
        assert step5["r"] == 8
    run_train(path, [], resume=str(tmp_path / "run" / "checkpoints" / "step-5"))
    assert outcome(tmp_path / "run") == finished


@pytest.mark.parametrize(
    "method", [{"use_dora": True}, {"init": "pissa", "use_dora": True}], ids=["dora", "pissa-dora"]
)
def test_a_trained_variant_merges_and_evals_as_hf_peft_loads_it(method: dict, tmp_path, tiny_dirs, tiny_data) -> None:
    """`peft train`, then `peft merge` and `peft eval` of the run: the merged model is HF peft's
    adapter on the original base, merged; eval (which merges too) repeats the training's best eval (the
    adapter saved is the best eval's)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftcli.commands.evaluate import run_eval
    from peftcli.commands.merge import run_merge
    from tests.conftest import make_tokenizer

    recipe = tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", output_dir=str(tmp_path / "run"))
    recipe["method"] |= method
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_train(path, [])
    run_merge(tmp_path / "run", tmp_path / "merged", tolerance=1e-5)
    batch = dict(
        make_tokenizer()(
            ["good film good", "bad book bad", "the story was quite fun"], padding=True, return_tensors="pt"
        )
    )
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert-cls"], num_labels=2)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    evaluated = run_eval(tmp_path / "run", [], out=tmp_path / "eval.json")
    assert evaluated["metrics"]["accuracy"] == report["best_metrics"]["accuracy"]
    assert evaluated["metrics"]["loss"] == pytest.approx(report["best_metrics"]["loss"], rel=1e-5)
