"""The speedup model is logged only where it applies: one drafter at a constant k (through the real CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.test_cli import ROOT, all_artifacts, common_args
from tests.test_sweeps import sweep_runs

PREDICTION_KEYS = {"predicted_speedup", "speedup_prediction_ratio", "best_k_predicted", "predicted_speedup_best_k"}
MEASURED_KEYS = {"draft_verifier_cost_ratio", "verify_step_ms", "verify_cost_ratio_5_tokens", "draft_step_ms_gpt2"}


@pytest.fixture(scope="module")
def runs(models_dir, pubmedqa_file, tmp_path_factory):
    """One sweep: a single drafter and a draft set of three, each at a constant and an adaptive k (k = 4)."""
    tmp_path = tmp_path_factory.mktemp("scope")
    args = [
        "-m",
        "draft=gpt2,gpt2_family",
        "k_schedule=constant,heuristic",
        *common_args(models_dir, pubmedqa_file, tmp_path),
    ]
    args += ["quality.perplexity=false", "quality.embedder=none"]
    done = subprocess.run(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return {(run.data.params["draft.name"], run.data.params["k_schedule"]): run for run in children}, tmp_path


def summary(run, tmp_path: Path) -> str:
    return Path(MlflowClient().download_artifacts(run.info.run_id, "summary.md", str(tmp_path))).read_text()


def test_one_drafter_at_a_constant_k_gets_the_prediction(runs):
    by_config, tmp_path = runs
    run = by_config["gpt2", "constant"]
    assert PREDICTION_KEYS | MEASURED_KEYS | {"alpha_iid"} <= set(run.data.metrics)
    assert "No predicted speedup" not in summary(run, tmp_path)


@pytest.mark.parametrize(
    ("draft", "schedule", "reason"),
    [
        ("gpt2_family", "constant", "its 3 drafters are verified as a tree"),
        ("gpt2", "heuristic", "k_schedule=heuristic changes k from step to step"),
        ("gpt2_family", "heuristic", "its 3 drafters are verified as a tree"),
    ],
)
def test_draft_sets_and_adaptive_k_log_the_costs_but_no_prediction(runs, draft, schedule, reason):
    by_config, tmp_path = runs
    run = by_config[draft, schedule]
    assert set(run.data.metrics) >= MEASURED_KEYS
    assert not (PREDICTION_KEYS | {"alpha_iid"}) & set(run.data.metrics)
    assert "verify_cost_curve.csv" in all_artifacts(MlflowClient(), run.info.run_id)
    (note,) = [line for line in summary(run, tmp_path).splitlines() if line.startswith("No predicted speedup")]
    assert "one drafter at a constant k" in note and reason in note
