"""Searching instead of sweeping: each job returns its objective to Hydra, and Optuna drives k and the draft."""

from __future__ import annotations

import math
import subprocess
import sys

import mlflow
import optuna
import pytest
from omegaconf import OmegaConf

from specbench.errors import ConfigError
from specbench.objective import failed_value, objective_direction
from tests.test_cli import common_args, run_cli
from tests.test_sweeps import FAST, ROOT, sweep_runs

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="make install installs the Optuna sweeper")


def test_the_objective_direction_comes_from_the_catalog():
    assert objective_direction("speedup") == "maximize" and failed_value("speedup") == -math.inf
    assert objective_direction("cost_per_1k_tokens_usd_spec") == "minimize" == objective_direction("spec_ttft_p50_s")
    assert failed_value("cost_per_1k_tokens_usd_spec") == math.inf
    assert objective_direction("predicted_speedup_best_k") == "maximize"
    for key in ("best_k_predicted", "speedups"):  # a count with no better side; not a metric
        with pytest.raises(ConfigError, match=f"objective={key} is not a metric with a direction"):
            objective_direction(key)
    assert math.isnan(failed_value("speedups"))


def specbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_a_three_trial_search_through_the_cli(models_dir, pubmedqa_file, tmp_path):
    """`specbench --config-name search` with 3 trials: 3 runs, and Optuna's best is the best of them."""
    done = specbench(
        "--config-name", "search", "hydra.sweeper.n_trials=3", *common_args(models_dir, pubmedqa_file, tmp_path),
        "verifier=gpt2_large", *FAST,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,), children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(children) == 3 and {run.info.status for run in children} == {"FINISHED"}
    trials = {
        (int(run.data.params["k"]), run.data.params["draft.name"]): run.data.metrics["speedup"] for run in children
    }
    assert all(1 <= k <= 12 and draft in ("distilgpt2", "gpt2", "gpt_neo_125m") for k, draft in trials)
    result = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    best = (result.best_params.k, result.best_params.draft)
    assert best in trials and result.best_value == trials[best] == max(trials.values())
    assert parent.info.status == "FINISHED"


def test_failed_trials_return_the_worst_value_and_the_search_goes_on(models_dir, pubmedqa_file, tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    storage = f"sqlite:///{tmp_path}/optuna.db"
    done = specbench(
        "--config-name", "search", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
        *common_args(models_dir, pubmedqa_file, tmp_path)[1:], f"models_dir={empty}", *FAST,
    )  # fmt: skip
    assert done.returncode == 1 and "error: 2 of 2 configurations failed" in done.stderr, done.stderr[-3000:]
    trials = optuna.load_study(study_name="specbench_search", storage=storage).trials
    assert [trial.value for trial in trials] == [-math.inf, -math.inf]  # the worst speedup; the second trial ran
    _, children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert [run.info.status for run in children] == ["FAILED", "FAILED"]
    assert all("cannot load" in run.data.tags["error"] for run in children)


def test_the_shipped_searches_compose(monkeypatch, capsys):
    code, out, err = run_cli(["--config-name", "search_offline", "--cfg", "job"], monkeypatch, capsys)
    assert code == 0, err
    job = OmegaConf.create(out)
    assert job.objective == "speedup" and job.cost_curve_max_k == 12
    assert job.verifier.name == "qwen2_5_coder_1_5b" and job.tracking.experiment == "offline_search"
    code, out, err = run_cli(["--config-name", "search_offline", "--cfg", "hydra"], monkeypatch, capsys)
    sweeper = OmegaConf.to_container(OmegaConf.create(out).hydra.sweeper)  # unresolved: the job keys are not here
    assert code == 0 and sweeper["_target_"].endswith("OptunaSweeper"), err
    assert sweeper["direction"] == "${direction:${objective}}" and sweeper["params"]["k"] == "int(interval(1, 12))"
    assert sweeper["params"]["draft"] == "choice(qwen2_5_coder_0_5b_int8, qwen2_5_coder_0_5b, prompt_lookup)"


def test_one_run_predicts_the_best_k(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    """The cheap alternative to a search: one run at k=2 measures the verify curve to k=12 and predicts the best k."""
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "verifier=gpt2_large", "k=2", "cost_curve_max_k=12"]
    code, _, err = run_cli([*args, "quality.embedder=none", "quality.perplexity=false"], monkeypatch, capsys)
    assert code == 0, err
    _, (run,) = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    metrics = run.data.metrics
    assert (
        1 <= metrics["best_k_predicted"] <= 12 and metrics["predicted_speedup_best_k"] >= metrics["predicted_speedup"]
    )
    assert "verify_cost_ratio_3_tokens" in metrics
    curve = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/verify_cost_curve.csv").strip().splitlines()
    assert len(curve) == 1 + 13  # n = 1 .. 13 new tokens: k = 1 .. 12 predicted
