"""Sweeps (Hydra multiruns): a parent MLflow run groups the jobs; at the end, a report and a summary.

A Hydra callback opens the parent run before the launcher starts any job and
leaves its id where every job finds it (an environment variable for local
launchers, a file in the sweep folder for cluster launchers). Each job leaves
its outcome in its own output folder; at the end the callback gathers them,
logs the cross-run report to the parent run, and exits non-zero with one line
naming the configurations that failed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from specbench import console, tracking

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

JOB_STATUS_FILE = "specbench_job.json"
PARENT_ENV = "SPECBENCH_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run_id"


def parent_run_id() -> str | None:
    """The sweep's parent run id, seen from inside a job."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    marker = Path(HydraConfig.get().sweep.dir) / PARENT_FILE
    return marker.read_text().strip() if marker.exists() else None


def end_open_sweep(status: int, reason: str) -> None:
    """End this process's open sweep parent run, if any, with `status` (a RunStatus) and `reason` as its error tag.

    For sweeps that stop before the end callback runs: interrupted, or a job refused at composition.
    """
    parent_id = os.environ.pop(PARENT_ENV, None)
    if parent_id:
        client = MlflowClient()
        client.set_tag(parent_id, "error", reason[:4000])
        client.set_terminated(parent_id, RunStatus.to_string(status))


def job_statuses(sweep_dir: Path) -> list[dict[str, str]]:
    """Outcomes the jobs of a sweep left in their output folders; a job that left none died (killed, timed out)."""
    statuses = []
    for job_dir in sorted(path.parent for path in sweep_dir.glob("*/.hydra")):
        marker = job_dir / JOB_STATUS_FILE
        if marker.exists():
            statuses.append(json.loads(marker.read_text()))
        else:
            statuses.append({"name": f"job {job_dir.name}", "status": "LOST", "error": "ended without a status"})
    return statuses


class SweepCallback(Callback):
    """Opens the sweep's parent run, and closes it with a report and a summary."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Create the parent run before any job starts."""
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            experiment_id = tracking.connect(
                config.tracking.uri, config.tracking.experiment, config.tracking.artifact_location
            )
        except tracking.TrackingError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        overrides = " ".join(config.hydra.overrides.task)
        parent = MlflowClient().create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.name}",
            tags={tracking.SWEEP_TAG: str(sweep_dir), "specbench.overrides": overrides},
        )
        os.environ[PARENT_ENV] = parent.info.run_id
        (sweep_dir / PARENT_FILE).write_text(parent.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Report over the sweep's runs, end the parent run, and summarise failures."""
        from specbench import report

        sweep_dir = Path(config.hydra.sweep.dir)
        parent_id = (sweep_dir / PARENT_FILE).read_text().strip()
        os.environ.pop(PARENT_ENV, None)
        statuses = job_statuses(sweep_dir)
        run_ids = [s["run_id"] for s in statuses if s.get("status") in ("FINISHED", "SKIPPED")]
        failed = [s for s in statuses if s.get("status") not in ("FINISHED", "SKIPPED")]
        client = MlflowClient()
        summary = ""
        try:
            if run_ids:
                runs = report.load_runs(config.tracking.uri, config.tracking.experiment, run_ids=run_ids)
                report.write_report(runs, sweep_dir / "report")
                report.log_report(runs, parent_id)
                print(f"sweep report: {sweep_dir / 'report' / 'summary.md'}")
                summary = _describe_sweep(client, config.tracking.uri, parent_id, f"sweep {sweep_dir.name}", runs)
        except Exception as error:  # the runs are safe; only the summary is missing
            failed.append({"name": "the sweep report", "error": str(error).splitlines()[0]})
        finally:
            client.set_tag(parent_id, "specbench.jobs", f"{len(run_ids)} finished, {len(failed)} failed")
            client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))
        print(summary, end="", flush=True)
        if failed:
            names = ", ".join(f"{s['name']} ({s.get('error', 'unknown error')})" for s in failed)
            print(f"error: {len(failed)} of {len(statuses)} configurations failed: {names}", file=sys.stderr)
            sys.exit(1)


def _describe_sweep(client: MlflowClient, tracking_uri: str, parent_id: str, name: str, runs: pd.DataFrame) -> str:
    """Set the report's table as the parent run's description; return the console summary of the sweep."""
    from specbench.report import summary_table
    from specbench.report.files import ARTIFACT_DIR, table_markdown

    description = f"### {name}: {len(runs)} finished runs\n\n{table_markdown(summary_table(runs))}\n\n"
    description += f"Plots and the table as CSV: the `{ARTIFACT_DIR}/` artifacts of this run.\n"
    tracking.set_description(parent_id, description, f"the {ARTIFACT_DIR}/summary.md artifact")
    experiment_id = client.get_run(parent_id).info.experiment_id
    return console.sweep_summary(name, runs, console.where_to_look(tracking_uri, experiment_id, parent_id, "The sweep"))
