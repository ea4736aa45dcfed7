"""A built wheel works outside the checkout: configs, sample data and sweeps come from the installed package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """specbench built as a wheel and installed (without dependencies) into a folder of its own."""
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "-w", str(wheels)], check=True, timeout=600)
    (wheel,) = wheels.glob("specbench-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=600)
    return target


def specbench(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed console script, run from `cwd` with only the installed copy of specbench importable."""
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(installed / "bin" / "specbench"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_installed_package_holds_its_configs(installed, tmp_path):
    probe = subprocess.run(
        [sys.executable, "-c", "import specbench.conf, specbench.sweeps; print(specbench.conf.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(probe.stdout.strip()).is_relative_to(installed)
    for path in ("conf/config.yaml", "conf/draft/distilgpt2.yaml", "sweeps/offline_sweep.yaml"):
        assert (installed / "specbench" / path).is_file(), path
    assert (installed / "specbench" / "samples" / "sample_qa.jsonl").is_file()


def test_cfg_job_help_and_the_offline_preset_from_another_folder(installed, tmp_path):
    done = specbench(installed, tmp_path, "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert "name_or_path: EleutherAI/gpt-j-6B" in done.stdout
    done = specbench(installed, tmp_path, "experiment=offline", "--cfg", "job", "--resolve")
    assert done.returncode == 0, done.stderr
    sample = installed / "specbench" / "samples" / "sample_qa.jsonl"
    assert f"path: {sample}" in done.stdout
    done = specbench(installed, tmp_path, "--help")
    assert done.returncode == 0 and "draft: distilgpt2, gpt2, gpt2_family" in done.stdout
    done = specbench(installed, tmp_path, "--config-name", "offline_sweep", "--cfg", "hydra")
    assert done.returncode == 0 and "draft: qwen2_5_coder_0_5b_int8,prompt_lookup" in done.stdout


def test_a_tiny_run_from_another_folder(installed, tmp_path, models_dir, pubmedqa_file):
    done = specbench(
        installed,
        tmp_path,
        f"models_dir={models_dir}",
        f"dataset.path={pubmedqa_file}",
        "dataset.num_samples=1",
        "generation.max_new_tokens=4",
        "cost_curve=false",
        "quality.perplexity=false",
        "quality.embedder=none",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()  # the default store, in the working folder
