"""The report's load figures and table: runs served at several request rates, both modes against the rate.

Each load run (`params.mode` = load) is one request rate (`params.load.rate`) of a
series (verifier, backend, draft, k, sampling). Figures draw the speculative
figure solid and the same run's baseline dashed, in the series' colour, on a log
rate axis. A series' crossover (`crossover_rate`, `crossover_rate_low`,
`crossover_rate_high`, logged by a crossover search's parent run, when it is among
the runs) is a dotted vertical line over its shaded interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from specbench.load.crossover import RATIO_KEYS
from specbench.plots import new_figure, reference_line
from specbench.report.figures import _series_labels, col, draft_colors
from specbench.report.query import summary_table

LATENCY_PANELS = (("ttft", "Time to first token"), ("tpot", "Time per output token"), ("e2el", "End-to-end latency"))
RATIOS = tuple(RATIO_KEYS.values())
PREDICTED_RATIOS = {"tpot_p99_ratio": "predicted_tpot_p99_ratio", "e2el_p99_ratio": "predicted_e2el_p99_ratio"}
SERIES_BY = ("verifier", "backend", "draft", "k", "sampling")


def _metric(runs: pd.DataFrame, key: str) -> np.ndarray:
    """A metric of every run, NaN where a run did not log it."""
    name = f"metrics.{key}"
    return runs[name].to_numpy(float) if name in runs else np.full(len(runs), np.nan)


def load_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its series, its request rate (NaN for a run without one, e.g. a crossover search's
    parent), its crossover metric, and every metric it logged, keyed by MLflow key."""
    table = summary_table(runs, sort=False)
    rates = runs["params.load.rate"] if "params.load.rate" in runs else pd.Series(np.nan, index=runs.index)
    metric = runs.get("params.load.crossover_metric", pd.Series("tpot_p99", index=runs.index))
    frame = pd.DataFrame(
        {
            "series": _series_labels(table, by=SERIES_BY),
            "rate": pd.to_numeric(rates).to_numpy(),
            "crossover_metric": metric.fillna("tpot_p99").to_numpy(),
        }
    )
    metrics = runs.filter(regex=r"^metrics\.").rename(columns=lambda name: name.removeprefix("metrics."))
    return pd.concat([frame, metrics.reset_index(drop=True)], axis=1)


def _is_load(runs: pd.DataFrame) -> pd.Series:
    mode = runs["params.mode"] if "params.mode" in runs else pd.Series(pd.NA, index=runs.index)
    return (mode.astype("string") == "load").fillna(False).reset_index(drop=True)


def load_figures(runs: pd.DataFrame) -> dict[str, Figure]:
    """The load figures keyed by artifact path (none when no run served load at a rate): the p99 latencies of
    both modes, the ratios with their intervals and predictions, and goodput when runs set SLOs."""
    table = load_table(runs)
    probes = table[_is_load(runs) & table["rate"].notna()].sort_values(["series", "rate"], kind="stable")
    if probes.empty:
        return {}
    colors = draft_colors(probes["series"])
    crossovers = _crossovers(table)
    figures = {"plots/load_latency_vs_rate.png": _latencies(probes, colors, crossovers)}
    ratios = [key for key in RATIOS if key in probes and probes[key].notna().any()]
    if ratios:
        figures["plots/load_ratios_vs_rate.png"] = _ratios(probes, ratios, colors, crossovers)
    if "goodput_rps_spec" in probes and probes["goodput_rps_spec"].notna().any():
        figure, (ax,) = new_figure("Goodput against request rate", "requests meeting every SLO, per second")
        handles = _modes(ax, probes, colors, "goodput_rps") + _mark_crossovers(ax, crossovers, colors, "goodput")
        _rate_axis(ax, probes["rate"], ylabel="goodput (requests/s)")
        ax.legend(handles=handles, fontsize=7)
        figures["plots/load_goodput_vs_rate.png"] = figure
    return figures


def _crossovers(table: pd.DataFrame) -> pd.DataFrame:
    """Each series' crossover from the first run that logged one (a crossover search's parent)."""
    columns = ["series", "crossover_metric", "crossover_rate", "crossover_rate_low", "crossover_rate_high"]
    if "crossover_rate" not in table:  # no search logged one (or its crossover lay outside the range)
        return pd.DataFrame(columns=columns)
    return table[table["crossover_rate"].notna()].drop_duplicates("series").reindex(columns=columns)


def _modes(ax: Axes, probes: pd.DataFrame, colors: dict, stem: str) -> list[Line2D]:
    """Per series: `<stem>_spec` solid and `<stem>_baseline` dashed against the rate; legend handles."""
    for series, group in probes.groupby("series", sort=True):
        for mode, style in (("spec", "-"), ("baseline", "--")):
            key = f"{stem}_{mode}"
            if key in group:
                ax.plot(group["rate"], group[key], color=colors[series], linestyle=style, marker="o")
    return [
        *(Line2D([], [], color=color, marker="o", label=series) for series, color in colors.items()),
        Line2D([], [], color="grey", linestyle="-", label="speculative"),
        Line2D([], [], color="grey", linestyle="--", label="baseline (same run)"),
    ]


def _mark_crossovers(ax: Axes, crossovers: pd.DataFrame, colors: dict, metric: str) -> list:
    """A dotted line at the crossover rate of each series searched on `metric` (tpot_p99, e2el_p99, goodput),
    over its shaded interval; legend handles."""
    crossovers = crossovers[crossovers["crossover_metric"] == metric]
    handles = []
    for row in crossovers.itertuples(index=False):
        color = colors.get(row.series, "black")
        ax.axvline(row.crossover_rate, color=color, linestyle=":", linewidth=1.5)
        if pd.notna(row.crossover_rate_low) and pd.notna(row.crossover_rate_high):
            ax.axvspan(row.crossover_rate_low, row.crossover_rate_high, color=color, alpha=0.15)
    if not crossovers.empty:
        handles.append(Line2D([], [], color="black", linestyle=":", label="crossover"))
        handles.append(Patch(color="black", alpha=0.15, label="crossover 95% interval"))
    return handles


def _rate_axis(ax: Axes, rates: pd.Series, ylabel: str) -> None:
    """A log rate axis ticked at the probed rates."""
    ax.set_xscale("log")
    ticks = sorted(rates.unique())
    ax.set_xticks(ticks, [f"{rate:g}" for rate in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="request rate (requests/s)", ylabel=ylabel)


def _latencies(probes: pd.DataFrame, colors: dict, crossovers: pd.DataFrame) -> Figure:
    """TTFT, TPOT and E2EL p99 of both modes; the crossover on the panel of the metric it was searched on."""
    figure, axes = new_figure("p99 latencies against request rate", "", ncols=3, width=14)
    marks = []
    for ax, (name, label) in zip(axes, LATENCY_PANELS, strict=True):
        lines = _modes(ax, probes, colors, f"{name}_ms_p99")
        marks = _mark_crossovers(ax, crossovers, colors, f"{name}_p99") or marks
        ax.set_title(f"{label} p99")
        _rate_axis(ax, probes["rate"], ylabel=f"{name.upper()} p99 (ms)")
    axes[0].legend(handles=lines + marks, fontsize=7)  # one legend serves the three panels
    return figure


def _ratios(probes: pd.DataFrame, ratios: list[str], colors: dict, crossovers: pd.DataFrame) -> Figure:
    """Each of `ratios`, spec over baseline, with its 95% bootstrap interval; the model's prediction dashed."""
    figure, axes = new_figure(
        "Speculative over baseline against request rate", "", ncols=len(ratios), width=5 * len(ratios)
    )
    for ax, key in zip(axes, ratios, strict=True):
        handles = [Line2D([], [], color=color, marker="o", label=series) for series, color in colors.items()]
        for series, group in probes.groupby("series", sort=True):
            values = group[key].to_numpy(float)
            low, high = (_column(group, f"{key}_ci_{end}") for end in ("low", "high"))
            yerr = np.clip([values - low, high - values], 0, None)
            ax.errorbar(group["rate"], values, yerr=yerr, color=colors[series], marker="o", capsize=3)
            predicted = PREDICTED_RATIOS.get(key)
            if predicted in group and group[predicted].notna().any():
                ax.plot(group["rate"], group[predicted], color=colors[series], linestyle="--", marker="x")
        if PREDICTED_RATIOS.get(key) in probes:
            handles.append(Line2D([], [], color="grey", linestyle="--", marker="x", label="predicted"))
        handles.append(reference_line(ax, 1.0, "equal"))
        handles += _mark_crossovers(ax, crossovers, colors, key.removesuffix("_ratio"))
        ax.set_title(col(key).removesuffix(" (x)"))
        _rate_axis(ax, probes["rate"], ylabel="spec / baseline (x)")
        ax.legend(handles=handles, fontsize=7)
    return figure


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    return table[name].to_numpy(float) if name in table else np.full(len(table), np.nan)


PROBE_COLUMNS = (
    "occupancy_mean_baseline",
    "occupancy_mean_spec",
    "predicted_occupancy_spec",
    "ttft_ms_p99_baseline",
    "ttft_ms_p99_spec",
    "tpot_ms_p99_baseline",
    "tpot_ms_p99_spec",
    "predicted_tpot_ms_p99_spec",
    "e2el_ms_p99_baseline",
    "e2el_ms_p99_spec",
    "goodput_rps_baseline",
    "goodput_rps_spec",
)


def probe_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per load run at a rate: the rate, occupancy, the p99s, the ratios with their intervals, and the
    model's predictions beside what was measured. Columns no run logged are left out."""
    table = load_table(runs)
    probes = table[_is_load(runs) & table["rate"].notna()].sort_values(["series", "rate"], kind="stable")
    rows = pd.DataFrame({"series": probes["series"].to_numpy(), "rate (requests/s)": probes["rate"].to_numpy()})
    for key in PROBE_COLUMNS:
        if key in probes:
            rows[col(key)] = probes[key].to_numpy()
    for key in (*RATIOS, "predicted_tpot_p99_ratio"):
        if key in probes:
            rows[col(key)] = [_with_interval(row, key) for row in probes.to_dict("records")]
    return rows.dropna(axis=1, how="all").reset_index(drop=True)


def _with_interval(row: dict, key: str) -> str:
    """`value [low, high]` (3 significant digits), the value alone without an interval, '—' without a value."""
    value = row.get(key)
    if value is None or pd.isna(value):
        return "—"
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.3g}"
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"
