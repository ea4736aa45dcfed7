"""Tests for specbench.report against a real MLflow SQLite store holding a small sweep."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import specbench.cli
from specbench.intervals import METHODS
from specbench.report import comparison_figures, load_runs, log_report, summary_table, write_report
from specbench.report.figures import col
from specbench.report.query import INTERVAL_METHOD, INTERVAL_SIZE, crossover_table

EXPERIMENT = "specbench"
DRAFTS = ("gpt2_family", "distilgpt2")
KS = (4, 1, 2)
FIGURES = {
    "plots/speedup_vs_k.png",
    "plots/acceptance_vs_k.png",
    "plots/latency.png",
    "plots/throughput.png",
    "plots/disagreement.png",
    "plots/cost.png",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Sweep:
    uri: str
    parent_id: str
    children: set[str]  # the latest finished run of every configuration
    stale_id: str  # an older run of the configuration (distilgpt2, k=2)
    failed_id: str


def _metrics(draft: str, k: int) -> dict[str, float]:
    acceptance = 0.8 if draft == "distilgpt2" else 0.7
    speedup = 1 + 0.2 * k * acceptance
    metrics = {
        "baseline_latency_p50_s": 2.4,
        "baseline_latency_p95_s": 3.0,
        "spec_latency_p50_s": 2.4 / speedup,
        "spec_latency_p95_s": 3.0 / speedup,
        "baseline_tokens_per_s": 26.0,
        "spec_tokens_per_s": 26.0 * speedup,
        "speedup": speedup,
        "speedup_ci_low": speedup - 0.1,
        "speedup_ci_high": speedup + 0.1,
        "predicted_speedup": speedup + 0.15,
        "acceptance_rate": acceptance - 0.05 * k,
        "mean_accepted_tokens": k * acceptance,
        "disagreement_rate": 0.05,
        "exact_match_rate": 0.95,
        "rougeL_vs_baseline": 0.98,
        "cost_per_query_usd_baseline": 0.0054,
        "cost_per_query_usd_spec": 0.0054 / speedup,
        "cost_saving_pct": 100 * (1 - 1 / speedup),
        "num_prompts": 8,
        "num_repeats": 2,
        "interval_units": 8,
    }
    metrics |= {f"acceptance_rate_pos_{position}": acceptance**position for position in range(1, k + 1)}
    return metrics


def _log_run(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    draft: str,
    k: int,
    start_time: int,
    status: str = "FINISHED",
    metrics: dict[str, float] | None = None,
) -> str:
    tags = {"mlflow.parentRunId": parent_id, "specbench.config_hash": f"hash-{draft}-{k}"}
    run = client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=f"{draft} k={k}")
    params = {
        "verifier.name": "gpt_j_6b",
        "draft.name": draft,
        "k": k,
        "k_schedule": "constant",
        "dataset.name": "pubmedqa",
        "generation.do_sample": False,
    }
    values = metrics or _metrics(draft, k)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(key, float(value), start_time, 0) for key, value in values.items()],
        params=[Param(key, str(value)) for key, value in params.items()],
        tags=[RunTag("mlflow.runName", f"{draft} k={k}"), RunTag("interval_method", "t_log")],
    )
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    now = int(time.time() * 1000)
    parent_id = client.create_run(experiment_id, start_time=now - 60_000, run_name="sweep").info.run_id
    stale_id = _log_run(
        client, experiment_id, parent_id, "distilgpt2", 2, now - 50_000, metrics={"speedup": 0.5, "num_prompts": 8}
    )
    children = {
        _log_run(client, experiment_id, parent_id, draft, k, now - 40_000 + 1000 * index)
        for index, (draft, k) in enumerate((d, k) for d in DRAFTS for k in KS)
    }
    failed_id = _log_run(client, experiment_id, parent_id, "distilgpt2", 8, now - 10_000, status="FAILED")
    client.set_terminated(parent_id, "FINISHED")
    return Sweep(uri, parent_id, children, stale_id, failed_id)


@pytest.fixture(scope="module")
def runs(sweep: Sweep) -> pd.DataFrame:
    return load_runs(sweep.uri, EXPERIMENT, parent_run_id=sweep.parent_id)


def test_load_runs_keeps_the_latest_finished_child_of_each_config(sweep: Sweep, runs: pd.DataFrame) -> None:
    assert set(runs["run_id"]) == sweep.children
    assert len(runs) == 6
    # without a parent: the same runs, the parent itself excluded (it has no params.k)
    assert set(load_runs(sweep.uri, EXPERIMENT)["run_id"]) == sweep.children


def test_load_runs_by_run_ids_and_all_versions(sweep: Sweep) -> None:
    chosen = sorted(sweep.children)[:2]
    assert set(load_runs(sweep.uri, EXPERIMENT, run_ids=chosen)["run_id"]) == set(chosen)
    everything = load_runs(sweep.uri, EXPERIMENT, sweep.parent_id, latest_per_config=False)
    assert set(everything["run_id"]) == sweep.children | {sweep.stale_id}
    assert sweep.failed_id not in set(everything["run_id"])


def test_load_runs_explains_an_empty_selection(sweep: Sweep, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^no finished benchmark runs under parent run nope: check --experiment"):
        load_runs(sweep.uri, EXPERIMENT, parent_run_id="nope")
    with pytest.raises(ValueError, match=r"^experiment 'missing' does not exist"):
        load_runs(sweep.uri, "missing")
    with pytest.raises(ValueError, match=r"^no MLflow store at"):
        load_runs(f"sqlite:///{tmp_path}/absent.db", EXPERIMENT)


def test_summary_table_rows_columns_and_order(runs: pd.DataFrame) -> None:
    table = summary_table(runs)
    assert len(table) == 6
    assert list(table[["draft", "k"]].itertuples(index=False, name=None)) == [
        (draft, k) for draft in sorted(DRAFTS) for k in sorted(KS)
    ]
    assert list(table.columns[:5]) == ["draft", "k", "batch", "verifier", "sampling"]
    assert set(table["batch"]) == {1}  # runs that logged no batch_size decoded one prompt at a time
    assert set(table["verifier"]) == {"gpt_j_6b"}
    assert set(table["sampling"]) == {"greedy"}
    row = table.iloc[0]  # distilgpt2, k=1
    assert row["Speedup (x)"] == pytest.approx(1.16)
    assert row["Acceptance rate (%)"] == pytest.approx(75.0)
    assert row["Disagreement rate (%)"] == pytest.approx(5.0)
    assert (row[INTERVAL_SIZE], row[INTERVAL_METHOD]) == ("n=8x2", METHODS["t_log"])  # beside the speedup's interval
    assert list(table.columns).index(INTERVAL_SIZE) == list(table.columns).index("Speedup CI high (x)") + 1
    for key in ("spec_latency_p95_s", "baseline_tokens_per_s", "cost_per_query_usd_spec", "cost_saving_pct"):
        assert col(key) in table
    assert "BLEU vs baseline" not in table  # not logged, so not a column


def test_sampled_runs_show_no_disagreement(runs: pd.DataFrame) -> None:
    sampled = runs.assign(**{"params.generation.do_sample": ["True", "False"] * (len(runs) // 2)})
    table = summary_table(sampled, sort=False)
    disagreement = table["Disagreement rate (%)"]
    assert disagreement[table["sampling"] == "sampled"].isna().all()
    assert disagreement[table["sampling"] == "greedy"].tolist() == pytest.approx([5.0] * (len(runs) // 2))


def test_comparison_figures_are_titled_and_labelled(runs: pd.DataFrame) -> None:
    figures = comparison_figures(runs)
    assert set(figures) == FIGURES
    for path, figure in figures.items():
        assert isinstance(figure, Figure), path
        assert figure.get_suptitle(), path
        for ax in figure.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), path
    legend = [text.get_text() for text in figures["plots/speedup_vs_k.png"].axes[0].get_legend().get_texts()]
    assert legend == ["distilgpt2", "gpt2_family", "predicted (dashed)", "baseline"]


def test_comparison_figures_one_run_and_several_verifiers(runs: pd.DataFrame) -> None:
    assert set(comparison_figures(runs.iloc[:1])) == FIGURES
    mixed = runs.copy()
    mixed.loc[mixed["params.draft.name"] == "gpt2_family", "params.verifier.name"] = "gpt2_xl"
    legend = comparison_figures(mixed)["plots/speedup_vs_k.png"].axes[0].get_legend().get_texts()
    assert {text.get_text() for text in legend} >= {"gpt2_xl / gpt2_family", "gpt_j_6b / distilgpt2"}


def test_backends_sit_side_by_side_and_name_their_series(runs: pd.DataFrame) -> None:
    assert set(summary_table(runs)["backend"]) == {"specbench"}  # runs without the param ran our engine
    both = pd.concat([runs.assign(**{"params.engine.backend": backend}) for backend in ("transformers", "specbench")])
    table = summary_table(both.reset_index(drop=True))
    assert list(table[["draft", "k", "backend"]].itertuples(index=False, name=None))[:2] == [
        ("distilgpt2", 1, "specbench"),
        ("distilgpt2", 1, "transformers"),
    ]
    legend = comparison_figures(both.reset_index(drop=True))["plots/speedup_vs_k.png"].axes[0].get_legend()
    assert {text.get_text() for text in legend.get_texts()} >= {"specbench / distilgpt2", "transformers / gpt2_family"}


def test_write_report(runs: pd.DataFrame, tmp_path: Path) -> None:
    paths = write_report(runs, tmp_path / "report")
    relative = {path.relative_to(tmp_path / "report").as_posix() for path in paths}
    assert relative == {"summary.md", "summary.csv"} | FIGURES
    markdown = (tmp_path / "report" / "summary.md").read_text()
    assert markdown.startswith(
        "| draft | k | batch | verifier | sampling | backend | Latency p50 per request, baseline (s) |"
    )
    assert markdown.count("\n| distilgpt2 | ") == 3
    assert len(pd.read_csv(tmp_path / "report" / "summary.csv")) == 6
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_log_report_puts_the_files_under_the_parent(sweep: Sweep, runs: pd.DataFrame) -> None:
    log_report(runs, sweep.parent_id)
    client = MlflowClient(sweep.uri)
    assert {item.path for item in client.list_artifacts(sweep.parent_id, "report")} == {
        "report/summary.md",
        "report/summary.csv",
        "report/plots",
    }
    assert {item.path for item in client.list_artifacts(sweep.parent_id, "report/plots")} == {
        f"report/{path}" for path in FIGURES
    }


def report_command(argv: list[str]) -> int:
    """`specbench report ARGV` through the real command line; its exit code."""
    with pytest.raises(SystemExit) as stop:
        specbench.cli.main(["report", *argv])
    return stop.value.code


def test_main_prints_the_table_and_writes_the_report(
    sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--tracking-uri", sweep.uri, "--experiment", EXPERIMENT, "--parent-run-id", sweep.parent_id]
    assert report_command([*argv, "--out", str(out), "--log-to-parent"]) == 0
    printed = capsys.readouterr().out
    assert "| draft | k | batch | verifier |" in printed
    assert "| gpt2_family | 4 | 1 | gpt_j_6b | greedy |" in printed
    assert str(out) in printed
    assert (out / "summary.md").is_file()
    assert (out / "plots" / "speedup_vs_k.png").is_file()


def test_main_unknown_experiment_fails_with_one_sentence(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_command(["--tracking-uri", sweep.uri, "--experiment", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: experiment 'nope' does not exist")
    assert captured.err.count("\n") == 1
    assert captured.err.rstrip().endswith(".")


def batch_sweep(extrapolated: tuple[int, ...] = ()) -> pd.DataFrame:
    """Runs of one (draft, k) at batch sizes 1, 2 and 4, as `mlflow.search_runs` returns them; each marks its
    predictions at the `extrapolated` batch sizes (and its crossover at 8 when 8 is one of them)."""
    rows = []
    for batch, speedup in ((4, 0.9), (1, 1.6), (2, 1.3)):
        predicted = {f"metrics.predicted_speedup_batch_{size}": 1.8 / size**0.4 for size in (1, 2, 4, 8, 16)}
        rows.append(
            {
                "run_id": f"run-{batch}",
                "params.draft.name": "distilgpt2",
                "params.k": "4",
                "params.batch_size": str(batch),
                "params.verifier.name": "gpt_j_6b",
                "params.generation.do_sample": "False",
                "metrics.speedup": speedup,
                "metrics.speedup_ci_low": speedup - 0.1,
                "metrics.speedup_ci_high": speedup + 0.1,
                "metrics.crossover_batch_predicted": 8.0,
                "metrics.crossover_batch_predicted_extrapolated": 1.0 if 8 in extrapolated else float("nan"),
            }
            | predicted
            | {f"metrics.predicted_speedup_batch_{size}_extrapolated": 1.0 for size in extrapolated}
        )
    return pd.DataFrame(rows)


def test_speedup_against_batch_size_and_the_crossovers() -> None:
    runs = batch_sweep()
    crossovers = crossover_table(runs)
    assert crossovers[["batch sizes", "crossover measured", "crossover predicted"]].values.tolist() == [
        ["1, 2, 4", 4, 8.0]
    ]
    figure = comparison_figures(runs)["plots/speedup_vs_batch.png"]
    (ax,) = figure.axes
    measured = next(line for line in ax.get_lines() if line.get_marker() == "o")
    assert measured.get_xdata().tolist() == [1, 2, 4]
    assert measured.get_ydata().tolist() == pytest.approx([1.6, 1.3, 0.9])
    predicted = next(line for line in ax.get_lines() if line.get_linestyle() == "--" and line.get_marker() == "x")
    assert predicted.get_xdata().tolist() == [1, 2, 4, 8, 16]
    assert ax.get_xscale() == "log"


def test_the_report_names_the_crossover(tmp_path: Path) -> None:
    write_report(batch_sweep(), tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert "### Where speculation stops paying (batch size)" in markdown
    assert "| distilgpt2 | 4 | greedy | 1, 2, 4 | 4 | 8 |" in markdown


def test_extrapolated_predictions_are_marked() -> None:
    runs = batch_sweep(extrapolated=(8, 16))
    assert crossover_table(runs)["crossover predicted"].tolist() == ["8 (extrapolated)"]
    assert set(summary_table(runs)["Crossover batch size (predicted)"]) == {"8 (extrapolated)"}
    (ax,) = comparison_figures(runs)["plots/speedup_vs_batch.png"].axes
    (hollow,) = [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_markerfacecolor() == "none"]
    assert hollow.get_xdata().tolist() == [8, 16]
    assert "predicted, extrapolated" in [text.get_text() for text in ax.get_legend().get_texts()]
    plain = batch_sweep()
    assert crossover_table(plain)["crossover predicted"].tolist() == [8.0]
