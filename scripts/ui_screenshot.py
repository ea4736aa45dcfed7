"""Screenshots of MLflow's UI where specbench opens it: an experiment's runs table and its latest run's page.

    python scripts/ui_screenshot.py                         # the store `make run` logs to, its latest experiment
    python scripts/ui_screenshot.py --experiment offline --out docs/

Starts `specbench ui` on a free port (as `make ui` does), renders the URL it prints
and the latest run's page with headless Chromium (Debian: `apt-get install chromium`),
and writes runs-table.png and run-page.png. The README's screenshot came from here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow

from specbench import tracking, ui
from specbench.config import TrackingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=TrackingConfig.uri)
    parser.add_argument("--experiment", help="default: the experiment with the latest specbench run")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    if ui.chromium() is None:
        raise SystemExit("error: no chromium on PATH: install it (Debian: apt-get install chromium).")
    port = ui.free_port()
    base_url = f"http://127.0.0.1:{port}"
    urls = ui.experiment_urls(args.tracking_uri, base_url, args.experiment)
    if not urls:
        raise SystemExit(f"error: no specbench runs in {args.tracking_uri}: run `make run` first.")
    name, runs_table = urls[0]
    experiment = mlflow.get_experiment_by_name(name)
    [latest] = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.CONFIG_HASH_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    size = {"width": args.width, "height": args.height}
    with ui.serve(args.tracking_uri, port):
        ui.screenshot(runs_table, args.out / "runs-table.png", **size)
        run_page = tracking.run_url(base_url, experiment.experiment_id, latest.info.run_id)
        ui.screenshot(run_page, args.out / "run-page.png", **size)
    print(f"{args.out / 'runs-table.png'}: {runs_table}\n{args.out / 'run-page.png'}: {run_page}")


if __name__ == "__main__":
    main()
