"""`peft compare` as a user runs it: one recipe with several methods on a tiny model, finished runs
read without training, a failed run as a row, the refusals, and the pages it writes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import yaml

from peftcli.commands.compare import run_compare
from peftcli.commands.inspection import run_inspect
from peftcli.errors import PeftcliError
from tests.cli.test_cli import CLASSIFICATION_RUN_FILES, files_under, peft, write_recipe
from tests.conftest import tiny_recipe
from tests.unit.test_html_report import parse_html

# The recipe's name lands in every page: it must show as text, never run.
NAME = 'tiny <script>alert("x")'
METHODS = ("lora", "ia3", "bitfit")
COMPARISON_FILES = {"comparison.json", "comparison.md", "report.html"}
DECADES = {0: "1", 1: "10", 2: "100", 3: "1k", 4: "10k", 5: "100k", 6: "1M", 7: "10M"}
NO_TARGET = (
    "method.target_modules ['q_proj'] matched no linear layer of BertForSequenceClassification "
    "(linear layers: classifier, dense, key, query, value). `peft inspect --modules RECIPE` lists them with their "
    "full names."
)


@pytest.fixture(scope="module")
def compared(
    tmp_path_factory: pytest.TempPathFactory, tiny_dirs, tiny_data
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("compare")
    recipe = write_recipe(root, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification", name=NAME))
    out = root / "out"
    result = peft("compare", str(recipe), "--methods", ",".join(METHODS), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def rows_of(out: Path) -> list[dict]:
    return json.loads((out / "comparison.json").read_text())["rows"]


def test_compare_trains_each_method_with_its_defaults(compared) -> None:
    out, result = compared
    assert files_under(out) == COMPARISON_FILES | {f"{m}/{f}" for m in METHODS for f in CLASSIFICATION_RUN_FILES}
    table = json.loads((out / "comparison.json").read_text())
    assert (table["metric"], table["higher_is_better"]) == ("accuracy", True)
    rows = table["rows"]
    assert sorted(r["run"] for r in rows) == sorted(METHODS)
    assert [r["metric_best"] for r in rows] == sorted((r["metric_best"] for r in rows), reverse=True)
    for row in rows:
        run_dir = out / row["run"]
        report = json.loads((run_dir / "report.json").read_text())
        s = report["summary"]
        assert (row["method"], row["status"], row["error"], row["run_dir"]) == (
            row["run"],
            "trained",
            None,
            str(run_dir),
        )
        assert row["trainable_parameters"] == run_inspect(run_dir, [])["trainable_parameters"]
        assert row["metric_best"] == report["best_metrics"]["accuracy"]
        assert row["metric_final"] == report["final_metrics"]["accuracy"]
        assert row["adapter_folder_bytes"] == sum(p.stat().st_size for p in (run_dir / "adapter").iterdir())
        assert row["adapter_weights_bytes"] == (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
        assert [row[k] for k in ("wall_seconds", "tokens_per_s", "peak_memory_mb")] == [
            s["wall_seconds"], s["tokens_per_s"], s["peak_memory_mb"]
        ]  # fmt: skip
    # The recipe's method block was replaced by {name: lora}: LoRA's default rank, not the recipe's 4.
    assert yaml.safe_load((out / "lora" / "recipe.yaml").read_text())["method"]["rank"] == 8
    markdown = (out / "comparison.md").read_text()
    assert result.stdout.rstrip().endswith(markdown.rstrip())  # after the runs' progress, the table
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table_lines] == [r["run"] for r in rows]


def test_pages_are_self_contained_plot_on_a_log_axis_and_escape_names(compared) -> None:
    out, _ = compared
    rows = rows_of(out)
    html = (out / "report.html").read_text()
    parsed = parse_html(html)
    assert parsed.tags["svg"] == 1 and parsed.tags["script"] == 0
    assert "<script" not in html and "&lt;script&gt;" in html
    assert not any(s in html for s in ("<link", "src=", "url(", "@import"))  # nothing fetched: no network, no files
    labels = set(parsed.svg_texts[0])
    counts = [r["trainable_parameters"] for r in rows]
    decades = range(math.floor(math.log10(min(counts))), math.ceil(math.log10(max(counts))) + 1)
    assert "trainable parameters (log scale)" in labels and "accuracy (best)" in labels
    assert {DECADES[e] for e in decades} <= labels and set(METHODS) <= labels
    for m in METHODS:
        assert f'href="{m}/report.html"' in html
        run_page = (out / m / "report.html").read_text()
        run_parsed = parse_html(run_page)
        # The loss chart, then a panel per eval metric (the eval loss is drawn in the loss chart).
        metrics = [k for k in json.loads((out / m / "report.json").read_text())["final_metrics"] if k != "loss"]
        assert run_parsed.tags["svg"] == 1 + len(metrics) >= 2 and "<script" not in run_page
        assert f"Run {NAME}" in run_parsed.texts  # the heading, as text
        assert (out / m / "recipe.yaml").read_text() in run_parsed.texts


def test_finished_runs_are_read_and_a_failed_run_is_a_row(compared, tmp_path: Path, tiny_dirs, tiny_data) -> None:
    out, _ = compared
    finished = [out / "lora", out / "ia3"]
    before = {p: p.stat().st_mtime_ns for d in finished for p in d.rglob("*")}
    broken = tiny_recipe(
        tiny_dirs["bert-cls"],
        tiny_data,
        "sequence_classification",
        name="broken",
        method={"target_modules": ["q_proj"]},
    )
    again = tmp_path / "again"
    result = peft("compare", *map(str, finished), str(write_recipe(tmp_path, broken)), "--out", str(again))
    assert result.returncode == 1, result.stderr
    # Nothing trained: the finished runs are untouched, and no run got as far as its parameter count.
    assert {p: p.stat().st_mtime_ns for d in finished for p in d.rglob("*")} == before
    assert "trainable parameters" not in result.stderr
    assert f"failed: broken: {NO_TARGET}" in result.stderr
    assert files_under(again) == COMPARISON_FILES
    original = {r["run"]: r for r in rows_of(out)}
    rows = rows_of(again)
    assert [r["run"] for r in rows] == sorted(["lora", "ia3"], key=lambda m: -original[m]["metric_best"]) + ["broken"]
    assert rows[:2] == [original[r["run"]] | {"status": "read"} for r in rows[:2]]
    assert rows[2] == {
        "run": "broken", "method": "lora", "status": "failed", "error": NO_TARGET, "run_dir": str(again / "broken"),
        "trainable_parameters": None, "adapter_folder_bytes": None, "adapter_weights_bytes": None,
        "metric_best": None, "metric_final": None, "wall_seconds": None, "tokens_per_s": None, "peak_memory_mb": None,
    }  # fmt: skip
    assert f"| failed: {NO_TARGET} |" in (again / "comparison.md").read_text()


def test_refused_up_front_one_line_each_nothing_written(tmp_path: Path, tiny_dirs, tiny_data) -> None:
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_dirs["bert-cls"], tiny_data, "sequence_classification"))
    out = tmp_path / "out"
    with pytest.raises(PeftcliError) as exc:
        run_compare([str(stopped), str(recipe), "output_dir=x"], None, out)
    assert exc.value.lines == [
        "override 'output_dir=...': peft compare writes each run into --out. Set --out instead.",
        (
            f"{stopped}: not a finished run (no report.json): it is still training, or it stopped. "
            "Finish it with `peft train RECIPE --resume`, or give its recipe to train it here."
        ),
    ]
    with pytest.raises(PeftcliError) as exc:
        run_compare([str(recipe), "method.rank=4"], ["lora", "prompt-tuning", "ia3"], out)
    # An override reaches every method's block: rank is LoRA's key, not (IA)^3's.
    unknown, ia3 = exc.value.lines
    assert unknown == (
        "--methods: unknown method 'prompt-tuning'. Did you mean 'prompt_tuning'? Available: adalora, bitfit, "
        "bottleneck, full, ia3, lora, p_tuning, prefix_tuning, prompt_tuning, selective."
    )
    assert ia3.startswith("--methods ia3: override 'method.rank=4': method.rank: unknown key.")
    assert not out.exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_comparison_page_renders_in_chromium(compared, tmp_path: Path) -> None:
    out, _ = compared
    shot = tmp_path / "page.png"
    command = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1200,900",
    ]
    if os.geteuid() == 0:
        command.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    done = subprocess.run(
        [*command, (out / "report.html").resolve().as_uri()], capture_output=True, text=True, timeout=120, check=False
    )
    assert shot.is_file(), done.stderr
    width, height, varied = png_rows_that_vary(shot)
    assert (width, height) == (1200, 900)
    assert varied > 100, "the screenshot is (nearly) one colour"


def png_rows_that_vary(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of pixel rows that are not one colour, read without an image
    library. Whatever PNG filter a row uses, a row of one colour filters to a repetition of its first
    pixel's bytes (raw, or zeros for differences), so a row that is not such a repetition holds more
    than one colour."""
    data, pos, idat = path.read_bytes(), 8, b""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = {}
    while pos < len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        idat += body if kind == b"IDAT" else b""
        chunks.setdefault(kind, body)
        pos += 12 + length
    header = chunks[b"IHDR"]
    width, height, depth, colour = (
        int.from_bytes(header[:4], "big"),
        int.from_bytes(header[4:8], "big"),
        header[8],
        header[9],
    )
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    pixel, stride = max(1, channels * depth // 8), (width * channels * depth + 7) // 8 + 1
    raw = zlib.decompress(idat)
    varied = 0
    for y in range(height):
        rest = raw[y * stride + 1 + pixel : (y + 1) * stride]
        varied += rest != rest[:pixel] * (len(rest) // pixel)
    return width, height, varied


def test_parallel_runs_equal_the_sequential_ones_and_log_apart(compared) -> None:
    out, _ = compared
    recipe = out.parent / "recipe.yaml"
    parallel = out.parent / "parallel"
    result = peft("compare", str(recipe), "--methods", ",".join(METHODS), "--out", str(parallel), "--parallel", "2")
    assert result.returncode == 0, result.stderr
    one = {r["run"]: r for r in rows_of(out)}
    two = {r["run"]: r for r in rows_of(parallel)}
    assert sorted(two) == sorted(one) == sorted(METHODS)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for method, row in two.items():
        assert row["status"] == "trained" and row["trainable_parameters"] == one[method]["trainable_parameters"]
        assert row["metric_best"] == pytest.approx(one[method]["metric_best"])  # other thread counts: rounding only
        assert json.loads((parallel / method / "report.json").read_text())["summary"]["cpu_threads"] == threads
        log = parallel / "logs" / f"{method}.log"
        assert (
            f"  training on the CPU, {threads} CPU thread{'s' if threads != 1 else ''}; its output: {log}"
            in result.stderr
        )
        assert "done in " in log.read_text() and f"done: {method}: accuracy " in result.stderr
    assert "trainable parameters:" not in result.stderr  # the runs' own output went to their logs
    assert result.stderr.index("compare 2/3") < result.stderr.index("done: ")  # two ran at once
