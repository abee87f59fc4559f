"""Dropout with masks from 15-bit random integers: torch's distribution and scaling, the mask kept for
the backward, the same masks again under gradient checkpointing, and torch's own modules back after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftcli.config.schema import TrainSpec
from peftcli.methods import METHODS
from peftcli.models.loading import set_dropout
from peftcli.training.speedups.dropout_masks import CheaperDropout, cheaper_dropout, keep_mask, kept_scale
from tests.conftest import tiny_model
from tests.helpers import adapt, random_batches, run_training


@pytest.mark.parametrize("p", [0.1, 0.5, 0.02])
def test_masks_keep_each_element_with_probability_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([1000, 1001]), p)  # not a multiple of 4: the last int64 is cut
    assert keep.dtype == torch.bool and keep.shape == (1000, 1001)
    # Four lanes share each 64-bit number: every lane on its own keeps 1 - p (3 standard errors).
    lanes = keep.flatten()[: 1000 * 1000].view(-1, 4).float().mean(0)
    assert torch.all((lanes - (1 - p)).abs() < 3 * (p * (1 - p) / 250_000) ** 0.5 + 1e-4)
    assert kept_scale(p) == pytest.approx(1 / (1 - p), rel=1e-4)


def test_dropout_output_and_gradient_are_the_mask_times_the_scale() -> None:
    torch.manual_seed(0)
    drop = CheaperDropout(0.25).train()
    x = torch.randn(64, 37, 48, requires_grad=True)
    out = drop(x)
    kept = out != 0
    assert 0.7 < kept.float().mean() < 0.8
    torch.testing.assert_close(out[kept], x[kept] * kept_scale(0.25))
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g * kept_scale(0.25), 0.0))


def test_a_seeded_run_draws_the_same_masks() -> None:
    x = torch.randn(16, 40)
    drop = CheaperDropout(0.1).train()
    torch.manual_seed(3)
    first = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), first)


def test_eval_mode_and_zero_probability_leave_the_input() -> None:
    x = torch.randn(8, 9)
    assert torch.equal(CheaperDropout(0.5).eval()(x), x)
    assert torch.equal(CheaperDropout(0.0).train()(x), x)
    assert torch.equal(CheaperDropout(1.0).train()(x), torch.zeros_like(x))  # torch's own: all dropped


def test_the_block_switches_every_dropout_module_and_switches_them_back() -> None:
    model = tiny_model("bert-cls")
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    with pytest.raises(RuntimeError, match="inside"), cheaper_dropout(model) as switched:
        assert switched == dropouts and dropouts
        assert all(type(m) is CheaperDropout for m in dropouts)
        raise RuntimeError("inside")
    assert all(type(m) is nn.Dropout for m in dropouts)


def test_gradient_checkpointing_draws_the_same_masks_again() -> None:
    """Checkpointing recomputes each layer in the backward pass: its dropout must drop what the
    forward dropped, or the gradients would be of another network."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("bert-cls")
        adapt(model, METHODS["lora"], "sequence_classification")
        set_dropout(model, 0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = random_batches(model, "sequence_classification")[0]
        torch.manual_seed(0)
        with cheaper_dropout(model):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_training_loop_trains_with_cheaper_dropout_and_gives_torchs_back(tokenizer, tiny_data) -> None:
    model = tiny_model("bert-cls")
    adapt(model, METHODS["lora"], "sequence_classification")
    set_dropout(model, 0.1)
    seen: list[tuple[type, bool]] = []
    dropout = model.bert.encoder.layer[0].output.dropout
    dropout.register_forward_hook(lambda m, args, out: seen.append((type(m), m.training)))
    run_training(model, "sequence_classification", tokenizer, tiny_data, TrainSpec(batch_size=8, max_steps=4, seed=0))
    assert seen.count((CheaperDropout, True)) == 4  # one forward per training step
    assert type(dropout) is nn.Dropout
