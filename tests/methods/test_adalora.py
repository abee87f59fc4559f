"""AdaLoRA against HF peft (the reference, test-only), and its rank budget: the same weights give the
same outputs both ways, trained adapters (with a rank pattern) too; the budget falls to target_r per
layer; fed the same gradients, our allocator masks what HF peft's masks; the orthogonality
regularizer equals HF peft's and lowers the orthogonality error."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peftcli.config.load import validate_method
from peftcli.config.schema import TrainSpec
from peftcli.errors import MethodError
from peftcli.methods import METHODS
from peftcli.methods.adalora import RankBudget, SVDLinear, svd_layers
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, random_batches, randomize_trainable, run_training, training_hooks

ADALORA = METHODS["adalora"]
ARCHS = list(TINY)
# Training runs with the allocator: T5 adapts 4x the layers of the others (q, k, v, o, wi, wo in both
# stacks and the cross-attention), which made each such test take over a minute; BART covers encoder-decoders.
TRAINED_ARCHS = [a for a in ARCHS if a != "t5-s2s"]
# Small enough that the tiny models show a rank pattern after a dozen steps.
BUDGET = {"init_r": 4, "target_r": 2, "alpha": 8, "tinit": 2, "tfinal": 4, "delta_t": 1}


def hf_config(task: str, **kw) -> AdaLoraConfig:
    settings = {"init_r": 4, "target_r": 2, "lora_alpha": 8, "target_modules": "all-linear", "total_step": 20} | kw
    return AdaLoraConfig(task_type=TASKS[task].peft_task_type, **settings)


def save_ours(model, params, adapted, task: str, folder: Path) -> None:
    t = TASKS[task]
    save_adapter(
        folder, method_state(ADALORA, model, adapted), adapter_config(ADALORA, params, adapted, t, "tiny", None)
    )


def train_ours(arch: str, tokenizer, tiny_data, steps: int = 12, **settings):
    task = TINY[arch][1]
    model = tiny_model(arch)
    params, adapted = adapt(model, ADALORA, task, **(BUDGET | settings))
    spec = TrainSpec(batch_size=8, max_steps=steps, log_every=1, seed=0)
    result = run_training(
        model, task, tokenizer, tiny_data, spec, method_hooks=training_hooks(model, ADALORA, params, adapted)
    )
    return model, params, adapted, result


def kept_ranks(model, adapted) -> int:
    return sum(int((layer.lora_E != 0).sum()) for layer in svd_layers(model, adapted).values())


# -- interop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_our_fresh_adalora_loads_in_hf_peft_with_equal_outputs(arch: str, tokenizer, tmp_path: Path) -> None:
    task = TINY[arch][1]
    model = tiny_model(arch)
    params, adapted = adapt(model, ADALORA, task, init_r=4, alpha=8)
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    ours = logits(model, batch)
    save_ours(model, params, adapted, task, tmp_path)

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_peft_fresh_adalora_loads_in_ours_with_equal_outputs(arch: str, tokenizer, tmp_path: Path) -> None:
    task = TINY[arch][1]
    theirs = get_peft_model(tiny_model(arch), hf_config(task))
    randomize_trainable(theirs, seed=3)
    batch = sample_batch(arch, tokenizer)
    expected = logits(theirs, batch)
    theirs.save_pretrained(tmp_path)

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, TASKS[task])
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-6, atol=1e-6)
    n_trainable, _ = theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == n_trainable


@pytest.mark.parametrize("arch", TRAINED_ARCHS)
def test_trained_adalora_with_rank_pattern_loads_equal_in_ours_and_hf_peft(
    arch: str, tokenizer, tiny_data, tmp_path: Path
) -> None:
    task = TINY[arch][1]
    model, params, adapted, _ = train_ours(arch, tokenizer, tiny_data)
    batch = sample_batch(arch, tokenizer)
    trained = logits(model, batch)
    save_ours(model, params, adapted, task, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert set(pattern) == {f"{n}.lora_E" for n in adapted.adapted_modules}
    assert sum(map(sum, pattern.values())) == params.target_r * len(adapted.adapted_modules)
    # The saved tensors hold only the kept triplets, as HF peft writes them.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key, kept in pattern.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(kept), 1)

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, TASKS[task])
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(ours, batch), trained, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert-cls", "gpt2-lm"])
def test_hf_peft_trained_adalora_with_rank_pattern_loads_in_ours(arch: str, tokenizer, tmp_path: Path) -> None:
    task = TINY[arch][1]
    theirs = get_peft_model(tiny_model(arch), hf_config(task, tinit=2, tfinal=4, total_step=12))
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(random_batches(theirs, task, n=12), start=1):
        theirs.train()
        theirs(**batch).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    batch = sample_batch(arch, tokenizer)
    expected = logits(theirs, batch)
    theirs.save_pretrained(tmp_path)
    assert not all(all(v) for v in json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"].values())

    ours = tiny_model(arch)
    load_adapter(tmp_path, ours, TASKS[task])
    torch.testing.assert_close(logits(ours, batch), expected, rtol=1e-5, atol=1e-6)
    reloaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    n_trainable = sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n)
    assert sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n) == n_trainable


@pytest.mark.parametrize("arch", ["bert-cls", "llama-lm"])
def test_allocator_masks_what_hf_peft_masks_given_the_same_gradients(arch: str) -> None:
    task = TINY[arch][1]
    ours = tiny_model(arch)
    params, adapted = adapt(ours, ADALORA, task, **(BUDGET | {"delta_t": 2, "target_modules": "all-linear"}))
    hooks = training_hooks(ours, ADALORA, params, adapted)
    hooks.start(12)
    theirs = get_peft_model(tiny_model(arch), hf_config(task, tinit=2, tfinal=4, deltaT=2, total_step=12))
    ours_lora = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    theirs_lora = {
        n.removeprefix("base_model.model.").removesuffix(".default"): p
        for n, p in theirs.named_parameters()
        if "lora_" in n
    }
    assert set(ours_lora) == set(theirs_lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours_lora.items():
            theirs_lora[name].copy_(p.copy_(torch.randn(p.shape, generator=g)))
    patterns = []
    for step in range(1, 13):
        with torch.no_grad():
            for name, p in ours_lora.items():
                p.grad = torch.randn(p.shape, generator=g)
                theirs_lora[name].grad = p.grad.clone()
        hooks.after_optimizer_step(step)
        theirs.base_model.update_and_allocate(step)
        for name, p in ours_lora.items():
            assert torch.equal(p, theirs_lora[name]), (step, name)
        patterns.append(adapted.config_extras["rank_pattern"])
    assert patterns[0] is None and patterns[-1] is not None
    hf_pattern = {k.removesuffix(".default"): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert adapted.config_extras["rank_pattern"] == hf_pattern


# -- the rank budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TRAINED_ARCHS)
def test_budget_falls_from_init_r_to_target_r(arch: str, tokenizer, tiny_data) -> None:
    model = tiny_model(arch)
    task = TINY[arch][1]
    params, adapted = adapt(model, ADALORA, task, **BUDGET)
    randomize_trainable(model)  # every E nonzero
    n = len(adapted.adapted_modules)
    assert kept_ranks(model, adapted) == params.init_r * n
    spec = TrainSpec(batch_size=8, max_steps=12, log_every=1, seed=0)
    run_training(model, task, tokenizer, tiny_data, spec, method_hooks=training_hooks(model, ADALORA, params, adapted))
    assert kept_ranks(model, adapted) == params.target_r * n
    pattern = adapted.config_extras["rank_pattern"]
    assert sum(map(sum, pattern.values())) == params.target_r * n
    assert adapted.config_extras["total_step"] == 12


def test_budget_follows_the_cubic_schedule() -> None:
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, ADALORA, "sequence_classification", init_r=6, target_r=2, tinit=0.1, tfinal=0.2)
    budget = RankBudget(model, params, adapted)
    budget.start(100)
    n = len(adapted.adapted_modules)
    assert (budget.tinit, budget.tfinal, budget.total) == (10, 20, 100)
    totals = [budget.budget(step)[0] for step in range(1, 101)]
    assert totals[:10] == [6 * n] * 10 and totals[79:] == [2 * n] * 21
    assert all(a >= b for a, b in itertools.pairwise(totals))
    assert totals[44] == int(4 * n * (1 - 35 / 70) ** 3 + 2 * n)


def test_schedule_without_room_to_fall_is_refused() -> None:
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, ADALORA, "sequence_classification", tinit=5, tfinal=5)
    hooks = training_hooks(model, ADALORA, params, adapted)
    with pytest.raises(MethodError) as info:
        hooks.start(10)
    assert str(info.value).startswith(
        "method.tinit and method.tfinal leave no steps for the budget to fall (got tinit 5 and tfinal 5 steps of 10). "
        "Lower them or train longer."
    )


def test_training_with_a_rank_pattern_is_refused() -> None:
    model = tiny_model("bert-cls")
    pattern = {"bert.encoder.layer.0.attention.self.query.lora_E": [True, False]}
    params, adapted = adapt(model, ADALORA, "sequence_classification", init_r=2, target_r=1, rank_pattern=pattern)
    with pytest.raises(MethodError, match=r"^method.rank_pattern is written by training"):
        training_hooks(model, ADALORA, params, adapted)


# -- the orthogonality regularizer ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert-cls", "gpt2-lm"])
def test_regularizer_equals_hf_peft_and_lowers_orthogonality_error(arch: str) -> None:
    task = TINY[arch][1]
    model = tiny_model(arch)
    params, adapted = adapt(model, ADALORA, task, init_r=4, target_r=2, alpha=8, orth_reg_weight=0.3)
    hooks = training_hooks(model, ADALORA, params, adapted)
    theirs = get_peft_model(tiny_model(arch), hf_config(task, orth_reg_weight=0.3))
    with torch.no_grad():
        ours_lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(ours_lora[n.removeprefix("base_model.model.").removesuffix(".default")])
    batch = random_batches(model, task, n=1)[0]
    theirs.train()
    with_reg = theirs(**batch).loss
    without = theirs.base_model.model(**batch).loss
    torch.testing.assert_close(hooks.regularizer(), with_reg - without, rtol=1e-5, atol=1e-6)

    # Gradient steps on the regularizer alone make A and B more orthogonal, with finite gradients.
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if "lora_" in n], lr=0.02)
    before = hooks.regularizer().item()
    for _ in range(30):
        optimizer.zero_grad()
        hooks.regularizer().backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        optimizer.step()
    assert hooks.regularizer().item() < 0.5 * before


def test_regularizer_gradient_is_finite_at_exact_orthogonality() -> None:
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, ADALORA, "sequence_classification", init_r=4, target_r=2)
    with torch.no_grad():
        for layer in svd_layers(model, adapted).values():
            layer.lora_A.copy_(torch.eye(*layer.lora_A.shape))
            layer.lora_B.copy_(torch.eye(*layer.lora_B.shape))
    reg = training_hooks(model, ADALORA, params, adapted).regularizer()
    assert reg.item() == 0.0
    reg.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n)


def test_zero_orth_reg_weight_adds_no_regularizer() -> None:
    model = tiny_model("bert-cls")
    params, adapted = adapt(model, ADALORA, "sequence_classification", orth_reg_weight=0)
    assert training_hooks(model, ADALORA, params, adapted).regularizer is None


# -- merge, parameters, errors -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", TRAINED_ARCHS)
def test_merged_trained_adapter_equals_unmerged(arch: str, tokenizer, tiny_data) -> None:
    model, _, _, _ = train_ours(arch, tokenizer, tiny_data)
    batch = sample_batch(arch, tokenizer)
    expected = logits(model, batch)
    ADALORA.merge(model)
    assert not any(isinstance(m, SVDLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameters_equal_hf_peft(arch: str) -> None:
    task = TINY[arch][1]
    ours = tiny_model(arch)
    adapt(ours, ADALORA, task, init_r=4, target_r=2)
    theirs = get_peft_model(tiny_model(arch), hf_config(task))
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == theirs.get_nb_trainable_parameters()[0]


def method_errors(raw: dict) -> list[str]:
    _, problems = validate_method({"name": "adalora"} | raw)
    return [f"{'.'.join(loc)}: {message}" for loc, message in problems]


def test_bad_params_explain_themselves() -> None:
    assert method_errors({"init_r": 4, "target_r": 6}) == [
        "method.target_r: the budget only falls: target_r must be at most init_r (4) (got 6)."
    ]
    assert method_errors({"tinit": 2.5}) == [
        "method.tinit: give a whole number of steps or a fraction below 1 (got 2.5)."
    ]
    assert method_errors({"delta_t": 0})[0] == "method.delta_t: input should be greater than 0 (got 0)."
    assert method_errors({"deltaT": 2})[0].startswith("method.deltaT: unknown key.")
