"""What a job returns to Hydra: one metric of its run, so search sweepers (Optuna) can drive specbench.

`objective` names a metric key of the catalog (default `speedup`); the catalog's
`better` field gives its direction, which the shipped search configs read through
`${direction:${objective}}`. A job that fails returns the worst value for that
direction, so a search goes on and steers away from it.
"""

from __future__ import annotations

import math

from specbench.catalog import HIGHER, LOWER, metric
from specbench.errors import ConfigError

DIRECTIONS = {HIGHER: "maximize", LOWER: "minimize"}


def objective_direction(key: str) -> str:
    """`maximize` or `minimize` for a metric key; ConfigError for keys that are unknown or have no direction."""
    entry = metric(key)
    if entry is None or entry.better not in DIRECTIONS:
        raise ConfigError(
            f"objective={key} is not a metric with a direction: use speedup, spec_tokens_per_s, "
            "cost_per_1k_tokens_usd_spec or another key the README's metric table marks higher or lower."
        )
    return DIRECTIONS[entry.better]


def failed_value(key: str) -> float:
    """The worst possible value of the objective: what a failed job returns (NaN if the key itself is bad)."""
    try:
        return -math.inf if objective_direction(key) == "maximize" else math.inf
    except ConfigError:
        return math.nan


def run_value(run_id: str, key: str) -> float:
    """The objective as the run logged it (the worst value if it logged none, e.g. a cost without a price)."""
    from mlflow.tracking import MlflowClient  # the config schema imports this module; MLflow only a finished job

    value = MlflowClient().get_run(run_id).data.metrics.get(key)
    return failed_value(key) if value is None else value
