"""The causal-LM head at the target positions only: the same loss and gradients as the full head."""

from __future__ import annotations

import pytest
import torch

from peftcli.tasks.registry import IGNORE_INDEX, TASKS
from peftcli.training.speedups.head_at_targets import head_at_targets, with_target_index
from tests.conftest import tiny_model


def batch_with_prompts_and_padding(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    attention_mask[2, 5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, :7] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with nothing to learn
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("arch", ["gpt2-lm", "llama-lm"])
def test_head_at_targets_gives_the_full_heads_loss_and_gradients(arch: str, indexed: bool) -> None:
    """With the target positions found on the host (`with_target_index`, as the loop does) or not."""
    task = TASKS["causal_lm"]
    model = tiny_model(arch)
    batch = batch_with_prompts_and_padding(model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    given = with_target_index(batch) if indexed else batch

    def loss_and_grads(
        head: torch.nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with head_at_targets(head, given) as for_loss:
            logits = model(**inputs).logits
        loss, count = task.loss_sum(logits, for_loss)
        loss.backward()
        return logits, loss.detach(), count, [p.grad.clone() for p in model.parameters()]

    full_logits, full_loss, full_count, full_grads = loss_and_grads(None)
    logits, loss, count, grads = loss_and_grads(model.get_output_embeddings())
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert full_logits.shape[:2] == (3, 12) and logits.shape == (targets, model.config.vocab_size)
    assert int(count) == int(full_count) == task.units(batch) == targets
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    for g, full in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, full, rtol=1e-5, atol=1e-7)
    # The hook is gone afterwards: the next forward returns every position's logits again.
    assert model(**inputs).logits.shape[:2] == (3, 12)


def test_hidden_states_that_do_not_line_up_with_the_labels_keep_the_full_head() -> None:
    """Virtual tokens prepended: the head runs everywhere and the loss reads the batch unchanged."""
    model = tiny_model("llama-lm")
    batch = batch_with_prompts_and_padding(model.config.vocab_size)
    longer = {k: torch.cat([v[:, :2], v], dim=1) for k, v in batch.items() if k != "labels"}
    with head_at_targets(model.get_output_embeddings(), batch) as for_loss:
        logits = model(**longer).logits
    assert logits.shape[:2] == (3, 14) and for_loss.keys() == batch.keys()
