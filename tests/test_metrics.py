"""Metric arithmetic on hand-made decodes: ratios of sums, acceptance by position, bootstrap, repeats, the speedup
model, cost."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from specbench import speedup_model
from specbench.engine import DecodeResult, DrafterStats
from specbench.engine.costs import StepCosts
from specbench.metrics import (
    BatchStats,
    PromptOutcome,
    acceptance_metrics,
    bootstrap_intervals,
    cost_metrics,
    per_prompt_table,
    repeat_metrics,
    timing_metrics,
    usd_per_hour,
)
from specbench.speedup_model import iid_acceptance, out_of_scope, predicted_speedup, prediction_metrics


def outcome(
    pubid: str,
    baseline_s: float,
    spec_s: float,
    accepted_per_step: list[int],
    k: int = 2,
    baseline_tokens: int | None = None,
    repeat: int = 0,
) -> PromptOutcome:
    """A hand-made prompt: the speculative decode takes `accepted_per_step`; the baseline emits as many tokens
    unless `baseline_tokens` says otherwise (sampled modes stop at different lengths)."""
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
        depth_per_step=[k] * steps,
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
    baseline_tokens = tokens if baseline_tokens is None else baseline_tokens
    baseline = DecodeResult(
        tokens=list(range(baseline_tokens)), latency_s=baseline_s, ttft_s=0.1, verifier_calls=baseline_tokens
    )
    batch_stats = {"baseline_batch": BatchStats(baseline_s), "spec_batch": BatchStats(spec_s)}
    return PromptOutcome(pubid, 10, False, baseline, spec, "same", "same", **batch_stats, repeat=repeat)


def one_per_batch(outcomes: list[PromptOutcome]) -> list[PromptOutcome]:
    """Number each repeat's prompts as batches of one, in order, as batch_size=1 decodes them."""
    counts: dict[int, int] = {}
    for item in outcomes:
        item.batch = counts.get(item.repeat, 0)
        counts[item.repeat] = item.batch + 1
    return outcomes


@pytest.fixture
def outcomes():
    return one_per_batch([outcome("SYN-001", 2.0, 1.0, [2, 0, 1]), outcome("SYN-002", 4.0, 3.0, [2, 2])])


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


def curve(*seconds: float) -> dict[int, float]:
    """A verify curve: seconds of a pass over n = 1, 2, ... new tokens."""
    return dict(enumerate(seconds, start=1))


def test_speedup_model_picks_the_best_k(outcomes):
    costs = StepCosts(verify_s={1: curve(0.1, 0.1, 0.1, 0.1, 0.3, 0.3)}, draft_s={1: {"d": 0.01}})
    measured = speedup_model.cost_metrics(costs, k=2, batch=1)
    assert measured["draft_verifier_cost_ratio"] == pytest.approx(0.1)
    assert measured["verify_cost_ratio_3_tokens"] == pytest.approx(1.0)
    assert measured["draft_step_ms_d"] == pytest.approx(10.0)
    metrics = prediction_metrics(costs, outcomes, k=2, batch=1)
    assert metrics["best_k_predicted"] == 3  # the verify cost jumps at 5 tokens (k = 4)
    # alpha from the 5 full steps (2 + 0 + 1 + 2 + 2 accepted): 1.4 drafts per 2-token step
    assert metrics["alpha_iid"] == pytest.approx(iid_acceptance(1.4, 2))
    assert metrics["predicted_speedup"] == pytest.approx(predicted_speedup(metrics["alpha_iid"], 2, 0.1, 1.0))


def test_the_model_predicts_the_batch_size_where_speculation_stops_paying(outcomes):
    """Verifying 3 tokens per row costs what 1 costs up to 4 rows, then 2.5x: the crossover is at 8 rows."""
    flat, steep = {1: 0.1, 3: 0.1}, {1: 0.1, 3: 0.25}
    costs = StepCosts(
        verify_s={1: curve(0.1, 0.1, 0.1), 2: flat, 4: flat, 8: steep, 16: steep},
        draft_s={size: {"d": 0.01} for size in (1, 2, 4, 8, 16)},
    )
    metrics = prediction_metrics(costs, outcomes, k=2, batch=1)
    alpha = metrics["alpha_iid"]
    # both prompts in one batch: it takes max(3, 2) steps against max(6, 6) baseline calls, not 5 against 12
    waits = (6 / 3) / (12 / 5)
    assert metrics["predicted_speedup_batch_1"] == pytest.approx(predicted_speedup(alpha, 2, 0.1, 1.0))
    assert metrics["predicted_speedup_batch_4"] == pytest.approx(predicted_speedup(alpha, 2, 0.1, 1.0) * waits)
    assert metrics["predicted_speedup_batch_8"] == pytest.approx(predicted_speedup(alpha, 2, 0.1, 2.5) * waits)
    assert metrics["predicted_speedup_batch_4"] > 1 > metrics["predicted_speedup_batch_8"]
    assert metrics["crossover_batch_predicted"] == 8
    # a run at batch size 4: every prediction at its batch size counts the wait, the best k's included
    at_four = prediction_metrics(costs, outcomes, k=2, batch=4)
    assert at_four["predicted_speedup"] == pytest.approx(metrics["predicted_speedup_batch_4"])
    assert at_four["best_k_predicted"] == 2 and at_four["predicted_speedup_best_k"] == at_four["predicted_speedup"]
    # a grid that never crosses logs no crossover rather than a made-up one
    costs.verify_s = {size: flat | {2: 0.1} for size in (1, 2, 4)}
    assert "crossover_batch_predicted" not in prediction_metrics(costs, outcomes, k=2, batch=1)


def test_the_model_is_out_of_scope_for_draft_sets_and_adaptive_k():
    assert out_of_scope(1, adaptive_k=False) is None
    assert "2 drafters are verified as a tree" in out_of_scope(2, adaptive_k=False)
    assert "k_schedule=heuristic" in out_of_scope(1, adaptive_k=True)
    both = out_of_scope(3, adaptive_k=True)
    assert "3 drafters" in both and "k_schedule=heuristic" in both


def test_speedup_is_the_token_rate_ratio_when_outputs_differ_in_length():
    """Sampling: the speculative output stops at 6 tokens in 1 s, the baseline's at 11 tokens in 2 s."""
    outcomes = one_per_batch([outcome(f"P{i}", 2.0, 1.0, [1, 0, 2], baseline_tokens=11) for i in range(3)])  # 7 tokens
    table = per_prompt_table(outcomes)
    metrics = timing_metrics(table)
    rate_ratio = (7 / 1.0) / (11 / 2.0)  # 1.27x, where the time ratio would say 2.0x
    assert metrics["speedup"] == pytest.approx(rate_ratio)
    assert metrics["speedup"] == pytest.approx(metrics["spec_tokens_per_s"] / metrics["baseline_tokens_per_s"])
    assert table["speedup"].tolist() == pytest.approx([rate_ratio] * 3)
    # after the first token: 6 tokens in 0.9 s against 10 tokens in 1.9 s
    assert metrics["decode_speedup"] == pytest.approx((6 / 0.9) / (10 / 1.9))
    assert metrics["steady_state_speedup"] == pytest.approx((6 / 0.9) / (10 / 1.9))  # no draft prefill here
    intervals = bootstrap_intervals(table)
    assert intervals["speedup_ci_low"] == pytest.approx(rate_ratio)  # every prompt alike: no spread
    assert intervals["speedup_ci_high"] == pytest.approx(rate_ratio)
    costs = cost_metrics(metrics, table, price_per_hour=3.6)
    assert costs["cost_per_query_usd_spec"] / costs["cost_per_query_usd_baseline"] == pytest.approx(0.5)
    assert costs["cost_per_1k_tokens_usd_baseline"] / costs["cost_per_1k_tokens_usd_spec"] == pytest.approx(rate_ratio)
    assert costs["cost_saving_pct"] == pytest.approx(100 * (1 - 1 / rate_ratio))


def speedup_table(spec_seconds: list[float]) -> pd.DataFrame:
    """Prompts of 7 tokens in both modes, 1 s each verifier-only, `spec_seconds` speculatively."""
    return per_prompt_table(one_per_batch([outcome(f"P{i}", 1.0, s, [1, 0, 2]) for i, s in enumerate(spec_seconds)]))


def check_speedup_interval(low: float, high: float, expected: tuple[float, float]) -> None:
    assert low == pytest.approx(expected[0], abs=0.015)
    assert high == pytest.approx(expected[1], abs=0.015)


def test_bootstrap_interval_of_the_speedup_is_the_known_one():
    """Half the prompts take 0.5 s speculatively, half 1.5 s, all 1 s verifier-only, same tokens.

    A resample with B slow prompts out of n has speedup n / (0.5 n + B), B ~ Binomial(n, 1/2), so the
    95% interval is 1 / (0.5 + the binomial's 97.5% and 2.5% quantiles / n): [0.909, 1.111] for n = 100.
    A mean-of-ratios estimator (per-prompt speedups 2 and 0.667) centres on 1.33 instead.
    """
    n = 100
    table = speedup_table([0.5, 1.5] * (n // 2))
    intervals = bootstrap_intervals(table)
    expected = (1 / (0.5 + binom.ppf(0.975, n, 0.5) / n), 1 / (0.5 + binom.ppf(0.025, n, 0.5) / n))
    assert expected == pytest.approx((0.909, 1.111), abs=1e-3)
    check_speedup_interval(intervals["speedup_ci_low"], intervals["speedup_ci_high"], expected)
    # control: the same check rejects a mean-of-ratios bootstrap over the same prompts
    ratios = table["speedup"].to_numpy()
    means = ratios[np.random.default_rng(0).integers(0, n, size=(1000, n))].mean(axis=1)
    with pytest.raises(AssertionError):
        check_speedup_interval(np.percentile(means, 2.5), np.percentile(means, 97.5), expected)


def test_bootstrap_draws_prompts_with_all_their_repeats():
    """Two identical repeats hold no more information about prompts than one: the interval must not narrow."""
    spec_seconds = [0.5, 1.5, 0.8, 1.2, 0.6, 1.0]
    once = bootstrap_intervals(speedup_table(spec_seconds))
    twice_outcomes = [
        outcome(f"P{i}", 1.0, s, [1, 0, 2], repeat=repeat) for repeat in range(2) for i, s in enumerate(spec_seconds)
    ]
    twice = bootstrap_intervals(per_prompt_table(one_per_batch(twice_outcomes)))
    for key in ("speedup_ci_low", "speedup_ci_high", "acceptance_rate_ci_low", "acceptance_rate_ci_high"):
        assert twice[key] == pytest.approx(once[key]), key
    assert once["speedup_ci_high"] - once["speedup_ci_low"] > 0.2  # the prompts do differ


def test_acceptance_interval_skips_resamples_without_proposals():
    """Prompts that proposed nothing (prompt lookup found no match) have no acceptance rate to resample.

    The others accept exactly half of what they propose, so every resample with proposals says 0.5; with
    4 prompts, 1 resample in 16 draws only the empty ones, which counted as 0 would pull the low end to 0.
    """
    proposing = [outcome(f"P{i}", 1.0, 1.0, [1, 0, 2], k=2) for i in range(2)]  # 3 of 6 accepted
    empty = []
    for i in range(2):
        silent = outcome(f"E{i}", 1.0, 1.0, [0, 0], k=2)
        silent.spec.proposed = silent.spec.accepted = 0
        empty.append(silent)
    intervals = bootstrap_intervals(per_prompt_table(one_per_batch(proposing + empty)))
    assert intervals["acceptance_rate_ci_low"] == pytest.approx(0.5)
    assert intervals["acceptance_rate_ci_high"] == pytest.approx(0.5)


def test_repeats_pool_into_the_headline_and_show_their_spread():
    """Repeat 0 runs 1.5x faster, repeat 1 2x; the headline pools both, the spread shows each."""
    outcomes = [outcome(f"P{i}", 3.0, 2.0, [1, 0, 2]) for i in range(2)]
    outcomes += [outcome(f"P{i}", 3.0, 1.5, [1, 0, 2], repeat=1) for i in range(2)]
    table = per_prompt_table(one_per_batch(outcomes))
    assert table["repeat"].tolist() == [0, 0, 1, 1]
    metrics = timing_metrics(table) | repeat_metrics(table) | acceptance_metrics(table, outcomes)
    assert metrics["num_prompts"] == 2
    assert metrics["speedup"] == pytest.approx(12.0 / 7.0)  # all repeats pooled, a ratio of sums
    assert (metrics["speedup_repeat_min"], metrics["speedup_repeat_median"], metrics["speedup_repeat_max"]) == (
        pytest.approx(1.5),
        pytest.approx(1.75),
        pytest.approx(2.0),
    )
    assert metrics["speedup_repeat_std"] == pytest.approx(np.std([1.5, 2.0], ddof=1))
    assert metrics["spec_tokens_per_s_repeat_min"] == pytest.approx(14 / 4.0)
    assert metrics["spec_tokens_per_s_repeat_max"] == pytest.approx(14 / 3.0)
    assert metrics["baseline_tokens_per_s_repeat_std"] == pytest.approx(0.0)
    assert repeat_metrics(per_prompt_table(outcomes[:2])) == {}  # one repeat: no spread to show


def test_cost_per_query_and_profiles(outcomes):
    table = per_prompt_table(outcomes)
    metrics = cost_metrics(timing_metrics(table), table, price_per_hour=3.6)
    assert metrics["cost_per_query_usd_baseline"] == pytest.approx(0.001 * 6.0 / 2)
    assert metrics["cost_saving_pct"] == pytest.approx(100 * (1 - 4.0 / 6.0))  # equal outputs: per query = per token
    profiles = {"cpu": 0.1, "h100": 7.0, "h200": 8.0}
    assert usd_per_hour(None, "auto", profiles, "NVIDIA H200") == 8.0
    assert usd_per_hour(None, "auto", profiles, "CPU: AMD EPYC") == 0.1
    assert usd_per_hour(None, "h100", profiles, "NVIDIA H200") == 7.0
    assert usd_per_hour(2.5, "auto", profiles, "NVIDIA H200") == 2.5
    assert math.isnan(usd_per_hour(None, "auto", {"l4": 0.8}, "NVIDIA L40S"))  # not an L4


def test_a_batch_waits_for_its_row_with_the_most_steps():
    """Same output length; one row accepts 3 drafts a step (10 steps), the other mostly none (30 steps)."""
    fast = outcome("fast", 4.0, 1.0, [3] * 10, k=3)  # 41 tokens: 40 baseline calls after the prefill
    slow = outcome("slow", 4.0, 3.0, [1] * 10 + [0] * 20, k=3)  # 41 tokens in 30 steps
    again = outcome("fast", 4.0, 1.0, [0] * 40, k=3, repeat=1)  # later passes are not read
    rows = [fast, slow, again]
    assert speedup_model.finished_rows_factor(rows, 1) == pytest.approx(1.0)
    # together: 30 steps against 40 calls, where alone they average 40 steps against 80 calls
    assert speedup_model.finished_rows_factor(rows, 2) == pytest.approx((40 / 30) / (80 / 40))
    assert speedup_model.finished_rows_factor(rows, 8) == speedup_model.finished_rows_factor(rows, 2)
    even = [outcome("a", 4.0, 1.0, [1] * 20, k=3), outcome("b", 4.0, 1.0, [1] * 20, k=3)]
    assert speedup_model.finished_rows_factor(even, 2) == pytest.approx(1.0)  # rows that end together cost nothing
