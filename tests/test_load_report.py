"""The load figures, the per-probe table and the catalog's load keys, on a hand-made runs table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from specbench.catalog import metric
from specbench.report import write_report
from specbench.report.load import load_figures, probe_table
from specbench.summary import summary_markdown

RATES = (0.4, 0.05, 0.2, 0.1)  # out of order: the figures sort by rate
CROSSOVER = {"crossover_rate": 0.15, "crossover_rate_low": 0.12, "crossover_rate_high": 0.19}


def load_metrics(rate: float) -> dict[str, float]:
    """Latencies that grow with the rate, speculation faster at low rates and slower at high ones."""
    tpot_baseline, tpot_spec = 100 + 100 * rate, 60 + 300 * rate
    return {
        "ttft_ms_p99_baseline": 200 + 1000 * rate,
        "ttft_ms_p99_spec": 220 + 1200 * rate,
        "tpot_ms_p99_baseline": tpot_baseline,
        "tpot_ms_p99_spec": tpot_spec,
        "e2el_ms_p99_baseline": 64 * tpot_baseline,
        "e2el_ms_p99_spec": 64 * tpot_spec,
        "goodput_rps_baseline": rate * 0.9,
        "goodput_rps_spec": rate * (1.0 - rate),
        "occupancy_mean_baseline": 10 * rate,
        "occupancy_mean_spec": 8 * rate,
        "predicted_occupancy_spec": 7 * rate,
        "predicted_tpot_ms_p99_spec": tpot_spec * 0.9,
        "tpot_p99_ratio": tpot_spec / tpot_baseline,
        "tpot_p99_ratio_ci_low": tpot_spec / tpot_baseline - 0.05,
        "tpot_p99_ratio_ci_high": tpot_spec / tpot_baseline + 0.05,
        "e2el_p99_ratio": tpot_spec / tpot_baseline,
        "predicted_tpot_p99_ratio": 0.95 * tpot_spec / tpot_baseline,
    }


def load_runs() -> pd.DataFrame:
    """Four probes of one (draft, k), as `mlflow.search_runs` returns them, and the search's parent."""
    params = {
        "params.draft.name": "qwen_int8",
        "params.k": "4",
        "params.verifier.name": "qwen_1_5b",
        "params.generation.do_sample": "False",
        "params.mode": "load",
    }
    rows = [
        {"run_id": f"probe-{rate}", **params, "params.load.rate": str(rate)}
        | {f"metrics.{key}": value for key, value in load_metrics(rate).items()}
        for rate in RATES
    ]
    rows.append({"run_id": "parent", **params} | {f"metrics.{key}": value for key, value in CROSSOVER.items()})
    return pd.DataFrame(rows)


def test_latency_figure_draws_both_modes_against_the_rate_and_marks_the_crossover():
    figures = load_figures(load_runs())
    assert set(figures) == {
        "plots/load_latency_vs_rate.png",
        "plots/load_ratios_vs_rate.png",
        "plots/load_goodput_vs_rate.png",
    }
    for figure in figures.values():
        assert isinstance(figure, Figure) and figure.get_suptitle()
        for ax in figure.axes:
            assert ax.get_xlabel() == "request rate (requests/s)" and ax.get_ylabel() and ax.get_xscale() == "log"
    ttft, tpot, e2el = figures["plots/load_latency_vs_rate.png"].axes
    assert [ax.get_title() for ax in (ttft, tpot, e2el)] == [
        "Time to first token p99",
        "Time per output token p99",
        "End-to-end latency p99",
    ]
    spec, baseline, crossover = tpot.get_lines()
    assert spec.get_xdata().tolist() == [0.05, 0.1, 0.2, 0.4]
    assert spec.get_ydata().tolist() == pytest.approx([60 + 300 * rate for rate in (0.05, 0.1, 0.2, 0.4)])
    assert baseline.get_linestyle() == "--"
    assert baseline.get_ydata().tolist() == pytest.approx([100 + 100 * rate for rate in (0.05, 0.1, 0.2, 0.4)])
    assert crossover.get_linestyle() == ":" and crossover.get_xdata()[0] == 0.15
    (span,) = tpot.patches  # the crossover's interval
    assert (span.get_x(), span.get_x() + span.get_width()) == pytest.approx((0.12, 0.19))
    legend = [text.get_text() for text in ttft.get_legend().get_texts()]
    assert legend == ["qwen_int8", "speculative", "baseline (same run)", "crossover", "crossover 95% interval"]
    # searched on TPOT (the default): not marked on the other panels
    assert not ttft.patches and len(e2el.get_lines()) == 2
    assert [tick.get_text() for tick in tpot.get_xticklabels()] == ["0.05", "0.1", "0.2", "0.4"]


def test_ratio_figure_has_intervals_predictions_and_the_parity_line():
    figure = load_figures(load_runs())["plots/load_ratios_vs_rate.png"]
    (tpot, e2el) = figure.axes  # no goodput_ratio logged
    assert tpot.get_title() == "TPOT p99, spec / baseline"
    measured = next(line for line in tpot.get_lines() if line.get_marker() == "o")
    assert measured.get_ydata().tolist() == pytest.approx(
        [(60 + 300 * rate) / (100 + 100 * rate) for rate in (0.05, 0.1, 0.2, 0.4)]
    )
    predicted = next(line for line in tpot.get_lines() if line.get_marker() == "x")
    assert predicted.get_ydata().tolist() == pytest.approx(0.95 * measured.get_ydata())
    assert any(line.get_ydata()[0] == 1.0 and line.get_linestyle() == "--" for line in tpot.get_lines())
    assert not any(line.get_marker() == "x" for line in e2el.get_lines())  # no predicted E2EL ratio logged


def test_the_predicted_p99_e2el_ratio_is_drawn_beside_the_measured_one():
    runs = load_runs()
    runs["metrics.predicted_e2el_p99_ratio"] = 1.1 * runs["metrics.e2el_p99_ratio"]
    (_, e2el) = load_figures(runs)["plots/load_ratios_vs_rate.png"].axes
    measured = next(line for line in e2el.get_lines() if line.get_marker() == "o")
    predicted = next(line for line in e2el.get_lines() if line.get_marker() == "x")
    assert predicted.get_ydata().tolist() == pytest.approx(1.1 * measured.get_ydata())


def test_probe_table_has_one_row_per_rate_with_ratios_and_predictions():
    table = probe_table(load_runs())
    assert table["rate (requests/s)"].tolist() == [0.05, 0.1, 0.2, 0.4]  # the parent has no rate
    assert table["series"].unique().tolist() == ["qwen_int8"]
    first = table.iloc[0]  # 0.05 requests/s: TPOT 75 vs 105 ms
    assert first["Time per output token p99 (ms)"] == pytest.approx(75)
    assert first["Time per output token p99, baseline (ms)"] == pytest.approx(105)
    assert first["Time per output token p99 (predicted) (ms)"] == pytest.approx(67.5)
    assert first["Occupancy, mean (rows)"] == pytest.approx(0.4)
    assert first["Occupancy (predicted) (rows)"] == pytest.approx(0.35)
    assert first["TPOT p99, spec / baseline (x)"] == "0.714 [0.664, 0.764]"
    assert first["E2EL p99, spec / baseline (x)"] == "0.714"  # no interval logged
    assert first["TPOT p99, spec / baseline (predicted) (x)"] == "0.679"
    assert "Goodput, spec / baseline (x)" not in table


def test_batch_runs_have_no_load_figures_or_table():
    runs = load_runs().drop(columns="params.mode")
    assert load_figures(runs) == {}
    assert probe_table(runs).empty


def test_write_report_adds_the_load_section_and_figures(tmp_path: Path):
    paths = write_report(load_runs(), tmp_path)
    assert {"plots/load_latency_vs_rate.png", "plots/load_ratios_vs_rate.png"} <= {
        path.relative_to(tmp_path).as_posix() for path in paths
    }
    markdown = (tmp_path / "summary.md").read_text()
    section = markdown.split("### Under load (one row per request rate)\n\n", 1)[1]
    assert section.startswith("| series | rate (requests/s) | Occupancy, mean, baseline (rows) |")
    assert "| qwen_int8 | 0.05 | 0.5 | 0.4 | 0.35 |" in section


def test_catalog_knows_every_load_key_and_the_summary_shows_them():
    assert metric("tpot_ms_p99_baseline") is metric("tpot_ms_p99_spec")
    assert metric("queue_ms_mean_spec").unit == "ms"
    assert metric("tpot_p99_ratio_ci_high").key == "tpot_p99_ratio"
    assert metric("acceptance_rate_occupancy_4_7").key == "acceptance_rate_occupancy_{low}_{high}"
    assert metric("max_rate_under_slo_baseline").key == "max_rate_under_slo_spec"
    assert metric("predicted_saturated_baseline").format(1.0) == "1"
    for key in ("crossover_rate_low", "paired_requests", "failed_requests_spec", "predicted_crossover_rate"):
        assert metric(key) is not None, key
    text = summary_markdown(load_metrics(0.2) | {"paired_requests": 24, "failed_requests_spec": 0})
    assert "| Time per output token p99 (ms) | 120 | 120 |" in text
    assert "| TPOT p99, spec / baseline (x) | — | 1 [0.95, 1.05] |" in text
    assert "| Requests behind the ratios | — | 24 |" in text


def test_the_crossover_is_marked_where_it_was_searched():
    runs = load_runs().assign(**{"params.load.crossover_metric": "e2el_p99"})
    ttft, tpot, e2el = load_figures(runs)["plots/load_latency_vs_rate.png"].axes
    assert len(e2el.patches) == 1 and not tpot.patches and not ttft.patches
    tpot_ratio, e2el_ratio = load_figures(runs)["plots/load_ratios_vs_rate.png"].axes
    assert len(e2el_ratio.patches) == 1 and not tpot_ratio.patches
