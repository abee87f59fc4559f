"""Chat data: the template's rendering, labels on the assistant's turns only, both conversation shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from peftcli.config.load import load_recipe
from peftcli.config.schema import DataSpec
from peftcli.data.chat import encode_chat
from peftcli.data.prepare import prepare_data
from peftcli.errors import DataError
from peftcli.tasks.registry import IGNORE_INDEX
from tests.conftest import make_tokenizer, write_jsonl
from tests.unit.test_recipe import BASE, errors, write

# A chat template in the tiny tokenizer's words: user turns are "question : ...", assistant turns
# "answer : ... [EOS]", and the generation prompt is "answer :".
TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}"
    "{% if m['role'] == 'assistant' %}answer : {{ m['content'] }} {{ eos_token }} "
    "{% else %}question : {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}answer : {% endif %}"
)
# The same rendering, with the assistant's text marked for transformers' return_assistant_tokens_mask.
GENERATION_TEMPLATE = TEMPLATE.replace(
    "answer : {{ m['content'] }} {{ eos_token }} ",
    "answer : {% generation %}{{ m['content'] }} {{ eos_token }}{% endgeneration %} ",
)
CONVERSATION = [
    {"role": "user", "content": "what is one plus one"},
    {"role": "assistant", "content": "two"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four five"},
]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CONVERSATION]


def chat_tokenizer(template: str = TEMPLATE) -> PreTrainedTokenizerFast:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def chat_spec(path: Path, column: str = "messages", **kw) -> DataSpec:
    return DataSpec(files={"train": [str(path)]}, eval_split=None, columns={"messages": column}, **kw)


def test_only_the_assistant_turns_are_trained_with_their_end_token() -> None:
    tok = chat_tokenizer()
    ids, labels = encode_chat(tok, CONVERSATION, "row 0")
    assert ids == tok.apply_chat_template(CONVERSATION, return_dict=False)  # the template's own tokens
    first_prompt = tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_dict=False)
    second_prompt = tok.apply_chat_template(CONVERSATION[:3], add_generation_prompt=True, return_dict=False)
    two, four_five = (
        tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for text in ("two", "four five")
    )
    gap = len(second_prompt) - len(first_prompt) - len(two)
    assert labels == [IGNORE_INDEX] * len(first_prompt) + two + [IGNORE_INDEX] * gap + four_five
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "two [EOS] four five [EOS]"


def test_labels_match_the_templates_own_generation_marks() -> None:
    tok = chat_tokenizer(GENERATION_TEMPLATE)
    _, labels = encode_chat(tok, CONVERSATION, "row 0")
    mask = tok.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True)["assistant_masks"]
    assert [int(label != IGNORE_INDEX) for label in labels] == mask


def test_sharegpt_and_openai_shapes_give_the_same_rows(tmp_path: Path) -> None:
    tok = chat_tokenizer()
    openai = prepare_data(chat_spec(write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}])), "causal_lm", tok)
    sharegpt = prepare_data(
        chat_spec(write_jsonl(tmp_path / "b.jsonl", [{"conversations": SHAREGPT}]), "conversations"), "causal_lm", tok
    )
    assert openai.train[0] == sharegpt.train[0]
    assert openai.train[0]["input_ids"] == encode_chat(tok, CONVERSATION, "row 0")[0]


def test_truncation_and_conversations_without_an_assistant_turn(tmp_path: Path) -> None:
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:1]}, {"messages": CONVERSATION}]
    data = prepare_data(
        chat_spec(write_jsonl(tmp_path / "c.jsonl", rows), max_length=11), "causal_lm", chat_tokenizer()
    )
    assert len(data.train) == 2 and data.dropped == {"train": 1}  # the user-only conversation has nothing to learn
    assert all(
        len(ids) == 11 and labels[-1] != IGNORE_INDEX
        for ids, labels in zip(data.train["input_ids"], data.train["labels"])
    )  # "two" kept, its [EOS] cut


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        prepare_data(
            chat_spec(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])), "causal_lm", make_tokenizer()
        )
    assert str(info.value) == (
        "data.columns.messages: the tokenizer of '' has no chat template. Use a chat (instruct) model, save a chat "
        "template beside its tokenizer (chat_template.jinja), or train on prompt/response columns."
    )


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (
            {"from": "bot", "value": "x"},
            "message 1: unknown ShareGPT speaker (got from='bot'). Use human, gpt or system.",
        ),
        (
            {"speaker": "x"},
            "message 1: a message has role and content (OpenAI) or from and value (ShareGPT) (got speaker).",
        ),
    ],
)
def test_malformed_messages_name_the_row(tmp_path: Path, message: dict, line: str) -> None:
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "one"}, message]}]
    with pytest.raises(DataError) as info:
        prepare_data(chat_spec(write_jsonl(tmp_path / "e.jsonl", rows)), "causal_lm", chat_tokenizer())
    assert str(info.value) == f"data.columns.messages: row 1 of split 'train', {line}"


def test_recipe_checks_of_the_messages_column(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", [{"messages": CONVERSATION, "text": "a", "label": 0}])
    cls = write(tmp_path, BASE.replace("{text: text, label: label}", "{text: text, label: label, messages: messages}"))
    assert errors(cls) == [
        (
            f"{cls}: data.columns.messages: chat data trains causal_lm only (got 'messages' with task "
            "sequence_classification). Remove it, or set task: causal_lm."
        )
    ]
    lm = write(
        tmp_path,
        BASE.replace("sequence_classification", "causal_lm").replace(
            "{text: text, label: label}", "{messages: messages, response: text}"
        ),
    )
    assert errors(lm, ["optimizer.lr=-1"]) == [
        "override 'optimizer.lr=-1': optimizer.lr: input should be greater than 0 (got -1).",
        (
            f"{lm}: data.columns.messages: a conversation is the whole example: "
            "give `messages` alone, without text, prompt, prompt_template or response."
        ),
    ]
    assert load_recipe(lm, ["data.columns.response=null"]).data.columns.messages == "messages"
