"""The shipped Ray launcher configs, exercised into an MLflow tracking server: a two-job sweep on a local Ray instance
(`ray_local`), and a sweep that joins a cluster started beforehand with `ray start --head` (`ray_cluster`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_cli import common_args
from tests.test_sweeps import FAST, ROOT, free_port, sweep_runs, tracking_server  # noqa: F401 (a fixture)

pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="make install installs the Ray launcher")


def processes_naming(folder: Path) -> list[int]:
    """Ids of the processes whose command line names `folder`: the Ray processes of this test's instance."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return found


@pytest.fixture
def ray_dir():
    """Ray's state folder for this test (short: Ray's socket paths must stay under 108 bytes); removed afterwards,
    with any Ray process of this instance still running."""
    folder = Path(tempfile.mkdtemp(prefix="sbray", dir="/tmp"))
    yield folder
    for pid in processes_naming(folder):
        with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def ray_environment(ray_dir: Path) -> dict[str, str]:
    """Ray keeps its state under RAY_TMPDIR (not /tmp/ray), writes no auth token and sends no usage stats."""
    return {**os.environ, "RAY_TMPDIR": str(ray_dir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def test_ray_launcher_sweep_into_a_tracking_server(models_dir, pubmedqa_file, tmp_path, tracking_server, ray_dir):  # noqa: F811
    args = [
        "-m", "hydra/launcher=ray_local", "draft=distilgpt2", "k=2,3",
        *common_args(models_dir, pubmedqa_file, tmp_path), f"tracking.uri={tracking_server}", *FAST,
    ]  # fmt: skip
    env = ray_environment(ray_dir)
    done = subprocess.run(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Ray Launcher is launching 2 jobs" in output and "(_run_job pid=" in output  # jobs ran as Ray tasks
    assert any(ray_dir.glob("ray/session_*"))  # on the instance this test started
    (parent,), children = sweep_runs(tracking_server)
    assert len(children) == 2 and {run.info.status for run in children} == {"FINISHED"}
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert {(run.data.params["draft.name"], run.data.params["k"]) for run in children} == {
        ("distilgpt2", "2"),
        ("distilgpt2", "3"),
    }
    assert parent.info.status == "FINISHED"


def test_ray_cluster_launcher_joins_a_running_cluster(models_dir, pubmedqa_file, tmp_path, tracking_server, ray_dir):  # noqa: F811
    """`hydra/launcher=ray_cluster` as its config says to use it, on a one-node cluster without GPUs."""
    port = free_port()
    env = ray_environment(ray_dir) | {"RAY_ADDRESS": f"127.0.0.1:{port}"}
    ray = str(Path(sys.executable).with_name("ray"))
    head = [ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        args = [
            "-m", "hydra/launcher=ray_cluster", "hydra.launcher.ray.remote.num_gpus=0", "draft=distilgpt2,gpt2", "k=2",
            *common_args(models_dir, pubmedqa_file, tmp_path), f"tracking.uri={tracking_server}", *FAST,
        ]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "specbench", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Ray Launcher is launching 2 jobs" in output
    joined = [line for line in output.splitlines() if "Connecting to existing Ray cluster at address:" in line]
    assert joined and f":{port}" in joined[0]  # the head started above (named by the node's address), not a new one
    (parent,), children = sweep_runs(tracking_server)
    assert {run.info.status for run in children} == {"FINISHED"} and len(children) == 2
    assert {run.data.params["draft.name"] for run in children} == {"distilgpt2", "gpt2"}
    assert parent.info.status == "FINISHED"
