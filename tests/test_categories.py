"""Per-category figures: ratios of sums over each category's prompts, safe MLflow keys, the figure, the report table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from specbench.categories import add_category_column, category_metrics, metric_suffix
from specbench.data import Prompt
from specbench.engine import DecodeResult
from specbench.metrics import BatchStats, PromptOutcome, per_prompt_table
from specbench.plots import run_figures
from specbench.report import write_report
from specbench.report.categories import SPREAD_COLUMN, category_table


def outcome(
    pubid: str, baseline_s: float, spec_s: float, tokens: int, steps: int, accepted: int, batch: int = 0
) -> PromptOutcome:
    """A prompt decoded in `baseline_s` and `spec_s` seconds, `steps` steps of k=2 with `accepted` draft tokens kept."""
    spec = DecodeResult(
        tokens=list(range(tokens)),
        latency_s=spec_s,
        ttft_s=0.01,
        verifier_calls=steps + 1,  # the prefill, then one call per step
        steps=steps,
        proposed=2 * steps,
        accepted=accepted,
        proposed_by_position=[steps, steps],
        accepted_by_position=[accepted, 0],
        k_per_step=[2] * steps,
        depth_per_step=[2] * steps,
        offered_per_step=[2] * steps,
        accepted_per_step=[1] * accepted + [0] * (steps - accepted),
    )
    baseline = DecodeResult(tokens=list(range(tokens)), latency_s=baseline_s, ttft_s=0.01, verifier_calls=tokens)
    batch_stats = {"baseline_batch": BatchStats(baseline_s), "spec_batch": BatchStats(spec_s)}
    return PromptOutcome(pubid, 10, False, baseline, spec, "same", "same", **batch_stats, batch=batch)


def test_category_figures_are_ratios_of_sums_per_category():
    outcomes = [
        outcome("a", 2.0, 1.0, 9, 4, 4, batch=0),
        outcome("b", 1.0, 1.0, 5, 4, 0, batch=1),
        outcome("c", 3.0, 2.0, 7, 3, 3, batch=2),
        outcome("d", 1.0, 1.0, 3, 2, 0, batch=3),  # no category: only in the run's figures
    ]
    categories = ["qa", "qa", "Math & Logic", None]
    prompts = [Prompt(p, "", [], False, category) for p, category in zip("abcd", categories, strict=True)]
    table = per_prompt_table(outcomes)
    add_category_column(table, prompts)
    assert table["category"].tolist()[:3] == ["qa", "qa", "Math & Logic"] and pd.isna(table["category"][3])
    figures = category_metrics(table, outcomes)
    assert figures == pytest.approx(
        {
            "speedup_cat_qa": 3.0 / 2.0,  # not the mean of 2.0 and 1.0
            "acceptance_rate_cat_qa": 4 / 16,
            "mean_accepted_tokens_cat_qa": (8 + 4) / 8,
            "spec_tokens_per_s_cat_qa": 14 / 2.0,
            "speedup_cat_Math_Logic": 1.5,
            "acceptance_rate_cat_Math_Logic": 3 / 6,
            "mean_accepted_tokens_cat_Math_Logic": 6 / 3,
            "spec_tokens_per_s_cat_Math_Logic": 3.5,
        }
    )


def test_with_repeats_each_category_gets_the_spread_of_its_speedup():
    first = [outcome("a", 2.0, 1.0, 9, 4, 4, batch=0), outcome("b", 1.0, 1.0, 5, 4, 0, batch=1)]
    second = [outcome("a", 3.0, 1.0, 9, 4, 4, batch=0), outcome("b", 1.0, 2.0, 5, 4, 0, batch=1)]
    outcomes = first + [replace(item, repeat=1) for item in second]
    table = per_prompt_table(outcomes)
    add_category_column(table, [Prompt("a", "", [], False, "qa"), Prompt("b", "", [], False, "math")])
    figures = category_metrics(table, outcomes)
    assert {key: figures[key] for key in figures if "_repeat_" in key} == pytest.approx(
        {
            "speedup_repeat_min_cat_qa": 2.0,  # passes: 2.0x, then 3.0x
            "speedup_repeat_median_cat_qa": 2.5,
            "speedup_repeat_max_cat_qa": 3.0,
            "speedup_repeat_min_cat_math": 0.5,  # passes: 1.0x, then 0.5x
            "speedup_repeat_median_cat_math": 0.75,
            "speedup_repeat_max_cat_math": 1.0,
        }
    )
    assert figures["speedup_cat_qa"] == pytest.approx((18 / 2) / (18 / 5))  # pooled: both passes' sums


def test_no_categories_no_column_and_no_figures():
    outcomes = [outcome("a", 2.0, 1.0, 9, 4, 4)]
    table = per_prompt_table(outcomes)
    add_category_column(table, [Prompt("a", "", [], False)])
    assert "category" not in table and category_metrics(table, outcomes) == {}


@pytest.mark.parametrize(
    ("category", "suffix"),
    [
        ("qa", "qa"),
        ("math_reasoning", "math_reasoning"),
        ("Math & Logic", "Math_Logic"),
        (" r/a.g ", "r_a_g"),
        ("?", ""),
    ],
)
def test_metric_suffix_keeps_letters_digits_and_underscores(category, suffix):
    assert metric_suffix(category) == suffix


METRICS = {
    "speedup": 1.4,
    "acceptance_rate": 0.5,
    "speedup_cat_qa": 1.6,
    "acceptance_rate_cat_qa": 0.6,
    "speedup_cat_translation": 1.1,
    "acceptance_rate_cat_translation": 0.3,
}


def test_the_categories_figure_draws_each_category():
    table = pd.DataFrame({"speedup": [1.4]})
    figure = run_figures(METRICS, table, ["distilgpt2"], title="run")["plots/categories.png"]
    speedups, rates = figure.axes
    assert [label.get_text() for label in speedups.get_xticklabels()] == ["qa", "translation"]
    assert [bar.get_height() for bar in rates.patches] == pytest.approx([60.0, 30.0])
    assert "plots/categories.png" not in run_figures({"speedup": 1.4}, table, ["distilgpt2"])


def runs_frame() -> pd.DataFrame:
    """Two runs as `mlflow.search_runs` returns them, one with categories and one without."""
    return pd.DataFrame(
        {
            "run_id": ["r1", "r2"],
            "params.dataset.name": ["prompts", "pubmedqa"],
            "params.draft.name": ["distilgpt2", "distilgpt2"],
            "params.k": ["4", "4"],
            "params.verifier.name": ["gpt_j_6b", "gpt_j_6b"],
            "params.generation.do_sample": ["False", "False"],
            "metrics.speedup": [1.4, 1.2],
            "metrics.speedup_cat_qa": [1.6, None],
            "metrics.speedup_repeat_min_cat_qa": [1.5, None],
            "metrics.speedup_repeat_median_cat_qa": [1.6, None],
            "metrics.speedup_repeat_max_cat_qa": [1.7, None],
            "metrics.acceptance_rate_cat_qa": [0.6, None],
            "metrics.speedup_cat_translation": [1.1, None],
            "metrics.acceptance_rate_cat_translation": [0.3, None],
        }
    )


def test_the_report_has_a_category_table(tmp_path: Path):
    table = category_table(runs_frame())
    assert table[["category", "dataset", "draft", "k"]].values.tolist() == [
        ["qa", "prompts", "distilgpt2", 4],
        ["translation", "prompts", "distilgpt2", 4],
    ]
    assert table["Speedup (x)"].tolist() == [1.6, 1.1] and table["Acceptance rate (%)"].tolist() == [60.0, 30.0]
    assert table["Throughput (tokens/s)"].isna().all()  # not logged by these runs
    assert table[SPREAD_COLUMN].tolist() == ["1.5 / 1.6 / 1.7", "—"]  # only qa has repeat figures
    one_pass = runs_frame().filter(regex=r"^(?!metrics\.speedup_repeat_)")
    assert SPREAD_COLUMN not in category_table(one_pass)  # no run with repeats: no column of dashes
    paths = {path.name for path in write_report(runs_frame(), tmp_path)}
    assert {"categories.md", "categories.csv"} <= paths
    assert "| qa | prompts | distilgpt2 | 4 | gpt_j_6b | 1.6 | 60 |" in (tmp_path / "categories.md").read_text()
    assert category_table(runs_frame().iloc[1:]).empty
