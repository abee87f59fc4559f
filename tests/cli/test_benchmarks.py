"""The benchmark script runs end to end (on a tiny model, so the numbers mean nothing) and keeps the
prose of the doc it writes its table into."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cli.test_cli import ROOT


def test_benchmark_script_runs_both_tools_and_a_variant(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nprose before\n\n<!-- bench: tiny start -->\nold table\n<!-- bench: tiny end -->\n\nprose after\n"
    )
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "train_vs_hf.py"), "--workload", "tiny", "--steps", "6", "--warmup", "2",
        "--tools", "peftcli,hf-grouped-bf16", "--variant", "bf16:train.mixed_precision=bf16", "--markdown", str(doc),
    ]  # fmt: skip
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    header, rows = lines[0], lines[1:]
    assert set(header) == {"machine", "matmul_gflops", "flops_per_token"} and header["matmul_gflops"]["fp32"] > 0
    assert [r["tool"] for r in rows] == ["peftcli", "hf-grouped-bf16", "peftcli bf16"]
    for r in rows:
        assert (
            r["steps_timed"] == 4
            and r["real_tokens_per_s"] > 0
            and r["median_s_per_step"] > 0
            and r["peak_rss_mb"] > 100
        )
        assert r["trainable_parameters"] == rows[0]["trainable_parameters"]  # the same LoRA in both tools
        assert 0 <= r["eval"]["accuracy"] <= 1
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n\n<!-- bench: tiny start -->\n") and text.endswith(
        "<!-- bench: tiny end -->\n\nprose after\n"
    )
    assert "old table" not in text and "| peftcli bf16 |" in text and "| vs hf-grouped-bf16 |" in text


def test_repeated_rows_are_reported_as_medians_with_every_runs_tokens_per_s() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_vs_hf", ROOT / "benchmarks" / "train_vs_hf.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    runs = [
        {key: float(value) for key in bench.MEDIAN_KEYS} | {"tool": "peftcli", "eval": {"accuracy": 0.5}, "round": i}
        for i, value in ((1, 300), (2, 100), (3, 200))
    ]
    row = bench.median_row(runs)
    assert row["real_tokens_per_s"] == 200 and row["peak_rss_mb"] == 200 and row["runs"] == 3
    assert row["real_tokens_per_s_each"] == [300, 100, 200]
    assert bench.median_row(runs[:1]) == runs[0]  # one run: the row as it was
