"""Figures of one run, and the drawing helpers the cross-run report shares.

Figures use matplotlib's object API on the Agg canvas (no pyplot state), so they
render headless and in threads. A missing metric drops its element of a figure,
never the figure. Rates (0..1) are drawn and written as percentages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from specbench.catalog import metric
from specbench.intervals import sample_size

FIGSIZE = (7.0, 4.5)
DPI = 110
BASELINE_COLOR = "tab:gray"
SPEC_COLOR = "tab:blue"
PREDICTED_COLOR = "tab:orange"
MODES = {"baseline": ("baseline", BASELINE_COLOR), "spec": ("speculative", SPEC_COLOR)}
MODE_COLORS = [color for _, color in MODES.values()]
_POSITION_KEY = re.compile(r"acceptance_rate_pos_(\d+)")
_CATEGORY_KEY = re.compile(r"speedup_cat_(.+)")
_BY_BATCH_KEY = re.compile(r"predicted_speedup_batch_(\d+)")


def axis_label(key: str) -> str:
    """The catalog's label and unit of a metric, for an axis."""
    entry = metric(key)
    return entry.column if entry is not None else key


def new_figure(title: str, subtitle: str = "", ncols: int = 1, width: float = FIGSIZE[0]) -> tuple[Figure, list[Axes]]:
    """An empty figure of `ncols` side-by-side panels on the Agg canvas, titled (subtitle on a second line)."""
    figure = Figure(figsize=(width, FIGSIZE[1]), dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    figure.suptitle(f"{title}\n{subtitle}" if subtitle else title)
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def reference_line(ax: Axes, value: float, label: str, vertical: bool = False) -> Line2D:
    """The baseline (or another reference) as a black dashed line across the axes."""
    draw = ax.axvline if vertical else ax.axhline
    return draw(value, color="black", linestyle="--", linewidth=1, label=label)


def run_figures(
    metrics: dict[str, float],
    table: pd.DataFrame,
    drafters: list[str],
    verify_curve: pd.DataFrame | None = None,
    predicted: pd.DataFrame | None = None,
    title: str = "",
    k: int | None = None,
    verify_surface: pd.DataFrame | None = None,
    batch_size: int = 1,
) -> dict[str, Figure]:
    """One run's figures keyed by artifact path; `verify_curve` adds plots/verify_cost.png, and a
    `verify_surface` over several batch sizes adds plots/batch_scaling.png.

    `k` is the run's draft length, where the measured speedup sits on the predicted
    curve; by default the highest position with an `acceptance_rate_pos_<n>` metric.
    """
    positions = _positions(metrics)
    run_k = k if k is not None else max(positions, default=None)
    figures = {
        "plots/latency.png": _latency(metrics, title),
        "plots/throughput.png": _throughput(metrics, table, title),
        "plots/acceptance.png": _acceptance(metrics, positions, title),
        "plots/speedup.png": _speedup(metrics, predicted, run_k, title),
        "plots/drafters.png": _drafters(metrics, drafters, title),
        "plots/disagreement.png": _disagreement(metrics, table, title),
    }
    if verify_curve is not None:
        figures["plots/verify_cost.png"] = _verify_cost(verify_curve, run_k, title)
    if verify_surface is not None and verify_surface["batch_size"].nunique() > 1 and run_k is not None:
        figures["plots/batch_scaling.png"] = _batch_scaling(metrics, verify_surface, run_k, batch_size, title)
    if categories := _categories(metrics):
        figures["plots/categories.png"] = _by_category(metrics, categories, title)
    return figures


def _get(metrics: dict[str, float], key: str) -> float:
    """The metric as a float, NaN when absent."""
    value = metrics.get(key)
    return math.nan if value is None else float(value)


def _error(metrics: dict[str, float], key: str) -> tuple[float, float]:
    """Distances from the value down and up to its 95% interval (NaN without one), for error bars."""
    value = _get(metrics, key)
    below, above = np.clip([value - _get(metrics, f"{key}_ci_low"), _get(metrics, f"{key}_ci_high") - value], 0, None)
    return float(below), float(above)


def _per_mode(values: Callable[[str], list]) -> dict[str, list]:
    """{"baseline": values("baseline"), "speculative": values("spec")}, for bars of both modes."""
    return {label: values(mode) for mode, (label, _) in MODES.items()}


def _median(table: pd.DataFrame, column: str) -> float:
    return float(table[column].median()) if column in table else math.nan


def _positions(metrics: dict[str, float]) -> list[int]:
    """Draft positions (1..k) that have an acceptance rate."""
    return sorted(int(match[1]) for key in metrics if (match := _POSITION_KEY.fullmatch(key)))


def _categories(metrics: dict[str, float]) -> list[str]:
    """Categories (as in their metric keys) that have a speedup, in the order they were logged."""
    return [match[1] for key in metrics if (match := _CATEGORY_KEY.fullmatch(key))]


def _grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    colors: Sequence[str],
    errors: dict[str, Sequence[tuple[float, float]]] | None = None,
    fmt: str = "{:.3g}",
) -> None:
    """Bars of every series side by side in each group, labelled with their values, with optional error bars."""
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for index, ((name, values), color) in enumerate(zip(series.items(), colors, strict=True)):
        yerr = np.array(errors[name], dtype=float).reshape(-1, 2).T if errors else None
        offset = (index - (len(series) - 1) / 2) * width
        label = name if len(series) > 1 else None  # a lone series is named by the axis labels
        bars = ax.bar(x + offset, np.asarray(values, float), width, yerr=yerr, capsize=4, color=color, label=label)
        ax.bar_label(bars, fmt=fmt, padding=2, fontsize=8)
    ax.set_xticks(x, groups)
    ax.margins(y=0.15)
    if len(series) > 1:
        ax.legend()


def _latency(metrics: dict[str, float], title: str) -> Figure:
    figure, (ax,) = new_figure("Latency per request", title)
    quantiles = ("p50", "p95")
    _grouped_bars(
        ax,
        quantiles,
        _per_mode(lambda mode: [_get(metrics, f"{mode}_latency_{q}_s") for q in quantiles]),
        MODE_COLORS,
        _per_mode(lambda mode: [_error(metrics, f"{mode}_latency_{q}_s") for q in quantiles]),
    )
    bars = f"95% interval, {sample_size(metrics)}" if sample_size(metrics) else "95% interval"
    ax.set(xlabel=f"percentile over prompts (error bars: {bars})", ylabel="latency per request (s)")
    return figure


def _throughput(metrics: dict[str, float], table: pd.DataFrame, title: str) -> Figure:
    figure, (ax,) = new_figure("Throughput", title)
    _grouped_bars(
        ax,
        ["whole run (total tokens / total time)", "median prompt"],
        _per_mode(lambda mode: [_get(metrics, f"{mode}_tokens_per_s"), _median(table, f"{mode}_tokens_per_s")]),
        MODE_COLORS,
    )
    ax.set(xlabel="aggregate", ylabel=axis_label("spec_tokens_per_s"))
    return figure


def _acceptance(metrics: dict[str, float], positions: list[int], title: str) -> Figure:
    figure, (ax,) = new_figure("Acceptance rate by draft position", title)
    rates = [100 * _get(metrics, f"acceptance_rate_pos_{position}") for position in positions]
    _grouped_bars(ax, [str(position) for position in positions], {"by position": rates}, [SPEC_COLOR], fmt="{:.3g}%")
    overall = 100 * _get(metrics, "acceptance_rate")
    if not math.isnan(overall):
        ax.axhline(overall, color=PREDICTED_COLOR, linewidth=2, label=f"overall {overall:.3g}%")
        low, high = _get(metrics, "acceptance_rate_ci_low"), _get(metrics, "acceptance_rate_ci_high")
        if not math.isnan(low + high):
            ax.axhspan(100 * low, 100 * high, color=PREDICTED_COLOR, alpha=0.2, label="overall, 95% interval")
        ax.legend(loc="upper right")
    ax.set_ylim(0, 110)
    ax.set(xlabel="draft position (1 = first drafted token)", ylabel=axis_label("acceptance_rate"))
    return figure


def _measured_speedup(ax: Axes, x: float, metrics: dict[str, float], label: str) -> None:
    """The run's measured speedup at `x`, with its 95% interval as error bars."""
    ax.errorbar(
        [x],
        [_get(metrics, "speedup")],
        yerr=np.array([_error(metrics, "speedup")]).T,
        fmt="s",
        markersize=9,
        capsize=5,
        color=SPEC_COLOR,
        label=label,
    )


def _speedup(metrics: dict[str, float], predicted: pd.DataFrame | None, k: int | None, title: str) -> Figure:
    figure, (ax,) = new_figure("Speedup over the baseline", title)
    if predicted is not None:
        ax.plot(
            predicted["k"], predicted["predicted_speedup"], marker="o", color=PREDICTED_COLOR, label="predicted (model)"
        )
        _measured_speedup(ax, math.nan if k is None else k, metrics, f"measured at k={k} (95% interval)")
        ax.plot(
            [math.nan if k is None else k],
            [_get(metrics, "steady_state_speedup")],
            "D",
            markersize=8,
            color=PREDICTED_COLOR,
            markerfacecolor="none",
            label="measured, steady state (what the model describes)",
        )
        ax.set_xlabel("draft tokens per step k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _grouped_bars(
            ax,
            ["measured", "decode only\n(after first token)", "steady state\n(no prefills)", "predicted (model)"],
            {
                "speedup": [
                    _get(metrics, key)
                    for key in ("speedup", "decode_speedup", "steady_state_speedup", "predicted_speedup")
                ]
            },
            [SPEC_COLOR],
            {"speedup": [_error(metrics, "speedup")] + [(math.nan, math.nan)] * 3},
        )
        ax.set_xlabel("estimate" if k is None else f"estimate at k={k}")
    reference_line(ax, 1.0, "baseline (1.0x)")
    ax.legend()
    ax.set_ylabel(axis_label("speedup"))
    return figure


def _drafters(metrics: dict[str, float], drafters: list[str], title: str) -> Figure:
    figure, (rates, times) = new_figure("Drafters", title, ncols=2, width=9)
    _grouped_bars(
        rates,
        drafters,
        {
            "acceptance rate": [100 * _get(metrics, f"acceptance_rate_{name}") for name in drafters],
            "win rate": [100 * _get(metrics, f"win_rate_{name}") for name in drafters],
        },
        [SPEC_COLOR, PREDICTED_COLOR],
        fmt="{:.3g}%",
    )
    rates.set_ylim(0, 110)
    rates.set(title="Acceptance and win rate", xlabel="drafter", ylabel="rate (%)")
    _grouped_bars(
        times, drafters, {"draft time": [_get(metrics, f"draft_time_s_{name}") for name in drafters]}, ["tab:green"]
    )
    times.set(title="Time spent drafting (all prompts)", xlabel="drafter", ylabel=axis_label("draft_time_s_{draft}"))
    return figure


def _verify_cost(curve: pd.DataFrame, k: int | None, title: str) -> Figure:
    figure, (ax,) = new_figure("Verifier cost of checking n new tokens in one pass", title)
    ax.plot(curve["new_tokens"], curve["ratio_to_one_token"], marker="o", color=SPEC_COLOR, label="measured")
    reference_line(ax, 1.0, "one new token (reference)")
    if k is not None:
        ax.axvline(k + 1, color=PREDICTED_COLOR, linestyle=":", label=f"this run: k + 1 = {k + 1} tokens")
    if not curve.empty:
        one_token_ms = float(curve["verify_ms"].iloc[0])
        axis = ax.secondary_yaxis("right", functions=(lambda r: r * one_token_ms, lambda ms: ms / one_token_ms))
        axis.set_ylabel("verify time (ms)")
    ax.set(xlabel="new tokens verified in one pass", ylabel="time / one-token time (x)")
    ax.legend()
    return figure


def _batch_scaling(metrics: dict[str, float], surface: pd.DataFrame, k: int, batch_size: int, title: str) -> Figure:
    """Verifying k+1 tokens per row against one, and the predicted speedup, as the batch grows."""
    figure, (cost, speedup) = new_figure("Where speculation stops paying, by batch size", title, ncols=2, width=10)
    wide = surface[surface["new_tokens"] == k + 1].sort_values("batch_size")
    cost.plot(wide["batch_size"], wide["ratio_to_one_token"], marker="o", color=SPEC_COLOR, label=f"{k + 1} tokens")
    reference_line(cost, 1.0, "one token per row (reference)")
    cost.set(title="Verifier cost, measured", xlabel="batch size (rows)", ylabel="time / one-token time (x)")
    cost.set_xscale("log", base=2)
    cost.legend()
    sizes = sorted(int(match[1]) for key in metrics if (match := _BY_BATCH_KEY.fullmatch(key)))
    if sizes:
        predicted = [_get(metrics, f"predicted_speedup_batch_{size}") for size in sizes]
        speedup.plot(sizes, predicted, marker="o", color=PREDICTED_COLOR, label="predicted (model)")
        far = [(size, value) for size, value in zip(sizes, predicted, strict=True) if _extrapolated(metrics, size)]
        if far:  # more than 4x the prompts measured: drawn hollow
            label = "predicted, extrapolated"
            speedup.plot(*zip(*far, strict=True), "o", mfc="white", color=PREDICTED_COLOR, label=label)
        _measured_speedup(speedup, batch_size, metrics, f"measured at batch {batch_size}")
        speedup.set_xscale("log", base=2)
    reference_line(speedup, 1.0, "no speedup (1.0x)")
    speedup.set(title=f"Speedup at k={k}", xlabel="batch size (rows)", ylabel=axis_label("speedup"))
    speedup.legend()
    return figure


def _extrapolated(metrics: dict[str, float], size: int) -> bool:
    return metrics.get(f"predicted_speedup_batch_{size}_extrapolated") == 1


def _by_category(metrics: dict[str, float], categories: list[str], title: str) -> Figure:
    figure, (speedups, rates) = new_figure("By category", title, ncols=2, width=max(9, 1.2 * len(categories) + 3))
    crowded = sum(len(name) for name in categories) > 30
    _grouped_bars(
        speedups, categories, {"speedup": [_get(metrics, f"speedup_cat_{name}") for name in categories]}, [SPEC_COLOR]
    )
    reference_line(speedups, 1.0, "baseline (1.0x)")
    speedups.axhline(_get(metrics, "speedup"), color=PREDICTED_COLOR, linewidth=2, label="whole run")
    speedups.set(title="Speedup over the baseline", xlabel="category", ylabel=axis_label("speedup"))
    _grouped_bars(
        rates,
        categories,
        {"acceptance": [100 * _get(metrics, f"acceptance_rate_cat_{name}") for name in categories]},
        [SPEC_COLOR],
        fmt="{:.3g}%",
    )
    rates.axhline(100 * _get(metrics, "acceptance_rate"), color=PREDICTED_COLOR, linewidth=2, label="whole run")
    rates.set_ylim(0, 110)
    rates.set(title="Drafted tokens accepted", xlabel="category", ylabel=axis_label("acceptance_rate"))
    for ax in (speedups, rates):
        if crowded:
            for label in ax.get_xticklabels():
                label.set(rotation=30, ha="right")
        ax.margins(y=0.3)
        ax.legend(loc="best", fontsize=8)
    return figure


def _disagreement(metrics: dict[str, float], table: pd.DataFrame, title: str) -> Figure:
    figure, (rates, spread) = new_figure("Agreement with the baseline", title, ncols=2, width=9)
    _grouped_bars(
        rates,
        ["differ from baseline", "identical to baseline"],
        {"outputs": [100 * _get(metrics, key) for key in ("disagreement_rate", "exact_match_rate")]},
        [PREDICTED_COLOR],
        fmt="{:.3g}%",
    )
    rates.set_ylim(0, 110)
    rates.set(title="Speculative outputs", xlabel="output vs baseline output", ylabel="prompts (%)")
    if "speedup" in table and table["speedup"].notna().any():
        spread.hist(table["speedup"].dropna(), bins="auto", color=SPEC_COLOR, alpha=0.8, label="prompts")
        reference_line(spread, 1.0, "baseline (1.0x)", vertical=True)
        run_speedup = _get(metrics, "speedup")
        if not math.isnan(run_speedup):
            spread.axvline(run_speedup, color=PREDICTED_COLOR, linewidth=2, label=f"whole run {run_speedup:.3g}x")
        spread.yaxis.set_major_locator(MaxNLocator(integer=True))
        spread.legend()
    spread.set(title="Per-prompt speedup", xlabel=axis_label("speedup"), ylabel="prompts")
    return figure
