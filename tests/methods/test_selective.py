"""Selective fine-tuning: only the scored entries train, the budget is exact, scoring touches nothing,
and the adapter file holds only indices, deltas and the head. HF peft has no such method to compare with."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftcli.adapter_io import PREFIX, WEIGHTS_NAME
from peftcli.config.load import load_recipe
from peftcli.config.schema import TrainSpec
from peftcli.errors import CheckpointError, MethodError, RecipeError
from peftcli.methods import METHODS, context_for
from peftcli.methods._layers import is_linear
from peftcli.methods._sparse_delta import SparseDeltaLinear, with_delta
from peftcli.methods.base import Calibration, count_parameters, is_excluded
from peftcli.methods.selective import SelectiveLinear, SelectiveParams
from peftcli.models.adapters import adapter_config, load_adapter, method_state, save_adapter
from peftcli.tasks.registry import TASKS
from tests.conftest import TINY, sample_batch, tiny_model
from tests.helpers import adapt, logits, mean_loss, random_batches, randomize_trainable, run_training

METHOD = METHODS["selective"]
ARCHS = list(TINY)
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def eligible_size(arch: str, include_biases: bool = False) -> int:
    """Entries of every linear layer but the head and output layer, counted on a plain model."""
    model = tiny_model(arch)
    ctx = context_for(model, TASKS[TINY[arch][1]].head_modules)
    total = 0
    for name, m in model.named_modules():
        if is_linear(m) and not is_excluded(name, ctx.excluded_modules):
            total += m.weight.numel() + (m.bias.numel() if include_biases and m.bias is not None else 0)
    return total


def selection(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`<layer>.weight` / `<layer>.bias` -> selected flat indices."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SelectiveLinear):
            for part in ("weight", "bias"):
                if getattr(m, f"{part}_delta") is not None:
                    out[f"{name}.{part}"] = getattr(m, f"{part}_indices").clone()
    return out


def selected_total(model: torch.nn.Module) -> int:
    return sum(i.numel() for i in selection(model).values())


def calibrate_again(model: torch.nn.Module, params: SelectiveParams, adapted, arch: str, seed: int = 0) -> None:
    task = TINY[arch][1]
    METHOD.calibrate(model, params, adapted, Calibration(iter(random_batches(model, task, seed=seed)), mean_loss(task)))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_the_selected_entries(arch: str, tokenizer, tiny_data) -> None:
    task = TINY[arch][1]
    model = tiny_model(arch)
    before = dict(tiny_model(arch).named_parameters())
    adapt(model, METHOD, task, fraction=0.02)
    selected = selection(model)
    run_training(model, task, tokenizer, tiny_data, TrainSpec(batch_size=8, max_steps=6, seed=0))
    head = {n for n, p in model.named_parameters() if p.requires_grad and "_delta" not in n}
    merged = copy.deepcopy(model)
    METHOD.merge(merged)
    changed_any = False
    for name, p in merged.named_parameters():
        if name in head:
            continue
        changed = (p.detach() != before[name].detach()).reshape(-1).nonzero().flatten()
        allowed = selected.get(name, torch.empty(0, dtype=torch.long))
        assert set(changed.tolist()) <= set(allowed.tolist()), name
        changed_any |= changed.numel() > 0
    assert changed_any


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "settings", [{}, {"fraction": 0.013}, {"count": 37}, {"fraction": 0.01, "include_biases": True}]
)
def test_selected_count_is_the_budget_before_and_after_calibration(arch: str, settings: dict) -> None:
    task = TINY[arch][1]
    params = SelectiveParams(**settings)
    eligible = eligible_size(arch, params.include_biases)
    expected = params.count if params.count is not None else max(1, round(params.fraction * eligible))
    model = tiny_model(arch)
    # What `peft inspect RECIPE` sees: apply without calibration already holds the budget.
    adapted = METHOD.apply(model, params, context_for(model, TASKS[task].head_modules))
    assert selected_total(model) == expected
    head_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "_delta" not in n)
    assert count_parameters(model)[0] == expected + head_params
    calibrate_again(model, params, adapted, arch)
    assert selected_total(model) == expected
    assert count_parameters(model)[0] == expected + head_params


def test_default_fraction_is_half_a_percent() -> None:
    assert SelectiveParams().fraction == 0.005
    assert SelectiveParams(count=10).fraction is None


@pytest.mark.parametrize("arch", ARCHS)
def test_fisher_and_magnitude_select_differently(arch: str) -> None:
    picks = {}
    for score in ("fisher", "magnitude"):
        model = tiny_model(arch)
        adapt(model, METHOD, TINY[arch][1], score=score, fraction=0.05)
        picks[score] = {(n, i) for n, idx in selection(model).items() for i in idx.tolist()}
    assert len(picks["fisher"]) == len(picks["magnitude"])
    assert picks["fisher"] != picks["magnitude"]


def test_selection_is_the_top_scores() -> None:
    """The selected entries of a layer are those with the largest summed squared gradients."""
    arch, task = "bert-cls", "sequence_classification"
    reference = tiny_model(arch)
    for p in reference.parameters():
        p.requires_grad_(False)
    weights = [m.weight for n, m in reference.named_modules() if n.endswith("attention.self.query")]
    for w in weights:
        w.requires_grad_(True)
    scores = [torch.zeros_like(w) for w in weights]
    for batch in random_batches(reference, task):
        grads = torch.autograd.grad(mean_loss(task)(reference, batch), weights)
        for s, g in zip(scores, grads, strict=True):
            s += g.square()
    model = tiny_model(arch)
    adapt(model, METHOD, task, target_modules=["query"], count=50)
    flat = torch.cat([s.reshape(-1) for s in scores])
    threshold = flat.topk(50).values.min()
    chosen = selection(model)
    assert sum(i.numel() for i in chosen.values()) == 50
    for (name, idx), s in zip(sorted(chosen.items()), scores, strict=True):
        assert "query" in name
        assert bool((s.reshape(-1)[idx] >= threshold).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_leaves_weights_flags_and_grads_untouched(arch: str) -> None:
    task = TINY[arch][1]
    model = tiny_model(arch)
    params = SelectiveParams(fraction=0.02, include_biases=True)
    adapted = METHOD.apply(model, params, context_for(model, TASKS[task].head_modules))
    METHOD.merge(copy.deepcopy(model))  # merge of a copy must not touch the original either
    calibrate_again(model, params, adapted, arch)
    plain = dict(tiny_model(arch).named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is None, name
        if "_delta" in name:
            assert p.requires_grad and not p.any(), name
            continue
        plain_name = name.replace(".base_layer.", ".")
        assert torch.equal(p, plain[plain_name]), name
        is_head = any(name.startswith(h + ".") or f".{h}." in name for h in adapted.modules_to_save)
        assert p.requires_grad == is_head, name


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_keeps_indices_and_outputs(arch: str, tokenizer, tmp_path: Path) -> None:
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    params, adapted = adapt(model, METHOD, task.name, fraction=0.02, include_biases=True, score="magnitude")
    randomize_trainable(model)
    batch = sample_batch(arch, tokenizer)
    expected = logits(model, batch)
    save_adapter(
        tmp_path, method_state(METHOD, model, adapted), adapter_config(METHOD, params, adapted, task, "tiny", None)
    )

    fresh = tiny_model(arch)
    _, loaded_params, loaded = load_adapter(tmp_path, fresh, task)
    keys = {"fraction", "count", "score", "calibration_batches", "include_biases"}
    assert loaded_params.model_dump(include=keys) == params.model_dump(include=keys)
    assert loaded.adapted_modules == adapted.adapted_modules
    theirs, ours = selection(fresh), selection(model)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert torch.equal(logits(fresh, batch), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_gives_plain_names_and_changes_only_selected_entries(arch: str, tokenizer) -> None:
    model = tiny_model(arch)
    adapt(model, METHOD, TINY[arch][1], fraction=0.02, include_biases=True)
    randomize_trainable(model)
    selected = selection(model)
    head = {n for n, p in model.named_parameters() if p.requires_grad and "_delta" not in n}
    batch = sample_batch(arch, tokenizer)
    expected = logits(model, batch)
    METHOD.merge(model)
    plain = dict(tiny_model(arch).named_parameters())
    assert {n for n, _ in model.named_parameters()} == set(plain)
    assert not any(isinstance(m, SelectiveLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if name not in head:
            changed = set((p != plain[name]).reshape(-1).nonzero().flatten().tolist())
            assert changed == set(selected.get(name, torch.empty(0)).tolist()), name


def test_adapter_file_holds_only_indices_deltas_and_head(tmp_path: Path) -> None:
    arch, task = "bert-cls", TASKS["sequence_classification"]
    sizes = {}
    for count in (40, 2000):
        model = tiny_model(arch)
        params, adapted = adapt(model, METHOD, task.name, count=count)
        folder = tmp_path / str(count)
        save_adapter(
            folder, method_state(METHOD, model, adapted), adapter_config(METHOD, params, adapted, task, "tiny", None)
        )
        saved = load_file(str(folder / WEIGHTS_NAME))
        head = {PREFIX + n for n, p in model.named_parameters() if p.requires_grad and "_delta" not in n}
        assert head == {PREFIX + "classifier.weight", PREFIX + "classifier.bias"}
        sparse = {k for k in saved if k not in head}
        assert all(k.endswith((".weight.selected_indices", ".weight.selected_delta")) for k in sparse)
        indices = [saved[k] for k in sparse if k.endswith("indices")]
        assert sum(t.numel() for t in indices) == count and all(t.dtype == torch.int32 for t in indices)
        plain = dict(tiny_model(arch).named_parameters())
        assert all(k.removeprefix(PREFIX).rsplit(".", 1)[0] in plain for k in sparse)  # plain-model tensor names
        # 4 bytes an index and 4 a delta; beyond that only the head and the header (names, shapes).
        assert sum(saved[k].nbytes for k in sparse) == 8 * count
        payload = sum(t.nbytes for t in saved.values())
        size = (folder / WEIGHTS_NAME).stat().st_size
        assert payload < size < payload + 200 * len(saved) + 100
        sizes[count] = size
    assert sizes[2000] - sizes[40] >= 1960 * 8


def test_fraction_and_count_together_is_an_error() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPE, ["method={name: selective, fraction: 0.01, count: 100}"])
    assert info.value.lines[-1] == (
        "override 'method={name: selective, fraction: 0.01, count: 100}': method.count: "
        "method.fraction and method.count are both set; keep only one of them (got 100)."
    )


def test_count_above_the_eligible_entries_is_an_error() -> None:
    model = tiny_model("bert-cls")
    with pytest.raises(MethodError) as info:
        adapt(model, METHOD, "sequence_classification", count=1_000_000)
    assert str(info.value) == (
        f"method.count: more than the {eligible_size('bert-cls'):,} entries the eligible tensors hold "
        "(got 1,000,000). Lower it, or use method.fraction."
    )


def _saved(tmp_path: Path, arch: str = "bert-cls") -> tuple[Path, dict[str, torch.Tensor]]:
    task = TASKS[TINY[arch][1]]
    model = tiny_model(arch)
    params, adapted = adapt(model, METHOD, task.name, count=30)
    save_adapter(
        tmp_path, method_state(METHOD, model, adapted), adapter_config(METHOD, params, adapted, task, "tiny", None)
    )
    return tmp_path, load_file(str(tmp_path / WEIGHTS_NAME))


def _corrupt(folder: Path, state: dict[str, torch.Tensor], key_part: str, change) -> str:
    key = next(k for k in sorted(state) if k.endswith(key_part))
    state = dict(state)
    change(state, key)
    save_file(state, str(folder / WEIGHTS_NAME))
    return key


def test_load_rejects_indices_out_of_range(tmp_path: Path) -> None:
    folder, state = _saved(tmp_path)
    key = _corrupt(folder, state, "selected_indices", lambda s, k: s.__setitem__(k, s[k] + 10**6))
    with pytest.raises(CheckpointError, match=rf"{key} holds indices outside the tensor's .* entries"):
        load_adapter(folder, tiny_model("bert-cls"), TASKS["sequence_classification"])


def test_load_rejects_deltas_that_do_not_fit_the_indices(tmp_path: Path) -> None:
    folder, state = _saved(tmp_path)
    key = _corrupt(folder, state, "selected_delta", lambda s, k: s.__setitem__(k, torch.zeros(s[k].numel() + 1)))
    with pytest.raises(CheckpointError, match=rf"{key} must be a float vector of \d+ values, one per index"):
        load_adapter(folder, tiny_model("bert-cls"), TASKS["sequence_classification"])


def test_load_rejects_tensors_the_model_lacks(tmp_path: Path) -> None:
    folder, state = _saved(tmp_path)
    fake = PREFIX + "bert.encoder.layer.9.attention.self.query.weight.selected_indices"

    def add(s: dict, k: str) -> None:
        s[fake] = s[k].clone()
        s[fake.replace("indices", "delta")] = torch.zeros(s[k].numel())

    _corrupt(folder, state, "selected_indices", add)
    with pytest.raises(
        CheckpointError, match=rf"{fake} selects entries of a tensor this model has no eligible layer for"
    ):
        load_adapter(folder, tiny_model("bert-cls"), TASKS["sequence_classification"])


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_sparse_forward_and_backward_match_dense_autograd(transposed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g)  # (out x in) for Linear, (in x out) for Conv1D
    bias = torch.randn(5 if transposed else 6, generator=g)
    w_idx, b_idx = torch.tensor([0, 7, 13, 29]), torch.tensor([1, 4])
    w_delta = torch.randn(4, generator=g, requires_grad=True)
    b_delta = torch.randn(2, generator=g, requires_grad=True)
    x = torch.randn(3, 2, 6 if transposed else 5, generator=g, requires_grad=True)

    out = SparseDeltaLinear.apply(x, weight, bias, w_idx, w_delta, b_idx, b_delta, transposed)
    out.square().sum().backward()
    ours = (out.detach(), x.grad, w_delta.grad, b_delta.grad)

    x2, wd2, bd2 = (t.detach().clone().requires_grad_(True) for t in (x, w_delta, b_delta))
    w = weight.reshape(-1).index_add(0, w_idx, wd2).view_as(weight)
    b = bias.index_add(0, b_idx, bd2)
    ref = x2 @ w + b if transposed else x2 @ w.T + b
    ref.square().sum().backward()
    for a, e in zip(ours, (ref.detach(), x2.grad, wd2.grad, bd2.grad), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_trains_the_deltas() -> None:
    """Mixed precision: the forward runs in bfloat16, the deltas stay float32 and get gradients."""
    model = tiny_model("llama-lm")
    adapt(model, METHOD, "causal_lm", fraction=0.02)
    batch = random_batches(model, "causal_lm", n=1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mean_loss("causal_lm")(model, batch)
    loss.backward()
    deltas = [p for n, p in model.named_parameters() if n.endswith("_delta")]
    assert deltas and all(
        p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in deltas
    )
    assert any(bool(p.grad.any()) for p in deltas)


def test_with_delta_keeps_the_weight_exact_for_a_zero_delta() -> None:
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    assert torch.equal(with_delta(w, torch.tensor([1, 5]), torch.zeros(2)), w)
