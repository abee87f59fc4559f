"""Batching tokenized rows: length-grouped micro-batches that add up to each optimizer step's batch,
dynamic padding, and the train and eval DataLoaders.

Batches padded to their longest example waste compute on padding; grouping examples of similar length
(random across groups) removes most of it (docs/benchmarks.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Sampler

from peftcli.tasks.registry import IGNORE_INDEX


class GroupedBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices. Every `grad_accum` consecutive micro-batches form one optimizer step's
    batch of `batch_size * grad_accum` examples, so the accumulated batch is the same whatever the
    split into micro-batches. With grouping, each step's batch holds examples of similar length
    (sorted within chunks of 50 steps' worth), and the order of steps is random but for the first,
    which holds the longest example."""

    MEGABATCH_STEPS = 50

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        grad_accum: int,
        group_by_length: bool,
        seed: int,
        num_processes: int = 1,
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        # accelerate deals micro-batches out to the processes in turn, so one optimizer step takes
        # grad_accum x num_processes consecutive micro-batches: the step's batch is the same as one
        # process accumulating that many.
        self.grad_accum = grad_accum * num_processes
        self.group_by_length = group_by_length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def step_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.grad_accum
        if self.group_by_length:
            mega = size * self.MEGABATCH_STEPS
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
            ]
        steps = [order[s : s + size] for s in range(0, len(order), size)]
        if self.group_by_length and len(steps) > 1:
            # Shuffle whole steps, keeping a short last step at the end so steps stay aligned.
            full, last = (steps, []) if len(steps[-1]) == size else (steps[:-1], [steps[-1]])
            perm = torch.randperm(len(full), generator=g).tolist()
            full = [full[i] for i in perm]
            # The step with the longest example goes first, as in HF's length-grouped sampler: an
            # out-of-memory shows at step 1, and the allocator reaches its high-water mark at once
            # instead of growing with later, longer batches (docs/benchmarks.md, Levers).
            longest = max(range(len(full)), key=lambda k: max(self.lengths[i] for i in full[k]))
            full[0], full[longest] = full[longest], full[0]
            steps = full + last
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.step_batches():
            for s in range(0, len(step), self.batch_size):
                yield step[s : s + self.batch_size]

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size * self.grad_accum
        full, rest = divmod(n, size)
        return full * self.grad_accum + -(-rest // self.batch_size)


class Collator:
    """Pads a list of tokenized rows to the longest row (dynamic padding), on the right."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        batch["input_ids"] = self._pad([r["input_ids"] for r in rows], width, self.pad_token_id)
        batch["attention_mask"] = self._pad([[1] * len(r["input_ids"]) for r in rows], width, 0)
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = self._pad([r["token_type_ids"] for r in rows], width, 0)
        labels = [r["labels"] for r in rows]
        if isinstance(labels[0], list):
            # A seq2seq target has its own length; a causal LM's labels are as long as its input.
            batch["labels"] = self._pad(labels, max(len(x) for x in labels), IGNORE_INDEX)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch

    @staticmethod
    def _pad(seqs: list[list[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out


def lengths_of(ds: datasets.Dataset) -> list[int]:
    return [len(ids) for ids in ds["input_ids"]]


def train_loader(
    ds: datasets.Dataset,
    pad_token_id: int,
    batch_size: int,
    grad_accum: int,
    group_by_length: bool,
    seed: int,
    num_processes: int = 1,
) -> DataLoader:
    """All processes' micro-batches; accelerate's prepare() gives each process its own."""
    sampler = GroupedBatchSampler(lengths_of(ds), batch_size, grad_accum, group_by_length, seed, num_processes)
    return DataLoader(
        ds.with_format(None),
        batch_sampler=sampler,
        collate_fn=Collator(pad_token_id),
        generator=own_generator(seed),
        pin_memory=torch.cuda.is_available(),  # the copy to the GPU then does not block the host
    )


def own_generator(seed: int) -> torch.Generator:
    """A DataLoader draws a seed from the global generator each time it is iterated, unless it has
    its own: with one, evals and resumed runs leave the global generator (dropout) untouched."""
    return torch.Generator().manual_seed(seed)


def eval_loader(
    ds: datasets.Dataset, pad_token_id: int, batch_size: int, process_index: int = 0, num_processes: int = 1
) -> DataLoader:
    """Longest examples first, in fixed batches: little padding, and an out-of-memory shows at once.
    With several processes, this process's share of the batches: every example exactly once overall."""
    lengths = lengths_of(ds)
    order = sorted(range(len(ds)), key=lambda i: -lengths[i])
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)][process_index::num_processes]
    return DataLoader(
        ds.with_format(None),
        batch_sampler=batches,
        collate_fn=Collator(pad_token_id),
        generator=own_generator(0),
        pin_memory=torch.cuda.is_available(),
    )
