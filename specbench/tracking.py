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
import re
import subprocess
import time
import traceback
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.data
import pandas as pd
from matplotlib.figure import Figure
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import specbench
from specbench import catalog, plots
from specbench.config import DatasetConfig
from specbench.errors import TrackingError, first_line
from specbench.summary import summary_markdown

if TYPE_CHECKING:
    from specbench.data import Record
    from specbench.pipeline import RunResult
    from specbench.runner import RunSetup

CONFIG_HASH_TAG = "specbench.config_hash"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
POSITION_SERIES = "acceptance_rate_by_position"
DATASET_CONTEXT = "benchmark"  # the dataset input's context tag (mlflow.data.context)
_POSITION = re.compile(r"acceptance_rate_pos_(\d+)")
SWEEP_TAG = "specbench.sweep"
# keys that change where or how a run is logged, not what it measures
NON_RESULT_KEYS = ("tracking", "resume", "debug", "objective")
# MLflow's UI renders this tag as the description of a run or an experiment (markdown).
DESCRIPTION_TAG = "mlflow.note.content"
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag value
# What an experiment holds, for MLflow's UI to pick its layout (3.17 still takes it from the URL's workflowType).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved view of the runs table (columns, sort order) that a URL opens with `viewStateShareKey=`.
VIEW_KEY = "specbench"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "specbench: headline metrics"
VIEW_PARAMS = ("k", "draft.name")
DEFAULT_UI_URL = "http://127.0.0.1:5000"


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
            tag_experiment(found.experiment_id, found.tags)
            return found.experiment_id
        experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
        tag_experiment(experiment_id, {})
        return experiment_id
    except Exception as error:  # MLflow raises many types for an unusable store
        reason = _reason(error)
        raise TrackingError(f"cannot use the MLflow store {uri} ({reason}): check tracking.uri.") from error


def runs_view_state() -> dict[str, Any]:
    """The saved view of the runs table: the headline metrics and the params that tell runs apart, fastest first."""
    metrics = [name for entry in catalog.headline_metrics() for name in (entry.key, entry.baseline) if name]
    columns = [f"metrics.`{name}`" for name in metrics] + [f"params.`{name}`" for name in VIEW_PARAMS]
    return {"orderByKey": "metrics.`speedup`", "orderByAsc": False, "selectedColumns": columns, "columnOrder": columns}


def tag_experiment(experiment_id: str, tags: dict[str, str]) -> None:
    """Make MLflow's UI open the experiment as model development, with the specbench view of its runs.

    `tags` are the experiment's current tags: a kind someone chose is kept, and the
    view is rewritten only when its columns changed.
    """
    client = MlflowClient()
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    state = json.dumps(runs_view_state())
    try:
        current = json.loads(tags[VIEW_TAG])["state"]
    except (KeyError, TypeError, ValueError):
        current = None
    if current != state:
        now = int(time.time() * 1000)
        view = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": state}
        client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(view))


def ui_base_url(uri: str) -> str:
    """Where MLflow's UI for `uri` answers: the tracking server itself, else `specbench ui`'s default address."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow's UI, opened in the specbench view (the path must end in /runs:
    MLflow's redirect from the experiment's bare URL drops the view)."""
    return f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """A run's page in MLflow's UI (in its model-training layout)."""
    return f"{base_url}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def set_description(run_id: str, markdown: str, full_text: str) -> None:
    """Show `markdown` as the run's description in MLflow's UI, cut at a line to fit a tag (`full_text` says
    where the whole text is)."""
    if len(markdown) > MAX_TAG_LENGTH:
        note = f"\n\n(cut to fit MLflow's tag limit: the whole table is in {full_text})\n"
        cut = markdown.rfind("\n", 0, MAX_TAG_LENGTH - len(note))
        markdown = markdown[: cut if cut > 0 else MAX_TAG_LENGTH - len(note)] + note
    MlflowClient().set_tag(run_id, DESCRIPTION_TAG, markdown)


def _reason(error: BaseException) -> str:
    """The first line of an error, cut to 300 characters so that the sentence quoting it stays one readable line."""
    return first_line(error)[:300]


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            return
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(
            f"tracking.uri={uri} is unreachable ({_reason(error)}): start the server "
            "(make server) or use the local store (tracking.uri=sqlite:///mlruns/mlflow.db)."
        ) from error


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
    # the commit itself is MLflow's own tag, mlflow.source.git.commit (see tracked_run)
    dirty = _git("status", "--porcelain")
    if dirty is not None:
        tags["git.dirty"] = str(bool(dirty))
    return tags


def _git(*args: str) -> str | None:
    """Output of a git command in specbench's own checkout; None when it is not one (an installed package)."""
    root = Path(specbench.__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def source_tags(tags: dict[str, str]) -> dict[str, str]:
    """MLflow's git-commit tag with specbench's commit, unless MLflow already set one (from the entry point's repo).

    MLflow sets it only when the script it was started from lies in a git checkout: not for an installed
    `specbench` console script, nor under a test runner.
    """
    if GIT_COMMIT_TAG in tags:
        return {}
    commit = _git("rev-parse", "HEAD")
    return {GIT_COMMIT_TAG: commit} if commit else {}


@contextmanager
def tracked_run(
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    system_metrics: bool = False,
    nested: bool = False,
) -> Iterator[str]:
    """Start a run and yield its id; a run that raises is ended FAILED (KILLED on Ctrl-C) with the reason.

    What was logged before the failure stays. The reason goes to the `error` tag
    and, with the traceback, to `error.txt`. `system_metrics` starts MLflow's
    sampler of CPU, memory and (with pynvml) GPU use for the run. `nested` starts it inside the active run
    (its parent), as a load run's crossover search does for each probed rate.
    """
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags=tags,
        parent_run_id=parent_run_id,
        log_system_metrics=system_metrics,
        nested=nested,
    )
    mlflow.set_tags(source_tags(run.data.tags))
    status = RunStatus.FINISHED
    try:
        yield run.info.run_id
    except BaseException as error:
        killed = isinstance(error, KeyboardInterrupt)
        status = RunStatus.KILLED if killed else RunStatus.FAILED
        reason = "interrupted (Ctrl-C or SIGTERM)" if killed else _reason(error)
        try:
            mlflow.set_tag("error", reason)
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


def log_ui_tables(tables: dict[str, pd.DataFrame]) -> None:
    """DataFrames as MLflow tables (`mlflow.log_table`): the UI shows them; `mlflow.load_table` joins them across runs.

    Keyed by artifact path, which must end in .json.
    """
    for path, table in tables.items():
        mlflow.log_table(table, path)


def log_position_series(metrics: dict[str, float]) -> None:
    """The `acceptance_rate_pos_<i>` values again as one metric, `acceptance_rate_by_position`, at step i.

    MLflow's chart view draws a metric's steps as a curve, one per run, so runs compare by position at a glance.
    """
    positions = sorted((int(match[1]), value) for key, value in metrics.items() if (match := _POSITION.fullmatch(key)))
    timestamp = int(time.time() * 1000)
    series = [Metric(POSITION_SERIES, float(value), timestamp, step) for step, value in positions if value == value]
    if series:
        MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=series)


def log_dataset(cfg: DatasetConfig, records: list[Record]) -> None:
    """The run's records as an MLflow dataset input: name, source, digest and schema, so runs filter by dataset.

    `mlflow.search_runs(filter_string="dataset.name = 'pubmedqa'")`, or `dataset.digest = '...'` for exactly the
    same records. The records themselves are not uploaded: MLflow keeps a digest, schema and row count.
    """
    from specbench.data import records_table

    if cfg.path is not None:
        source: str | DatasetSource = str(Path(cfg.path).resolve())
    else:
        source = HuggingFaceDatasetSource(cfg.hub_id, config_name=cfg.hub_config, split=cfg.split)
    with warnings.catch_warnings():
        # MLflow registers its local-file source for two URI schemes and warns that a path matches both (same class)
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(records_table(records), source=source, name=cfg.name)
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=DATASET_CONTEXT)
            return
        except MlflowException as error:
            # two jobs of a parallel sweep can register the same dataset at once; a retry finds the row the other
            # wrote and only links it to this run
            if "UNIQUE constraint" not in str(error) or attempt == 2:
                raise


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
    from specbench.models import model_revision  # torch and transformers: only once a run has models

    mlflow.set_tags({f"model.{name}.revision": model_revision(spec) for name, spec in setup.specs.items()})
    if setup.gpu_memory_before_load_gb is not None:
        mlflow.log_metric("gpu_mem_before_load_gb", setup.gpu_memory_before_load_gb)
    if setup.dtype_choice is not None:
        mlflow.log_param("dtype_chosen", setup.dtype_choice.dtype)
        if setup.dtype_choice.times:
            mlflow.log_param("dtype_probe", "cached" if setup.dtype_choice.cached else "measured")
            log_metrics(setup.dtype_choice.metrics())


def log_partial(table: pd.DataFrame) -> None:
    """The per-prompt table of a run that stopped part-way."""
    log_table(table, "per_prompt.csv")


def log_result(result: RunResult) -> None:
    """Metrics, tags, tables, generations, figures and the summary of a finished run."""
    log_metrics(result.metrics)
    mlflow.set_tags(result.tags)
    log_position_series(result.metrics)
    log_table(result.per_prompt, "per_prompt.csv")
    log_table(result.steps, "steps.csv")
    log_ui_tables({"per_prompt.json": result.per_prompt, "steps.json": result.steps})
    log_jsonl(result.generations, "generations.jsonl")
    if result.verify_curve is not None:
        log_table(result.verify_curve, "verify_cost_curve.csv")
    if result.verify_surface is not None:
        log_table(result.verify_surface, "verify_cost_surface.csv")
    log_figures(
        plots.run_figures(
            result.metrics,
            result.per_prompt,
            result.drafters,
            result.verify_curve,
            result.predicted_curve,
            title=result.title,
            k=result.k,
            verify_surface=result.verify_surface,
            batch_size=result.batch_size,
        )
    )
    summary = summary_markdown(result.metrics, title=result.title, notes=result.notes)
    mlflow.log_text(summary, "summary.md")
    set_description(mlflow.active_run().info.run_id, summary, "summary.md")
