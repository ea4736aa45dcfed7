"""Issue 13 through the real CLI, read back from MLflow: a per-category sweep of the shipped prompt file, PubMedQA
accuracy with a hub model at a pinned revision, the dataset input, tables across runs, the acceptance-by-position
series, system metrics, tags and progress lines; and bad prompt-set input in one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import specbench.cli
import specbench.job
import specbench.models
from specbench.answers import parse_decision
from specbench.config import SAMPLES_PACKAGE, DatasetConfig, package_file
from specbench.data import Record
from specbench.models import ModelSpec, model_revision
from specbench.testing import make_model, train_tokenizer
from specbench.tracking import GIT_COMMIT_TAG, log_dataset, source_tags
from tests.test_cli import all_artifacts, run_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = package_file(SAMPLES_PACKAGE, "prompts_sample.jsonl")
CATEGORIES = {"qa", "translation", "summarization", "math_reasoning"}
HUB_ID, HUB_COMMIT = "acme/tiny-verifier", "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Store:
    uri: str
    children: list[Run]  # the per-category sweep's runs (k=1, k=2)
    parent: Run
    accuracy: Run  # the PubMedQA run with a hub verifier
    sweep_output: str


def specbench_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "specbench", *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write_hub_cache(root: Path) -> Path:
    """A HuggingFace hub cache with one tiny model (the shared tokenizer) at HUB_COMMIT, `main` pointing at it."""
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_COMMIT
    tokenizer = train_tokenizer()
    make_model("gpt2", len(tokenizer), seed=30, layers=2).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return root


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, models_dir, pubmedqa_file) -> Store:
    root = tmp_path_factory.mktemp("issue13")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    common = [
        f"models_dir={models_dir}",
        "dtype=float32",
        "generation.max_new_tokens=8",
        "quality.embedder=none",
        "quality.perplexity=false",
        "cost_batch_grid=[1,2]",
        f"tracking.uri={uri}",
        f"hydra.run.dir={root}/outputs",
        f"hydra.sweep.dir={root}/multirun",
    ]
    sweep = specbench_cli(
        "-m",
        "k=1,2",
        "dataset=prompts",
        "dataset.per_category=1",
        "tracking.system_metrics=true",
        *common,
        env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )
    specbench_cli(
        "dataset=pubmedqa_answer",
        f"dataset.path={pubmedqa_file}",
        "dataset.num_samples=2",
        f"verifier.name_or_path={HUB_ID}",
        "verifier.revision=main",
        "cost_curve=false",
        *common,
        env={"HF_HUB_CACHE": str(write_hub_cache(root / "hub"))},
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    (parent,) = [run for run in runs if "k" not in run.data.params]
    children = sorted((run for run in runs if run.data.params.get("dataset.name") == "prompts"), key=_k)
    (accuracy,) = [run for run in runs if run.data.params.get("dataset.name") == "pubmedqa"]
    return Store(uri, children, parent, accuracy, sweep.stdout + sweep.stderr)


@pytest.fixture
def store(module_store: Store) -> Store:
    """The module's store, with MLflow pointed at it and its experiment (other tests move both)."""
    mlflow.set_tracking_uri(module_store.uri)
    mlflow.set_experiment("specbench")
    return module_store


def _k(run: Run) -> int:
    return int(run.data.params["k"])


def per_prompt(run: Run, folder: Path) -> pd.DataFrame:
    return pd.read_csv(MlflowClient().download_artifacts(run.info.run_id, "per_prompt.csv", str(folder)))


def test_per_category_figures_are_ratios_of_sums_of_the_per_prompt_table(store, tmp_path):
    assert [_k(run) for run in store.children] == [1, 2]
    for run in store.children:
        table = per_prompt(run, tmp_path)
        assert set(table["category"]) == CATEGORIES and len(table) == 4  # dataset.per_category=1
        for category, rows in table.groupby("category"):
            metrics = run.data.metrics
            speedup = rows["baseline_latency_s"].sum() / rows["spec_latency_s"].sum()
            assert metrics[f"speedup_cat_{category}"] == pytest.approx(speedup)
            assert metrics[f"acceptance_rate_cat_{category}"] == pytest.approx(
                rows["accepted"].sum() / rows["proposed"].sum()
            )
            tokens_per_s = rows["spec_tokens"].sum() / rows["spec_latency_s"].sum()
            assert metrics[f"spec_tokens_per_s_cat_{category}"] == pytest.approx(tokens_per_s)
            assert metrics[f"mean_accepted_tokens_cat_{category}"] == pytest.approx(
                (rows["spec_tokens"] - 1).sum() / rows["steps"].sum()
            )
        assert "plots/categories.png" in all_artifacts(MlflowClient(), run.info.run_id)
    assert not any("_cat_" in key for key in store.accuracy.data.metrics)


def test_the_sweep_report_has_a_category_table(store, tmp_path):
    assert {"report/categories.md", "report/categories.csv"} <= all_artifacts(MlflowClient(), store.parent.info.run_id)
    path = MlflowClient().download_artifacts(store.parent.info.run_id, "report/categories.csv", str(tmp_path))
    table = pd.read_csv(path)
    assert len(table) == 8 and set(table["category"]) == CATEGORIES and set(table["k"]) == {1, 2}
    by_run = table.set_index(["category", "k"])["Speedup (x)"]
    assert by_run["qa", 2] == pytest.approx(store.children[1].data.metrics["speedup_cat_qa"])


def test_the_dataset_is_an_mlflow_input_runs_can_be_filtered_by(store):
    (used,) = store.children[0].inputs.dataset_inputs
    assert used.dataset.name == "prompts" and str(SAMPLE.resolve()) in used.dataset.source
    assert {"id", "question", "category"} <= set(used.dataset.schema.replace('"', " ").split())
    assert {tag.key: tag.value for tag in used.tags} == {"mlflow.data.context": "benchmark"}
    assert used.dataset.digest == store.children[1].inputs.dataset_inputs[0].dataset.digest  # same records
    (pubmedqa,) = store.accuracy.inputs.dataset_inputs
    assert pubmedqa.dataset.name == "pubmedqa" and pubmedqa.dataset.digest != used.dataset.digest
    by_name = mlflow.search_runs(experiment_names=["specbench"], filter_string="dataset.name = 'prompts'")
    assert set(by_name["run_id"]) == {run.info.run_id for run in store.children}
    by_digest = mlflow.search_runs(
        experiment_names=["specbench"], filter_string=f"dataset.digest = '{pubmedqa.dataset.digest}'"
    )
    assert list(by_digest["run_id"]) == [store.accuracy.info.run_id]


def test_tables_join_across_runs_with_load_table(store, tmp_path):
    joined = mlflow.load_table("per_prompt.json", extra_columns=["run_id"])  # every run of the experiment
    runs = [*store.children, store.accuracy]
    assert set(joined["run_id"]) == {run.info.run_id for run in runs}
    for run in runs:
        rows = joined[joined["run_id"] == run.info.run_id].reset_index(drop=True)
        csv = per_prompt(run, tmp_path)
        assert rows["pubid"].astype(str).tolist() == csv["pubid"].astype(str).tolist()
        assert rows["spec_latency_s"].tolist() == pytest.approx(csv["spec_latency_s"].tolist())
    # the README's example: one figure per (draft, k, category) from the joined table
    params = mlflow.search_runs(experiment_names=["specbench"])[["run_id", "params.draft.name", "params.k"]]
    medians = (
        joined.merge(params, on="run_id").groupby(["params.draft.name", "params.k", "category"])["speedup"].median()
    )
    assert set(medians.index) == {("distilgpt2", k, category) for k in ("1", "2") for category in CATEGORIES}
    run_id = store.children[1].info.run_id
    steps = mlflow.load_table("steps.json", run_ids=[run_id])
    csv = pd.read_csv(MlflowClient().download_artifacts(run_id, "steps.csv", str(tmp_path)))
    assert (
        len(steps) > 0
        and steps[["step", "k", "accepted"]].values.tolist() == csv[["step", "k", "accepted"]].values.tolist()
    )


def test_acceptance_by_position_is_a_step_series(store):
    client = MlflowClient()
    for run in store.children:
        history = client.get_metric_history(run.info.run_id, "acceptance_rate_by_position")
        positions = {f"acceptance_rate_pos_{point.step}": point.value for point in history}
        assert sorted(point.step for point in history) == list(range(1, _k(run) + 1))
        assert positions == {key: value for key, value in run.data.metrics.items() if "_pos_" in key}


def test_tags_revisions_system_metrics_and_progress_lines(store):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for run in [*store.children, store.accuracy]:
        tags = run.data.tags
        assert tags[GIT_COMMIT_TAG] == head and "git.dirty" in tags and "git.commit" not in tags
        assert tags["model.distilgpt2.revision"].startswith("local: 5 files, ")
    assert store.accuracy.data.tags["model.verifier.revision"] == HUB_COMMIT
    assert HUB_ID in store.accuracy.data.tags["model.verifier"]
    for run in store.children:  # tracking.system_metrics=true
        assert "system/cpu_utilization_percentage" in run.data.metrics
    assert not any(key.startswith("system/") for key in store.accuracy.data.metrics)  # off by default
    assert "measuring step costs: verify curve at batch size 1, then batch sizes up to" in store.sweep_output
    assert "step costs measured in" in store.sweep_output


def test_source_tags_fill_in_the_commit_only_when_mlflow_did_not():
    assert source_tags({GIT_COMMIT_TAG: "set by MLflow"}) == {}
    assert len(source_tags({})[GIT_COMMIT_TAG]) == 40  # this checkout's commit


def test_pubmedqa_accuracy_is_logged_and_summarised(store, tmp_path):
    metrics = store.accuracy.data.metrics
    for mode in ("baseline", "spec"):
        assert 0 <= metrics[f"accuracy_{mode}"] <= 1 and 0 <= metrics[f"unparsed_rate_{mode}"] <= 1
    assert metrics["accuracy_baseline"] == metrics["accuracy_spec"]  # greedy float32: the same outputs
    table = per_prompt(store.accuracy, tmp_path)
    assert table["gold_answer"].tolist() == ["yes", "yes"]
    client = MlflowClient()
    generations = client.download_artifacts(store.accuracy.info.run_id, "generations.jsonl", str(tmp_path))
    lines = pd.read_json(generations, lines=True)
    parsed = [parse_decision(text) for text in lines["spec_text"]]
    assert [None if pd.isna(answer) else answer for answer in table["spec_answer"]] == parsed
    assert metrics["unparsed_rate_spec"] == pytest.approx(sum(p is None for p in parsed) / 2)
    summary = Path(client.download_artifacts(store.accuracy.info.run_id, "summary.md", str(tmp_path))).read_text()
    assert "| Accuracy (yes/no/maybe) |" in summary and "| Unparsed answers |" in summary
    assert store.accuracy.data.params["dataset.template"].endswith('"Answer: maybe".')
    assert not any(key.startswith("accuracy_") for key in store.children[0].data.metrics)  # no gold answers


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_PROMPT_INPUTS = [
    (["dataset=prompts", "dataset.categories=[qa,coding]"], "names 'coding', which no record of"),
    (["dataset=prompts", "dataset.per_category=0"], "dataset.per_category=0 is invalid"),
    (["dataset=prompts", "dataset.path=FILE.csv"], ":1: the CSV header (id, text) has no prompt or turns"),
    (["dataset=prompts", "dataset.path=FILE.jsonl"], ":2: no prompt text (none of the fields prompt, turns, question"),
    (["dataset=prompts", "dataset.path=/no/such.jsonl"], "does not exist: point it at a prompt file"),
    (["dataset=prompts", "dataset.template='Q: {query}'"], "dataset.template uses {query}: use only {abstract}"),
    (["dataset.path=PUBMEDQA", "verifier.revision=v1.0"], "is a local copy: drop revision"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_PROMPT_INPUTS, ids=[" ".join(o) for o, _ in BAD_PROMPT_INPUTS])
def test_bad_prompt_set_input_is_one_sentence_before_models_load(
    overrides, message, models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys
):
    files = {
        "PUBMEDQA": pubmedqa_file,
        "FILE.csv": _write(tmp_path / "p.csv", "id,text\n1,hello\n"),
        "FILE.jsonl": _write(tmp_path / "p.jsonl", '{"id": 1, "prompt": "fine"}\n{"id": 2, "body": "no text"}\n'),
    }
    overrides = [next((o.replace(k, str(v)) for k, v in files.items() if k in o), o) for o in overrides]
    monkeypatch.setattr(specbench.job, "MODEL_CACHE", specbench.models.ModelCache())
    args = [
        f"models_dir={models_dir}",
        "dataset.num_samples=1",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"hydra.run.dir={tmp_path}/outputs",
        *overrides,
    ]
    code, _, err = run_cli(args, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err and not specbench.job.MODEL_CACHE._models


def test_a_hub_dataset_is_logged_with_its_hub_source(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = mlflow.create_experiment("hub", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_dataset(DatasetConfig(), [Record("1", "Q?", (("", "abstract"),), answer="yes")])
    (used,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert used.dataset.name == "pubmedqa" and used.dataset.source_type == "hugging_face"
    assert '"path": "qiaojin/PubMedQA"' in used.dataset.source and '"config_name": "pqa_labeled"' in used.dataset.source
    assert '"answer"' in used.dataset.schema


def test_a_local_gguf_file_is_identified_by_its_size(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(96))
    (tmp_path / "other.gguf").write_bytes(b"not this one")
    spec = ModelSpec(str(tmp_path), "model.gguf", "float32", "cpu")
    assert model_revision(spec).startswith("local: 1 files, 100 bytes, last changed 20")
