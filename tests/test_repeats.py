"""Repeat runs through the real CLI: the prompt set timed twice, the spread read back from MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from specbench.report import load_runs, summary_table
from tests.test_cli import common_args, run_cli

FAST = ["cost_curve=false", "quality.perplexity=false", "quality.embedder=none"]


def test_two_repeats_log_their_spread_and_every_decode(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    code, _, err = run_cli(["repeats=2", *FAST, *common_args(models_dir, pubmedqa_file, tmp_path)], monkeypatch, capsys)
    assert code == 0, err
    mlflow.set_tracking_uri(store)
    (run,) = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    metrics = run.data.metrics
    assert metrics["num_prompts"] == 2 and metrics["num_repeats"] == 2  # prompts, not decodes

    client = MlflowClient()
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_prompt.csv", str(tmp_path)))
    assert len(table) == 2 * 2  # prompts x repeats
    assert sorted(zip(table["repeat"], table["pubid"], strict=True)) == [(0, 1000), (0, 1001), (1, 1000), (1, 1001)]
    # by hand from the table: each repeat's figures are ratios of sums over its batches (one prompt each here)
    sums = table.groupby("repeat")[["baseline_tokens", "baseline_batch_s", "spec_tokens", "spec_batch_s"]].sum()
    rates = {mode: sums[f"{mode}_tokens"] / sums[f"{mode}_batch_s"] for mode in ("baseline", "spec")}
    per_repeat = {
        "speedup": rates["spec"] / rates["baseline"],
        "baseline_tokens_per_s": rates["baseline"],
        "spec_tokens_per_s": rates["spec"],
    }
    for figure, values in per_repeat.items():
        first, second = values.tolist()
        logged = [metrics[f"{figure}_repeat_{stat}"] for stat in ("min", "median", "max", "std")]
        # two repeats: the median is their mean, the sample standard deviation |a - b| / sqrt(2)
        assert logged == pytest.approx(
            [min(first, second), (first + second) / 2, max(first, second), abs(first - second) / 2**0.5], rel=1e-6
        ), figure
    # the headline pools both repeats: total tokens over total time
    assert metrics["spec_tokens_per_s"] == pytest.approx(table["spec_tokens"].sum() / table["spec_latency_s"].sum())
    summary = Path(client.download_artifacts(run.info.run_id, "summary.md", str(tmp_path))).read_text()
    (row,) = [line for line in summary.splitlines() if line.startswith("| Speedup over repeats (min-median-max)")]
    assert row.count(" / ") == 2

    report = summary_table(load_runs(store, "specbench"))
    spread = report["Speedup over repeats (min-median-max) (x)"][0]
    assert [float(value) for value in spread.split(" / ")] == pytest.approx(
        [metrics[f"speedup_repeat_{stat}"] for stat in ("min", "median", "max")], rel=5e-3
    )


def test_zero_repeats_is_refused_in_one_sentence(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["repeats=0", *common_args(models_dir, pubmedqa_file, tmp_path)], monkeypatch, capsys)
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: repeats=0 is invalid: time the prompt set 1 or more times."
    ]
