"""mode=load through the real CLI, in-process, on tiny models: one run per rate, a crossover search with nested
probe runs, the oracle draft, k_schedule=load, and the bad inputs that belong to the engine side."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from specbench.report.query import load_runs
from specbench.tracking import CONFIG_HASH_TAG
from tests.test_cli import common_args, run_cli

# after common_args, so that these win where they name the same key
FAST = ["load.rate=40", "load.num_requests=6", "load.max_batch_size=3", "k=3"]


def store(tmp_path) -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return MlflowClient()


def finished_runs(tmp_path) -> list:
    store(tmp_path)
    return mlflow.search_runs(experiment_names=["specbench"], output_format="list")


def test_a_load_run_logs_both_modes_of_one_trace(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys, recwarn):
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "mode=load", *FAST, "repeats=2"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (run,) = finished_runs(tmp_path)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("ttft_ms_p99_spec", "tpot_ms_p99_baseline", "e2el_ms_p50_spec", "queue_ms_mean_baseline",
                "output_tokens_per_s_spec", "requests_per_s_baseline", "occupancy_mean_spec", "occupancy_max_baseline",
                "joins_per_request_baseline", "joins_per_request_spec",
                "tpot_p99_ratio", "tpot_p99_ratio_ci_low", "e2el_p99_ratio", "acceptance_rate",
                "tpot_p99_ratio_repeat_median", "predicted_tpot_ratio", "predicted_tpot_p99_ratio",
                "padded_token_share", "padded_token_share_baseline"):  # fmt: skip
        assert key in metrics, key
    assert metrics["num_requests"] == 6 and metrics["repeats"] == 2 and metrics["request_rate"] == 40
    assert metrics["disagreement_rate"] == 0  # float32 greedy: every request equals its baseline
    assert 1 <= metrics["occupancy_max_spec"] <= 3
    assert 0 < metrics["joins_per_request_spec"] <= 1
    client = MlflowClient()
    folder = client.download_artifacts(run.info.run_id, "requests.jsonl", str(tmp_path))
    lines = [json.loads(line) for line in Path(folder).read_text(encoding="utf-8").splitlines()]
    assert [line["request_id"] for line in lines] == list(range(6))
    arrivals = [line["arrival_s"] for line in lines]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    for line in lines:
        assert line["baseline"]["tokens"] == line["spec"]["tokens"]
        for mode in ("baseline", "spec"):
            times = line[mode]
            assert line["arrival_s"] <= times["admitted_s"] <= times["first_token_s"] <= times["finish_s"]
    occupancy = client.get_metric_history(run.info.run_id, "occupancy_spec")
    assert occupancy and max(point.value for point in occupancy) <= 3
    assert [point.step for point in occupancy] == list(range(len(occupancy)))
    drafted = {point.value for point in client.get_metric_history(run.info.run_id, "k_spec")}
    assert max(drafted) == 3 and drafted <= {0.0, 1.0, 2.0, 3.0}  # k, cut near a request's length limit
    assert any(dataset.dataset.name == "trace" for dataset in run.inputs.dataset_inputs)
    assert "TPOT p99, spec / baseline" in out and "6 requests x 2" in out
    assert not [warning for warning in recwarn if "Inferred schema" in str(warning.message)]  # a model's hint, not ours


def test_several_traces_are_each_served_in_both_modes_and_logged_apart(
    models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys
):
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "mode=load", *FAST, "load.traces=2"]
    code, out, err = run_cli([*args, "load.exclude_first=2"], monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (run,) = finished_runs(tmp_path)
    metrics = run.data.metrics
    assert metrics["num_requests"] == 6 and metrics["traces"] == 2 and metrics["excluded_requests"] == 2
    assert metrics["paired_requests"] == 8  # the first 2 of each trace's serve are served but not measured
    assert ("6 requests (the first 2 left out) x 2 traces x 1 ([low, high]: 95% bootstrap interval over traces, "
            "then their requests)") in out  # fmt: skip
    assert metrics["disagreement_rate"] == 0 and "tpot_p99_ratio_repeat_median" in metrics  # one ratio per trace
    assert metrics["tpot_p99_ratio_ci_low"] <= metrics["tpot_p99_ratio"] <= metrics["tpot_p99_ratio_ci_high"]
    client = MlflowClient()
    traces = []
    for name in ("requests.jsonl", "requests_trace1.jsonl"):
        path = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path)))
        traces.append([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()])
    records, arrivals = ([[line[key] for line in trace] for trace in traces] for key in ("record_id", "arrival_s"))
    assert records[0] == records[1] and arrivals[0] != arrivals[1]  # the same prompts, arrivals of seeds 0 and 1
    for trace in traces:  # every request, those left out of the figures too
        assert len(trace) == 6 and all(line["baseline"]["tokens"] == line["spec"]["tokens"] for line in trace)
    steps = Path(client.download_artifacts(run.info.run_id, "steps.csv", str(tmp_path))).read_text().splitlines()
    trace_column = steps[0].split(",").index("trace")
    assert {line.split(",")[trace_column] for line in steps[1:]} == {"0", "1"}


def test_coalesced_joins_serve_both_modes_losslessly_and_are_logged(
    models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys
):
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "mode=load", *FAST, "load.num_requests=9"]
    code, _, err = run_cli([*args, "load.coalesce_joins=true"], monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (run,) = finished_runs(tmp_path)
    assert run.data.params["load.coalesce_joins"] == "True"
    assert run.data.metrics["disagreement_rate"] == 0 and run.data.metrics["num_requests"] == 9


def test_the_crossover_search_runs_one_nested_run_per_probe(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    search = ["load.find_crossover=true", "load.rate_min=5", "load.rate_max=80", "load.max_probes=3"]
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "mode=load", *FAST, *search]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    runs = finished_runs(tmp_path)
    (parent,) = [run for run in runs if "crossover_probes" in run.data.metrics]
    probes = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(probes) == parent.data.metrics["crossover_probes"] in (2, 3)  # 2 when the ends agree: no bisection
    rates = sorted(float(run.data.params["load.rate"]) for run in probes)
    assert rates[0] == 5.0 and rates[-1] == 80.0 and rates[1:-1] in ([], [pytest.approx(20.0)])
    assert all(run.info.status == "FINISHED" and "tpot_p99_ratio" in run.data.metrics for run in probes)
    conclusion = parent.data.tags["crossover"]
    assert conclusion.startswith("Speculation ") and conclusion in out
    inside = "crossover_rate" in parent.data.metrics
    assert inside == ("at both ends" not in conclusion and "either end" not in conclusion)
    artifacts = {item.path for item in MlflowClient().list_artifacts(parent.info.run_id)}
    assert "load_probes.csv" in artifacts and "summary.md" in artifacts
    # each probe is a configuration of its own: `specbench report --parent-run-id` keeps every one of them
    hashes = {run.data.tags[CONFIG_HASH_TAG] for run in [parent, *probes]}
    assert len(hashes) == len(probes) + 1
    reported = load_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "specbench", parent_run_id=parent.info.run_id)
    assert sorted(reported["params.load.rate"].astype(float)) == rates


def test_the_oracle_draft_is_accepted_as_often_as_asked(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    oracle = ["draft=oracle", "oracle.acceptance=0.7", "oracle.cost_model=distilbert/distilgpt2", "load.num_requests=8"]
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "mode=load", *FAST, *oracle,
            "generation.max_new_tokens=24"]  # fmt: skip
    code, _out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (run,) = finished_runs(tmp_path)
    metrics = run.data.metrics
    assert metrics["disagreement_rate"] == 0 and metrics["oracle_off_path_steps"] == 0
    assert metrics["oracle_acceptance_pos_1_ci_low"] <= 0.7 <= metrics["oracle_acceptance_pos_1_ci_high"]
    assert 0.4 < metrics["oracle_acceptance_pos_1"] < 0.95


@pytest.mark.parametrize("schedule", ["load", "heuristic"])
def test_k_schedules_choose_k_per_step(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys, schedule):
    """k_schedule=load picks k (0 included) per step from the occupancy; heuristic per row, as in batch runs."""
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "mode=load", *FAST, f"k_schedule={schedule}", "k_max=4"]
    code, _out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    (run,) = finished_runs(tmp_path)
    ks = {point.value for point in MlflowClient().get_metric_history(run.info.run_id, "k_spec")}
    assert ks <= {0.0, 1.0, 2.0, 3.0, 4.0} and run.data.metrics["disagreement_rate"] == 0
    if schedule == "load":  # what it believed: the estimate, and the upper end of its interval that priced drafting
        metrics = run.data.metrics
        assert 0 < metrics["k_schedule_alpha"] < metrics["k_schedule_alpha_bound"] < 1
    else:
        assert "k_schedule_alpha" not in run.data.metrics


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["mode=load", "engine.backend=transformers"], "mode=load needs an engine that lets requests join"),
        (["draft=oracle", "generation.do_sample=true"], "use greedy decoding (generation.do_sample=false)"),
        (["k_schedule=load"], "k_schedule=load chooses k from the occupancy of a running batch: use it with mode=load"),
        (["draft=oracle", "oracle.acceptance=1.5"], "oracle.acceptance=1.5 is invalid"),
    ],
)
def test_bad_load_input_is_one_sentence(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys, override, message):
    code, _out, err = run_cli([*common_args(models_dir, pubmedqa_file, tmp_path), *override], monkeypatch, capsys)
    assert code == 1 and message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0  # one line


def test_the_server_backend_runs_the_same_load_job_through_the_cli(
    models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys
):
    """engine.backend=server, two scripted servers started from commands: the crossover search's probes are nested
    runs with the load figures and each server's log, and no model is loaded."""
    # chunks 2 ms apart: chunks sent at once may reach the client in one read, and a TPOT of 0 has no ratio
    scripted = f"{shlex.quote(sys.executable)} -m specbench.server.scripted --port {{port}} --interval-ms 2"
    servers = [f"server.baseline_cmd='{scripted}'", f"server.spec_cmd='{scripted} --spec-k 4'"]
    search = ["load.find_crossover=true", "load.rate_min=5", "load.rate_max=50", "load.max_probes=2"]
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "mode=load", "engine.backend=server", *servers,
            *search, "load.num_requests=6", "warmup_prompts=0"]  # fmt: skip
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    runs = finished_runs(tmp_path)
    (parent,) = [run for run in runs if "crossover_probes" in run.data.metrics]
    probes = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(probes) == 2 and all(run.info.status == "FINISHED" for run in probes)
    for run in probes:
        assert run.data.metrics["failed_requests_spec"] == 0 and "tpot_ms_p99_spec" in run.data.metrics
        logs = {item.path for item in MlflowClient().list_artifacts(run.info.run_id, "servers")}
        assert any(path.endswith("server_spec.log") for path in logs)
    assert "model.verifier" not in parent.data.tags  # the servers hold the models: none was loaded here
    assert parent.data.tags["crossover"] in out
    assert all("padded_token_share" not in run.data.metrics for run in probes)  # no verifier of ours ran
    summary = Path(MlflowClient().download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read_text()
    assert "on its servers (engine.backend=server), rates 5-50 requests/s" in summary
