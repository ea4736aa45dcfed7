"""Batch size as a sweep axis, through the real CLI: each row decodes as if alone; the report gains a batch axis."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from tests.test_cli import all_artifacts, common_args, run_cli


def test_a_batch_size_sweep_is_read_back_from_mlflow(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    args = [
        "-m",
        *common_args(models_dir, pubmedqa_file, tmp_path),  # before the settings below, which override its
        "batch_size=1,2,4",
        "k=2",
        "dataset.num_samples=3",  # batch_size=4 is more than the 3 prompts: one batch of 3
        "quality.perplexity=false",
        "quality.embedder=none",
        "cost_batch_grid=[1,2,4]",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    children = sorted((run for run in runs if "k" in run.data.params), key=lambda r: int(r.data.params["batch_size"]))
    parent = next(run for run in runs if "k" not in run.data.params)
    assert [run.data.params["batch_size"] for run in children] == ["1", "2", "4"]
    client = MlflowClient()
    outputs = []
    for run in children:
        metrics = run.data.metrics
        assert run.info.status == "FINISHED"
        assert metrics["disagreement_rate"] == 0.0  # greedy float32: speculative equals verifier-only
        assert 0.0 <= metrics["padded_token_share"] < 1.0
        assert {"predicted_speedup_batch_1", "predicted_speedup_batch_2", "predicted_speedup_batch_4"} <= set(metrics)
        assert "verify_cost_surface.csv" in all_artifacts(client, run.info.run_id)
        lines = Path(client.download_artifacts(run.info.run_id, "generations.jsonl", str(tmp_path / run.info.run_id)))
        outputs.append([json.loads(line)["spec_tokens"] for line in lines.read_text().splitlines()])
    assert children[0].data.metrics["padded_token_share"] == 0.0  # one chain per batch: no padding
    assert outputs[0] == outputs[1] == outputs[2]  # a row decodes the same whatever shares its batch
    assert {"report/summary.md", "report/plots/speedup_vs_batch.png"} <= all_artifacts(client, parent.info.run_id)
