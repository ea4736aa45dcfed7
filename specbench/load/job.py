"""A load run in MLflow: one run per request rate, or a crossover search with one nested run per probed rate.

`specbench.job` calls `run_load_job` inside the run it opened (after the config and the
models are set up, as for a batch run). With `load.find_crossover`, that run is the
search's parent: each probe is a nested run with its own params (its `load.rate`),
metrics and artifacts, and the parent gets the crossover rate with its interval,
the model's predicted crossover, and the report's figures and table of its probes.
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric

from specbench import console, tracking
from specbench.config import ArrivalKind, SpecBenchConfig
from specbench.data import Record
from specbench.load.crossover import crossover_metrics, find_crossover, probe_from_metrics
from specbench.load.metrics import slo_set
from specbench.load.pipeline import check_joinable_drafters, load_costs, run_load
from specbench.load.result import LoadResult, load_title
from specbench.load.trace import write_requests
from specbench.runner import RunSetup
from specbench.server.run import run_server_load
from specbench.speedup_model import verify_surface_table
from specbench.summary import summary_markdown

SERIES_BATCH = 1000  # step metrics per MLflow call


def run_load_job(
    cfg: SpecBenchConfig,
    setup: RunSetup | None,
    records: list[Record],
    experiment_id: str,
    run_id: str,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
) -> tuple[str, dict[str, float], str | None]:
    """Serve the trace (or search the crossover rate) and log it all to the active run `run_id`; returns the title
    and metrics the console shows, and the search's conclusion (None without a search).

    `setup` holds our engine's models; with engine.backend=server it is None and the servers serve the trace.
    """
    if setup is not None:
        check_joinable_drafters(setup)  # before the costs are measured
    costs = load_costs(cfg, setup) if setup is not None else None
    if costs is not None:
        tracking.log_table(verify_surface_table(costs), "verify_cost_surface.csv")

    def serve_and_log(rate: float | None) -> tuple[str, dict[str, float]]:
        """Serve at `rate`, log it all to the active run; its title and metrics (the served requests of a server
        run live in a folder gone by then)."""
        if setup is not None:
            result = run_load(cfg, setup, rate, costs)
            log_load_result(result)
            return result.title, result.metrics
        with tempfile.TemporaryDirectory() as folder:  # the servers' responses and logs, read as they are logged
            result, artifacts = run_server_load(cfg, records, rate, Path(folder))
            log_load_result(result)
            for path in artifacts:
                mlflow.log_artifact(str(path), "servers")
        return result.title, result.metrics

    if not cfg.load.find_crossover:
        rate = None if cfg.load.arrival is ArrivalKind.trace else cfg.load.rate
        return *serve_and_log(rate), None

    predictions = []

    def probe(rate: float):
        # a probe is its own configuration: with the search's hash, `specbench report` would keep one probe of the
        # search (its latest per configuration) and `resume` would take a finished probe for the finished search
        probe_hash = tracking.config_hash({"search": tags[tracking.CONFIG_HASH_TAG], "load.rate": rate})
        probe_tags = tags | {tracking.CONFIG_HASH_TAG: probe_hash}
        with tracking.tracked_run(experiment_id, f"{run_name}-rate{rate:.3g}", probe_tags, run_id, nested=True):
            tracking.log_params(params | {"load.rate": str(rate), "load.find_crossover": "False"})
            _, probe_metrics = serve_and_log(rate)
        print(console.load_probe_line(rate, probe_metrics, cfg.load.crossover_metric), flush=True)
        if "predicted_crossover_rate" in probe_metrics:
            predictions.append(probe_metrics["predicted_crossover_rate"])
        return probe_from_metrics(rate, probe_metrics, cfg.load.crossover_metric)

    load = cfg.load
    crossover = find_crossover(probe, load.crossover_metric, load.rate_min, load.rate_max, load.max_probes)
    metrics = crossover_metrics(crossover, cfg.slo.attainment if slo_set(cfg.slo) else None)
    if predictions:
        metrics["predicted_crossover_rate"] = statistics.median(predictions)
    tracking.log_metrics(metrics)
    mlflow.set_tag("crossover", crossover.message)
    title = load_title(cfg, f"rates {load.rate_min:g}-{load.rate_max:g} requests/s")
    summary = summary_markdown(metrics, title=title, notes=[crossover.message])
    mlflow.log_text(summary, "summary.md")
    tracking.set_description(run_id, summary, "summary.md")
    _log_probe_report(cfg, run_id)
    return title, metrics, crossover.message


def log_load_result(result: LoadResult) -> None:
    """Metrics, the step series (occupancy and k over the trace), the steps table, `requests.jsonl` (and
    `requests_trace{N}.jsonl` for the other traces), the traces as an MLflow dataset input, and the summary of one
    load run."""
    tracking.log_metrics(result.metrics)
    steps = result.steps_table()
    tracking.log_table(steps, "steps.csv")
    _log_step_series(steps)
    with tempfile.TemporaryDirectory() as folder:
        for number, trace in enumerate(result.traces):  # each trace's first serve; a file each, to replay as a trace
            path = Path(folder) / ("requests.jsonl" if number == 0 else f"requests_trace{number}.jsonl")
            write_requests(path, trace, {mode: served[number] for mode, served in result.served.items()})
            mlflow.log_artifact(str(path))
    traces = pd.DataFrame([{"trace": number} | vars(request) for number, trace in enumerate(result.traces)
                           for request in trace])  # fmt: skip
    with warnings.catch_warnings():
        # MLflow hints, for a model's signature, that integer columns cannot hold missing values: not for a dataset
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
        mlflow.log_input(mlflow.data.from_pandas(traces, name="trace"), context="load")
    summary = summary_markdown(result.metrics, title=result.title, notes=result.notes)
    mlflow.log_text(summary, "summary.md")
    tracking.set_description(mlflow.active_run().info.run_id, summary, "summary.md")


def _log_step_series(steps: pd.DataFrame) -> None:
    """Occupancy (both modes) and k (speculation) at every scheduler step of the first serve (repeat 0, trace 0), as
    MLflow step metrics `occupancy_{mode}` and `k_spec`, so MLflow's charts draw them over the trace."""
    first = steps[(steps["repeat"] == 0) & (steps["trace"] == 0)]
    series = []
    for mode, rows in first.groupby("mode"):
        for step, (occupancy, k) in enumerate(zip(rows["rows"], rows["k"], strict=True)):
            series.append(Metric(f"occupancy_{mode}", float(occupancy), 0, step))
            if mode == "spec":
                series.append(Metric("k_spec", float(k), 0, step))
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for start in range(0, len(series), SERIES_BATCH):
        client.log_batch(run_id, metrics=series[start : start + SERIES_BATCH])


def _log_probe_report(cfg: SpecBenchConfig, run_id: str) -> None:
    """The report's load figures and probe table over the search's runs (its probes and itself), on the parent."""
    from specbench.report.load import load_figures, probe_table  # matplotlib: only once there is a report to draw
    from specbench.report.query import load_runs

    runs = load_runs(cfg.tracking.uri, cfg.tracking.experiment, parent_run_id=run_id, latest_per_config=False)
    parent = mlflow.search_runs(filter_string=f"attributes.run_id = '{run_id}'", output_format="pandas")
    runs = pd.concat([runs, parent], ignore_index=True)
    tracking.log_figures(load_figures(runs))
    tracking.log_table(probe_table(runs), "load_probes.csv")
