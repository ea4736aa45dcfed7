"""The crossover search on synthetic ratio curves whose crossing is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specbench.config import CrossoverMetric
from specbench.load.crossover import (
    Probe,
    crossover_metrics,
    find_crossover,
    max_rate_under_slo,
    probe_from_metrics,
)

TPOT = CrossoverMetric.tpot_p99


class Curve:
    """A synthetic probe: TPOT ratio 0.6 + 0.4 (rate / crossing)^2 (1 at `crossing`), an interval of +-`width`,
    optional seeded noise on the estimate; it records the rates probed."""

    def __init__(self, crossing: float, width: float = 0.1, noise: float = 0.0, seed: int = 0) -> None:
        self.crossing, self.width, self.noise = crossing, width, noise
        self.rng = np.random.default_rng(seed)
        self.rates: list[float] = []

    def true_ratio(self, rate: float) -> float:
        return 0.6 + 0.4 * (rate / self.crossing) ** 2

    def __call__(self, rate: float) -> Probe:
        self.rates.append(rate)
        ratio = self.true_ratio(rate) + self.noise * self.rng.uniform(-1, 1)
        return Probe(rate, ratio, ratio - self.width, ratio + self.width)


def test_a_monotone_curve_crossing_is_found_within_the_last_bracket_and_max_probes():
    curve = Curve(crossing=0.3)
    result = find_crossover(curve, TPOT, 0.01, 10.0, max_probes=7)
    assert len(curve.rates) == 7 and len(result.probes) == 7
    assert curve.rates[:2] == [0.01, 10.0]
    # 5 bisections of a 1000x range on log scale leave a bracket of 1000^(1/32) = 1.24x around the crossing
    assert abs(math.log(result.rate / 0.3)) < math.log(1000) / 32
    assert result.rate_low < result.rate < result.rate_high
    # the interval's ends are where 0.6 + 0.4 (r / 0.3)^2 +- 0.1 reaches 1: r = 0.3 sqrt(0.75) and 0.3 sqrt(1.25),
    # each interpolated between probes that need not straddle it closely
    assert 0.3 * math.sqrt(0.75) / 1.6 < result.rate_low < 0.3
    assert 0.3 < result.rate_high < 0.3 * math.sqrt(1.25) * 1.6
    assert result.message == (
        f"Speculation stops beating the baseline on tpot_p99 at {result.rate:.3g} requests/s "
        f"(95% interval {result.rate_low:.3g} to {result.rate_high:.3g})."
    )
    assert crossover_metrics(result) == {
        "crossover_rate": result.rate,
        "crossover_rate_low": result.rate_low,
        "crossover_rate_high": result.rate_high,
        "crossover_probes": 7,
    }


def test_more_probes_narrow_the_bracket():
    errors = []
    for probes in (3, 5, 9):
        result = find_crossover(Curve(crossing=1.3, width=0.0), TPOT, 0.1, 40.0, probes)
        errors.append(abs(math.log(result.rate / 1.3)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_an_always_winning_curve_gives_no_rate_and_says_the_crossover_is_above_the_range():
    curve = Curve(crossing=100.0)
    result = find_crossover(curve, TPOT, 0.1, 10.0, max_probes=6)
    assert curve.rates == [0.1, 10.0]  # nothing left to bisect
    assert result.rate is None and result.rate_low is None and result.rate_high is None
    assert "beats the baseline on tpot_p99 at both ends of 0.1-10.0 requests/s" in result.message
    assert "above load.rate_max" in result.message
    assert "crossover_rate" not in crossover_metrics(result)


def test_an_always_losing_curve_gives_no_rate_and_says_the_crossover_is_below_the_range():
    result = find_crossover(Curve(crossing=0.001), TPOT, 0.1, 10.0, max_probes=6)
    assert result.rate is None
    assert "does not beat the baseline on tpot_p99 at either end" in result.message
    assert "below load.rate_min" in result.message


def test_noisy_estimates_keep_the_true_crossing_inside_the_interval():
    # the estimate wanders by up to 0.05 and its interval is +-0.15 wide, so every interval holds the true ratio
    for seed in range(20):
        curve = Curve(crossing=1.0, width=0.15, noise=0.05, seed=seed)
        result = find_crossover(curve, TPOT, 0.05, 20.0, max_probes=6)
        assert result.rate_low <= 1.0 <= result.rate_high, seed
        assert result.rate_low <= result.rate <= result.rate_high, seed


def test_an_interval_end_beyond_the_range_is_not_reported():
    # at the lowest rate the ratio is 0.6 +- 0.5: speculation may already lose there, so the low end is unknown
    result = find_crossover(Curve(crossing=1.0, width=0.5), TPOT, 0.1, 10.0, max_probes=5)
    assert result.rate is not None and result.rate_low is None and result.rate_high is not None
    assert "95% interval below 0.1 to" in result.message
    assert "crossover_rate_low" not in crossover_metrics(result)


def test_goodput_wins_above_one_and_a_curve_that_starts_paying_is_named_so():
    # goodput ratio rising with rate: speculation loses at low rates and wins at high ones
    def probe(rate: float) -> Probe:
        ratio = rate / 2.0
        return Probe(rate, ratio, ratio * 0.9, ratio * 1.1)

    result = find_crossover(probe, CrossoverMetric.goodput, 0.5, 8.0, max_probes=6)
    assert result.rate == pytest.approx(2.0)  # log ratio is linear in log rate: interpolation is exact
    assert result.rate_low == pytest.approx(2.0 / 1.1) and result.rate_high == pytest.approx(2.0 / 0.9)
    assert result.message.startswith("Speculation starts beating the baseline on goodput at 2 requests/s")


def test_max_rate_under_slo_is_bracketed_by_the_last_meeting_and_the_first_missing_probe():
    probes = [
        Probe(1.0, 1.0, slo_attainment={"baseline": 1.0, "spec": 1.0}),
        Probe(4.0, 1.0, slo_attainment={"baseline": 0.5, "spec": 1.0}),
        Probe(2.0, 1.0, slo_attainment={"baseline": 0.98, "spec": 1.0}),
    ]
    assert max_rate_under_slo(probes, "baseline", 0.9) == (2.0, 4.0)
    assert max_rate_under_slo(probes, "baseline", 0.99) == (1.0, 2.0)  # 0.98 at 2 misses 0.99
    assert max_rate_under_slo(probes, "spec", 0.99) is None  # met at every probed rate
    missed = [Probe(1.0, 1.0, slo_attainment={"spec": 0.5}), Probe(2.0, 1.0, slo_attainment={"spec": 0.2})]
    assert max_rate_under_slo(missed, "spec", 0.9) is None  # missed at every probed rate
    # a search of two probes sees only the ends: the limit lies somewhere between them
    result = find_crossover(lambda rate: next(p for p in probes if p.rate == rate), TPOT, 1.0, 4.0, 2)
    assert crossover_metrics(result, attainment=0.9) == {
        "crossover_probes": 2,
        "max_rate_under_slo_baseline": 1.0,
        "min_rate_over_slo_baseline": 4.0,
    }


def test_probes_from_load_metrics():
    metrics = {
        "tpot_p99_ratio": 0.8,
        "tpot_p99_ratio_ci_low": 0.7,
        "tpot_p99_ratio_ci_high": 0.95,
        "slo_attainment_baseline": 0.5,
        "slo_attainment_spec": 0.75,
        "goodput_rps_baseline": 0.0,
        "goodput_rps_spec": 0.2,
    }
    assert probe_from_metrics(0.4, metrics, TPOT) == Probe(0.4, 0.8, 0.7, 0.95, {"baseline": 0.5, "spec": 0.75})
    assert probe_from_metrics(0.4, metrics, CrossoverMetric.goodput).ratio == math.inf  # no good baseline request
    assert probe_from_metrics(0.4, metrics | {"goodput_rps_spec": 0.0}, CrossoverMetric.goodput).ratio == 1.0
    with pytest.raises(ValueError, match="has no e2el_p99_ratio"):
        probe_from_metrics(0.4, metrics, CrossoverMetric.e2el_p99)
