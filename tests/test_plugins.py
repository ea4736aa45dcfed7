"""The README's own-drafter example, end to end: a drafter kind from a user's module and a draft config from a
user's folder on Hydra's search path, run through the real CLI."""

from __future__ import annotations

import mlflow

from tests.test_cli import common_args, run_cli

USER_MODULE = """
from dataclasses import dataclass
from specbench.drafters import register_drafter
from specbench.engine import Proposal

@dataclass
class RepeatConfig:
    kind: str = "repeat_last"

class RepeatLast:
    def __init__(self, name): self.name = name
    def reset(self, batch_size): pass
    def prefill(self, contexts): pass
    def propose(self, contexts, depths, choosers):
        return [Proposal([tokens[-1]] * depth) for tokens, depth in zip(contexts, depths)]

register_drafter("repeat_last", RepeatConfig, lambda name, config, model: RepeatLast(name))
"""


def users_drafter(tmp_path, monkeypatch) -> list[str]:
    """The user's module and draft config written to `tmp_path`; the arguments that pick them."""
    (tmp_path / "my_drafters_for_test.py").write_text(USER_MODULE)
    (tmp_path / "conf" / "draft").mkdir(parents=True)
    (tmp_path / "conf" / "draft" / "repeat.yaml").write_text("name: repeat\ndrafters:\n  repeat: {kind: repeat_last}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["plugins=[my_drafters_for_test]", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "draft=repeat"]


def test_a_users_drafter_kind_and_draft_config(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    args = [
        *users_drafter(tmp_path, monkeypatch),
        "cost_curve=false",
        "quality.perplexity=false",
        "quality.embedder=none",
        *common_args(models_dir, pubmedqa_file, tmp_path),
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    assert run.data.params["draft.name"] == "repeat" and run.info.status == "FINISHED"
    assert run.data.metrics["disagreement_rate"] == 0.0  # lossless whatever the drafter proposes
    assert "acceptance_rate_repeat" in run.data.metrics


def test_a_drafter_that_cannot_join_a_running_batch_stops_a_load_run_before_its_costs(
    models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys
):
    args = [
        *users_drafter(tmp_path, monkeypatch),
        "mode=load",
        "load.num_requests=2",
        *common_args(models_dir, pubmedqa_file, tmp_path),
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 1 and "drafter repeat cannot take requests into a running batch" in err and "Traceback" not in err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    assert run.info.status == "FAILED"
    logged = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "verify_cost_surface.csv" not in logged  # refused before the step costs were measured
