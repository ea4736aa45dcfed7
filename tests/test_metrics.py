"""Metric arithmetic on hand-made decodes: ratios of sums, acceptance by position, bootstrap, repeats, the speedup
model, cost."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom, binomtest, logistic, t

from specbench import catalog, speedup_model
from specbench import metrics as metrics_module
from specbench.engine import DecodeResult, DrafterStats
from specbench.engine.costs import StepCosts
from specbench.intervals import interval, resample_cells, wilson_interval
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
from specbench.speedup_model import (
    expected_maximum,
    iid_acceptance,
    out_of_scope,
    predicted_speedup,
    prediction_metrics,
)


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

    def waits(b: int) -> float:
        """b rows drawn from the two prompts (3 and 2 steps, 6 baseline calls each): the largest takes 3 steps
        unless all b drew the 2-step prompt (probability 1/2^b), against 5 steps for 12 calls row by row."""
        return (6 / (3 - 0.5**b)) / (12 / 5)

    assert metrics["predicted_speedup_batch_1"] == pytest.approx(predicted_speedup(alpha, 2, 0.1, 1.0))
    assert metrics["predicted_speedup_batch_4"] == pytest.approx(predicted_speedup(alpha, 2, 0.1, 1.0) * waits(4))
    assert metrics["predicted_speedup_batch_8"] == pytest.approx(predicted_speedup(alpha, 2, 0.1, 2.5) * waits(8))
    assert metrics["predicted_speedup_batch_4"] > 1 > metrics["predicted_speedup_batch_8"]
    assert metrics["crossover_batch_predicted"] == 8
    # 16 rows are more than 4x the 2 prompts measured: that prediction, and only it, is marked
    assert [key for key in metrics if key.endswith("_extrapolated")] == ["predicted_speedup_batch_16_extrapolated"]
    assert metrics["predicted_speedup_batch_16_extrapolated"] == 1
    # a run at batch size 4: every prediction at its batch size counts the wait, the best k's included
    at_four = prediction_metrics(costs, outcomes, k=2, batch=4)
    assert at_four["predicted_speedup"] == pytest.approx(metrics["predicted_speedup_batch_4"])
    assert at_four["best_k_predicted"] == 2 and at_four["predicted_speedup_best_k"] == at_four["predicted_speedup"]
    # a grid that never crosses logs no crossover rather than a made-up one
    costs.verify_s = {size: flat | {2: 0.1} for size in (1, 2, 4)}
    assert "crossover_batch_predicted" not in prediction_metrics(costs, outcomes, k=2, batch=1)
    # a crossover only reached past 4x the prompts is marked too
    costs.verify_s = {1: curve(0.1, 0.1, 0.1), 4: flat, 16: steep}
    costs.draft_s = {size: {"d": 0.01} for size in (1, 4, 16)}
    far = prediction_metrics(costs, outcomes, k=2, batch=1)
    assert far["crossover_batch_predicted"] == 16 and far["crossover_batch_predicted_extrapolated"] == 1


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


def test_per_request_costs_let_output_length_bias_the_speedup_and_the_docs_say_so():
    """Both modes take 1 s to the first token, then 0.1 s a token; sampling stops the baseline at 11 tokens and the
    speculative output at 41. Decoding is equally fast, yet the token-rate ratio says 1.49x: the fixed second is
    spread over more tokens. decode_speedup, without it, says 1.0x; the docs must not claim otherwise."""
    spec = DecodeResult(tokens=list(range(41)), latency_s=5.0, ttft_s=1.0, verifier_calls=41, steps=40)
    baseline = DecodeResult(tokens=list(range(11)), latency_s=2.0, ttft_s=1.0, verifier_calls=11)
    outcomes = [PromptOutcome("P", 10, False, baseline, spec, "a", "b", BatchStats(2.0), BatchStats(5.0))]
    metrics = timing_metrics(per_prompt_table(outcomes))
    assert metrics["speedup"] == pytest.approx((41 / 5.0) / (11 / 2.0))
    assert metrics["decode_speedup"] == pytest.approx(1.0)
    docs = [entry.doc for entry in catalog.METRICS] + [metrics_module.__doc__]
    assert not [doc for doc in docs if "cannot bias" in doc]
    assert "time to first token" in catalog.metric("speedup").doc and "decode_speedup" in catalog.metric("speedup").doc


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


def test_repeats_are_resampled_within_each_drawn_prompt():
    """25 alike prompts, 1.5 s verifier-only; speculatively 1 s in repeat 0 and 2 s in repeat 1 (the machine's noise).

    Drawing prompts with all their repeats would see no spread at all. The two-level bootstrap also draws 2 repeats
    within each drawn prompt: S ~ Binomial(50, 1/2) slow draws give speedup 75 / (50 + S).
    """
    outcomes = [outcome(f"P{i}", 1.5, 1.0 + repeat, [1, 0, 2], repeat=repeat) for repeat in range(2) for i in range(25)]
    intervals = bootstrap_intervals(per_prompt_table(one_per_batch(outcomes)))
    expected = (75 / (50 + binom.ppf(0.975, 50, 0.5)), 75 / (50 + binom.ppf(0.025, 50, 0.5)))
    assert expected == pytest.approx((0.915, 1.103), abs=1e-3)
    assert intervals["speedup_ci_low"] == pytest.approx(expected[0], abs=0.02)
    assert intervals["speedup_ci_high"] == pytest.approx(expected[1], abs=0.02)
    assert intervals["interval_units"] == 25


def test_below_twenty_prompts_the_interval_is_t_on_the_log_scale():
    """6 prompts: estimate x exp(+-t(0.975, 5) x bootstrap standard error / estimate), by hand on the same resamples,
    wider than the percentile interval those resamples give; the acceptance rate's is symmetric in logit."""
    spec_seconds = np.array([0.5, 1.5, 0.8, 1.2, 0.6, 1.0])
    table = speedup_table(list(spec_seconds))
    table["accepted"] = [1, 3, 2, 3, 0, 2]  # of 6 proposed each
    intervals = bootstrap_intervals(table, seed=3)
    picks = resample_cells(6, 1, seed=3)  # prompt i is cell i
    resampled = 6.0 / spec_seconds[picks].sum(axis=1)  # speedup: 6 s verifier-only over the speculative seconds
    estimate = 6.0 / spec_seconds.sum()
    half = t.ppf(0.975, 5) * resampled.std(ddof=1) / estimate
    low, high = intervals["speedup_ci_low"], intervals["speedup_ci_high"]
    assert (low, high) == pytest.approx((estimate * np.exp(-half), estimate * np.exp(half)))
    assert low < np.percentile(resampled, 2.5) and high > np.percentile(resampled, 97.5)
    rate = 11 / 36
    low, high = (logistic.ppf(intervals[f"acceptance_rate_ci_{end}"]) for end in ("low", "high"))
    assert logistic.ppf(rate) - low == pytest.approx(high - logistic.ppf(rate))
    accepted = table["accepted"].to_numpy()[picks].sum(axis=1) / 36
    assert high - low == pytest.approx(2 * t.ppf(0.975, 5) * accepted.std(ddof=1) / (rate * (1 - rate)))


def test_the_small_sample_interval_covers_where_the_percentile_bootstrap_does_not():
    """400 simulated runs of 6 prompts: baseline seconds 1 + lognormal(0, 0.5), speculative seconds the baseline's
    times lognormal(-0.3, 0.4), so the speedup of the population is e^0.22. The t interval holds it in about 95% of
    runs (92% here); the percentile interval of the same resamples (the method used before) in 82.5%."""
    rng = np.random.default_rng(1)
    truth, units, runs = math.exp(0.3 - 0.4**2 / 2), 6, 400
    covered = {"t": 0, "percentile": 0}
    for run in range(runs):
        baseline = 1 + rng.lognormal(0, 0.5, units)
        spec = baseline * rng.lognormal(-0.3, 0.4, units)
        picks = resample_cells(units, 1, seed=run)
        resampled = baseline[picks].sum(axis=1) / spec[picks].sum(axis=1)
        low, high = interval(baseline.sum() / spec.sum(), resampled, units)
        covered["t"] += low <= truth <= high
        covered["percentile"] += np.percentile(resampled, 2.5) <= truth <= np.percentile(resampled, 97.5)
    assert covered["t"] / runs >= 0.9
    assert covered["percentile"] / runs < 0.87


def test_the_wilson_interval_is_scipys_and_takes_fractional_counts():
    for successes, trials in ((8, 10), (3, 41), (0, 10), (20, 20)):
        expected = binomtest(successes, trials).proportion_ci(method="wilson")
        assert wilson_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-9)
    # a prior's pseudo-counts: between its integer neighbours
    assert wilson_interval(4, 9)[1] < wilson_interval(4.5, 9)[1] < wilson_interval(5, 9)[1]


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


def test_expected_maximum_is_the_mean_over_every_resample():
    values = [1, 5, 2]
    for draws in (1, 2, 3):
        every = np.array(np.meshgrid(*[values] * draws)).reshape(draws, -1)  # all 3^draws resamples
        assert expected_maximum(values, draws) == pytest.approx(every.max(axis=0).mean())
    assert expected_maximum(values, 1) == pytest.approx(np.mean(values))
    assert expected_maximum(values, 200) == pytest.approx(5.0)  # b rows: almost surely one of them is the longest


def test_a_batch_waits_for_its_row_with_the_most_steps():
    """Same output length (40 baseline calls after the prefill); one row accepts 3 drafts a step (10 steps), the
    other mostly none (30 steps). b rows drawn from the two take 30 steps unless all drew the fast one (1/2^b)."""
    fast = outcome("fast", 4.0, 1.0, [3] * 10, k=3)
    slow = outcome("slow", 4.0, 3.0, [1] * 10 + [0] * 20, k=3)
    again = outcome("fast", 4.0, 1.0, [0] * 40, k=3, repeat=1)  # later passes are not read
    rows = [fast, slow, again]

    def by_hand(b: int) -> float:  # (40 / expected largest steps) over (80 / 40) row by row
        return (40 / (30 - 20 * 0.5**b)) / (80 / 40)

    for b in (1, 2, 8, 64):
        assert speedup_model.finished_rows_factor(rows, b) == pytest.approx(by_hand(b)), b
    assert speedup_model.finished_rows_factor(rows, 1) == pytest.approx(1.0)
    # the wait grows with the batch past the prompt count instead of stopping at the two prompts measured
    assert speedup_model.finished_rows_factor(rows, 8) < speedup_model.finished_rows_factor(rows, 2)
    even = [outcome("a", 4.0, 1.0, [1] * 20, k=3), outcome("b", 4.0, 1.0, [1] * 20, k=3)]
    assert speedup_model.finished_rows_factor(even, 64) == pytest.approx(1.0)  # rows that end together cost nothing


def test_when_no_k_pays_the_run_says_why_and_which_acceptance_would_pay():
    """A free drafter (c = 0) whose verify pass over n tokens costs 1 + (n - 1) / 2: k = 1 pays above alpha 0.5
    (1 + a > 1.5), k = 2 above 0.618 (1 + a + a^2 > 2); at a measured alpha of 0.4 none pays."""
    from specbench.engine.costs import StepCosts
    from specbench.speedup_model import acceptance_to_pay, no_k_pays

    costs = StepCosts(verify_s={1: {n: 1 + (n - 1) / 2 for n in (1, 2, 3)}}, draft_s={1: {"lookup": 0.0}})
    assert acceptance_to_pay(1, 0.0, 1.5) == pytest.approx(0.5)
    assert acceptance_to_pay(2, 0.0, 2.0) == pytest.approx((5**0.5 - 1) / 2)
    assert acceptance_to_pay(2, 1.0, 2.0) is None  # a draft step as dear as the verifier's: nothing pays
    metrics = {"best_k_predicted": 1, "predicted_speedup_best_k": 1.4 / 1.5, "alpha_iid": 0.4}
    note = no_k_pays(metrics, costs, 1)
    assert metrics["acceptance_to_pay"] == pytest.approx(0.5)
    assert note == (
        "No k pays at the measured acceptance (best k=1: 0.93x predicted): verifying 2 tokens costs 1.50x one token "
        "and a draft step 0.00x; it would pay at a per-token acceptance above 0.50, at k=1 (measured 0.40)."
    )
    assert no_k_pays({"best_k_predicted": 1, "predicted_speedup_best_k": 1.2, "alpha_iid": 0.9}, costs, 1) is None
