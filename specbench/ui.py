"""`specbench ui`: MLflow's UI on a store, opened where specbench's runs are.

It prints the URL of each experiment's runs table in the specbench view (the
headline metrics as columns, fastest first), then becomes `mlflow ui`. MLflow 3.x
otherwise opens an experiment on its GenAI overview, empty for specbench.

`serve` starts it in the background, and `render` and `screenshot` look at a page
with headless Chromium: the browser test and `scripts/ui_screenshot.py` use them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from specbench import tracking
from specbench.config import TrackingConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `specbench ui`; options it does not know go to `mlflow ui` (e.g. --workers 1)."""
    parser.add_argument("--tracking-uri", default=TrackingConfig.uri, help="the MLflow store (default: %(default)s)")
    parser.add_argument("--experiment", help="print only this experiment's URL (default: every one with runs)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)


def experiment_urls(tracking_uri: str, base_url: str, experiment: str | None = None) -> list[tuple[str, str]]:
    """(name, runs-table URL) of each experiment holding specbench runs, the most recently used first.

    Experiments that older versions created get the specbench view on the way.
    """
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        experiments = [found] if found is not None else []
    else:
        experiments = client.search_experiments()
    latest = []
    for entry in experiments:
        runs = client.search_runs(
            [entry.experiment_id],
            filter_string=f"tags.`{tracking.CONFIG_HASH_TAG}` LIKE '%'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            tracking.tag_experiment(entry.experiment_id, entry.tags)
            latest.append((runs[0].info.start_time, entry))
    latest.sort(key=lambda pair: pair[0], reverse=True)
    return [(entry.name, tracking.runs_table_url(base_url, entry.experiment_id)) for _, entry in latest]


def run(args: argparse.Namespace) -> int:
    """Print where the runs are, then exec `mlflow ui` (a tracking server serves its own UI: only print)."""
    base_url = f"http://{args.host}:{args.port}"
    if args.tracking_uri.startswith(("http://", "https://")):
        base_url = tracking.ui_base_url(args.tracking_uri)
        for name, url in experiment_urls(args.tracking_uri, base_url, args.experiment):
            print(f"{name}: {url}")
        print(f"{args.tracking_uri} is a tracking server: it serves its own UI at {base_url}")
        return 0
    database = tracking.sqlite_path(args.tracking_uri)
    if database is not None and not database.is_file():
        print(f"no runs yet in {database}: run `make run` (or `specbench experiment=offline`) first.")
        database.parent.mkdir(parents=True, exist_ok=True)
    else:
        urls = experiment_urls(args.tracking_uri, base_url, args.experiment)
        if urls:
            print("the runs of each specbench experiment (latest first):")
        else:
            print(f"no specbench runs in {args.experiment or 'any experiment'} of {args.tracking_uri} yet.")
        for name, url in urls:
            print(f"  {name}: {url}")
    print(f"starting the MLflow UI at {base_url} (Ctrl-C stops it)", flush=True)
    command = ["mlflow", "ui", "--backend-store-uri", args.tracking_uri, "--host", args.host, "--port", str(args.port)]
    os.execv(sys.executable, [sys.executable, "-m", *command, *args.mlflow_args])
    return 0  # not reached: exec replaced this process


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve(tracking_uri: str, port: int, cwd: Path | None = None, timeout_s: float = 120) -> Iterator[list[str]]:
    """Run `specbench ui` on `port` in the background until the block ends; yield the lines it printed first.

    The UI runs in its own process group, which is stopped as a whole (MLflow starts workers).
    """
    command = [sys.executable, "-m", "specbench", "ui", "--tracking-uri", tracking_uri, "--port", str(port)]
    environment = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: starts faster
    with tempfile.TemporaryFile("w+") as output:  # a file, not a pipe: nobody drains the server's output
        server = subprocess.Popen(
            [*command, "--workers", "1"],
            cwd=cwd,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            try:
                _wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout_s)
            except (RuntimeError, TimeoutError) as error:
                output.seek(0)
                raise RuntimeError(f"{error}; it printed:\n{output.read()[-3000:]}") from error
            output.seek(0)
            yield output.read().splitlines()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _wait_until_healthy(base_url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if server.poll() is not None:
                raise RuntimeError(f"the MLflow UI exited with code {server.returncode} before answering") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"the MLflow UI did not answer at {base_url} within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def chromium() -> str | None:
    """The headless-capable Chromium on PATH (Debian's `chromium` package), if any."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _headless(width: int, height: int) -> list[str]:
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH: install it (Debian: apt-get install chromium)")
    # --virtual-time-budget lets the single-page app fetch and render before the page is read
    options = [f"--window-size={width},{height}", "--virtual-time-budget=15000", "--hide-scrollbars"]
    options += ["--headless=new", "--disable-gpu", "--disable-dev-shm-usage"]
    if os.geteuid() == 0:
        options.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return [browser, *options]


def render(url: str, width: int = 1600, height: int = 1000) -> str:
    """The page's DOM once MLflow's app has rendered it, from headless Chromium."""
    done = subprocess.run([*_headless(width, height), "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return done.stdout


def screenshot(url: str, path: Path, width: int = 1600, height: int = 1000) -> None:
    """A PNG of the page once MLflow's app has rendered it, from headless Chromium."""
    subprocess.run(
        [*_headless(width, height), f"--screenshot={path}", url], capture_output=True, timeout=120, check=True
    )
