"""Sweeps past one process and through faults: joblib into a tracking server, resume, failure isolation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import specbench.cli
import specbench.pipeline
import specbench.runner
from tests.test_cli import RUN_ARTIFACTS, all_artifacts, common_args, run_cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ["cost_curve=false", "quality.perplexity=false", "quality.embedder=none"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_until(process: subprocess.Popen, marker: str, count: int = 1) -> list[str]:
    """Read the process's output line by line until `marker` has appeared `count` times (or it exits)."""
    lines, seen = [], 0
    for line in process.stdout:
        lines.append(line)
        seen += marker in line
        if seen >= count:
            return lines
    raise AssertionError(f"process ended before printing {marker!r} {count} times:\n{''.join(lines[-30:])}")


@pytest.fixture
def tracking_server(tmp_path):
    """`mlflow server` on loopback with a SQLite backend and proxied artifacts, as `make server` starts it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        read_until(server, "Uvicorn running on")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)


def sweep_runs(uri: str, experiment: str = "specbench"):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return [r for r in runs if "k" not in r.data.params], [r for r in runs if "k" in r.data.params]


def test_parallel_joblib_sweep_into_a_tracking_server(models_dir, pubmedqa_file, tmp_path, tracking_server):
    args = [
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "draft=distilgpt2", "k=2,3",
        *common_args(models_dir, pubmedqa_file, tmp_path), f"tracking.uri={tracking_server}", "quality.embedder=none",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parents, children = sweep_runs(tracking_server)
    assert len(parents) == 1 and len(children) == 2
    client = MlflowClient()
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"speedup", "acceptance_rate", "disagreement_rate"} <= set(run.data.metrics)
        assert set(RUN_ARTIFACTS) <= all_artifacts(client, run.info.run_id)
    assert len({r.data.tags["specbench.config_hash"] for r in children}) == 2


def test_interrupted_sweep_resumes_without_duplicates(models_dir, pubmedqa_file, tmp_path):
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = ["-m", "draft=distilgpt2,gpt2", "k=2,3", *common_args(models_dir, pubmedqa_file, tmp_path), *FAST]
    first = subprocess.Popen(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    read_until(first, "#2 : ")  # Hydra launches the third job: the first two have finished
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=300)[0]
    assert first.returncode != 0 and "rerun with resume=true" in output

    parents, children = sweep_runs(store)
    finished_before = {r.data.tags["specbench.config_hash"] for r in children if r.info.status == "FINISHED"}
    assert 2 <= len(finished_before) < 4
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    assert parents[0].info.status == "KILLED"

    again = subprocess.run(
        [sys.executable, "-m", "specbench", *args, "resume=true"], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    _, children = sweep_runs(store)
    finished = [r.data.tags["specbench.config_hash"] for r in children if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 4  # one FINISHED run per configuration, none duplicated
    assert finished_before <= set(finished)  # nothing lost: the earlier runs are the ones kept


def test_a_failing_job_is_isolated_and_reported(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-models"
    empty.mkdir()
    args = ["-m", f"models_dir={models_dir},{empty}", *common_args(models_dir, pubmedqa_file, tmp_path)[1:], *FAST]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 1
    summary = [line for line in err.splitlines() if line.startswith("error: 1 of 2 configurations failed")]
    assert len(summary) == 1 and "cannot load" in summary[0]
    parents, children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "cannot load" in failed.data.tags["error"]
    assert "error.txt" in all_artifacts(MlflowClient(), failed.info.run_id)
    assert parents[0].info.status == "FAILED"


def test_ctrl_c_keeps_the_prompts_already_decoded(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    real_decode_prompts = specbench.runner.decode_prompts

    def interrupted_after_one(setup, cfg, progress=True):
        for outcome in real_decode_prompts(setup, cfg, progress):
            yield outcome
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the second prompt decodes

    monkeypatch.setattr(specbench.pipeline, "decode_prompts", interrupted_after_one)
    code, _, err = run_cli([*common_args(models_dir, pubmedqa_file, tmp_path), *FAST], monkeypatch, capsys)
    assert code == 130 and "marked KILLED" in err
    _, (run,) = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["error"]
    table = MlflowClient().download_artifacts(run.info.run_id, "per_prompt.csv", str(tmp_path))
    assert len(Path(table).read_text().strip().splitlines()) == 2  # header + the one finished prompt


def test_unwritable_store_is_one_sentence(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store folder should be")
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), f"tracking.uri=sqlite:///{blocker}/mlflow.db"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 1 and "error: cannot create" in err and "set tracking.uri" in err
    if os.geteuid() != 0:  # root ignores permission bits
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        args[-1] = f"tracking.uri=sqlite:///{read_only}/mlflow.db"
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 1 and "is read-only" in err


def test_submitit_local_launcher_config(models_dir, pubmedqa_file, tmp_path, tracking_server):
    """The shipped `hydra/launcher=local_processes` (submitit, the SLURM code path) runs jobs in their own processes."""
    args = [
        "-m", "hydra/launcher=local_processes", "draft=distilgpt2,gpt2",
        *common_args(models_dir, pubmedqa_file, tmp_path), f"tracking.uri={tracking_server}", *FAST,
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parents, children = sweep_runs(tracking_server)
    assert len(parents) == 1 and sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]


def test_a_sweep_whose_jobs_are_refused_at_composition_ends_its_parent_failed(
    models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys
):
    """`specbench -m k=2,4 no_such_key=1,2`: the parent run exists before any job composes; it must not stay RUNNING."""
    args = ["-m", "k=2,4", "no_such_key=1,2", *common_args(models_dir, pubmedqa_file, tmp_path)]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "error: 'no_such_key' is not a setting" in err
    parents, children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(parents) == 1 and not children
    assert parents[0].info.status == "FAILED"
    assert "'no_such_key' is not a setting" in parents[0].data.tags["error"]
