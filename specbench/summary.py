"""Markdown tables: one run's headline figures (summary.md), and the table helpers the report shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral

import pandas as pd

from specbench.catalog import Metric, summary_metrics
from specbench.intervals import legend, sample_size


def format_number(value: object) -> str:
    """Three significant digits (1,000 and above in full), integers as is, '—' when missing, text unchanged."""
    if isinstance(value, str):
        return value
    if pd.isna(value):
        return "—"
    if isinstance(value, Integral):
        return str(value)
    number = float(value)
    return f"{number:,.0f}" if abs(number) >= 1000 else f"{number:.3g}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; cells go through `format_number`."""
    lines = [list(header), ["---"] * len(header), *rows]
    return "\n".join(
        "| " + " | ".join(format_number(cell).replace("|", "\\|") for cell in line) + " |" for line in lines
    )


def _cell(metrics: Mapping[str, float], entry: Metric, key: str) -> str:
    """One value in its unit, followed by its 95% interval and n when the run logged one (or its spread over
    repeats)."""
    if entry.spread:
        return entry.format_spread(metrics, key)
    value, low, high = (entry.format(metrics.get(name)) for name in (key, f"{key}_ci_low", f"{key}_ci_high"))
    return value if "—" in (value, low, high) else f"{value} [{low}, {high}] {sample_size(metrics)}".rstrip()


def summary_markdown(metrics: Mapping[str, float], title: str = "", notes: Sequence[str] = ()) -> str:
    """The run's headline numbers as a markdown table, baseline next to speculative; absent metrics are left out.

    `notes` are lines under the table (e.g. why a figure is missing), after what the intervals' brackets mean.
    """
    rows = []
    for entry in summary_metrics():
        unit = "USD" if entry.fmt == "usd" else entry.unit
        label = f"{entry.label} ({unit})" if unit else entry.label
        cells = [_cell(metrics, entry, key) if key else "—" for key in (entry.baseline, entry.key)]
        if entry.key == "num_prompts":
            cells[0] = cells[1]
        if any(cell != "—" for cell in cells):
            rows.append([label, *cells])
    table = markdown_table(["Metric", "Baseline", "Speculative"], rows)
    notes = [line for line in (legend(metrics), *notes) if line]
    text = "".join(f"\n{note}\n" for note in notes)
    return f"### {title}\n\n{table}\n{text}" if title else f"{table}\n{text}"
