"""Per-category figures: the run-level speedup, acceptance and throughput, computed over each category's prompts.

Each figure is the run-level metric applied to the category's rows of the
per-prompt table (so a ratio of sums, like the run's own), logged as
`<metric>_cat_<category>` with the category made safe for an MLflow key. The
rows of a batch share its wall time whatever their categories, so here each
request counts its own latency (from its batch's start to its last token) as
its time; at batch size 1 that is the batch's time. With `repeats` > 1 each
category's speedup also gets its spread over the passes,
`speedup_repeat_{min,median,max}_cat_<category>`: a category of a few prompts
moves more between passes than the whole set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from specbench import metrics
from specbench.catalog import SPREAD_STATS
from specbench.data import Prompt
from specbench.metrics import PromptOutcome

# run-level metrics that get one value per category
PER_CATEGORY = ("speedup", "acceptance_rate", "mean_accepted_tokens", "spec_tokens_per_s")
_UNSAFE = re.compile(r"[^0-9A-Za-z_]+")


def metric_suffix(category: str) -> str:
    """The category as it appears in metric keys: runs of other characters than letters, digits and _ become _."""
    return _UNSAFE.sub("_", category).strip("_")


def add_category_column(table: pd.DataFrame, prompts: Sequence[Prompt]) -> None:
    """Add each prompt's category to the per-prompt table (joined on the id), when the records have categories."""
    by_id = {prompt.pubid: prompt.category for prompt in prompts}
    if any(category is not None for category in by_id.values()):
        table.insert(1, "category", table["pubid"].map(by_id))


def categories(table: pd.DataFrame) -> list[str]:
    """The categories of the per-prompt table, in order of first appearance; none without a category column."""
    return list(table["category"].dropna().unique()) if "category" in table else []


def category_metrics(table: pd.DataFrame, outcomes: Sequence[PromptOutcome]) -> dict[str, float]:
    """`<metric>_cat_<category>` for every metric of PER_CATEGORY; `outcomes` are the table's rows, in order."""
    results: dict[str, float] = {}
    for category in categories(table):
        rows = (table["category"] == category).to_numpy()
        subset = table[rows].reset_index(drop=True)
        subset = subset.assign(  # each request as its own batch, timed by its own latency
            batch=range(len(subset)),
            baseline_batch_s=subset["baseline_latency_s"],
            spec_batch_s=subset["spec_latency_s"],
        )
        kept = [outcome for outcome, keep in zip(outcomes, rows, strict=True) if keep]
        overall = metrics.timing_metrics(subset) | metrics.acceptance_metrics(subset, kept)
        suffix = metric_suffix(category)
        results |= {f"{key}_cat_{suffix}": float(overall[key]) for key in PER_CATEGORY}
        spread = metrics.repeat_metrics(subset)  # empty for one pass
        results |= {
            f"speedup_repeat_{stat}_cat_{suffix}": spread[f"speedup_repeat_{stat}"] for stat in SPREAD_STATS if spread
        }
    return results
