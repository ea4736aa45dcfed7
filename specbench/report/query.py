"""The runs to compare: finished benchmark runs from MLflow, as one readable table."""

from __future__ import annotations

import mlflow
import pandas as pd

from specbench import tracking
from specbench.catalog import Metric, metric, report_metrics
from specbench.intervals import METHODS, sample_size

CONFIG_HASH = "tags.specbench.config_hash"
INTERVAL_SIZE, INTERVAL_METHOD = "Speedup CI n", "Speedup CI method"


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


def summary_table(runs: pd.DataFrame, sort: bool = True) -> pd.DataFrame:
    """One row per run with readable column names and units, sorted by draft, k and batch size (else in the order
    of `runs`); absent metrics are left out.

    The speedup's interval comes with its n (units x repeats) and method; sampled runs show no disagreement
    (their outputs differ by design), and a crossover predicted past the prompts measured is marked extrapolated.
    """
    table = pd.DataFrame(
        {
            "draft": param(runs, "draft.name"),
            "k": pd.to_numeric(param(runs, "k"), errors="coerce").astype("Int64"),
            # runs from before batching decoded one prompt at a time
            "batch": pd.to_numeric(param(runs, "batch_size"), errors="coerce").fillna(1).astype("Int64"),
            "verifier": param(runs, "verifier.name"),
            "sampling": param(runs, "generation.do_sample").str.lower().map({"true": "sampled", "false": "greedy"}),
            # runs from before engine.backend existed ran our engine
            "backend": param(runs, "engine.backend").fillna("specbench"),
        }
    )
    for name, key, scale in summary_columns():
        if f"metrics.{key}" not in runs:
            continue
        entry = metric(key)
        if entry is not None and entry.spread:  # text: "min / median / max" over the run's repeats
            values = runs.filter(regex=r"^metrics\.").rename(columns=lambda name: name.removeprefix("metrics."))
            table[name] = [entry.format_spread(row, key) for row in values.to_dict("records")]
        else:
            table[name] = runs[f"metrics.{key}"].to_numpy() * scale
        if key == "speedup_ci_high":
            values = runs.filter(regex=r"^metrics\.").rename(columns=lambda name: name.removeprefix("metrics."))
            table[INTERVAL_SIZE] = [sample_size(row) or pd.NA for row in values.to_dict("records")]
            methods = runs.get("tags.interval_method", pd.Series(pd.NA, index=runs.index))
            table[INTERVAL_METHOD] = methods.map(METHODS, na_action="ignore").to_numpy()
        if key == "disagreement_rate":
            table.loc[(table["sampling"] == "sampled").to_numpy(), name] = float("nan")
        if key == "crossover_batch_predicted":
            table[name] = _mark_extrapolated(table[name], runs)
    if not sort:
        return table
    # the backends of one configuration sit side by side
    order = ["draft", "k", "batch", "backend", "verifier", "sampling"]
    return table.sort_values(order, kind="stable").reset_index(drop=True)


def crossover_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (verifier, draft, k, sampling) measured at several batch sizes: the smallest batch size whose measured
    speedup is below 1, beside the one the model predicts from the smallest-batch run (empty cells: none seen)."""
    table = summary_table(runs, sort=False)
    table["speedup"] = runs["metrics.speedup"].to_numpy() if "metrics.speedup" in runs else float("nan")
    predicted = runs.get("metrics.crossover_batch_predicted", pd.Series(float("nan"), index=runs.index))
    table["predicted"] = _mark_extrapolated(predicted, runs).to_numpy()
    rows = []
    for (verifier, draft, k, sampling), group in table.groupby(["verifier", "draft", "k", "sampling"], dropna=False):
        if group["batch"].nunique() < 2:
            continue
        group = group.sort_values("batch")
        below = group.loc[group["speedup"] < 1, "batch"]
        rows.append(
            {
                "verifier": verifier,
                "draft": draft,
                "k": k,
                "sampling": sampling,
                "batch sizes": ", ".join(str(size) for size in group["batch"]),
                "crossover measured": below.iloc[0] if len(below) else pd.NA,
                "crossover predicted": group["predicted"].iloc[0],
            }
        )
    return pd.DataFrame(rows)


def _mark_extrapolated(crossovers: pd.Series, runs: pd.DataFrame) -> pd.Series:
    """Predicted crossover batch sizes, "64 (extrapolated)" where the run marked it so (more than 4x its prompts)."""
    marks = runs.get("metrics.crossover_batch_predicted_extrapolated", pd.Series(float("nan"), index=runs.index))
    marked = [
        f"{value:.0f} (extrapolated)" if mark == 1 else value
        for value, mark in zip(crossovers.to_numpy(), marks.to_numpy(), strict=True)
    ]
    return pd.Series(marked, index=crossovers.index)


def param(runs: pd.DataFrame, key: str) -> pd.Series:
    """A params column as strings (missing where a run lacks it)."""
    name = f"params.{key}"
    values = runs[name] if name in runs else pd.Series(pd.NA, index=runs.index)
    return values.astype("string").reset_index(drop=True)
