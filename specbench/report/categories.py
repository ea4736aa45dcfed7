"""The report's category table: each run's per-category speedup, acceptance and throughput, one row per category."""

from __future__ import annotations

import re

import pandas as pd

from specbench.catalog import SPREAD_STATS, metric
from specbench.report.query import column, param

# the run-level metric whose label and unit name each column, and the per-category key's prefix
COLUMNS = ("speedup", "acceptance_rate", "mean_accepted_tokens", "spec_tokens_per_s")
_SPEEDUP = re.compile(r"metrics\.speedup_cat_(.+)")
SPREAD_COLUMN = "Speedup over repeats, min / median / max (x)"


def category_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, category) for the runs that logged per-category figures, sorted by category, draft, k.

    Empty (no rows) when no run has categories.
    """
    identity = pd.DataFrame(
        {
            "dataset": param(runs, "dataset.name"),
            "draft": param(runs, "draft.name"),
            "k": pd.to_numeric(param(runs, "k"), errors="coerce").astype("Int64"),
            "verifier": param(runs, "verifier.name"),
        }
    )
    rows = []
    missing = pd.Series(float("nan"), index=runs.index)
    for name in runs.columns:
        if not (match := _SPEEDUP.fullmatch(name)):
            continue
        for index in range(len(runs)):
            if pd.isna(runs[name].iloc[index]):
                continue
            row = {"category": match[1], **identity.iloc[index].to_dict()}
            for key in COLUMNS:
                entry = metric(key)
                value = runs.get(f"metrics.{key}_cat_{match[1]}", missing)
                row[column(key, entry)] = value.iloc[index] * (100.0 if entry.fmt == "rate" else 1.0)
            spread = {
                f"speedup_repeat_{stat}": runs.get(f"metrics.speedup_repeat_{stat}_cat_{match[1]}", missing).iloc[index]
                for stat in SPREAD_STATS
            }
            row[SPREAD_COLUMN] = metric("speedup_repeat_median").format_spread(spread, "speedup_repeat_median")
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    if (table[SPREAD_COLUMN] == "—").all():  # no run had repeats
        table = table.drop(columns=SPREAD_COLUMN)
    return table.sort_values(["category", "dataset", "draft", "k"], kind="stable").reset_index(drop=True)
