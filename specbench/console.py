"""What the console shows when a run or a sweep ends: the headline figures, then where to open them.

Labels, units and formats come from `specbench.catalog`; the URLs from `specbench.tracking`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from specbench import catalog, intervals, tracking
from specbench.catalog import EXTRAPOLATED_BEYOND
from specbench.config import CrossoverMetric, TrackingConfig
from specbench.load.crossover import RATIO_KEYS

_BY_BATCH = re.compile(r"predicted_speedup_batch_(\d+)")


def _with_unit(entry: catalog.Metric, text: str) -> str:
    """A formatted value with its unit ("1.48x", "12.3 tokens/s"); rates, percentages and dollars carry theirs."""
    if text == "—" or entry.fmt in ("rate", "pct", "usd") or not entry.unit:
        return text
    return f"{text}{entry.unit}" if entry.unit == "x" else f"{text} {entry.unit}"


def _value(metrics: Mapping[str, float], entry: catalog.Metric, key: str) -> str:
    """One value in its unit, followed by its 95% interval in brackets and its n when the run logged one."""
    value, low, high = (
        _with_unit(entry, entry.format(metrics.get(name)))
        for name in (key, *(key + s for s in catalog.INTERVAL_SUFFIXES))
    )
    return value if "—" in (value, low, high) else f"{value} [{low}, {high}] {intervals.sample_size(metrics)}".rstrip()


def headline(metrics: Mapping[str, float], sampled: bool = False, dtype: str = "") -> list[tuple[str, str]]:
    """(label, value) of each headline metric; a metric measured in both modes gives speculative and baseline.

    Disagreement is left out of `sampled` runs (their outputs differ by design); a greedy run that counted its
    near-ties shows them (`dtype`: the verifier's, whose rounding makes them).
    """
    rows = []
    for entry in catalog.headline_metrics():
        if entry.key == "disagreement_rate" and sampled:
            continue
        if entry.key == "disagreement_rate" and "disagreements_at_near_tie" in metrics:
            rows.append(("Disagreement", disagreement(metrics, dtype)))
            continue
        value = _value(metrics, entry, entry.key)
        if entry.baseline:
            value = f"{value} speculative, {_value(metrics, entry, entry.baseline)} baseline"
        rows.append((entry.label, value))
    if predictions := predictions_by_batch(metrics):
        rows.append(("Predicted speedup by batch", predictions))
    return rows


def disagreement(metrics: Mapping[str, float], dtype: str = "") -> str:
    """ "1 of 6 prompts, all at near-ties (bfloat16 rounding)": greedy decodes whose output differs, by the near-tie
    rule (`specbench.engine.scoring.TopTwoGap`); decodes rather than prompts with repeats."""
    repeats = int(metrics.get("num_repeats") or 1)
    decodes = int(metrics.get("num_prompts") or 0) * repeats
    near, other = int(metrics["disagreements_at_near_tie"]), int(metrics["disagreements_not_near_tie"])
    text = f"{near + other} of {decodes} {'prompts' if repeats == 1 else 'decodes'}"
    rounding = f" ({dtype} rounding)" if dtype else ""
    if not other:
        return text + (f", all at near-ties{rounding}" if near else "")
    if not near:
        return f"{text}, none at a near-tie: see the warnings"
    return f"{text}: {near} at near-ties{rounding}, {other} not (see the warnings)"


def predictions_by_batch(metrics: Mapping[str, float]) -> str:
    """The speedup model's prediction at each batch size ("1: 1.5x, 64*: 0.7x"), extrapolated ones starred."""
    sizes = sorted(int(match[1]) for key in metrics if (match := _BY_BATCH.fullmatch(key)))
    entry = catalog.metric("predicted_speedup_batch_{b}")
    parts, starred = [], False
    for size in sizes:
        mark = "*" if metrics.get(f"predicted_speedup_batch_{size}_extrapolated") else ""
        starred |= bool(mark)
        parts.append(f"{size}{mark}: {_with_unit(entry, entry.format(metrics[f'predicted_speedup_batch_{size}']))}")
    if starred:
        prompts = catalog.metric("num_prompts").format(metrics.get("num_prompts"))
        parts[-1] += f" (*: extrapolated, over {EXTRAPOLATED_BEYOND}x the {prompts} prompts)"
    return ", ".join(parts)


def where_to_look(tracking_uri: str, experiment_id: str, run_id: str, what: str = "This run") -> list[str]:
    """The MLflow URLs of a run and of its experiment's runs table, and how to serve them when no server is."""
    base = tracking.ui_base_url(tracking_uri)
    lines = [
        f"{what}: {tracking.run_url(base, experiment_id, run_id)}",
        f"All runs: {tracking.runs_table_url(base, experiment_id)}",
    ]
    if tracking_uri == TrackingConfig.uri:
        lines.append("(serve them with `make ui` or `specbench ui`)")
    elif not tracking_uri.startswith(("http://", "https://")):
        lines.append(f"(serve them with `specbench ui --tracking-uri {tracking_uri}`)")
    return lines


def run_summary(
    title: str,
    metrics: Mapping[str, float],
    links: list[str],
    notes: Sequence[str] = (),
    sampled: bool = False,
    dtype: str = "",
) -> str:
    """The end-of-run block: the title, the headline figures (see `headline`), the run's `notes` (prompts left out
    or cut, warnings), then `links` (from `where_to_look`)."""
    rows = headline(metrics, sampled, dtype)
    width = max(len(label) for label, _ in rows)
    prompts = catalog.metric("num_prompts").format(metrics.get("num_prompts"))
    repeats = int(metrics.get("num_repeats") or 1)
    legend = intervals.legend(metrics)
    heading = f"{title}, {prompts} prompts" + (f" x {repeats} repeats" if repeats > 1 else "")
    lines = ["", heading + (f" ({legend})" if legend else "")]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join([*lines, *notes, *links]) + "\n"


def sweep_table(runs: pd.DataFrame) -> str:
    """The headline figures of a sweep's runs (`mlflow.search_runs` rows), one line per run, fastest first."""
    columns = [(entry, name) for entry in catalog.headline_metrics() for name in (entry.key, entry.baseline) if name]
    header = ["Run", *(entry.label + (", baseline" if name == entry.baseline else "") for entry, name in columns)]
    rows = []
    sampled = runs.get("params.generation.do_sample", pd.Series("False", index=runs.index)).astype(str) == "True"
    for name, metrics, by_design in zip(runs["tags.mlflow.runName"], _metric_rows(runs), sampled, strict=True):
        if by_design:  # sampled: outputs differ from the baseline's by design
            metrics.pop("disagreement_rate", None)
        speedup = metrics.get("speedup", float("nan"))
        order = (speedup != speedup, -speedup)  # fastest first, runs without a speedup last
        rows.append((order, [str(name), *(_value(metrics, entry, key) for entry, key in columns)]))
    lines = [header, *(cells for _, cells in sorted(rows, key=lambda row: row[0]))]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _metric_rows(runs: pd.DataFrame) -> list[dict[str, float]]:
    """Each run's metrics as {key: value}."""
    keys = [column for column in runs.columns if column.startswith("metrics.")]
    return [{key.removeprefix("metrics."): row[key] for key in keys} for _, row in runs.iterrows()]


def sweep_summary(name: str, runs: pd.DataFrame, links: list[str]) -> str:
    """The end-of-sweep block: one line per finished run, then `links`."""
    return "\n".join(["", f"{name}: {len(runs)} finished runs", sweep_table(runs), *links]) + "\n"


LOAD_HEADLINE = ("ttft_ms_p99", "tpot_ms_p99", "e2el_ms_p99", "output_tokens_per_s", "goodput_rps", "occupancy_mean")


def load_summary(title: str, metrics: Mapping[str, float], links: list[str], conclusion: str | None = None) -> str:
    """The end-of-run block of a load run: each mode's latencies and throughput, the ratios with their intervals,
    acceptance, and (for a crossover search) its conclusion, then `links`."""
    rows = []
    for stem in LOAD_HEADLINE:
        entry = catalog.metric(f"{stem}_spec")
        if entry is None or f"{stem}_spec" not in metrics:
            continue
        spec, baseline = (_value(metrics, entry, f"{stem}_{mode}") for mode in ("spec", "baseline"))
        rows.append((entry.label.removesuffix(", speculative"), f"{spec} speculative, {baseline} baseline"))
    for key in (*RATIO_KEYS.values(), "acceptance_rate", "crossover_rate", "predicted_crossover_rate"):
        entry = catalog.metric(key)
        if entry is not None and key in metrics:
            rows.append((entry.label, _value(metrics, entry, key)))
    lines = ["", title]
    requests = metrics.get("num_requests")
    if requests is not None:
        repeats, traces = int(metrics.get("repeats", 1)), int(metrics.get("traces", 1))
        excluded = int(metrics.get("excluded_requests", 0))
        served = f"{int(requests)} requests" + (f" (the first {excluded} left out)" if excluded else "")
        served += (f" x {traces} traces" if traces > 1 else "") + f" x {repeats}"
        over = "traces, then their requests" if traces > 1 else "requests"
        lines[-1] += f", {served} ([low, high]: 95% bootstrap interval over {over})"
    if rows:
        width = max(len(label) for label, _ in rows)
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    if conclusion:
        lines.append(conclusion)
    return "\n".join([*lines, *links]) + "\n"


def load_probe_line(rate: float, metrics: Mapping[str, float], crossover_metric: CrossoverMetric) -> str:
    """One line per probed rate of a crossover search: the rate, the ratio it is searched on, and occupancy."""
    key = RATIO_KEYS[crossover_metric]
    entry = catalog.metric(key)
    ratio = _value(metrics, entry, key) if entry is not None else str(metrics.get(key))
    occupancy = metrics.get("occupancy_mean_spec", float("nan"))
    return f"  rate {rate:.3g} requests/s: {key} {ratio}, mean occupancy {occupancy:.2f} (speculative)"
