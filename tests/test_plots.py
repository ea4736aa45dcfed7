"""Tests for specbench.plots: one run's figures and markdown summary, rendered for real on the Agg canvas."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from specbench.plots import run_figures
from specbench.summary import format_number, markdown_table, summary_markdown

DRAFTERS = ["distilgpt2", "prompt_lookup"]
K = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALWAYS = {
    "plots/latency.png",
    "plots/throughput.png",
    "plots/acceptance.png",
    "plots/speedup.png",
    "plots/drafters.png",
    "plots/disagreement.png",
}
OPTIONAL_PREFIXES = ("predicted_", "best_k_", "rougeL", "bleu", "semantic", "perplexity", "cost_")


def _metrics() -> dict[str, float]:
    metrics = {
        "num_prompts": 8,
        "baseline_latency_p50_s": 2.41,
        "baseline_latency_p95_s": 3.02,
        "spec_latency_p50_s": 1.58,
        "spec_latency_p95_s": 2.11,
        "baseline_ms_per_token_p50": 37.6,
        "baseline_ms_per_token_p95": 41.0,
        "spec_ms_per_token_p50": 24.7,
        "spec_ms_per_token_p95": 30.2,
        "baseline_ttft_p50_s": 0.12,
        "spec_ttft_p50_s": 0.13,
        "baseline_tokens_per_s": 26.6,
        "spec_tokens_per_s": 40.4,
        "speedup": 1.52,
        "speedup_ci_low": 1.41,
        "speedup_ci_high": 1.63,
        "decode_speedup": 1.57,
        "steady_state_speedup": 1.9,
        "predicted_speedup": 1.68,
        "best_k_predicted": 4,
        "predicted_speedup_best_k": 1.74,
        "draft_verifier_cost_ratio": 0.08,
        "alpha_iid": 0.74,
        "acceptance_rate": 0.712,
        "acceptance_rate_ci_low": 0.68,
        "acceptance_rate_ci_high": 0.74,
        "mean_accepted_tokens": 1.91,
        "mean_k": 3.0,
        "disagreement_rate": 0.125,
        "exact_match_rate": 0.875,
        "rougeL_vs_baseline": 0.97,
        "bleu_vs_baseline": 0.95,
        "semantic_similarity_vs_baseline": 0.99,
        "perplexity_baseline": 4.21,
        "perplexity_spec": 4.25,
        "cost_per_query_usd_baseline": 0.00536,
        "cost_per_query_usd_spec": 0.00352,
        "cost_per_1k_tokens_usd_baseline": 0.0837,
        "cost_per_1k_tokens_usd_spec": 0.055,
        "cost_saving_pct": 34.3,
    }
    for key in ("baseline_latency_p50_s", "baseline_latency_p95_s", "spec_latency_p50_s", "spec_latency_p95_s"):
        metrics[f"{key}_ci_low"] = metrics[key] - 0.2
        metrics[f"{key}_ci_high"] = metrics[key] + 0.15
    for position, rate in enumerate((0.84, 0.71, 0.58), 1):
        metrics[f"acceptance_rate_pos_{position}"] = rate
    for name, (acceptance, wins, seconds) in zip(DRAFTERS, ((0.69, 0.62, 3.4), (0.41, 0.38, 0.05)), strict=True):
        metrics[f"acceptance_rate_{name}"] = acceptance
        metrics[f"win_rate_{name}"] = wins
        metrics[f"draft_time_s_{name}"] = seconds
        metrics[f"draft_step_ms_{name}"] = 1000 * seconds / 120
    return metrics


def _table(prompts: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    tokens = 64
    baseline = rng.uniform(2.0, 3.2, prompts)
    spec = baseline / rng.uniform(1.1, 2.0, prompts)
    table = pd.DataFrame(
        {
            "pubid": [str(21645374 + i) for i in range(prompts)],
            "baseline_latency_s": baseline,
            "spec_latency_s": spec,
            "baseline_ms_per_token": 1000 * baseline / tokens,
            "spec_ms_per_token": 1000 * spec / tokens,
            "baseline_tokens_per_s": tokens / baseline,
            "spec_tokens_per_s": tokens / spec,
            "speedup": baseline / spec,
            "acceptance_rate": rng.uniform(0.5, 0.9, prompts),
            "identical": [True] * (prompts - 1) + [False],
        }
    )
    for name in DRAFTERS:
        proposed = rng.integers(40, 90, prompts)
        table[f"{name}_proposed"] = proposed
        table[f"{name}_accepted"] = (proposed * rng.uniform(0.3, 0.8, prompts)).astype(int)
        table[f"{name}_wins"] = rng.integers(5, 20, prompts)
        table[f"{name}_draft_time_s"] = rng.uniform(0.01, 0.5, prompts)
    return table


def _verify_curve() -> pd.DataFrame:
    ms = [31.0, 31.8, 32.5, 33.9, 35.2, 38.0]
    return pd.DataFrame(
        {"new_tokens": range(1, len(ms) + 1), "verify_ms": ms, "ratio_to_one_token": [m / ms[0] for m in ms]}
    )


def _predicted() -> pd.DataFrame:
    return pd.DataFrame({"k": [1, 2, 3, 4, 5], "predicted_speedup": [1.35, 1.58, 1.68, 1.74, 1.71]})


def _render(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_run_figures_keys_titles_and_axis_labels() -> None:
    figures = run_figures(_metrics(), _table(), DRAFTERS, _verify_curve(), _predicted(), title="gpt_j_6b + mix, k=3")
    assert set(figures) == ALWAYS | {"plots/verify_cost.png"}
    for path, figure in figures.items():
        assert isinstance(figure, Figure), path
        assert figure.get_suptitle().strip(), path
        assert "gpt_j_6b + mix, k=3" in figure.get_suptitle(), path
        for ax in figure.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), f"{path}: unlabelled axes"


def test_figures_save_as_png(tmp_path: Path) -> None:
    figures = run_figures(_metrics(), _table(), DRAFTERS, _verify_curve(), _predicted(), title="run")
    for artifact, figure in figures.items():
        target = tmp_path / artifact
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target)
        assert target.read_bytes().startswith(PNG_SIGNATURE), artifact
        assert target.stat().st_size > 10_000, artifact


def _speedup_points(k: int | None = None) -> dict[str, np.ndarray]:
    """The (x, y) points of the speedup figure's predicted curve and measured markers, by legend label."""
    (ax,) = run_figures(_metrics(), _table(), DRAFTERS, predicted=_predicted(), k=k)["plots/speedup.png"].axes
    points = {line.get_label(): line.get_xydata() for line in ax.get_lines()}
    for container in ax.containers:  # the error bar's marker is a line inside its container
        points[container.get_label()] = container.lines[0].get_xydata()
    return points


def test_measured_speedup_sits_on_the_predicted_curve_at_the_run_k() -> None:
    points = _speedup_points()  # k defaults to the deepest acceptance position, 3
    np.testing.assert_allclose(points["predicted (model)"], _predicted()[["k", "predicted_speedup"]].to_numpy())
    np.testing.assert_allclose(points[f"measured at k={K} (95% interval)"], [[K, _metrics()["speedup"]]])
    points = _speedup_points(k=5)
    np.testing.assert_allclose(points["measured at k=5 (95% interval)"], [[5, _metrics()["speedup"]]])
    np.testing.assert_allclose(points["measured, steady state (what the model describes)"], [[5, 1.9]])


def test_missing_optional_metrics_do_not_crash() -> None:
    metrics = {
        key: value
        for key, value in _metrics().items()
        if "_ci_" not in key and not key.startswith(OPTIONAL_PREFIXES) and not key.endswith("_prompt_lookup")
    }
    figures = run_figures(metrics, _table(), DRAFTERS)
    assert set(figures) == ALWAYS
    for figure in figures.values():
        assert _render(figure).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("drafters", [[], ["distilgpt2"]])
def test_no_metrics_and_no_table_still_render(drafters: list[str]) -> None:
    figures = run_figures({}, pd.DataFrame(), drafters)
    assert set(figures) == ALWAYS
    for figure in figures.values():
        assert _render(figure).startswith(PNG_SIGNATURE)


def test_summary_markdown_has_the_key_numbers() -> None:
    text = summary_markdown(_metrics(), title="gpt_j_6b + mix, k=3")
    assert text.startswith("### gpt_j_6b + mix, k=3\n\n| Metric | Baseline | Speculative |")
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert (
        lines["Latency p50 per request (s)"]
        == "| Latency p50 per request (s) | 2.41 [2.21, 2.56] | 1.58 [1.38, 1.73] |"
    )
    assert lines["Throughput (tokens/s)"] == "| Throughput (tokens/s) | 26.6 | 40.4 |"
    assert lines["Speedup (x)"] == "| Speedup (x) | — | 1.52 [1.41, 1.63] |"
    assert lines["Predicted speedup (x)"].endswith("| 1.68 |")
    assert lines["Acceptance rate"] == "| Acceptance rate | — | 71.2% [68%, 74%] |"
    assert lines["Mean accepted tokens per step"].endswith("| 1.91 |")
    assert lines["Disagreement rate"].endswith("| 12.5% |")
    assert lines["ROUGE-L vs baseline"].endswith("| 0.97 |")
    assert lines["Perplexity (verifier)"] == "| Perplexity (verifier) | 4.21 | 4.25 |"
    assert lines["Cost per query (USD)"] == "| Cost per query (USD) | $0.00536 | $0.00352 |"
    assert lines["Cost saving"].endswith("| 34.3% |")


def test_summary_markdown_shows_the_spread_over_repeats_and_notes() -> None:
    metrics = _metrics() | {"speedup_repeat_min": 1.41, "speedup_repeat_median": 1.5, "speedup_repeat_max": 1.6}
    for mode, values in (("baseline", (25.1, 26.6, 27.0)), ("spec", (38.2, 40.4, 41.9))):
        metrics |= dict(zip([f"{mode}_tokens_per_s_repeat_{s}" for s in ("min", "median", "max")], values, strict=True))
    note = "No predicted speedup: a reason."
    text = summary_markdown(metrics, title="run", notes=[note])
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert lines["Speedup over repeats (min-median-max) (x)"].endswith("| — | 1.41 / 1.5 / 1.6 |")
    assert lines["Throughput over repeats (min-median-max) (tokens/s)"].endswith(
        "| 25.1 / 26.6 / 27 | 38.2 / 40.4 / 41.9 |"
    )
    assert text.endswith(f"|\n\n{note}\n")  # one line under the table
    assert "over repeats" not in summary_markdown(_metrics())  # one repeat: no spread row


def test_summary_markdown_skips_missing_metrics() -> None:
    text = summary_markdown({"speedup": 1.2, "acceptance_rate": 0.5})
    assert text == "| Metric | Baseline | Speculative |\n| --- | --- | --- |\n| Speedup (x) | — | 1.2 |\n" + (
        "| Acceptance rate | — | 50% |\n"
    )


def test_format_number_and_markdown_table() -> None:
    assert [format_number(v) for v in (1234.4, 0.012345, 7, float("nan"), None, "a")] == [
        "1,234",
        "0.0123",
        "7",
        "—",
        "—",
        "a",
    ]
    assert markdown_table(["a", "b|c"], [[1.5, "x"]]) == "| a | b\\|c |\n| --- | --- |\n| 1.5 | x |"


def test_summary_markdown_prints_n_beside_every_interval_and_the_method() -> None:
    text = summary_markdown(_metrics() | {"interval_units": 8, "num_repeats": 3}, title="run")
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert lines["Speedup (x)"] == "| Speedup (x) | — | 1.52 [1.41, 1.63] n=8x3 |"
    assert lines["Latency p50 per request (s)"].endswith("| 2.41 [2.21, 2.56] n=8x3 | 1.58 [1.38, 1.73] n=8x3 |")
    assert lines["Throughput (tokens/s)"] == "| Throughput (tokens/s) | 26.6 | 40.4 |"  # no interval, no n
    assert (
        "\n[low, high] n=8x3: 95% interval over 8 prompts x 3 repeats, t on the log scale (logit for rates) with "
        "the bootstrap's standard error\n" in text
    )


def test_predictions_marked_extrapolated_are_drawn_hollow() -> None:
    surface = pd.DataFrame(
        [
            {
                "batch_size": b,
                "new_tokens": n,
                "verify_ms": 10.0 * b * n,
                "ratio_to_one_token": float(n),
                "ms_per_row": 1,
            }
            for b in (1, 4, 64)
            for n in (1, K + 1)
        ]
    )
    predicted = {"predicted_speedup_batch_1": 1.6, "predicted_speedup_batch_4": 1.2, "predicted_speedup_batch_64": 0.7}
    metrics = _metrics() | predicted | {"predicted_speedup_batch_64_extrapolated": 1}
    figure = run_figures(metrics, _table(), DRAFTERS, k=K, verify_surface=surface)["plots/batch_scaling.png"]
    speedup = figure.axes[1]
    (hollow,) = [line for line in speedup.get_lines() if line.get_label() == "predicted, extrapolated"]
    assert hollow.get_xdata().tolist() == [64] and hollow.get_markerfacecolor() == "white"
    (curve,) = [line for line in speedup.get_lines() if line.get_label() == "predicted (model)"]
    assert curve.get_xdata().tolist() == [1, 4, 64]
