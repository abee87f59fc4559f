"""`peft train RECIPE --dry-run`: what training would see, without loading the model's weights or writing
anything: one training example as tokenized, its trained tokens marked, and the examples and tokens of
every split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from rich.console import Console
from rich.markup import escape
from transformers import PreTrainedTokenizerBase

from peftcli.config.load import load_recipe
from peftcli.config.schema import Recipe
from peftcli.data.prepare import PreparedData, prepare_data
from peftcli.data.tokenize import words_cut
from peftcli.models.loading import load_tokenizer
from peftcli.tasks.registry import IGNORE_INDEX, TASKS

# emoji=False: an example's text or a name with `:fire:` in it is printed as written.
console = Console(soft_wrap=True, highlight=False, emoji=False)


def run_dry_run(recipe_path: Path, overrides: list[str]) -> dict[str, Any]:
    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, recipe.task, tokenizer)
    splits = {recipe.data.train_split: data.train} | (
        {str(recipe.data.eval_split): data.eval} if data.eval is not None else {}
    )
    encoder_decoder = TASKS[recipe.task].encoder_decoder
    counts = {split: split_counts(ds, data, encoder_decoder) for split, ds in splits.items()}
    what = f": dry run of {recipe.method.name} on {recipe.model.name} ({recipe.task}); nothing is written"
    console.print(f"[bold]{escape(str(recipe.name))}[/]{escape(what)}")
    print_example(data, tokenizer, encoder_decoder)
    print_counts(counts, data, recipe)
    return counts


def trained(labels: list[int]) -> list[bool]:
    """Which tokens are targets: position t predicts token t + 1, so the first token never is."""
    return [i > 0 and label != IGNORE_INDEX for i, label in enumerate(labels)]


def split_counts(ds: datasets.Dataset, data: PreparedData, encoder_decoder: bool = False) -> dict[str, Any]:
    tokens = sum(len(ids) for ids in ds["input_ids"])
    if "num_words" in ds.column_names:  # token classification: one tag per word
        assert data.label_names is not None
        per_tag = Counter(data.label_names[y] for labels in ds["labels"] for y in labels if y != IGNORE_INDEX)
        return {
            "examples": len(ds),
            "tokens": tokens,
            "labels": dict(sorted(per_tag.items())),
            "words_cut": words_cut(ds),
        }
    if encoder_decoder:  # the targets are a sequence of their own, every token trained
        return {"examples": len(ds), "tokens": tokens, "target_tokens": sum(len(t) for t in ds["labels"])}
    if data.label_names is not None:  # classification: one label per example
        per_label = Counter(data.label_names[y] for y in ds["labels"])
        return {"examples": len(ds), "tokens": tokens, "labels": dict(sorted(per_label.items()))}
    targets = sum(sum(trained(labels)) for labels in ds["labels"])
    return {"examples": len(ds), "tokens": tokens, "trained_tokens": targets}


def runs_of(flags: list[bool]) -> list[tuple[bool, int, int]]:
    """Consecutive tokens of the same kind, as (trained, start, end)."""
    out: list[tuple[bool, int, int]] = []
    for i, flag in enumerate(flags):
        if out and out[-1][0] == flag:
            out[-1] = (flag, out[-1][1], i + 1)
        else:
            out.append((flag, i, i + 1))
    return out


def piece(tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int, end: int) -> str:
    """The text tokens start..end add to the decoded prefix: decoding a run on its own would lose the
    spaces a word-level or SentencePiece tokenizer puts between tokens."""
    before = tokenizer.decode(ids[:start], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    through = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if through.startswith(before):
        return through[len(before) :]
    return tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def marked(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], styled: bool) -> str:
    """The example's text with trained tokens highlighted (styled) or in [[...]], masked tokens dim or
    plain. Whitespace at the edge of a trained run is shown outside its brackets."""
    parts = []
    for is_trained, start, end in runs_of(trained(labels)):
        text = piece(tokenizer, ids, start, end)
        if not styled and not is_trained:
            parts.append(text)
            continue
        core = text.strip()
        lead, tail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
        if not styled:
            parts.append(f"{lead}[[{core}]]{tail}" if core else text)
        else:
            style = "bold green" if is_trained else "dim"
            parts.append(f"{escape(lead)}[{style}]{escape(core)}[/]{escape(tail)}")
    return "".join(parts)


def styled_output() -> bool:
    return console.is_terminal and not console.no_color


def tagged(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], tag_names: list[str]) -> str:
    """Sub-tokens separated by spaces, each word's first one followed by /TAG, the tag it trains."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return " ".join(p if y == IGNORE_INDEX else f"{p}/{tag_names[y]}" for p, y in zip(pieces, labels))


def print_example(data: PreparedData, tokenizer: PreTrainedTokenizerBase, encoder_decoder: bool = False) -> None:
    row = data.train[0]
    ids, labels = row["input_ids"], row["labels"]
    if encoder_decoder:
        console.print(f"first training example: source ({len(ids)} tokens, the encoder's input):", markup=False)
        console.print(
            tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), markup=False
        )
        console.print(f"target ({len(labels)} tokens, all trained):", markup=False)
        console.print(
            tokenizer.decode(labels, skip_special_tokens=False, clean_up_tokenization_spaces=False), markup=False
        )
        return
    if data.label_names is not None and isinstance(labels, list):
        console.print(
            f"first training example ({len(ids)} tokens, {row['num_words']} words): each word's first sub-token "
            "shows the tag it trains (/TAG); the other sub-tokens and special tokens are not trained:",
            markup=False,
        )
        console.print(tagged(tokenizer, ids, labels, data.label_names), markup=False)
        return
    if data.label_names is not None:
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        console.print(f"first training example ({len(ids)} tokens), label {data.label_names[labels]!r}:", markup=False)
        console.print(text, markup=False)
        return
    styled = styled_output()
    legend = "trained tokens highlighted, masked tokens dim" if styled else "trained tokens in [[...]]"
    console.print(
        f"first training example ({len(ids)} tokens, {sum(trained(labels))} trained; {legend}):", markup=False
    )
    body = marked(tokenizer, ids, labels, styled)
    console.print(body, markup=styled)


def print_counts(counts: dict[str, dict[str, Any]], data: PreparedData, recipe: Recipe) -> None:
    for split, c in counts.items():
        line = f"{split}: {c['examples']:,} examples, {c['tokens']:,} tokens"
        if "trained_tokens" in c:
            share = 100 * c["trained_tokens"] / max(c["tokens"], 1)
            line += f", {c['trained_tokens']:,} trained ({share:.1f}%)"
        if "target_tokens" in c:
            line += f" in sources, {c['target_tokens']:,} in targets (all trained)"
        if "labels" in c:
            line += "; labels: " + ", ".join(f"{name} {n:,}" for name, n in c["labels"].items())
        if c.get("words_cut"):
            line += (
                f"; {c['words_cut']:,} words cut by data.max_length {recipe.data.max_length} (not trained or scored)"
            )
        if data.dropped.get(split):
            line += (
                f"; {data.dropped[split]:,} dropped (nothing to learn within data.max_length {recipe.data.max_length})"
            )
        console.print(line, markup=False)
    run_dir = recipe.run_dir()
    taken = run_dir.is_dir() and any(run_dir.iterdir())
    console.print(
        f"would write {run_dir}" + (" (it exists: peft train needs --overwrite)" if taken else ""), markup=False
    )
