"""The real CLI, end to end: a multirun into a temporary MLflow store, model sharing, and every bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import specbench.cli
import specbench.job
import specbench.models
from specbench.testing import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

RUN_METRICS = [
    "baseline_latency_p50_s",
    "baseline_latency_p95_s",
    "spec_latency_p50_s",
    "spec_latency_p95_s",
    "baseline_ms_per_token_p50",
    "baseline_ms_per_token_p95",
    "spec_ms_per_token_p50",
    "spec_ms_per_token_p95",
    "baseline_ttft_p50_s",
    "spec_ttft_p50_s",
    "baseline_tokens_per_s",
    "spec_tokens_per_s",
    "speedup",
    "acceptance_rate",
    "mean_accepted_tokens",
    "disagreement_rate",
    "exact_match_rate",
    "cost_per_query_usd_baseline",
    "cost_per_query_usd_spec",
    "cost_per_1k_tokens_usd_baseline",
    "cost_per_1k_tokens_usd_spec",
    "cost_saving_pct",
    "rougeL_vs_baseline",
    "bleu_vs_baseline",
    "semantic_similarity_vs_baseline",
    "perplexity_baseline",
    "perplexity_spec",
    "draft_verifier_cost_ratio",
    "predicted_speedup",
    "best_k_predicted",
    "speedup_ci_low",
    "speedup_ci_high",
    "acceptance_rate_ci_low",
    "acceptance_rate_ci_high",
    "spec_latency_p50_s_ci_low",
    "spec_latency_p95_s_ci_high",
]
RUN_ARTIFACTS = [
    "per_prompt.csv",
    "generations.jsonl",
    "steps.csv",
    "config.yaml",
    "summary.md",
    "verify_cost_curve.csv",
    "plots/latency.png",
    "plots/throughput.png",
    "plots/acceptance.png",
    "plots/speedup.png",
    "plots/drafters.png",
    "plots/disagreement.png",
]


def common_args(models_dir: Path, data: Path, tmp_path: Path) -> list[str]:
    return [
        f"models_dir={models_dir}",
        "dtype=float32",  # greedy outputs are exactly equal in float32; `auto` measures (tests/test_dtype_probe.py)
        f"dataset.path={data}",
        "dataset.num_samples=2",
        "generation.max_new_tokens=8",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"hydra.run.dir={tmp_path}/outputs",
        f"hydra.sweep.dir={tmp_path}/multirun",
        "cost_batch_grid=[1,2]",  # the speedup model's batch grid: two sizes keep its path, the whole grid costs ~4 s
    ]


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `specbench ARGS` in this process; return (exit code, stdout, stderr)."""
    # Hydra's logging would bind handlers to pytest's captured stderr, which closes after the test.
    quiet = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    monkeypatch.setattr(sys, "argv", ["specbench", *args, *quiet])
    code = 0
    try:
        specbench.cli.main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        logging.getLogger().handlers.clear()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def all_artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_seed_sweep_through_the_real_cli(models_dir, pubmedqa_file, tmp_path):
    """`python -m specbench -m draft=... k=...` (2 drafts of two architectures x 2 k) gives 4 complete runs under one
    parent."""
    args = ["-m", "draft=distilgpt2,gpt_neo_125m", "k=2,4", *common_args(models_dir, pubmedqa_file, tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "specbench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    parents = [run for run in runs if "k" not in run.data.params]
    children = [run for run in runs if "k" in run.data.params]
    assert len(parents) == 1 and len(children) == 4
    assert {(r.data.params["draft.name"], r.data.params["k"]) for r in children} == {
        (draft, k) for draft in ("distilgpt2", "gpt_neo_125m") for k in ("2", "4")
    }
    client = MlflowClient()
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        tags = set(run.data.tags)
        assert {"mlflow.source.git.commit", "git.dirty", "torch.version", "transformers.version", "device.name"} <= tags
        assert "git.commit" not in run.data.tags  # MLflow's own tag holds it
        k = int(run.data.params["k"])
        expected = RUN_METRICS + [f"acceptance_rate_pos_{i}" for i in range(1, k + 1)]
        expected.append(f"acceptance_rate_{run.data.params['draft.name']}")
        assert not set(expected) - set(run.data.metrics), run.data.params["draft.name"]
        assert run.data.metrics["disagreement_rate"] == 0.0  # greedy float32: identical outputs
        assert set(RUN_ARTIFACTS) <= all_artifacts(client, run.info.run_id)
        table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_prompt.csv", str(tmp_path)))
        assert len(table) == 2 and table["identical"].all() and table["pubid"].tolist() == [1000, 1001]
        generations = Path(client.download_artifacts(run.info.run_id, "generations.jsonl", str(tmp_path)))
        lines = [json.loads(line) for line in generations.read_text().splitlines()]
        assert [line["baseline_text"] for line in lines] == [line["spec_text"] for line in lines]
    report = all_artifacts(client, parents[0].info.run_id)
    assert {"report/summary.md", "report/summary.csv", "report/plots/speedup_vs_k.png"} <= report
    assert parents[0].info.status == "FINISHED"


def test_jobs_share_loaded_models_and_release_unused_ones(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    loads: list[str] = []
    real_load = specbench.models.load_model

    def counting_load(spec):
        loads.append(Path(spec.source).name)
        return real_load(spec)

    monkeypatch.setattr(specbench.models, "load_model", counting_load)
    monkeypatch.setattr(specbench.job, "MODEL_CACHE", specbench.models.ModelCache())
    args = [
        "-m",
        "draft=distilgpt2,gpt2",
        "k=1,3",
        "cost_curve=false",
        "quality.perplexity=false",
        "quality.embedder=none",
    ]
    code, _, err = run_cli([*args, *common_args(models_dir, pubmedqa_file, tmp_path)], monkeypatch, capsys)
    assert code == 0, err
    assert loads == ["gpt-j-6B", "distilgpt2", "gpt2"]  # the verifier once, each draft once
    assert len(specbench.job.MODEL_CACHE._models) == 2  # distilgpt2 was released when gpt2 came in


def test_help_and_cfg_job(monkeypatch, capsys):
    code, out, _ = run_cli(["--help"], monkeypatch, capsys)
    assert code == 0 and "draft: distilgpt2, gpt2, gpt2_family" in out and "specbench -m draft=" in out
    code, out, _ = run_cli(["--cfg", "job", "k=3", "draft=gpt2_family"], monkeypatch, capsys)
    assert code == 0 and "k: 3" in out and "gpt_neo_125m:" in out and "name_or_path: EleutherAI/gpt-j-6B" in out


@pytest.fixture(scope="module")
def foreign_tokenizer_model(tmp_path_factory, models_dir) -> Path:
    """The distilgpt2 weights with a tokenizer trained to a different vocabulary."""
    folder = tmp_path_factory.mktemp("foreign")
    for item in (models_dir / "distilbert" / "distilgpt2").iterdir():
        if item.name.startswith("model") or item.name.startswith("config"):
            (folder / item.name).write_bytes(item.read_bytes())
    train_tokenizer(vocab_size=350).save_pretrained(folder)
    return folder


BAD_INPUTS = [
    (["k=0"], "k=0 is invalid"),
    (["k=-1"], "k=-1 is invalid"),
    (["k=abc"], "k: Value 'abc'"),
    (["batch_size=0"], "batch_size=0 is invalid"),
    (["batch_size=-2"], "batch_size=-2 is invalid"),
    (["batch_size=two"], "batch_size: Value 'two'"),
    (["draft=nonexistent"], "'nonexistent' is not a draft option: choose one of distilgpt2"),
    (["verifier=gptj"], "'gptj' is not a verifier option"),
    (["dataset=pubmed"], "'pubmed' is not a dataset option"),
    (["generaton.max_new_tokens=5"], "did you mean generation?"),
    (["generation.max_new_tokens=0"], "generation.max_new_tokens=0 is invalid"),
    (["generation.max_new_tokens=-3"], "generation.max_new_tokens=-3 is invalid"),
    (["generation.temperature=0", "generation.do_sample=true"], "generation.temperature=0.0 is invalid"),
    (["dataset.num_samples=50"], "has only 8 records"),
    (["dataset.path=/no/such/file.jsonl"], "dataset.path=/no/such/file.jsonl does not exist"),
    (["device=cuda"], "no CUDA GPU is visible"),
    (["tracking.uri=http://127.0.0.1:9"], "is unreachable"),
    (["generation.max_new_tokens=600"], "leaves no room for a prompt"),
    (["generation.max_new_tokens=505"], "tokens without any abstract"),
    (["generation.max_new_tokens=505"], "set dataset.too_long=skip to leave such prompts out"),
    (["dataset.too_long=cut"], "dataset.too_long: Invalid value 'cut', expected one of [error, skip, truncate]"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_fails_in_one_sentence_before_loading_models(
    overrides, message, models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(specbench.job, "MODEL_CACHE", specbench.models.ModelCache())
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), *overrides]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not specbench.job.MODEL_CACHE._models


def test_broken_jsonl_names_the_line(models_dir, tmp_path, monkeypatch, capsys, pubmedqa_file):
    broken = tmp_path / "broken.jsonl"
    lines = pubmedqa_file.read_text().splitlines()
    broken.write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n")
    args = [*common_args(models_dir, broken, tmp_path)]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code != 0 and f"error: {broken}:2: not valid JSON" in err


def test_foreign_tokenizer_is_refused_and_the_run_marked_failed(
    models_dir, pubmedqa_file, foreign_tokenizer_model, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(specbench.job, "MODEL_CACHE", specbench.models.ModelCache())
    args = [
        *common_args(models_dir, pubmedqa_file, tmp_path),
        f"draft.drafters.distilgpt2.name_or_path={foreign_tokenizer_model}",
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code != 0
    assert "error: draft 'distilgpt2' does not share the tokenizer of verifier 'gpt_j_6b'" in err
    assert not specbench.job.MODEL_CACHE._models
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    assert run.info.status == "FAILED" and "does not share the tokenizer" in run.data.tags["error"]
    assert "error.txt" in all_artifacts(MlflowClient(), run.info.run_id)
