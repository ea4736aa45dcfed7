"""The load model on synthetic cost surfaces whose answers are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specbench.config import CrossoverMetric
from specbench.engine.costs import StepCosts
from specbench.engine.results import ServedRequest
from specbench.load.model import (
    interpolate_log_batch,
    join_seconds_per_request,
    predicted_crossover_rate,
    predicted_load_metrics,
    quantile_steps,
)
from specbench.speedup_model import tokens_per_step

SIZES = (1, 2, 4, 8, 16, 32, 64)


def surface(verify_one, verify_three, draft) -> StepCosts:
    """Step costs at SIZES from functions of the batch size: verifier over 1 and over 3 tokens, one draft step."""
    return StepCosts(
        verify_s={b: {1: verify_one(b), 3: verify_three(b)} for b in SIZES},
        draft_s={b: {"draft": draft(b)} for b in SIZES},
    )


FLAT = surface(lambda b: 0.01, lambda b: 0.012, lambda b: 0.001)


def test_interpolation_is_linear_in_log_batch_size_and_clamped_outside():
    values = {1: 0.01, 4: 0.03, 16: 0.04}
    assert interpolate_log_batch(values, 2) == pytest.approx(0.02)  # halfway from log 1 to log 4
    assert interpolate_log_batch(values, 8) == pytest.approx(0.035)
    assert interpolate_log_batch(values, 0.3) == 0.01
    assert interpolate_log_batch(values, 100) == 0.04


def served(admitted_s: float, first_token_s: float, error: str | None = None) -> ServedRequest:
    return ServedRequest(0, 0.0, admitted_s, first_token_s, first_token_s + 1, 8, error=error)


def test_requests_that_join_together_share_one_prefill_in_the_join_cost():
    # a join of 3 rows at 1.0 s took 30 ms (its rows' first tokens at 1.03), a lone join at 2.0 s took 10 ms:
    # 40 ms of joining for 4 requests; a failed request (a server's) is not counted
    requests = [served(1.0, 1.03), served(1.0, 1.03), served(1.0, 1.03), served(2.0, 2.01), served(3.0, 9.0, "500")]
    assert join_seconds_per_request(requests) == pytest.approx(0.01)
    assert join_seconds_per_request([served(1.0, 1.03)] * 3) == pytest.approx(0.01)


def test_tokens_per_step():
    assert tokens_per_step(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert tokens_per_step(1.0, 4) == 5
    assert tokens_per_step(0.0, 4) == 1


def test_quantile_steps_by_hand():
    # alpha = 0.5, k = 2: a step yields 1 token (p 0.5), 2 (0.25) or 3 (0.25). Two tokens take one step with
    # p 0.5 and two with p 0.5, so the 99th percentile row needs 2; the 40th needs 1.
    assert quantile_steps(0.5, 2, 2) == 2
    assert quantile_steps(0.5, 2, 2, quantile=0.4) == 1
    # three tokens in one step: 0.25; in two: all but the 1 + 1 path (0.25), so 0.75; in three: 1
    assert quantile_steps(0.5, 2, 3, quantile=0.75) == 2
    assert quantile_steps(0.5, 2, 3, quantile=0.76) == 3
    assert quantile_steps(0.0, 4, 10) == 10  # nothing accepted: one token a step, like the baseline (k = 0)
    assert quantile_steps(0.9, 0, 10) == 10
    assert quantile_steps(1.0, 4, 10) == 2  # every draft accepted: 5 tokens a step


def test_quantile_steps_match_simulated_rows():
    # 20,000 rows drawing their acceptances (alpha = 0.8, k = 4) until 63 tokens are out: the 99th percentile
    # of their step counts is the computed one (within a step: the empirical quantile of a discrete law)
    generator = np.random.default_rng(0)
    accepted = np.minimum(generator.geometric(0.2, size=(20_000, 63)) - 1, 4)  # j < 4 w.p. 0.8^j 0.2, else 4
    emitted = np.cumsum(1 + accepted, axis=1)
    steps = 1 + np.argmax(emitted >= 63, axis=1)
    assert abs(np.quantile(steps, 0.99) - quantile_steps(0.8, 4, 63)) <= 1
    assert quantile_steps(0.8, 4, 63) > 63 / tokens_per_step(0.8, 4) * 1.2  # 25 steps against the mean's 18.7


def test_occupancy_tpot_and_e2el_with_prefill_by_hand():
    # baseline: step 10 ms flat, prefill p = 50 ms, 11 tokens (10 decode steps), 10 requests/s:
    # prefills take a p = 0.5 of the time, so T = 0.05 + 10 x 0.01 / 0.5 = 0.25 s, b = 10 x 0.25 = 2.5,
    # TPOT = 0.01 / 0.5 = 20 ms
    metrics = predicted_load_metrics(
        FLAT, alpha=0.5, k=2, rate=10.0, mean_output_tokens=11, prefill_s=0.05, max_batch_size=8
    )
    assert metrics["predicted_occupancy_baseline"] == pytest.approx(2.5)
    assert metrics["predicted_tpot_ms_baseline"] == pytest.approx(20.0)
    assert metrics["predicted_e2el_ms_baseline"] == pytest.approx(250.0)
    assert metrics["predicted_output_tokens_per_s_baseline"] == pytest.approx(110.0)
    assert metrics["predicted_saturated_baseline"] == 0.0
    # capacity at 8 rows: u^2 - (1 + 8 + 0.1 / 0.05) u + 8 = 0, u = (11 - sqrt(89)) / 2, a = u / p
    assert metrics["predicted_capacity_rps_baseline"] == pytest.approx((11 - math.sqrt(89)) / 2 / 0.05)
    # speculation: step 2 x 1 + 12 = 14 ms, 1.75 tokens a step, so 10 / 1.75 steps: T = 0.05 + (0.08 / 0.5) = 0.21 s
    assert metrics["predicted_tpot_ms_spec"] == pytest.approx(14 / 1.75 / 0.5)
    assert metrics["predicted_e2el_ms_spec"] == pytest.approx(210.0)
    assert metrics["predicted_occupancy_spec"] == pytest.approx(2.1)
    assert metrics["predicted_tpot_ratio"] == pytest.approx(16 / 20)
    assert metrics["predicted_e2el_ratio"] == pytest.approx(210 / 250)
    # p99s: the baseline's rows all take 10 steps (its means); speculation's row unlucky at p99 takes
    # quantile_steps(0.5, 2, 10) = 9 steps of 14 ms over a half share: 9 x 28 / 10 ms a token, 0.05 + 9 x 0.028 s
    assert quantile_steps(0.5, 2, 10) == 9
    assert metrics["predicted_tpot_ms_p99_baseline"] == pytest.approx(20.0)
    assert metrics["predicted_e2el_ms_p99_baseline"] == pytest.approx(250.0)
    assert metrics["predicted_tpot_ms_p99_spec"] == pytest.approx(9 * 28 / 10)
    assert metrics["predicted_e2el_ms_p99_spec"] == pytest.approx(50 + 9 * 28)
    assert metrics["predicted_tpot_p99_ratio"] == pytest.approx(25.2 / 20)
    assert metrics["predicted_e2el_p99_ratio"] == pytest.approx(302 / 250)


def test_a_full_batch_saturates_at_its_capacity():
    # 2 rows at most: u^2 - 5u + 2 = 0, u = (5 - sqrt(17)) / 2 = 0.438, so 8.77 requests/s < 10: saturated,
    # TPOT = 0.01 / (1 - u) with requests joining at that capacity, no E2EL (the queue grows)
    metrics = predicted_load_metrics(FLAT, 0.5, 2, rate=10.0, mean_output_tokens=11, prefill_s=0.05, max_batch_size=2)
    share = (5 - math.sqrt(17)) / 2
    assert metrics["predicted_saturated_baseline"] == 1.0
    assert metrics["predicted_occupancy_baseline"] == 2.0
    assert metrics["predicted_capacity_rps_baseline"] == pytest.approx(share / 0.05)
    assert metrics["predicted_tpot_ms_baseline"] == pytest.approx(10 / (1 - share))
    assert metrics["predicted_output_tokens_per_s_baseline"] == pytest.approx(11 * share / 0.05)
    assert "predicted_e2el_ms_baseline" not in metrics and "predicted_e2el_ratio" not in metrics


def test_the_fixed_point_reads_the_surface_between_measured_batch_sizes_on_log_scale():
    # no prefill; the baseline step is 10 ms at 1 row, 20 ms at 4, so 15 ms at 2 on log scale; 11 tokens (10
    # steps): b = rate x 10 x s(b) holds at b = 2 for 2 / 0.15 requests/s (linear in b: s(2) = 13.3 ms)
    costs = StepCosts(verify_s={1: {1: 0.01, 3: 0.01}, 4: {1: 0.02, 3: 0.02}}, draft_s={1: {"d": 0.0}, 4: {"d": 0.0}})
    metrics = predicted_load_metrics(
        costs, 0.5, 2, rate=2 / 0.15, mean_output_tokens=11, prefill_s=0.0, max_batch_size=8
    )
    assert metrics["predicted_occupancy_baseline"] == pytest.approx(2.0)
    assert metrics["predicted_tpot_ms_baseline"] == pytest.approx(15.0)


def test_the_smallest_of_several_fixed_points_is_the_one_a_filling_server_reaches():
    # 10 ms at 1 row, 30 ms at 4: 10 steps at 10 requests/s hold b = 10 x 0.1 (1 + log2 b) at b = 1 and at b = 2
    costs = StepCosts(verify_s={1: {1: 0.01, 3: 0.01}, 4: {1: 0.03, 3: 0.03}}, draft_s={1: {"d": 0.0}, 4: {"d": 0.0}})
    metrics = predicted_load_metrics(costs, 0.5, 2, rate=10.0, mean_output_tokens=11, prefill_s=0.0, max_batch_size=8)
    assert metrics["predicted_occupancy_baseline"] == pytest.approx(1.0)


# The baseline's step is 10 ms at every batch size; speculation (k = 2, alpha = 0.5: 1.75 tokens a step) costs
# 2 x 1.25 ms of drafting plus 10 ms + 5 ms x log2(b) of verifying. Its TPOT, (12.5 + 5 log2 b) / 1.75 ms, equals
# the baseline's 10 ms at b = 2. Without prefill, 11 tokens take 10 / 1.75 steps of 17.5 ms = 0.1 s there,
# so b = 2 at 20 requests/s: the crossover.
CROSSING = surface(lambda b: 0.01, lambda b: 0.01 + 0.005 * math.log2(b), lambda b: 0.00125)


def test_the_mean_tpots_cross_by_hand():
    at = predicted_load_metrics(CROSSING, 0.5, 2, 20.0, 11, 0.0, 64)
    assert at["predicted_tpot_ratio"] == pytest.approx(1.0)
    assert at["predicted_occupancy_spec"] == pytest.approx(2.0)
    below = predicted_load_metrics(CROSSING, 0.5, 2, 10.0, 11, 0.0, 64)
    assert below["predicted_tpot_ratio"] < 1


# With 3 output tokens (2 decode tokens) at alpha = 0.5, k = 2, the row unlucky at p99 needs 2 steps, as a baseline
# row does (quantile_steps(0.5, 2, 2) = 2): speculation's p99 TPOT is its step, 2 x 1.25 + 5 + 2.5 log2(b) ms,
# against the baseline's 10 ms: equal at b = 2. There a request stays 2 / 1.75 steps of 10 ms (no prefill), so
# b = 2 at 2 / (0.02 / 1.75) = 175 requests/s. Its mean TPOT, a step over 1.75 tokens, wins well beyond.
P99_CROSSING = surface(lambda b: 0.01, lambda b: 0.005 + 0.0025 * math.log2(b), lambda b: 0.00125)


def test_the_predicted_crossover_rate_is_where_the_p99s_cross():
    common = {"mean_output_tokens": 3, "prefill_s": 0.0, "max_batch_size": 64}
    rate = predicted_crossover_rate(P99_CROSSING, 0.5, 2, rate_min=1.0, rate_max=1000.0, **common)
    assert rate == pytest.approx(175.0, rel=1e-6)
    at = predicted_load_metrics(P99_CROSSING, 0.5, 2, 175.0, **common)
    assert at["predicted_tpot_p99_ratio"] == pytest.approx(1.0)
    assert at["predicted_tpot_ratio"] == pytest.approx(1 / 1.75)
    # on CROSSING speculation's step is 12.5 ms or more against the baseline's 10: its p99 loses at every rate
    # (the means cross near 100 requests/s), so no crossover in a range well past that
    assert predicted_crossover_rate(CROSSING, 0.5, 2, rate_min=1.0, rate_max=1000.0, **common) is None
    assert predicted_load_metrics(CROSSING, 0.5, 2, 1.0, **common)["predicted_tpot_p99_ratio"] > 1


def test_no_predicted_crossover_inside_the_range_or_for_goodput():
    common = {"mean_output_tokens": 3, "prefill_s": 0.0, "max_batch_size": 64}
    assert predicted_crossover_rate(P99_CROSSING, 0.5, 2, rate_min=1.0, rate_max=150.0, **common) is None
    always_wins = surface(lambda b: 0.01, lambda b: 0.005, lambda b: 0.001)  # a 7 ms step against 10
    assert predicted_crossover_rate(always_wins, 0.5, 2, rate_min=1.0, rate_max=1000.0, **common) is None
    goodput = CrossoverMetric.goodput
    assert predicted_crossover_rate(P99_CROSSING, 0.5, 2, rate_min=1.0, rate_max=1e3, metric=goodput, **common) is None


def test_a_mode_that_saturates_loses_from_there_on():
    # compute-bound baseline: a step of b rows costs 10 ms x b, so 10 decode steps give it 10 requests/s at any
    # batch size. Speculation: 20 ms a step at any b; its row unlucky at p99 takes quantile_steps(0.5, 2, 10) = 9
    # steps, 0.18 s a request: slower than the idle baseline's 0.1 s (and its p99 TPOT 18 ms above 10), but it
    # never saturates below 64 / 0.114 = 560 requests/s (10 / 1.75 steps on the mean). So speculation starts
    # winning, on E2EL and on TPOT, where the baseline saturates: at 10 requests/s.
    costs = surface(lambda b: 0.01 * b, lambda b: 0.02, lambda b: 0.0)
    for metric in (CrossoverMetric.e2el_p99, CrossoverMetric.tpot_p99):
        rate = predicted_crossover_rate(
            costs, 0.5, 2, 11, prefill_s=0.0, max_batch_size=64, rate_min=1.0, rate_max=100.0, metric=metric
        )
        assert rate == pytest.approx(10.0, rel=1e-6)
    saturated = predicted_load_metrics(costs, 0.5, 2, 20.0, 11, 0.0, 64)
    assert saturated["predicted_saturated_baseline"] == 1.0 and saturated["predicted_saturated_spec"] == 0.0
    assert saturated["predicted_capacity_rps_baseline"] == pytest.approx(10.0)


def test_a_surface_missing_the_verify_length_is_refused():
    with pytest.raises(ValueError, match="over 1 and 5 tokens"):
        predicted_load_metrics(FLAT, 0.5, 4, 1.0, 11, 0.0, 8)
