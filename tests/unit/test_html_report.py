"""report.html's own SVG plots: log and linear axes, escaping, pages that parse with every element
closed."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser

import pytest

from peftcli.html_report import NOTHING_LOGGED, Series, curves_svg, linear_axis, log_axis, page, run_html, svg_chart

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
    assert parsed.tags["svg"] == 2 and parsed.tags["script"] == 0
    titles = [texts[0] for texts in parsed.svg_texts]
    assert titles == ["Loss", "Eval metrics"]
    assert {"train loss", "eval loss"} <= set(parsed.svg_texts[0]) and {"accuracy", "f1"} <= set(parsed.svg_texts[1])
    assert "name: run <&>\nmethod: {name: lora}\n" in parsed.texts and "run <&>" not in text
    assert "1,234" in parsed.texts
    # curves.svg is the same charts in one standalone SVG file, valid XML for any image viewer.
    svg = ET.fromstring(curves_svg(history))
    ns = "{http://www.w3.org/2000/svg}"
    assert svg.tag == f"{ns}svg" and svg.get("height") == str(2 * int(svg.get("width")) * 340 // 640)
    assert [t.text for t in svg.iter(f"{ns}title")] == ["Loss", "Eval metrics"]
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
