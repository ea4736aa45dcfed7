"""Metric arithmetic on hand-made decodes: ratios of sums, acceptance by position, the speedup model, cost."""

from __future__ import annotations

import math

import pytest

from specbench.engine import DecodeResult, DrafterStats
from specbench.engine.costs import StepCosts
from specbench.metrics import (
    PromptOutcome,
    acceptance_metrics,
    bootstrap_intervals,
    cost_metrics,
    per_prompt_table,
    timing_metrics,
    usd_per_hour,
)
from specbench.speedup_model import iid_acceptance, predicted_speedup, speedup_model_metrics


def outcome(pubid: str, baseline_s: float, spec_s: float, accepted_per_step: list[int], k: int = 2) -> PromptOutcome:
    steps = len(accepted_per_step)
    tokens = 1 + sum(a + 1 for a in accepted_per_step)
    spec = DecodeResult(
        tokens=list(range(tokens)),
        latency_s=spec_s,
        ttft_s=0.1,
        verifier_calls=steps + 1,
        steps=steps,
        proposed=k * steps,
        accepted=sum(accepted_per_step),
        proposed_by_position=[steps] * k,
        accepted_by_position=[sum(a > i for a in accepted_per_step) for i in range(k)],
        k_per_step=[k] * steps,
        offered_per_step=[k] * steps,
        accepted_per_step=accepted_per_step,
        drafters={
            "d": DrafterStats(
                proposed=k * steps,
                accepted=sum(accepted_per_step),
                wins=sum(1 for a in accepted_per_step if a),
                draft_time_s=0.2,
            )
        },
    )
    baseline = DecodeResult(tokens=list(range(tokens)), latency_s=baseline_s, ttft_s=0.1, verifier_calls=tokens)
    return PromptOutcome(pubid, 10, False, baseline, spec, "same", "same")


@pytest.fixture
def outcomes():
    return [outcome("SYN-001", 2.0, 1.0, [2, 0, 1]), outcome("SYN-002", 4.0, 3.0, [2, 2])]


def test_timing_is_ratio_of_sums(outcomes):
    table = per_prompt_table(outcomes)
    metrics = timing_metrics(table)
    assert metrics["speedup"] == pytest.approx(6.0 / 4.0)  # not the mean of 2.0 and 1.33
    assert metrics["decode_speedup"] == pytest.approx(5.8 / 3.8)
    assert metrics["baseline_latency_p50_s"] == pytest.approx(3.0)
    assert metrics["spec_tokens_per_s"] == pytest.approx((7 + 7) / 4.0)


def test_acceptance_by_position_and_per_drafter(outcomes):
    table = per_prompt_table(outcomes)
    metrics = acceptance_metrics(table, outcomes)
    assert metrics["acceptance_rate"] == pytest.approx(7 / 10)
    assert metrics["acceptance_rate_pos_1"] == pytest.approx(4 / 5)  # 4 of 5 steps kept the first token
    assert metrics["acceptance_rate_pos_2"] == pytest.approx(3 / 5)
    assert metrics["mean_accepted_tokens"] == pytest.approx(12 / 5)  # the verifier's own token included
    assert metrics["acceptance_rate_d"] == pytest.approx(0.7)
    assert metrics["win_rate_d"] == 1.0 and metrics["disagreement_rate"] == 0.0


def test_iid_acceptance_inverts_the_expected_accepted_count():
    for alpha in (0.1, 0.5, 0.8, 0.95):
        k = 4
        expected = sum(alpha**i for i in range(1, k + 1))
        assert iid_acceptance(expected, k) == pytest.approx(alpha, abs=1e-6)
    assert iid_acceptance(4.0, 4) == pytest.approx(1.0, abs=1e-6)


def test_predicted_speedup_matches_leviathan():
    # alpha 0.8, k 4, c 0.1, flat verify cost: (1 - 0.8^5) / ((1 - 0.8)(0.4 + 1))
    assert predicted_speedup(0.8, 4, 0.1, 1.0) == pytest.approx((1 - 0.8**5) / (0.2 * 1.4))
    assert predicted_speedup(1.0, 3, 0.0, 1.0) == pytest.approx(4.0)
    assert predicted_speedup(0.0, 3, 0.0, 1.0) == pytest.approx(1.0)
    # a verifier pass over k+1 tokens that costs twice one token halves the prediction
    assert predicted_speedup(0.8, 4, 0.1, 2.0) < predicted_speedup(0.8, 4, 0.1, 1.0)


def test_speedup_model_picks_the_best_k(outcomes):
    costs = StepCosts(verify_s=[0.1, 0.1, 0.1, 0.1, 0.3, 0.3], draft_s={"d": 0.01})
    metrics = speedup_model_metrics(costs, outcomes, k=2)
    assert metrics["draft_verifier_cost_ratio"] == pytest.approx(0.1)
    assert metrics["best_k_predicted"] == 3  # the verify cost jumps at 5 tokens (k = 4)
    assert math.isfinite(metrics["predicted_speedup"])


def test_bootstrap_with_text_pubids(outcomes):
    intervals = bootstrap_intervals(per_prompt_table(outcomes))
    assert intervals["speedup_ci_low"] <= 1.5 <= intervals["speedup_ci_high"]
    assert intervals["acceptance_rate_ci_low"] <= intervals["acceptance_rate_ci_high"]


def test_cost_per_query_and_profiles(outcomes):
    table = per_prompt_table(outcomes)
    metrics = cost_metrics(timing_metrics(table), table, price_per_hour=3.6)
    assert metrics["cost_per_query_usd_baseline"] == pytest.approx(0.001 * 6.0 / 2)
    assert metrics["cost_saving_pct"] == pytest.approx(100 * (1 - 4.0 / 6.0))
    profiles = {"cpu": 0.1, "h100": 7.0, "h200": 8.0}
    assert usd_per_hour(None, "auto", profiles, "NVIDIA H200") == 8.0
    assert usd_per_hour(None, "auto", profiles, "CPU: AMD EPYC") == 0.1
    assert usd_per_hour(None, "h100", profiles, "NVIDIA H200") == 7.0
    assert usd_per_hour(2.5, "auto", profiles, "NVIDIA H200") == 2.5
    assert math.isnan(usd_per_hour(None, "auto", {"l4": 0.8}, "NVIDIA L40S"))  # not an L4
