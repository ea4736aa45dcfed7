"""The end-of-run and end-of-sweep console summaries, the MLflow URLs they print, and the experiment's tags."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from specbench import console, tracking

METRICS = {
    "num_prompts": 6,
    "speedup": 1.4812,
    "speedup_ci_low": 1.402,
    "speedup_ci_high": 1.553,
    "acceptance_rate": 0.642,
    "acceptance_rate_ci_low": 0.6,
    "acceptance_rate_ci_high": 0.7,
    "spec_tokens_per_s": 12.34,
    "baseline_tokens_per_s": 8.312,
    "disagreement_rate": 0.0,
    "cost_saving_pct": 32.45,
    "interval_units": 6,
    "num_repeats": 1,
}


def test_run_summary_shows_the_headline_figures_in_their_units():
    links = console.where_to_look("sqlite:///mlruns/mlflow.db", "3", "abc")
    text = console.run_summary("v + d, k=4", METRICS, links)
    lines = text.strip().splitlines()
    assert lines[0] == (
        "v + d, k=4, 6 prompts ([low, high] n=6: 95% interval over 6 prompts, t on the log scale (logit for rates) "
        "with the bootstrap's standard error)"
    )
    assert lines[1].split() == ["Speedup", "1.48x", "[1.4x,", "1.55x]", "n=6"]
    assert lines[2].split() == ["Acceptance", "rate", "64.2%", "[60%,", "70%]", "n=6"]
    assert "12.3 tokens/s speculative, 8.31 tokens/s baseline" in lines[3]
    assert lines[4].split() == ["Disagreement", "rate", "0%"]
    assert lines[5].split() == ["Cost", "saving", "32.5%"]
    assert lines[6] == "This run: http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert lines[7] == (
        "All runs: http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=specbench"
    )
    assert lines[8] == "(serve them with `make ui` or `specbench ui`)"


def test_every_interval_shows_its_n_and_method():
    """20 batches of 4 prompts timed 3 times: a percentile bootstrap, n printed as batches x repeats."""
    metrics = METRICS | {"num_prompts": 80, "interval_units": 20, "num_repeats": 3}
    lines = console.run_summary("t", metrics, []).strip().splitlines()
    assert lines[0] == (
        "t, 80 prompts x 3 repeats ([low, high] n=20x3: 95% interval over 20 batches of prompts x 3 repeats, "
        "percentile bootstrap)"
    )
    assert [line.split()[-1] for line in lines[1:3]] == ["n=20x3", "n=20x3"]


def disagreement_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("  Disagreement")]
    return line.removeprefix("  Disagreement").strip()


def test_greedy_disagreements_show_their_near_ties_and_sampled_runs_none():
    greedy = METRICS | {"disagreement_rate": 1 / 6, "disagreements_at_near_tie": 1, "disagreements_not_near_tie": 0}
    text = console.run_summary("t", greedy, [], dtype="bfloat16")
    assert disagreement_line(text) == "1 of 6 prompts, all at near-ties (bfloat16 rounding)"
    warning = "warning: the speculative output of question_id 3 (repeat 0) differs ..."
    mixed = greedy | {"disagreement_rate": 2 / 6, "disagreements_not_near_tie": 1}
    text = console.run_summary("t", mixed, [], notes=[warning], dtype="bfloat16")
    assert disagreement_line(text) == "2 of 6 prompts: 1 at near-ties (bfloat16 rounding), 1 not (see the warnings)"
    assert text.splitlines()[-1] == warning
    twice = greedy | {"num_repeats": 2, "disagreements_at_near_tie": 0}
    assert disagreement_line(console.run_summary("t", twice, [])) == "0 of 12 decodes"
    sampled = console.run_summary("t", METRICS | {"disagreement_rate": 0.97}, [], sampled=True)
    assert "Disagreement" not in sampled and "97" not in sampled  # different by design: no headline


def test_predictions_past_four_times_the_prompts_are_starred():
    predicted = {f"predicted_speedup_batch_{b}": value for b, value in ((1, 1.52), (8, 1.1), (32, 0.7))}
    metrics = METRICS | predicted | {"predicted_speedup_batch_32_extrapolated": 1}
    (line,) = [line for line in console.run_summary("t", metrics, []).splitlines() if "by batch" in line]
    assert line.split("batch", 1)[1].strip() == "1: 1.52x, 8: 1.1x, 32*: 0.7x (*: extrapolated, over 4x the 6 prompts)"


def test_missing_metrics_show_a_dash_and_no_interval():
    text = console.run_summary("t", {"speedup": 0.9, "speedup_ci_low": 0.8}, [])
    assert "0.9x\n" in text  # an interval needs both ends
    assert "Acceptance rate    —" in text and "— speculative, — baseline" in text


def test_links_depend_on_the_store():
    assert console.where_to_look("http://10.0.0.5:5001/", "1", "r") == [
        "This run: http://10.0.0.5:5001/#/experiments/1/runs/r?workflowType=machine_learning",
        "All runs: http://10.0.0.5:5001/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=specbench",
    ]  # a tracking server serves its own UI: nothing to start
    other = console.where_to_look("sqlite:////data/runs.db", "1", "r")
    assert other[-1] == "(serve them with `specbench ui --tracking-uri sqlite:////data/runs.db`)"


def test_sweep_table_lists_runs_fastest_first():
    runs = pd.DataFrame(
        {
            "tags.mlflow.runName": ["slow", "broken", "fast"],
            "metrics.speedup": [0.8, float("nan"), 1.6],
            "metrics.acceptance_rate": [0.5, float("nan"), 0.75],
            "metrics.disagreement_rate": [0.0, float("nan"), 0.96],
            "params.generation.do_sample": ["False", "False", "True"],
        }
    )
    lines = console.sweep_table(runs).splitlines()
    assert lines[0].split("  ")[0] == "Run"
    assert "Throughput, baseline" in lines[0] and "Cost saving" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["fast", "slow", "broken"]
    assert lines[1].split()[1:3] == ["1.6x", "75%"] and lines[3].split()[1] == "—"
    assert "96" not in lines[1] and "0%" in lines[2]  # the sampled run's disagreement is by design: not shown


def test_experiments_are_tagged_as_model_development_with_the_headline_view(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.connect(uri, "fresh")
    tags = MlflowClient().get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.specbench"])
    state = json.loads(view["state"])
    assert state["selectedColumns"] == [
        "metrics.`speedup`",
        "metrics.`acceptance_rate`",
        "metrics.`spec_tokens_per_s`",
        "metrics.`baseline_tokens_per_s`",
        "metrics.`disagreement_rate`",
        "metrics.`cost_saving_pct`",
        "params.`k`",
        "params.`draft.name`",
    ]
    assert state["orderByKey"] == "metrics.`speedup`" and state["orderByAsc"] is False

    # an experiment made elsewhere keeps the kind its owner chose, and gets the view; a stale view is replaced
    mlflow.set_tracking_uri(uri)
    other = mlflow.create_experiment("theirs", tags={"mlflow.experimentKind": "genai_development"})
    stale = json.dumps({"name": "old", "createdAt": 1, "updatedAt": 1, "state": json.dumps({"selectedColumns": []})})
    MlflowClient().set_experiment_tag(other, "mlflow.sharedViewState.specbench", stale)
    assert tracking.connect(uri, "theirs") == other
    tags = MlflowClient().get_experiment(other).tags
    assert tags["mlflow.experimentKind"] == "genai_development"
    assert json.loads(json.loads(tags["mlflow.sharedViewState.specbench"])["state"]) == state


def test_a_description_too_long_for_a_tag_is_cut_at_a_line(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("descriptions")  # not whichever experiment an earlier test in this process left active
    table = "\n".join(f"| run {index} | {'x' * 60} |" for index in range(400))  # ~27,000 characters
    with mlflow.start_run() as run:
        tracking.set_description(run.info.run_id, table, "report/summary.md")
    description = MlflowClient().get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert len(description) <= tracking.MAX_TAG_LENGTH
    kept, note = description.split("\n\n")
    assert table.startswith(kept) and kept.endswith("|")
    assert note == "(cut to fit MLflow's tag limit: the whole table is in report/summary.md)\n"
