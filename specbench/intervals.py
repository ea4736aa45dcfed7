"""95% intervals of a run's figures: the two-level bootstrap every interval uses, and the method by sample size.

    picks = resample_cells(units, repeats, seed)          # units drawn, then repeats within each
    low, high = interval(estimate, statistic(picks), units)

A unit is what can be drawn independently: a batch of prompts (a prompt, at batch size 1), whose rows
share their timing. `interval_method(units)` says how the bounds come from the resamples, and
`sample_size` how consoles and reports print n beside an interval. numpy and scipy only, so reports
load it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import stats

BOOTSTRAP_SAMPLES = 1000
# From this many independent units on, percentile intervals; below, a t interval (see `interval_method`)
PERCENTILE_MIN_UNITS = 20
METHODS = {
    "percentile": "percentile bootstrap",
    "t_log": "t on the log scale (logit for rates) with the bootstrap's standard error",
}


def interval_method(units: int) -> str:
    """The method of a run's 95% intervals over `units` independent units: a key of METHODS.

    Below PERCENTILE_MIN_UNITS units a percentile bootstrap covers far less than 95%: its resamples
    of 6 prompts hold at most 462 distinct sets, and its quantiles sit inside the spread a new set of
    prompts would show. There the interval is t on the log scale (logit for a rate in 0..1): the
    estimate +- t(0.975, units - 1) standard errors, the standard error the two-level bootstrap's
    (moved to that scale by its derivative at the estimate). The t quantile with units - 1 degrees of
    freedom widens the interval as units get few (2.57 at 6 units against 1.96), and the log keeps a
    ratio's interval positive and as asymmetric as a ratio is. scipy's BCa bootstrap was not chosen:
    it resamples one level only (repeats would bring no machine noise), and its bias and acceleration
    corrections, estimated from the same few units, are unstable below about 20.
    """
    return "percentile" if units >= PERCENTILE_MIN_UNITS else "t_log"


def resample_cells(units: int, repeats: int, seed: int = 0) -> np.ndarray:
    """The two-level bootstrap every interval uses: draws of `units` units with replacement, then, for each drawn
    unit, `repeats` of its repeats with replacement, so that the spread between prompts and the machine's spread
    between repeats both enter. [BOOTSTRAP_SAMPLES, units * repeats] indices of cells (unit * repeats + repeat).

    Units and repeats come from two streams of `seed`, so a run with identical repeats draws the same units as a
    run with one.
    """
    unit_stream, repeat_stream = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    drawn_units = unit_stream.integers(0, units, size=(BOOTSTRAP_SAMPLES, units))
    drawn_repeats = repeat_stream.integers(0, repeats, size=(BOOTSTRAP_SAMPLES, units, repeats))
    return (drawn_units[:, :, None] * repeats + drawn_repeats).reshape(BOOTSTRAP_SAMPLES, units * repeats)


def interval(estimate: float, resampled: np.ndarray, units: int, share: bool = False) -> tuple[float, float]:
    """The 95% interval of `estimate` from its bootstrap `resampled` values, by `interval_method(units)`; `share`: a
    rate in 0..1 (logit scale for the t interval, log otherwise)."""
    resampled = resampled[np.isfinite(resampled)]
    if interval_method(units) == "percentile":
        return float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))
    spread = float(resampled.std(ddof=1)) if len(resampled) > 1 else 0.0
    if spread == 0 or not 0 < estimate < (1 if share else math.inf):
        return estimate, estimate  # every resample alike: a ratio of sums at 0 or 1 is so in every unit
    to_scale, back = (stats.logistic.ppf, stats.logistic.cdf) if share else (np.log, np.exp)
    slope = 1 / (estimate * (1 - estimate)) if share else 1 / estimate  # d(logit) or d(log) at the estimate
    half_width = stats.t.ppf(0.975, units - 1) * spread * slope
    center = to_scale(estimate)
    return float(back(center - half_width)), float(back(center + half_width))


def wilson_interval(successes: float, trials: float, z: float = float(stats.norm.ppf(0.975))) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); counts may be fractional (a prior's
    pseudo-counts)."""
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return centre - half, centre + half


def sample_size(metrics: Mapping[str, float]) -> str:
    """n as printed beside an interval: "n=6" (units), "n=6x3" (units x repeats), "" when the run has no interval."""
    units, repeats = metrics.get("interval_units"), metrics.get("num_repeats") or 1
    if units is None or units != units:
        return ""
    return f"n={int(units)}" + (f"x{int(repeats)}" if repeats > 1 else "")


def legend(metrics: Mapping[str, float], method: str | None = None) -> str:
    """What "[low, high] n=..." means for a run: the units, repeats and method (`method`: its logged tag, else
    `interval_method` of its units); "" without an interval."""
    size = sample_size(metrics)
    if not size:
        return ""
    units, repeats = int(metrics["interval_units"]), int(metrics.get("num_repeats") or 1)
    what = "prompts" if units == metrics.get("num_prompts") else "batches of prompts"
    times = f" x {repeats} repeats" if repeats > 1 else ""
    name = METHODS.get(method or interval_method(units), method)
    return f"[low, high] {size}: 95% interval over {units} {what}{times}, {name}"
