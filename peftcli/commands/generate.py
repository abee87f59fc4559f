"""`peft generate TARGET "prompt"` (or `--file`): completions from a trained causal LM adapter, a run
directory or an adapter folder. Prompts are plain text, or chat: wrapped as a user message in the
tokenizer's chat template (on by default for a run trained on `messages`), or whole conversations from
a JSONL file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from accelerate import PartialState
from transformers import PreTrainedTokenizerBase

from peftcli.data.chat import as_messages, render, require_chat_template
from peftcli.errors import PeftcliError
from peftcli.models.loading import load_tokenizer
from peftcli.models.target import Target, build, resolve_target
from peftcli.tasks.generation import Decoding, complete

Prompt = str | list[dict[str, str]]  # plain text, or a conversation
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)*=")


def run_generate(
    target_path: Path,
    prompt: str | None,
    file: Path | None,
    decoding: Decoding,
    chat: bool | None,
    overrides: list[str],
    greedy: bool = False,
) -> list[str]:
    check_decoding(decoding, greedy)  # before anything loads: a typo costs no model load
    if file is not None and prompt is not None and OVERRIDE.match(prompt):
        # With --file there is no prompt argument: `peft generate RUN --file F model.name=X` is an override.
        prompt, overrides = None, [prompt, *overrides]
    prompts = read_prompts(prompt, file)
    target = resolve_target(target_path, overrides)
    check_target(target)
    chat = use_chat(target, chat, prompts, file)
    if chat:  # checked before the model loads
        key = "--file" if any(isinstance(p, list) for p in prompts) else "--chat"
        require_chat_template(
            load_tokenizer(target.model), key, "Complete plain text (plain prompts, --no-chat), or use a chat model."
        )
    built = build(target)
    model = built.model.to(PartialState().device).eval()
    completions = []
    for i, p in enumerate(prompts):
        ids = prompt_ids(built.tokenizer, p, chat, f"prompt {i + 1}")
        completions.append(complete(model, built.tokenizer, ids, decoding))
        show(i, p, completions[-1], len(prompts))
    return completions


def check_decoding(d: Decoding, greedy: bool) -> None:
    """Every bad option at once, one line each."""
    problems = []
    if d.max_new_tokens < 1:
        problems.append(f"--max-new-tokens: must be at least 1 (got {d.max_new_tokens}).")
    if d.temperature < 0:
        problems.append(f"--temperature: must be 0 (greedy) or more (got {d.temperature}).")
    if d.top_p is not None and not 0 < d.top_p <= 1:
        problems.append(f"--top-p: must be above 0 and at most 1 (got {d.top_p}).")
    if d.top_k is not None and d.top_k < 1:
        problems.append(f"--top-k: must be at least 1 (got {d.top_k}). Leave it out to sample from every token.")
    if greedy and d.temperature > 0:
        problems.append(
            f"--greedy: greedy decoding takes no temperature (got --temperature {d.temperature}). Drop one of them."
        )
    elif d.temperature == 0:
        for option, value in (("--top-p", d.top_p), ("--top-k", d.top_k)):
            if value is not None:
                problems.append(
                    f"{option}: applies to sampling only (got {value} with greedy decoding). "
                    "Give --temperature above 0 to sample."
                )
    if problems:
        raise PeftcliError(*problems)


def read_prompts(prompt: str | None, file: Path | None) -> list[Prompt]:
    if prompt is not None and file is not None:
        raise PeftcliError(f"--file: give a prompt or --file, not both (got a prompt and --file {file}).")
    if prompt is not None:
        if not prompt.strip():
            raise PeftcliError("PROMPT: the prompt is empty. Give the text to complete.")
        return [prompt]
    if file is None:
        raise PeftcliError(
            'PROMPT: nothing to complete. Give a prompt (peft generate RUN "text") or --file prompts.txt.'
        )
    if not file.is_file():
        raise PeftcliError(
            f"--file: file not found (got '{file}'). Give a text file (one prompt a line) or a JSONL file."
        )
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PeftcliError(
            f"--file: {file} is not UTF-8 text. Give a text file (one prompt a line) or a JSONL file."
        ) from None
    prompts = (
        jsonl_prompts(file, lines) if file.suffix.lower() == ".jsonl" else [line for line in lines if line.strip()]
    )
    if not prompts:
        raise PeftcliError(f"--file: no prompts in {file} (it is empty). Write one prompt a line.")
    return prompts


def jsonl_prompts(file: Path, lines: list[str]) -> list[Prompt]:
    """One JSON object a line: {"messages": [...]} (or ShareGPT's "conversations") or {"prompt": "..."}."""
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--file: {file} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeftcliError(f"{where}: not valid JSON ({exc.msg}). Write one JSON object a line.") from None
        conversation = row.get("messages", row.get("conversations")) if isinstance(row, dict) else None
        if conversation is not None:
            prompts.append(as_messages(conversation, where))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        else:
            raise PeftcliError(
                f'{where}: expected an object with "messages" (or "conversations") or a "prompt" string (got '
                f"{line.strip()[:80]})."
            )
    return prompts


def check_target(target: Target) -> None:
    if target.adapter_dir is None:
        raise PeftcliError(
            f"{target.path}: a recipe has no trained adapter to generate with. "
            "Give a run directory or an adapter folder."
        )
    if not target.task.generates:
        raise PeftcliError(
            f"{target.path}: generate needs a causal_lm or seq2seq_lm adapter (got {target.task.name}). "
            "Use `peft eval` for classification."
        )


def use_chat(target: Target, chat: bool | None, prompts: list[Prompt], file: Path | None) -> bool:
    """--chat, else on when the run trained on messages or the file holds conversations."""
    conversations = any(isinstance(p, list) for p in prompts)
    if chat is False and conversations:
        raise PeftcliError(
            f"--no-chat: {file} holds conversations, which only the chat template can render. Drop --no-chat."
        )
    if chat is not None:
        return chat
    return conversations or bool(target.recipe is not None and target.recipe.data.columns.messages)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool, where: str) -> list[int]:
    """Tokenized as in training: plain text with the tokenizer's special tokens, a chat as the template
    renders it up to the assistant's turn (the template writes its own special tokens)."""
    if not chat:
        assert isinstance(prompt, str)
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = render(tokenizer, messages, where, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def show(i: int, prompt: Prompt, completion: str, total: int) -> None:
    """One prompt: its completion alone. Several: each under a header naming the prompt."""
    if total > 1:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        first = text.strip().splitlines()[0] if text.strip() else ""
        print(f"[{i + 1}] {first[:70] + ('...' if len(first) > 70 else '')}")
    print(completion, flush=True)
    if total > 1 and i + 1 < total:
        print()
