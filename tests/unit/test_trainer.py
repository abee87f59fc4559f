"""The training loop: accumulation equals the large batch, the schedule warms up, loss goes down."""

from __future__ import annotations

import pytest
import torch

from peftcli.config.schema import OptimizerSpec, ScheduleSpec, TrainSpec
from peftcli.methods import METHODS
from peftcli.training.optim import make_scheduler
from tests.conftest import TINY, tiny_model
from tests.helpers import adapt, randomize_trainable, run_training


@pytest.mark.parametrize("arch", ["bert-cls", "llama-lm"])
def test_grad_accumulation_4x8_equals_1x32(arch: str, tokenizer, tiny_data) -> None:
    """One optimizer step over 32 examples, as 1 x 32 and as 4 x 8. For causal LM the micro-batches
    hold different numbers of target tokens, so per-micro-batch means would not match."""
    task = TINY[arch][1]
    results = []
    for batch_size, accum in [(32, 1), (8, 4)]:
        model = tiny_model(arch)
        adapt(model, METHODS["lora"], task)
        randomize_trainable(model)  # B != 0, so A gets gradients too
        spec = TrainSpec(batch_size=batch_size, grad_accum=accum, max_steps=1, max_grad_norm=None, seed=0)
        run_training(model, task, tokenizer, tiny_data, spec, OptimizerSpec(name="sgd", lr=1.0))
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    big, accumulated = results
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6)
    # The step really moved the parameters: the comparison is not between two untouched models.
    start = tiny_model(arch)
    adapt(start, METHODS["lora"], task)
    randomize_trainable(start)
    initial = {n: p for n, p in start.named_parameters() if p.requires_grad}
    assert all(not torch.allclose(initial[n], big[n]) for n in big)


def learning_rates(schedule: ScheduleSpec, total_steps: int, lr: float) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(optimizer, schedule, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_linear_decay() -> None:
    lrs = learning_rates(ScheduleSpec(name="linear", warmup_ratio=0.2), total_steps=10, lr=1.0)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert lrs[2:] == sorted(lrs[2:], reverse=True)


def test_constant_schedule_keeps_lr_after_warmup() -> None:
    lrs = learning_rates(ScheduleSpec(name="constant", warmup_steps=2), total_steps=6, lr=0.1)
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.1, 0.1, 0.1])


def test_best_metric_picks_the_best_eval(tokenizer, tiny_data) -> None:
    model = tiny_model("bert-cls")
    adapt(model, METHODS["lora"], "sequence_classification")
    result = run_training(
        model,
        "sequence_classification",
        tokenizer,
        tiny_data,
        TrainSpec(batch_size=8, max_steps=12, eval_every=3, seed=0),
    )
    evals = [r for r in result.history if "eval_accuracy" in r]
    assert len(evals) == 4  # steps 3, 6, 9, 12
    best = max(evals, key=lambda r: r["eval_accuracy"])  # first of the best wins
    assert result.best_step == best["step"]
    assert result.best_metrics["accuracy"] == best["eval_accuracy"]


@pytest.mark.parametrize(
    ("mixed_precision", "dtype", "length", "flash"),
    [
        ("no", torch.float32, 24, True),  # fp32: flash wins at every length
        ("bf16", torch.float32, 24, False),  # bf16 autocast, short: the math kernel
        ("no", torch.bfloat16, 24, False),  # bf16 weights, short: the math kernel
        ("bf16", torch.float32, 191, False),
        ("bf16", torch.float32, 192, True),  # long enough for flash's bf16 backward to win
    ],
)
def test_bf16_training_on_cpu_uses_the_math_attention_kernel_below_192_tokens(
    mixed_precision: str, dtype: torch.dtype, length: int, flash: bool
) -> None:
    from types import SimpleNamespace

    from peftcli.training.speedups.attention_kernel import math_attention

    model = torch.nn.Linear(4, 4).to(dtype)
    # accelerate's state is a process-wide singleton: a stand-in with the two attributes read.
    accelerator = SimpleNamespace(mixed_precision=mixed_precision, device=torch.device("cpu"))
    with math_attention(accelerator, model) as attention:  # type: ignore[arg-type]
        with attention(length):
            assert torch.backends.cuda.flash_sdp_enabled() is flash
            assert torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()  # restored after the forward
