"""The request rate where speculation stops beating the baseline, searched on a log scale.

The search takes a probe: a callable that serves the trace at a request rate in
both modes and returns a `Probe` (spec over baseline on the crossover metric, its
bootstrap interval over requests, and each mode's SLO attainment). It probes
`rate_min` and `rate_max` first. When speculation wins at both ends, or at
neither, the crossover is outside the range: the search says so and gives no
rate. Otherwise it bisects the bracket on log rate until `max_probes` probes have
run, and reports:

- `crossover_rate`: where the ratio crosses 1, interpolated linearly in
  (log rate, log ratio) between the two probes that bracket it;
- `crossover_rate_low`, `crossover_rate_high`: where the interval's ends cross 1,
  interpolated the same way over all the probes, sorted by rate. The low end is
  where the bound least favourable to speculation first stops showing a win; the
  high end where the most favourable one last shows one. A noisy, non-monotone
  curve widens this interval rather than hiding a crossing. An end that does not
  cross within the range is not reported (it lies beyond that bound).

Speculation wins on `tpot_p99` and `e2el_p99` when the ratio is below 1, on
`goodput` when above; a tie is not a win. The search assumes one crossing; when
speculation loses at `rate_min` and wins at `rate_max` it reports where it starts
to pay instead, and says so.

`max_rate_under_slo_{mode}` and `min_rate_over_slo_{mode}`: the last probed rate at
which at least `slo.attainment` (99% by default) of the requests meet every SLO set,
and the next probed rate, where they do not; the mode's limit lies between the two,
not interpolated (attainment falls from 1 to near 0 within a few percent of the rate
near saturation). With only `slo.tpot_ms` set and 99%, that is where p99 TPOT reaches
the target. DistServe uses a 90% attainment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from specbench.config import CrossoverMetric

RATIO_KEYS = {
    CrossoverMetric.tpot_p99: "tpot_p99_ratio",
    CrossoverMetric.e2el_p99: "e2el_p99_ratio",
    CrossoverMetric.goodput: "goodput_ratio",
}
_RATIO_LIMIT = 1e6  # a ratio beyond this (e.g. goodput over a baseline that met no SLO) counts as this


@dataclass(frozen=True)
class Probe:
    """What serving the trace at one request rate measured."""

    rate: float
    ratio: float  # spec over baseline on the crossover metric
    ratio_low: float | None = None  # its 95% bootstrap interval over requests
    ratio_high: float | None = None
    slo_attainment: Mapping[str, float] = field(default_factory=dict)  # mode -> share of requests meeting every SLO


@dataclass
class Crossover:
    """The search's outcome: its probes in the order they ran, and the crossover when it lies inside the range."""

    probes: list[Probe]
    rate: float | None
    rate_low: float | None
    rate_high: float | None
    message: str  # one sentence: where the crossover is, or why there is no number


def probe_from_metrics(rate: float, metrics: Mapping[str, float], metric: CrossoverMetric) -> Probe:
    """A `Probe` from a load run's metrics (`specbench.load.metrics.load_metrics`).

    Goodput over a baseline that met no SLO counts as an unbounded win when speculation met some, a tie when
    neither did.
    """
    key = RATIO_KEYS[metric]
    ratio = metrics.get(key)
    if ratio is None and metric is CrossoverMetric.goodput and "goodput_rps_baseline" in metrics:
        spec, baseline = metrics["goodput_rps_spec"], metrics["goodput_rps_baseline"]
        ratio = spec / baseline if baseline > 0 else (math.inf if spec > 0 else 1.0)
    if ratio is None:
        raise ValueError(
            f"the probe at {rate} requests/s has no {key}: each mode must serve requests whose figure is above 0"
        )
    attainment = {mode: metrics.get(f"slo_attainment_{mode}") for mode in ("baseline", "spec")}
    return Probe(
        rate,
        ratio,
        metrics.get(f"{key}_ci_low"),
        metrics.get(f"{key}_ci_high"),
        {mode: value for mode, value in attainment.items() if value is not None},
    )


def _score(metric: CrossoverMetric, ratio: float) -> float:
    """Above 0 when speculation wins: log ratio for goodput, -log ratio for latencies."""
    log_ratio = math.log(min(max(ratio, 1 / _RATIO_LIMIT), _RATIO_LIMIT))
    return log_ratio if metric is CrossoverMetric.goodput else -log_ratio


def _crossing(left: tuple[float, float], right: tuple[float, float]) -> float:
    """Where the line through (log rate, score) points `left` (score > 0) and `right` (score <= 0) reaches 0."""
    (rate_a, score_a), (rate_b, score_b) = left, right
    share = score_a / (score_a - score_b)
    return math.exp(math.log(rate_a) + share * (math.log(rate_b) - math.log(rate_a)))


def find_crossover(
    probe: Callable[[float], Probe], metric: CrossoverMetric, rate_min: float, rate_max: float, max_probes: int
) -> Crossover:
    """Search [rate_min, rate_max] on a log scale, in at most `max_probes` probes (2 or more), for the rate where
    speculation stops beating the baseline on `metric`."""
    if not 0 < rate_min < rate_max or max_probes < 2:
        raise ValueError("the search needs 0 < rate_min < rate_max and 2 or more probes")
    name = metric.value
    probes = [probe(rate_min), probe(rate_max)]
    wins_low, wins_high = (_score(metric, p.ratio) > 0 for p in probes)
    if wins_low == wins_high:
        where = (
            "beats the baseline on {name} at both ends of {low}-{high} requests/s: the crossover, if any, is above "
            "load.rate_max"
            if wins_low
            else "does not beat the baseline on {name} at either end of {low}-{high} requests/s: the crossover, if "
            "any, is below load.rate_min"
        )
        message = f"Speculation {where.format(name=name, low=rate_min, high=rate_max)}."
        return Crossover(probes, None, None, None, message)
    side = 1.0 if wins_low else -1.0  # the search's score is above 0 on the low side of the crossing
    bracket = [probes[0], probes[1]]
    while len(probes) < max_probes:
        middle = probe(math.sqrt(bracket[0].rate * bracket[1].rate))
        probes.append(middle)
        bracket[0 if side * _score(metric, middle.ratio) > 0 else 1] = middle
    low_side, high_side = ((p.rate, side * _score(metric, p.ratio)) for p in bracket)
    rate = _crossing(low_side, high_side)
    rate_low, rate_high = _interval(probes, metric, side)
    what = "stops" if wins_low else "starts"
    return Crossover(
        probes,
        rate,
        rate_low,
        rate_high,
        f"Speculation {what} beating the baseline on {name} at {rate:.3g} requests/s "
        f"(95% interval {_bound(rate_low, 'below', rate_min)} to {_bound(rate_high, 'above', rate_max)}).",
    )


def _bound(value: float | None, beyond: str, limit: float) -> str:
    return f"{value:.3g}" if value is not None else f"{beyond} {limit:.3g}"


def _interval(probes: list[Probe], metric: CrossoverMetric, side: float) -> tuple[float | None, float | None]:
    """Where the bound least favourable to the low side first crosses 0, and the most favourable one last does."""
    if any(p.ratio_low is None or p.ratio_high is None for p in probes):
        return None, None
    ordered = sorted(probes, key=lambda p: p.rate)
    ends = [sorted(side * _score(metric, bound) for bound in (p.ratio_low, p.ratio_high)) for p in ordered]
    worst = [(p.rate, scores[0]) for p, scores in zip(ordered, ends, strict=True)]
    best = [(p.rate, scores[1]) for p, scores in zip(ordered, ends, strict=True)]
    first_loss = next((i for i, (_, score) in enumerate(worst) if score <= 0), None)
    rate_low = None if first_loss in (None, 0) else _crossing(worst[first_loss - 1], worst[first_loss])
    last_win = max((i for i, (_, score) in enumerate(best) if score > 0), default=None)
    rate_high = None if last_win in (None, len(best) - 1) else _crossing(best[last_win], best[last_win + 1])
    return rate_low, rate_high


def max_rate_under_slo(probes: list[Probe], mode: str, attainment: float) -> tuple[float, float] | None:
    """The bracket of the highest rate where at least `attainment` of `mode`'s requests meet every SLO: the last
    probe (by rate) that meets it and the first that does not. None when every probe meets it, or none does (it
    lies outside the probed range).

    Not interpolated: attainment falls from 1 to near 0 within a small span of rates near saturation, so a line
    between two distant probes would put the limit next to the lower one whatever the truth."""
    points = sorted((p.rate, p.slo_attainment[mode]) for p in probes if mode in p.slo_attainment)
    first_miss = next((i for i, (_, share) in enumerate(points) if share < attainment), None)
    if first_miss in (None, 0):
        return None
    return points[first_miss - 1][0], points[first_miss][0]


def crossover_metrics(crossover: Crossover, attainment: float | None = None) -> dict[str, float]:
    """The parent run's figures: `crossover_rate` and its interval when inside the range, and (with `attainment`,
    when SLOs are set) each mode's bracket, `max_rate_under_slo_{mode}` and `min_rate_over_slo_{mode}`, when its
    limit lies inside the probed range."""
    metrics = {
        key: value
        for key, value in (
            ("crossover_rate", crossover.rate),
            ("crossover_rate_low", crossover.rate_low),
            ("crossover_rate_high", crossover.rate_high),
        )
        if value is not None
    }
    metrics["crossover_probes"] = len(crossover.probes)
    if attainment is not None:
        for mode in ("baseline", "spec"):
            bracket = max_rate_under_slo(crossover.probes, mode, attainment)
            if bracket is not None:
                metrics[f"max_rate_under_slo_{mode}"], metrics[f"min_rate_over_slo_{mode}"] = bracket
    return metrics
