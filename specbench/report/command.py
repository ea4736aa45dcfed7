"""`specbench report`: compare the runs of an experiment or a sweep, print the table, write the files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from specbench.report.categories import category_table
from specbench.report.files import ARTIFACT_DIR, log_report, table_markdown, write_report
from specbench.report.query import load_runs, summary_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `specbench report`."""
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--experiment", default="specbench", help="MLflow experiment name")
    parser.add_argument("--parent-run-id", help="only the runs of this sweep (its parent run id)")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>)")
    parser.add_argument("--log-to-parent", action="store_true", help="also log the report to the parent run")


def run(args: argparse.Namespace) -> int:
    """Compare runs, print the table, write the report (and log it to the sweep's parent run)."""
    try:
        if args.log_to_parent and not args.parent_run_id:
            raise ValueError("--log-to-parent needs --parent-run-id: pass the sweep's parent run id.")
        runs = load_runs(args.tracking_uri, args.experiment, args.parent_run_id)
        out_dir = args.out or Path("reports") / args.experiment
        paths = write_report(runs, out_dir)
        if args.log_to_parent:
            log_report(runs, args.parent_run_id)
    except (ValueError, MlflowException, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table_markdown(summary_table(runs)))
    by_category = category_table(runs)
    if not by_category.empty:
        print(f"\nBy category:\n\n{table_markdown(by_category)}")
    print(f"\n{len(runs)} runs; wrote {len(paths)} files to {out_dir}: summary.md, summary.csv, plots/*.png")
    if args.log_to_parent:
        print(f"logged to run {args.parent_run_id} under {ARTIFACT_DIR}/")
    return 0
