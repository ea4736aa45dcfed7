"""MLflow: one run per job, a parent run per sweep, and nothing lost when a run fails.

The default store is SQLite under `mlruns/` (MLflow 3.13+ refuses the old file
store); `tracking.uri` may point anywhere MLflow can write, e.g. a tracking
server, which parallel sweeps need (SQLite locks under concurrent writers).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import RunStatus

import specbench
from specbench import plots
from specbench.errors import TrackingError
from specbench.summary import summary_markdown

if TYPE_CHECKING:
    from specbench.pipeline import RunResult
    from specbench.runner import RunSetup

CONFIG_HASH_TAG = "specbench.config_hash"
SWEEP_TAG = "specbench.sweep"
# keys that change where or how a run is logged, not what it measures
NON_RESULT_KEYS = ("tracking", "resume", "debug", "objective")


def config_hash(config: dict[str, Any]) -> str:
    """Short hash of everything in the resolved config that determines a run's results."""
    relevant = {key: value for key, value in config.items() if key not in NON_RESULT_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}, the form MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def connect(uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """Point MLflow at `uri`, check it answers, and return the experiment's id (created if needed)."""
    database = sqlite_path(uri)
    if database is not None:
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(
                f"cannot create {database.parent} for the MLflow store ({error}): make it writable or set tracking.uri."
            ) from error
        if not os.access(database.parent, os.W_OK):
            raise TrackingError(
                f"the MLflow store folder {database.parent} is read-only: make it writable "
                "or set tracking.uri to another store."
            )
        artifact_location = artifact_location or (database.parent.resolve() / "artifacts").as_uri()
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        return mlflow.create_experiment(experiment, artifact_location=artifact_location)
    except Exception as error:  # MLflow raises many types for an unusable store
        raise TrackingError(f"cannot use the MLflow store {uri} ({_first_line(error)}): check tracking.uri.") from error


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            return
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(
            f"tracking.uri={uri} is unreachable ({_first_line(error)}): start the server "
            "(make server) or use the local store (tracking.uri=sqlite:///mlruns/mlflow.db)."
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def finished_run(experiment_id: str, config_hash_value: str) -> str | None:
    """Id of a FINISHED run with this config hash, if the experiment has one."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{config_hash_value}' and attributes.status = 'FINISHED'",
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def environment_tags(device_name: str) -> dict[str, str]:
    """Versions, machine and code revision, so a number can be traced to what produced it."""
    import torch
    import transformers

    tags = {
        "specbench.version": specbench.__version__,
        "torch.version": torch.__version__,
        "transformers.version": transformers.__version__,
        "python.version": platform.python_version(),
        "device.name": device_name,
        "host.cpu_count": str(os.cpu_count()),
        "host.platform": platform.platform(),
    }
    if torch.cuda.is_available():
        tags["cuda.version"] = str(torch.version.cuda)
    root = Path(specbench.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
        tags["git.commit"] = commit.stdout.strip()
        tags["git.dirty"] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.CalledProcessError):
        tags["git.commit"] = "unknown"
    return tags


@contextmanager
def tracked_run(
    experiment_id: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
) -> Iterator[str]:
    """Start a run and yield its id; a run that raises is ended FAILED (KILLED on Ctrl-C) with the reason.

    What was logged before the failure stays. The reason goes to the `error` tag
    and, with the traceback, to `error.txt`.
    """
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags, parent_run_id=parent_run_id)
    status = RunStatus.FINISHED
    try:
        yield run.info.run_id
    except BaseException as error:
        killed = isinstance(error, KeyboardInterrupt)
        status = RunStatus.KILLED if killed else RunStatus.FAILED
        reason = "interrupted (Ctrl-C or SIGTERM)" if killed else _first_line(error)
        try:
            mlflow.set_tag("error", reason[:4000])
            mlflow.log_text("".join(traceback.format_exception(error)), "error.txt")
        except Exception:  # the store itself may be what failed: the status below matters more
            pass
        raise
    finally:
        mlflow.end_run(RunStatus.to_string(status))


def log_params(params: dict[str, str]) -> None:
    """Log params in batches (MLflow caps one call at 100)."""
    items = list(params.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


def log_metrics(metrics: dict[str, float]) -> None:
    """Log finite numeric metrics; NaN and missing values are skipped, not logged as garbage."""
    clean = {key: float(value) for key, value in metrics.items() if value is not None and value == value}
    mlflow.log_metrics(clean)


def log_table(table: pd.DataFrame, path: str) -> None:
    """A DataFrame as a CSV artifact."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    mlflow.log_text(buffer.getvalue(), path)


def log_jsonl(records: list[dict[str, Any]], path: str) -> None:
    """Records as a JSON-lines artifact."""
    mlflow.log_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), path)


def log_figures(figures: dict[str, Figure]) -> None:
    """Figures as PNG artifacts, keyed by artifact path."""
    for path, figure in figures.items():
        mlflow.log_figure(figure, path)


def log_setup(setup: RunSetup) -> None:
    """Tags that trace the run to its machine and models, logged before decoding starts."""
    mlflow.set_tags(environment_tags(setup.device_name) | {"device": str(setup.device)})
    mlflow.set_tags({f"model.{name}": spec.label for name, spec in setup.specs.items()})
    if setup.gpu_memory_before_load_gb is not None:
        mlflow.log_metric("gpu_mem_before_load_gb", setup.gpu_memory_before_load_gb)


def log_partial(table: pd.DataFrame) -> None:
    """The per-prompt table of a run that stopped part-way."""
    log_table(table, "per_prompt.csv")


def log_result(result: RunResult) -> None:
    """Metrics, tables, generations, figures and the summary of a finished run."""
    log_metrics(result.metrics)
    log_table(result.per_prompt, "per_prompt.csv")
    log_table(result.steps, "steps.csv")
    log_jsonl(result.generations, "generations.jsonl")
    if result.verify_curve is not None:
        log_table(result.verify_curve, "verify_cost_curve.csv")
    log_figures(
        plots.run_figures(
            result.metrics,
            result.per_prompt,
            result.drafters,
            result.verify_curve,
            result.predicted_curve,
            title=result.title,
            k=result.k,
        )
    )
    mlflow.log_text(summary_markdown(result.metrics, title=result.title), "summary.md")
