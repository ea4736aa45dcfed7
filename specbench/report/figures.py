"""Cross-run comparison figures: speedup and acceptance against k, and each run's figures beside its own baseline."""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from specbench.catalog import metric
from specbench.plots import FIGSIZE, new_figure, reference_line
from specbench.report.query import column, summary_table


def col(key: str) -> str:
    """The summary table's column of an MLflow metric key."""
    return column(key, metric(key))


def draft_colors(names: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """One qualitative colour per distinct name, assigned in sorted order so every plot agrees."""
    unique = sorted(set(names))
    colormap = matplotlib.colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {name: colormap(index % colormap.N) for index, name in enumerate(unique)}


def comparison_figures(runs: pd.DataFrame) -> dict[str, Figure]:
    """Cross-run figures keyed by artifact path; one colour per draft (per "verifier / backend / draft" when
    those vary)."""
    table = summary_table(runs)
    table["series"] = _series_labels(table)
    table = table.sort_values(["series", "k", "batch"], kind="stable").reset_index(drop=True)
    colors = draft_colors(table["series"])
    constant = [name for name in ("verifier", "sampling", "backend") if table[name].nunique() == 1]
    subtitle = ", ".join(f"{name}: {table[name][0]}" for name in constant)

    def bars(title: str, ylabel: str, *columns: tuple[str, str, str | None]) -> Figure:
        return _bars_vs_baseline(table, colors, title, subtitle, ylabel, list(columns))

    figures = {
        "plots/speedup_vs_k.png": _speedup_vs_k(table, colors, subtitle),
        "plots/acceptance_vs_k.png": _acceptance_vs_k(table, colors, subtitle),
        "plots/latency.png": bars(
            "Latency per request",
            "latency per request (s)",
            ("speculative p50", col("spec_latency_p50_s"), col("baseline_latency_p50_s")),
            ("speculative p95", col("spec_latency_p95_s"), col("baseline_latency_p95_s")),
        ),
        "plots/throughput.png": bars(
            "Throughput", "generated tokens/s", ("speculative", col("spec_tokens_per_s"), col("baseline_tokens_per_s"))
        ),
        "plots/disagreement.png": bars(
            "Speculative outputs that differ from the baseline",
            "prompts whose output differs (%)",
            ("speculative", col("disagreement_rate"), None),
        ),
        "plots/cost.png": bars(
            "Cost per query",
            "cost per query (USD)",
            ("speculative", col("cost_per_query_usd_spec"), col("cost_per_query_usd_baseline")),
        ),
    }
    if table["batch"].nunique() > 1:
        figures["plots/speedup_vs_batch.png"] = _speedup_vs_batch(runs, subtitle)
    return figures


def _series_labels(
    table: pd.DataFrame, by: tuple[str, ...] = ("verifier", "backend", "draft", "sampling", "batch")
) -> pd.Series:
    """The draft, with the verifier, the backend, the sampling mode and the batch size when those vary across runs."""
    parts = [name for name in by if name == "draft" or table[name].nunique() > 1]
    labels = table[parts].astype("string").fillna("?")
    if "batch" in labels:
        labels["batch"] = "batch " + labels["batch"]
    if "k" in labels:
        labels["k"] = "k=" + labels["k"]
    return labels.agg(" / ".join, axis=1)


def _speedup_vs_batch(runs: pd.DataFrame, subtitle: str) -> Figure:
    """Measured speedup against batch size, one line per (draft, k), with the model's predicted curve beside it.

    The predicted curve of a series is the one its smallest-batch run measured (each run predicts every batch
    size of its cost grid from its own acceptance and step costs); points it marked extrapolated (batch sizes
    over 4x its prompts) are drawn hollow.
    """
    table = summary_table(runs, sort=False)  # row i is runs.iloc[i]
    table["series"] = _series_labels(table, by=("verifier", "backend", "draft", "k", "sampling"))
    predicted = runs.filter(regex=r"^metrics\.predicted_speedup_batch_\d+$").reset_index(drop=True)
    predicted.columns = [int(name.rsplit("_", 1)[1]) for name in predicted.columns]
    predicted = predicted[sorted(predicted.columns)]
    colors = draft_colors(table["series"])
    figure, (ax,) = new_figure("Speedup over the baseline vs batch size", subtitle)
    handles = _series_handles(colors)
    extrapolated = False
    for series, group in table.groupby("series", sort=True):
        group = group.sort_values("batch")
        values = _column(group, col("speedup"))
        low, high = _column(group, col("speedup_ci_low")), _column(group, col("speedup_ci_high"))
        ax.errorbar(
            group["batch"].to_numpy(float),
            values,
            yerr=np.clip([values - low, high - values], 0, None),
            color=colors[series],
            marker="o",
            capsize=3,
        )
        curve = predicted.loc[group.index[0]].dropna() if not predicted.empty else pd.Series(dtype=float)
        if not curve.empty:
            ax.plot(curve.index, curve.to_numpy(float), color=colors[series], linestyle="--", marker="x")
            far = [size for size in curve.index if runs.iloc[group.index[0]].get(_extrapolated(size)) == 1]
            if far:
                ax.plot(far, curve[far].to_numpy(float), linestyle="none", marker="o", mfc="none", color=colors[series])
                extrapolated = True
    if not predicted.empty:
        handles.append(Line2D([], [], color="grey", linestyle="--", marker="x", label="predicted (dashed)"))
    if extrapolated:
        handles.append(
            Line2D([], [], color="grey", linestyle="none", marker="o", mfc="none", label="predicted, extrapolated")
        )
    handles.append(reference_line(ax, 1.0, "baseline (no speedup)"))
    ax.set_xscale("log", base=2)
    ax.legend(handles=handles, fontsize=8)
    ax.set(xlabel="batch size (rows decoded together)", ylabel="speedup over baseline (x)")
    return figure


def _extrapolated(size: int) -> str:
    """The runs column that marks the prediction at `size` rows as extrapolated."""
    return f"metrics.predicted_speedup_batch_{size}_extrapolated"


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric column, NaN throughout when the runs did not log it."""
    return table[name].to_numpy(float) if name in table else np.full(len(table), np.nan)


def _lines_vs_k(
    ax: Axes, table: pd.DataFrame, colors: dict, column: str, interval: tuple[str, str] | None = None, **style
) -> None:
    """One line per series of `column` against k, with error bars from the `interval` columns."""
    for series, group in table.groupby("series", sort=True):
        values = _column(group, column)
        yerr = None
        if interval is not None:
            low, high = (_column(group, name) for name in interval)
            yerr = np.clip([values - low, high - values], 0, None)
        ax.errorbar(_column(group, "k"), values, yerr=yerr, color=colors[series], capsize=3, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft tokens per step k")


def _series_handles(colors: dict) -> list[Line2D]:
    """Legend entries naming each series by its colour."""
    return [Line2D([], [], color=color, marker="o", label=series) for series, color in colors.items()]


def _speedup_vs_k(table: pd.DataFrame, colors: dict, subtitle: str) -> Figure:
    figure, (ax,) = new_figure("Speedup over the baseline vs k", subtitle)
    _lines_vs_k(ax, table, colors, col("speedup"), (col("speedup_ci_low"), col("speedup_ci_high")), marker="o")
    _lines_vs_k(ax, table, colors, col("predicted_speedup"), linestyle="--", marker="x")
    handles = _series_handles(colors)
    if col("predicted_speedup") in table:
        handles.append(Line2D([], [], color="grey", linestyle="--", marker="x", label="predicted (dashed)"))
    handles.append(reference_line(ax, 1.0, "baseline"))
    ax.legend(handles=handles, fontsize=8)
    ax.set_ylabel("speedup over baseline (x)")
    return figure


def _acceptance_vs_k(table: pd.DataFrame, colors: dict, subtitle: str) -> Figure:
    figure, (rate, tokens) = new_figure("Acceptance vs k", subtitle, ncols=2, width=9)
    _lines_vs_k(rate, table, colors, col("acceptance_rate"), marker="o")
    rate.set(title="Drafted tokens accepted", ylabel="acceptance rate (%)", ylim=(0, 105))
    _lines_vs_k(tokens, table, colors, col("mean_accepted_tokens"), marker="o")
    tokens.set(title="Tokens per verifier pass", ylabel="mean accepted tokens per step")
    rate.legend(handles=_series_handles(colors))
    return figure


def _bars_vs_baseline(
    table: pd.DataFrame,
    colors: dict,
    title: str,
    subtitle: str,
    ylabel: str,
    bars: list[tuple[str, str, str | None]],
) -> Figure:
    """Per run, one bar per (name, speculative column, baseline column); each run's own baseline is a dashed segment."""
    figure, (ax,) = new_figure(title, subtitle, width=max(FIGSIZE[0], 2 + 0.4 * len(table) * len(bars)))
    x = np.arange(len(table))
    width = 0.8 / len(bars)
    handles = []
    for index, (name, spec, baseline) in enumerate(bars):
        hatch = "//" if index else None
        centers = x + (index - (len(bars) - 1) / 2) * width
        ax.bar(
            centers,
            _column(table, spec),
            width,
            color=[colors[s] for s in table["series"]],
            hatch=hatch,
            edgecolor="white",
        )
        handles.append(Patch(facecolor="lightgrey", edgecolor="dimgrey", hatch=hatch, label=name))
        if baseline is not None:
            segments = (centers - width / 2, centers + width / 2)
            ax.hlines(_column(table, baseline), *segments, colors="black", linestyles="--", linewidth=1.5)
    if any(baseline for *_, baseline in bars):
        handles.append(Line2D([], [], color="black", linestyle="--", label="baseline (same run)"))
    ax.margins(y=0.2)
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncols=len(handles))
    crowded = len(table) > 6
    ax.set_xticks(
        x,
        [f"{series}\nk={k}" for series, k in zip(table["series"], table["k"], strict=True)],
        rotation=30 if crowded else 0,
        ha="right" if crowded else "center",
        fontsize=8,
    )
    ax.set(xlabel="run (draft set, k)", ylabel=ylabel)
    return figure
