"""Where a run's results show: the console at its end, its MLflow description, and MLflow's UI in a real browser.

One small sweep through the real CLI (tiny models, a temporary SQLite store) feeds every test;
`specbench ui` serves that store; headless Chromium renders the URLs the runs printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from specbench import ui
from tests.test_cli import common_args

ROOT = Path(__file__).resolve().parents[1]
FAST = ["cost_curve=false", "quality.perplexity=false", "quality.embedder=none"]


@pytest.fixture(scope="module")
def sweep(models_dir, pubmedqa_file, tmp_path_factory):
    """A two-run sweep through the real CLI: (store URI, stdout, experiment id, parent run, child runs)."""
    tmp_path = tmp_path_factory.mktemp("ui")
    args = ["-m", "draft=distilgpt2", "k=2,3", *FAST, *common_args(models_dir, pubmedqa_file, tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    parents = [run for run in runs if "k" not in run.data.params]
    children = sorted((run for run in runs if "k" in run.data.params), key=lambda run: run.data.params["k"])
    assert len(parents) == 1 and len(children) == 2
    return uri, done.stdout, parents[0].info.experiment_id, parents[0], children


@pytest.fixture(scope="module")
def served(sweep):
    """`specbench ui` on the sweep's store: (port, the lines it printed)."""
    port = ui.free_port()
    with ui.serve(sweep[0], port) as printed:
        yield port, printed


def test_every_run_and_the_sweep_print_their_figures_and_urls(sweep):
    uri, stdout, experiment_id, parent, children = sweep
    base = "http://127.0.0.1:5000/#/experiments"
    table = f"All runs: {base}/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=specbench"
    serve = f"(serve them with `specbench ui --tracking-uri {uri}`)"
    for child in children:
        block = stdout.split(f"gpt_j_6b + distilgpt2, k={child.data.params['k']}, 2 prompts")[1].split(serve)[0]
        for label in ("Speedup", "Acceptance rate", "Throughput", "Disagreement", "Cost saving"):
            assert f"\n  {label} " in block
        assert re.search(r"\n  Disagreement +0 of 2 prompts\n", block)  # greedy float32: none, so no near-tie
        speedup = child.data.metrics["speedup"]
        bound = r"[0-9][0-9.,e+-]*x"  # Metric.format: 3 significant digits, or thousands with commas (n = 2: wide)
        assert re.search(rf"Speedup +{speedup:.3g}x \[{bound}, {bound}\]", block)
        assert f"This run: {base}/{experiment_id}/runs/{child.info.run_id}?workflowType=machine_learning" in block
        assert table in block
    sweep_block = stdout.split("sweep multirun: 2 finished runs\n")[1]
    rows = sweep_block.splitlines()[1:3]
    assert [row.split()[0] for row in rows] == [  # fastest first
        child.info.run_name for child in sorted(children, key=lambda run: -run.data.metrics["speedup"])
    ]
    assert f"The sweep: {base}/{experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning" in sweep_block


def test_descriptions_are_the_run_summary_and_the_sweep_table(sweep, tmp_path):
    _, _, _, parent, children = sweep
    client = MlflowClient()
    for child in children:
        summary = Path(client.download_artifacts(child.info.run_id, "summary.md", str(tmp_path))).read_text()
        assert child.data.tags["mlflow.note.content"] == summary
    report = Path(client.download_artifacts(parent.info.run_id, "report/summary.md", str(tmp_path))).read_text()
    description = client.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
    assert description.startswith("### sweep multirun: 2 finished runs\n\n")
    assert report.strip() in description and "| draft | k |" in report


def test_specbench_ui_prints_the_runs_table_url(sweep, served):
    _, _, experiment_id, _, _ = sweep
    port, printed = served
    url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert f"  specbench: {url}&viewStateShareKey=specbench" in printed
    assert f"starting the MLflow UI at http://127.0.0.1:{port} (Ctrl-C stops it)" in printed


@pytest.mark.skipif(ui.chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_the_printed_urls_open_the_runs_table_and_the_run_description_in_a_browser(sweep, served):
    _, stdout, experiment_id, parent, children = sweep
    port, printed = served
    runs_table = next(line.split(": ", 1)[1] for line in printed if line.startswith("  specbench: "))
    dom = ui.render(runs_table)
    assert f"<title>Runs - Experiment {experiment_id} - MLflow" in dom  # not the GenAI overview
    assert 'data-testid="sort-header-Run Name"' in dom and ">sweep multirun<" in dom
    for column in ("speedup", "acceptance_rate", "spec_tokens_per_s", "baseline_tokens_per_s", "k", "draft.name"):
        assert f'data-testid="sort-header-{column}"' in dom, column  # the saved view's columns

    def printed_page(run_id: str) -> str:
        url = next(line.split(": ", 1)[1] for line in stdout.splitlines() if run_id in line)
        return ui.render(url.replace("127.0.0.1:5000", f"127.0.0.1:{port}"))

    child = children[0]
    dom = printed_page(child.info.run_id)
    assert child.info.run_name in dom
    assert f"gpt_j_6b + distilgpt2, k={child.data.params['k']}" in dom  # the description's heading, rendered
    assert "<th>Speculative</th>" in dom and "Speedup (x)</td>" in dom  # its table, rendered
    dom = printed_page(parent.info.run_id)
    assert "sweep multirun: 2 finished runs" in dom and "<th>draft</th>" in dom
