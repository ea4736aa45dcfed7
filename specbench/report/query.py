"""The runs to compare: finished benchmark runs from MLflow, as one readable table."""

from __future__ import annotations

import mlflow
import pandas as pd

from specbench import tracking
from specbench.catalog import Metric, report_metrics

CONFIG_HASH = "tags.specbench.config_hash"


def load_runs(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    run_ids: list[str] | None = None,
    latest_per_config: bool = True,
) -> pd.DataFrame:
    """Finished benchmark runs (not sweep parents) as `mlflow.search_runs` rows, newest first.

    Points MLflow at `tracking_uri` (so `log_report` logs to the same store). With
    `latest_per_config`, a configuration measured several times keeps its latest run.
    """
    database = tracking.sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise ValueError(f"no MLflow store at {database}: pass --tracking-uri of the store the benchmarks logged to.")
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ValueError(
            f"experiment '{experiment}' does not exist in {tracking_uri}: pass --experiment with its name."
        )
    clauses = ["attributes.status = 'FINISHED'"]
    if parent_run_id:
        clauses.append(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    if run_ids:
        quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
        clauses.append(f"attributes.run_id IN ({quoted})")
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=" AND ".join(clauses),
        order_by=["attributes.start_time DESC"],
        output_format="pandas",
    )
    if "params.k" in runs:
        runs = runs[runs["params.k"].notna()]
    if latest_per_config and CONFIG_HASH in runs:
        runs = runs[runs[CONFIG_HASH].isna() | ~runs[CONFIG_HASH].duplicated()]
    if runs.empty or "params.k" not in runs:
        scope = f"under parent run {parent_run_id}" if parent_run_id else f"in experiment '{experiment}'"
        raise ValueError(
            f"no finished benchmark runs {scope}: check --experiment and --parent-run-id, or run a benchmark first."
        )
    return runs.reset_index(drop=True)


def _unit(entry: Metric) -> str:
    return {"rate": "%", "pct": "%", "usd": "USD"}.get(entry.fmt, entry.unit)


def column(key: str, entry: Metric) -> str:
    """The summary table's column for MLflow key `key` of catalog entry `entry`, with its unit."""
    name = entry.label
    if key == entry.baseline:
        name += ", baseline"
    elif key.endswith(("_ci_low", "_ci_high")):
        name += " CI low" if key.endswith("_ci_low") else " CI high"
    unit = _unit(entry)
    return f"{name} ({unit})" if unit else name


def summary_columns() -> list[tuple[str, str, float]]:
    """(column, MLflow key, scale) of every report metric: baseline, speculative, then its interval."""
    columns = []
    for entry in report_metrics():
        keys = [entry.baseline, entry.key] if entry.baseline else [entry.key]
        if entry.key == "speedup":
            keys += ["speedup_ci_low", "speedup_ci_high"]
        scale = 100.0 if entry.fmt == "rate" else 1.0
        columns += [(column(key, entry), key, scale) for key in keys]
    return columns


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with readable column names and units, sorted by draft, k and backend; absent metrics are
    left out."""
    table = pd.DataFrame(
        {
            "draft": param(runs, "draft.name"),
            "k": pd.to_numeric(param(runs, "k"), errors="coerce").astype("Int64"),
            "verifier": param(runs, "verifier.name"),
            "sampling": param(runs, "generation.do_sample").str.lower().map({"true": "sampled", "false": "greedy"}),
            # runs from before engine.backend existed ran our engine
            "backend": param(runs, "engine.backend").fillna("specbench"),
        }
    )
    for name, key, scale in summary_columns():
        if f"metrics.{key}" in runs:
            table[name] = runs[f"metrics.{key}"].to_numpy() * scale
    # the backends of one configuration sit side by side
    return table.sort_values(["draft", "k", "backend", "verifier", "sampling"], kind="stable").reset_index(drop=True)


def param(runs: pd.DataFrame, key: str) -> pd.Series:
    """A params column as strings (missing where a run lacks it)."""
    name = f"params.{key}"
    values = runs[name] if name in runs else pd.Series(pd.NA, index=runs.index)
    return values.astype("string").reset_index(drop=True)
