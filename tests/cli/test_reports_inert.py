"""What a user names (runs, folders, labels, models) stays inert: in the pages a link is a relative,
percent-encoded path to the run's own report.html, never a scheme; in the terminal a name is printed
as written, never read as rich markup or an emoji code; and a name read back from a run's files never
decides where peftcli writes. The CLI runs in-process, as in test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.commands.generate import show
from peftcli.config.load import load_recipe
from peftcli.methods import METHODS, context_for
from peftcli.models.adapters import adapter_config, method_state, save_adapter
from peftcli.reporting.compare_tables import run_row
from peftcli.reporting.html import sweep_html
from peftcli.reporting.sweep_tables import override
from peftcli.tasks.registry import TASKS
from tests.cli.test_bad_inputs import CLS, refused, snapshot
from tests.conftest import make_tokenizer, tiny_model, tiny_recipe, write_jsonl
from tests.helpers import randomize_trainable
from tests.unit.test_html_report import parse_html

# Each is a valid run name (one folder name); each breaks a link or a terminal line taken as written.
HOSTILE = [
    "javascript:alert(1)",  # a scheme, if the link is not encoded
    '"><img src=x onerror=alert(1)>',  # out of the attribute, if it is not escaped
    "a b#c?d%41&e",  # a fragment, a query, a percent escape
    "naïve ünïcode 名前",
    "[red]y",  # rich: a style tag
    "a:fire:b",  # rich: an emoji code
]
# A name has no `/`, but a path does: `[/]` (a closing tag with nothing to close, for which rich raises
# MarkupError) reaches the terminal in a run's folder, --out and a model's path, and in class labels.


def finished_run(folder: Path, name: str, accuracy: float = 0.5, edits: dict[str, Any] | None = None) -> Path:
    """A run folder as `peft train` leaves it, as far as `peft compare` reads it; `edits` replace keys
    of its report.json, as a hand edit would."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"0" * 64)
    content = {
        "name": name,
        "method": "lora",
        "task": CLS,
        "summary": {"trainable_parameters": 1000 + len(name), "adapter_bytes": 64, "wall_seconds": 1.0},
        "final_metrics": {"accuracy": accuracy},
        "best_metrics": {"accuracy": accuracy},
        "best_metric": "accuracy",
    } | (edits or {})
    (folder / "report.json").write_text(json.dumps(content))
    (folder / "report.html").write_text("<!DOCTYPE html><title>run</title>")
    return folder


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # not a MarkupError
    assert "Traceback" not in result.output + result.stderr
    return result


class Attributes(HTMLParser):
    """Every attribute that names a URL (href, src, xlink:href, action...) with its value."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [(k, v or "") for k, v in attrs if k in ("href", "src", "xlink:href", "action", "formaction")]


def urls_of(html: str) -> list[tuple[str, str]]:
    parsed = Attributes()
    parsed.feed(html)
    return parsed.urls


def assert_links_reach(page: Path, runs: list[Path]) -> None:
    """Every link on the page is a relative path, percent-encoded (no scheme, host, query or fragment),
    and the links are exactly the runs' report.html files, resolved from the page's folder."""
    html = page.read_text(encoding="utf-8")
    urls = urls_of(html)
    assert {k for k, _ in urls} == {"href"}
    reached = set()
    for _, href in urls:
        parts = urlsplit(href)
        assert (parts.scheme, parts.netloc, parts.query, parts.fragment) == ("", "", "", ""), href
        assert ":" not in href and not href.startswith("/"), href
        reached.add((page.parent / unquote(href)).resolve())
    assert reached == {(r / "report.html").resolve() for r in runs}
    parsed = parse_html(html)
    assert parsed.tags["script"] == 0 and parsed.tags["img"] == 0
    texts = {t for svg in parsed.svg_texts for t in svg}
    assert {r.name for r in runs} <= set(parsed.texts) and {r.name for r in runs} <= texts  # table and plot


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder; tmp_path around it shows anything written outside."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# -- links in the pages ------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", [True, False], ids=["runs-inside-out", "runs-beside-out"])
def test_comparison_links_are_encoded_relative_paths(work: Path, inside: bool) -> None:
    out = work / "out"
    parent = out if inside else work / "runs"
    runs = [finished_run(parent / name, name, accuracy=0.1 * i) for i, name in enumerate(HOSTILE, 1)]
    result = invoke("compare", *map(str, runs), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert_links_reach(out / "report.html", runs)


def test_sweep_links_are_encoded_relative_paths(tmp_path: Path) -> None:
    """A sweep's trials are trial-NNN under --out, but the page links whatever folder a row names."""
    runs = [finished_run(tmp_path / name, name) for name in HOSTILE]
    rows = [
        run_row(f"trial-{i:03d}", run, "accuracy", "read") | {"params": {"method.rank": i}}
        for i, run in enumerate(runs, 1)
    ]
    summary = {
        "title": "peft sweep: [/]x", "recipe": "recipe.yaml", "strategy": "grid", "metric": "accuracy",
        "higher_is_better": True, "params": {"method.rank": list(range(1, len(runs) + 1))},
        "recipe_values": {"method.rank": 1}, "best": "trial-001", "rows": rows,
    }  # fmt: skip
    page = tmp_path / "report.html"
    page.write_text(sweep_html(summary, tmp_path), encoding="utf-8")
    html = page.read_text(encoding="utf-8")
    urls = urls_of(html)
    for _, href in urls:
        assert urlsplit(href).scheme == "" and ":" not in href, href
    assert {(tmp_path / unquote(h)).resolve() for _, h in urls} == {(r / "report.html").resolve() for r in runs}
    assert parse_html(html).tags["img"] == 0


# -- names in the terminal -----------------------------------------------------------------------------


def test_compare_prints_names_as_written(work: Path) -> None:
    """No --out: the comparison's folder is named after the runs, and said as written too."""
    names = ["[red]y", "[bold]z", "a:fire:b"]
    runs = [finished_run(Path("[/]runs") / name, name, accuracy=0.9 - 0.1 * i) for i, name in enumerate(names)]
    result = invoke("compare", *map(str, runs))
    assert result.exit_code == 0, result.stderr
    out = Path("compare") / "-vs-".join(names)
    assert result.stderr.splitlines() == [
        *(f"compare {i}/3: {r.name} (reading the finished run {r})" for i, r in enumerate(runs, 1)),
        f"comparison: {out / 'report.html'} (and comparison.md, comparison.json)",
    ]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table] == names
    assert f"# peft compare: {'-vs-'.join(names)}" in result.stdout
    assert {p.name for p in out.iterdir()} == {"comparison.json", "comparison.md", "report.html"}


@pytest.fixture
def swept_once(work: Path, tiny_dirs, tiny_data) -> tuple[Path, Path, Path]:
    """A recipe, a one-point space, and --out (named to break markup) holding that point's finished
    trial, so that `peft sweep` reads it instead of training."""
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS)))
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump({"strategy": "grid", "params": {"method.rank": [4]}}))
    out = work / "[/]sweep [red]x a:fire:b"
    trial = out / "trial-001"
    resolved = load_recipe(recipe, [override("method.rank", 4), override("output_dir", str(trial))])
    finished_run(trial, "tiny", accuracy=0.75)
    (trial / "recipe.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json")))
    return recipe, space, out


def test_sweep_prints_its_folder_as_written(swept_once, tmp_path: Path) -> None:
    recipe, space, out = swept_once
    # The trial's report names another place: a sweep never writes where a report says.
    report = out / "trial-001" / "report.json"
    report.write_text(json.dumps(json.loads(report.read_text()) | {"name": "../../escaped", "run_dir": "/tmp/x"}))
    before = snapshot(tmp_path)
    result = invoke("sweep", str(recipe), "--space", str(space), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        "sweep 1/1: trial-001 method.rank=4",
        f"  reading the finished trial {out / 'trial-001'}",
        f"sweep: {out / 'report.html'} (and sweep.md, sweep.json, best.yaml)",
    ]
    assert f"peft sweep: {out.name}" in result.stdout
    assert "Best: trial-001, method.rank=4: accuracy 0.7500 (best.yaml)." in result.stdout
    after = snapshot(tmp_path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    inside = str(out.relative_to(tmp_path))
    assert changed == {f"{inside}/{f}" for f in ("sweep.json", "sweep.md", "report.html", "best.yaml")}


def test_sweep_trial_recipe_that_is_not_yaml_is_a_failed_row(swept_once) -> None:
    recipe, space, out = swept_once
    (out / "trial-001" / "recipe.yaml").write_text("name: [unclosed\n")
    before = snapshot(out / "trial-001")
    result = invoke("sweep", str(recipe), "--space", str(space), "--out", str(out))
    assert result.exit_code == 1, result.stderr  # not trained over, not a traceback: a failed row
    assert f"failed: trial-001: {out / 'trial-001'} holds a finished trial of other values" in result.stderr
    assert snapshot(out / "trial-001") == before


def save_lora(folder: Path, base_model: Path, labels: list[str]) -> None:
    """A LoRA adapter with random weights and the given labels, in the layout `peft train` writes."""
    model, method, task = tiny_model("bert-cls"), METHODS["lora"], TASKS[CLS]
    params = method.params(rank=4, alpha=8, target_modules=["query", "value"])
    adapted = method.apply(model, params, context_for(model, task.head_modules))
    randomize_trainable(model)
    config = adapter_config(method, params, adapted, task, str(base_model), None)
    save_adapter(folder, method_state(method, model, adapted), config, labels, make_tokenizer())


@pytest.fixture
def odd_run(work: Path, tiny_dirs, tiny_data) -> Path:
    """A run whose base model folder and class labels are named to break markup."""
    model = work / "[/]model :fire:"
    shutil.copytree(tiny_dirs["bert-cls"], model)
    labels = {"negative": "[/]neg :fire:", "positive": "[red]pos"}
    data = {}
    for split in ("train", "validation"):  # the tiny sentiment data, its labels renamed
        rows = [json.loads(line) for line in tiny_data[f"sentiment_{split}"].read_text().splitlines()]
        data[f"sentiment_{split}"] = write_jsonl(
            work / f"{split}.jsonl", [r | {"label": labels[r["label"]]} for r in rows]
        )
    run = work / "run"
    save_lora(run / "adapter", model, labels=list(labels.values()))
    (run / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(model, data, CLS, name="[red]run")))
    return run


def test_eval_prints_labels_as_written(odd_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one table row a line
    result = invoke("eval", str(odd_run))
    assert result.exit_code == 0, result.stderr
    assert "[/]neg :fire:: precision / recall" in result.stderr and "[red]pos: precision / recall" in result.stderr
    assert "confusion matrix (rows true, columns predicted; [/]neg :fire:, [red]pos): [[" in result.stderr
    assert f"wrote {odd_run / 'eval.json'}" in result.stderr


def test_inspect_prints_the_model_as_written(odd_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    result = invoke("inspect", str(odd_run))
    assert result.exit_code == 0, result.stderr
    assert f"lora on {odd_run.parent / '[/]model :fire:'} ({CLS})" in result.stdout


def test_dry_run_prints_the_name_as_written(work: Path, tiny_dirs, tiny_data) -> None:
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_dirs["bert-cls"], tiny_data, CLS, name="[red]x:fire:")))
    result = invoke("train", str(recipe), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("[red]x:fire:: dry run of lora on ")


def test_error_lines_print_what_the_user_wrote(work: Path) -> None:
    missing = "[/]a:fire:.yaml"
    refused(
        work, "validate", missing, lines=[f"{missing}: recipe file not found. Check the path (relative to {work})."]
    )


def test_generate_prints_completions_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    show(0, "[bold]prompt :fire:", "[/]completion [red]x", 2)
    show(1, [{"role": "user", "content": "[/]second"}], ":fire: y", 2)
    assert capsys.readouterr().out == "[1] [bold]prompt :fire:\n[/]completion [red]x\n\n[2] [/]second\n:fire: y\n"


# -- names read from a run's files ---------------------------------------------------------------------


def unsafe_name_line(report: Path, name: Any) -> str:
    return (
        f"{report}: name: not a run name, one folder name without / or \\ (got {name!r}). "
        "Write the run's name there, or give the run's recipe to train it here."
    )


@pytest.mark.parametrize(
    "name",
    ["../../escaped", "ABSOLUTE", "", " ", ".", "..", "a/b", "a\\b", "a\0b", None, 5, ["x"]],
    ids=[
        "dotdot",
        "absolute",
        "empty",
        "blank",
        "dot",
        "dotdot-alone",
        "slash",
        "backslash",
        "nul",
        "null",
        "number",
        "list",
    ],
)
@pytest.mark.parametrize("with_out", [False, True], ids=["default-out", "given-out"])
def test_compare_refuses_a_run_name_that_is_not_one_folder(
    work: Path, tmp_path: Path, name: Any, with_out: bool
) -> None:
    """The default --out is compare/<run name>: a name read from report.json is held to the recipe's rule."""
    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name
    run = finished_run(Path("runs") / "r", "r", edits={"name": name})
    before = snapshot(tmp_path)
    out = ["--out", "out"] if with_out else []
    refused(work, "compare", str(run), *out, lines=[unsafe_name_line(run / "report.json", name)])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("key", "value"),
    [("summary", []), ("summary", None), ("best_metrics", 3), ("final_metrics", "accuracy 0.5")],
)
def test_compare_refuses_a_report_of_the_wrong_shape(work: Path, key: str, value: Any) -> None:
    run = finished_run(Path("runs") / "r", "r", edits={key: value})
    refused(
        work,
        "compare",
        str(run),
        lines=[f"{run / 'report.json'}: {key}: not a mapping (got {value!r}). Train the run again, or leave it out."],
    )


def test_consoles_remade_for_a_log_file_keep_printing_names_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With --parallel a run's consoles are made again for its log file: emoji codes stay off there too."""
    import sys

    from rich.console import Console

    from peftcli.commands import compare
    from peftcli.training.own_process import remake_consoles

    for name, module in list(sys.modules.items()):  # every console remade here is put back afterwards
        if name.startswith("peftcli.") and isinstance(getattr(module, "console", None), Console):
            monkeypatch.setattr(module, "console", module.console)
    with (tmp_path / "log").open("w") as log:
        monkeypatch.setattr("sys.stderr", log)
        remake_consoles()
        compare.console.print("a:fire:b")
    assert (tmp_path / "log").read_text() == "a:fire:b\n"
