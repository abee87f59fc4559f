"""Chat training, `peft train --dry-run` and `peft generate`, in-process through typer's CliRunner (see
test_bad_inputs.py: a subprocess per call would spend most of the time importing torch)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from peftcli.cli import app
from tests.cli.test_bad_inputs import refused, snapshot
from tests.conftest import qa_rows, tiny_recipe, write_jsonl
from tests.unit.test_chat import CONVERSATION, chat_tokenizer


def peft_in_process(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result.stdout


def conversations(n: int, seed: int) -> list[dict]:
    """One- and two-turn conversations over the tiny vocabulary; the first is test_chat's CONVERSATION."""
    rows = qa_rows(2 * n, seed)
    turns = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]
    return [{"messages": CONVERSATION}] + [
        {"messages": turns[i] + (turns[i + n] if i % 2 else [])} for i in range(1, n)
    ]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory, tiny_dirs) -> Path:
    """The tiny Llama with a chat template saved beside its tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "llama-chat"
    shutil.copytree(tiny_dirs["llama-lm"], folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def chat_recipe(model: Path, tiny_data: dict, root: Path, **sections) -> Path:
    files = {
        "train": [str(write_jsonl(root / "train.jsonl", conversations(48, 5)))],
        "validation": [str(write_jsonl(root / "validation.jsonl", conversations(16, 6)))],
    }
    recipe = tiny_recipe(model, tiny_data, "causal_lm", **sections)
    recipe["data"] |= {"files": files, "columns": {"messages": "messages"}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory, chat_model: Path, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("chat-run")
    recipe = chat_recipe(
        chat_model, tiny_data, root, output_dir=str(root / "run"), train={"max_steps": 12, "eval_every": None}
    )
    peft_in_process("train", str(recipe))
    assert (root / "run" / "adapter" / "adapter_model.safetensors").is_file()
    return root / "run"


# -- --dry-run ------------------------------------------------------------------------------------


def test_dry_run_marks_the_trained_tokens_and_writes_nothing(work: Path, chat_model: Path, tiny_data) -> None:
    recipe = chat_recipe(chat_model, tiny_data, work)
    before = snapshot(work)
    out = peft_in_process("train", str(recipe), "--dry-run")
    assert snapshot(work) == before and not (work / "runs").exists()
    assert (
        "[BOS] question : what is one plus one answer : [[two [EOS]]] question : what is two plus two answer : "
        "[[four five [EOS]]]" in out
    )
    assert re.search(r"^train: 48 examples, [\d,]+ tokens, [\d,]+ trained \([\d.]+%\)$", out, re.MULTILINE)
    assert re.search(r"^validation: 16 examples, ", out, re.MULTILINE)
    assert "would write runs/tiny" in out


def test_dry_run_of_prompt_response_and_classification(work: Path, tiny_dirs, tiny_data) -> None:
    qa = work / "qa.yaml"
    qa.write_text(yaml.safe_dump(tiny_recipe(tiny_dirs["llama-lm"], tiny_data, "causal_lm")))
    first = qa_rows(96, 3)[0]  # tiny_data's first training row
    assert f"{first['question']} answer : [[{first['answer']} [EOS]]]" in peft_in_process("train", str(qa), "--dry-run")
    cls = work / "cls.yaml"
    cls.write_text(yaml.safe_dump(tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification")))
    out = peft_in_process("train", str(cls), "--dry-run")
    assert "label 'positive'" in out and re.search(
        r"^train: 96 examples, [\d,]+ tokens; labels: negative 48, positive 48$", out, re.MULTILINE
    )


def test_a_model_without_a_chat_template_is_refused(work: Path, tiny_dirs, tiny_data) -> None:
    recipe = chat_recipe(tiny_dirs["llama-lm"], tiny_data, work)
    line = (
        f"data.columns.messages: the tokenizer of '{tiny_dirs['llama-lm']}' has no chat template. "
        "Use a chat (instruct) model, save a chat template beside its tokenizer (chat_template.jinja), or train on "
        "prompt/response columns."
    )
    refused(work, "train", str(recipe), lines=[line])


# -- peft generate --------------------------------------------------------------------------------


def hf_greedy(model_dir: Path, adapter: Path, ids: list[int], max_new_tokens: int) -> str:
    """What transformers and HF peft generate for the same adapter."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def test_generate_matches_hf_peft_greedy(chat_run: Path, chat_model: Path) -> None:
    tok = chat_tokenizer()
    user = tok.apply_chat_template(
        [{"role": "user", "content": "what is two plus one"}], add_generation_prompt=True, return_dict=False
    )
    ours = peft_in_process("generate", str(chat_run), "what is two plus one", "--max-new-tokens", "8")
    assert ours == hf_greedy(chat_model, chat_run / "adapter", user, 8) + "\n"
    raw = "the film was good and"  # --no-chat: the text as it is; unlike the chats trained on, so no early [EOS]
    ours = peft_in_process("generate", str(chat_run), raw, "--no-chat", "--max-new-tokens", "8")
    assert ours == hf_greedy(chat_model, chat_run / "adapter", tok(raw)["input_ids"], 8) + "\n"
    assert len(ours.split()) == 8  # all eight new tokens compared, none a special token


def test_generate_from_a_file_of_prompts_and_conversations(chat_run: Path, work: Path) -> None:
    prompts = ["what is one plus one", "the film was good", "what is two plus two"]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = peft_in_process("generate", str(chat_run), "--file", "prompts.txt", "--max-new-tokens", "4")
    singles = [peft_in_process("generate", str(chat_run), p, "--max-new-tokens", "4").rstrip("\n") for p in prompts]
    assert out == "\n\n".join(f"[{i + 1}] {p}\n{s}" for i, (p, s) in enumerate(zip(prompts, singles))) + "\n"
    rows = [
        {"messages": [{"role": "user", "content": prompts[0]}]},
        {"prompt": prompts[1]},
        {"conversations": [{"from": "human", "value": prompts[2]}]},
    ]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert peft_in_process("generate", str(chat_run), "--file", "prompts.jsonl", "--max-new-tokens", "4") == out


GREEDY_ONLY = "applies to sampling only (got {} with greedy decoding). Give --temperature above 0 to sample."


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        (["--temperature", "-1"], ["--temperature: must be 0 (greedy) or more (got -1.0)."]),
        (
            ["--max-new-tokens", "0", "--top-p", "1.5", "--temperature", "0.7"],
            ["--max-new-tokens: must be at least 1 (got 0).", "--top-p: must be above 0 and at most 1 (got 1.5)."],
        ),
        (
            ["--temperature", "1", "--top-k", "0"],
            ["--top-k: must be at least 1 (got 0). Leave it out to sample from every token."],
        ),
        (
            ["--greedy", "--temperature", "0.5"],
            ["--greedy: greedy decoding takes no temperature (got --temperature 0.5). Drop one of them."],
        ),
        (
            ["--top-p", "0.9", "--top-k", "5"],
            ["--top-p: " + GREEDY_ONLY.format(0.9), "--top-k: " + GREEDY_ONLY.format(5)],
        ),
    ],
)
def test_bad_sampling_options(chat_run: Path, work: Path, args: list[str], lines: list[str]) -> None:
    refused(work, "generate", str(chat_run), "hello", *args, lines=lines)


PROMPT_FILES = {
    "bad.jsonl": '{"prompt": "one"}\n{"prompt": \n',
    "chat.jsonl": '{"messages": [{"role": "user", "content": "one"}]}\n',
}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--file", "nope.txt"],
            "--file: file not found (got 'nope.txt'). Give a text file (one prompt a line) or a JSONL file.",
        ),
        ([], 'PROMPT: nothing to complete. Give a prompt (peft generate RUN "text") or --file prompts.txt.'),
        (
            ["--file", "bad.jsonl"],
            "--file: bad.jsonl line 2: not valid JSON (Expecting value). Write one JSON object a line.",
        ),
        (
            ["--file", "chat.jsonl", "--no-chat"],
            "--no-chat: chat.jsonl holds conversations, which only the chat template can render. Drop --no-chat.",
        ),
    ],
)
def test_bad_prompts(chat_run: Path, work: Path, args: list[str], line: str) -> None:
    for name, text in PROMPT_FILES.items():
        (work / name).write_text(text)
    refused(work, "generate", str(chat_run), *args, lines=[line])


def test_chat_needs_a_chat_template(chat_run: Path, work: Path, tiny_dirs) -> None:
    plain = tiny_dirs["llama-lm"]  # the same model without a chat template
    line = (
        f"--chat: the tokenizer of '{plain}' has no chat template. Complete plain text (plain prompts, --no-chat), "
        "or use a chat model."
    )
    refused(work, "generate", str(chat_run), "hello", f"model.name={plain}", lines=[line])
