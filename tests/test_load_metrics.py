"""Load metrics on hand-made timelines: every expected number below is worked out by hand in the comments."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from specbench.config import SloConfig
from specbench.engine.results import ServedRequest, ServeResult, StepRecord
from specbench.load.metrics import (
    acceptance_by_occupancy,
    load_metrics,
    mode_metrics,
    most_running,
    occupancy_bucket,
    ratio_metrics,
)
from specbench.load.result import LoadResult, concatenate


def request(request_id, arrival, admitted, chunks, sizes=None, error=None) -> ServedRequest:
    """A request whose chunks reach the client at `chunks` (seconds), `sizes` tokens each (1 by default)."""
    sizes = sizes or [1] * len(chunks)
    return ServedRequest(
        request_id,
        arrival,
        admitted,
        first_token_s=chunks[0] if chunks else 0.0,
        finish_s=chunks[-1] if chunks else 0.0,
        num_tokens=sum(sizes),
        tokens=list(range(sum(sizes))),
        chunk_times_s=list(chunks),
        chunk_sizes=list(sizes),
        error=error,
    )


def baseline_timeline() -> ServeResult:
    """r0: 5 tokens, TTFT 500 ms, TPOT 500, E2EL 2500, queue 0, ITLs 4 x 500;
    r1: 3 tokens, TTFT 1000, TPOT 1000, E2EL 3000, queue 500, ITLs 2 x 1000;
    r2: failed;
    r3: 1 token, TTFT 200, no TPOT, E2EL 200, queue 0, no ITL.
    The trace ends at 5 s (the failed request's give-up)."""
    return ServeResult(
        [
            request(0, 0.0, 0.0, [0.5, 1.0, 1.5, 2.0, 2.5]),
            request(1, 1.0, 1.5, [2.0, 3.0, 4.0]),
            request(2, 1.8, 1.8, [], error="connection reset"),
            request(3, 2.2, 2.2, [2.4]),
        ],
        steps=[],
        wall_s=5.0,
    )


def test_percentiles_means_and_rates_of_one_mode():
    metrics = mode_metrics(baseline_timeline(), "baseline")
    expected = {
        "failed_requests_baseline": 1,
        # TTFT 200, 500, 1000: linear percentiles at positions 1, 1.8, 1.98 of the sorted values
        "ttft_ms_p50_baseline": 500,
        "ttft_ms_p90_baseline": 500 + 0.8 * 500,
        "ttft_ms_p99_baseline": 500 + 0.98 * 500,
        "ttft_ms_mean_baseline": 1700 / 3,
        # TPOT 500, 1000 (r3 has one token)
        "tpot_ms_p50_baseline": 750,
        "tpot_ms_p90_baseline": 950,
        "tpot_ms_p99_baseline": 995,
        "tpot_ms_mean_baseline": 750,
        # ITL 500 x 4, 1000 x 2: positions 2.5, 4.5, 4.95
        "itl_ms_p50_baseline": 500,
        "itl_ms_p90_baseline": 1000,
        "itl_ms_p99_baseline": 1000,
        "itl_ms_mean_baseline": 4000 / 6,
        # E2EL 200, 2500, 3000
        "e2el_ms_p50_baseline": 2500,
        "e2el_ms_p90_baseline": 2500 + 0.8 * 500,
        "e2el_ms_p99_baseline": 2500 + 0.98 * 500,
        "e2el_ms_mean_baseline": 5700 / 3,
        # queue 0, 0, 500
        "queue_ms_p50_baseline": 0,
        "queue_ms_p90_baseline": 0.8 * 500,
        "queue_ms_p99_baseline": 0.98 * 500,
        "queue_ms_mean_baseline": 500 / 3,
        # 3 completed requests and 9 tokens over the 5 s from the trace's start to the last finish
        "requests_per_s_baseline": 0.6,
        "output_tokens_per_s_baseline": 1.8,
        # time in the batch 2.5 + 2.5 + 0.2 = 5.2 s over 5 s; at 2.2-2.4 s r0, r1 and r3 run together
        "occupancy_mean_baseline": 1.04,
        "occupancy_max_baseline": 3,
    }
    assert metrics == pytest.approx(expected)


def test_figures_after_the_first_requests_start_at_the_next_arrival():
    timeline = baseline_timeline()
    timeline.steps = [StepRecord(0.5, 1, 1, 0), StepRecord(2.0, 2, 2, 0), StepRecord(2.4, 3, 4, 0)]
    measured = timeline.after_first(1)  # r0 left out: the clock starts at r1's arrival, 1.0 s
    assert [r.request_id for r in measured.requests] == [1, 2, 3] and measured.wall_s == 4.0
    assert [(step.time_s, step.rows) for step in measured.steps] == [(1.0, 2), (1.4, 3)]  # the step at 0.5 s left out
    (r0,) = measured.earlier  # what r0 did in the window: running from 0 to 1.5 s, 4 tokens (at 0, 0.5, 1, 1.5)
    assert (r0.admitted_s, r0.finish_s, r0.num_tokens, r0.chunk_times_s) == (0.0, 1.5, 4, [0.0, 0.5, 1.0, 1.5])
    metrics = mode_metrics(measured, "baseline")
    expected = {
        "failed_requests_baseline": 1,
        "ttft_ms_p50_baseline": 600,  # TTFT 200 (r3), 1000 (r1): r0 in no per-request figure
        "tpot_ms_p99_baseline": 1000,  # r1 alone
        "e2el_ms_p50_baseline": 1600,  # 200, 3000
        "queue_ms_mean_baseline": 250,  # 500, 0
        "requests_per_s_baseline": 0.5,  # 2 measured requests completed over the 4 s from 1.0 s to the end
        "output_tokens_per_s_baseline": 2.0,  # 3 + 1 tokens, and r0's 4 in the window
        "occupancy_mean_baseline": (2.5 + 0.2 + 1.5) / 4,  # r1, r3, and r0's 1.5 s in the window
        "occupancy_max_baseline": 3,  # r0, r1 and r3 at 1.2-1.4 s on the window's clock
    }
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    pooled = mode_metrics(concatenate([measured, measured]), "baseline")  # two serves end to end: r0's part in each
    assert {key: pooled[key] for key in ("output_tokens_per_s_baseline", "occupancy_mean_baseline")} == pytest.approx(
        {"output_tokens_per_s_baseline": 2.0, "occupancy_mean_baseline": (2.5 + 0.2 + 1.5) / 4}
    )
    assert pooled["occupancy_max_baseline"] == 3
    # a server that reports no running usage counts chunks, not tokens: the window takes its share of num_tokens
    streamed = replace(request(0, 0.0, 0.0, [1.0, 3.0]), num_tokens=10)
    assert streamed.in_window(2.0).num_tokens == 5
    assert timeline.after_first(0) is timeline
    with pytest.raises(ValueError, match="none would remain"):
        timeline.after_first(4)


def test_pooled_serves_leave_out_the_first_requests_of_each_serve():
    # two traces of 10 requests, one repeat: request 3 of each serve on, ids renumbered serve after serve
    serves = [many_requests(10), scaled(many_requests(10), 2.0, 6.0)]
    result = LoadResult("t", 1.0, [[], []], {"baseline": serves, "spec": serves}, {}, exclude_first=3)
    pooled, traces = result.pooled["baseline"], result.pooled_traces()
    assert len(pooled.requests) == 14 and len({r.request_id for r in pooled.requests}) == 14
    assert sorted(traces.values()) == [0] * 7 + [1] * 7 and set(traces) == {r.request_id for r in pooled.requests}
    assert pooled.wall_s == pytest.approx((6.0 - 1.5) + (6.0 - 1.5))  # each serve from request 3's arrival, 1.5 s
    assert pooled.requests[0].arrival_s == 0.0
    assert load_metrics(result.pooled, traces=traces)["paired_requests"] == 14


def test_goodput_counts_requests_meeting_every_slo_set():
    # TTFT <= 600 ms and TPOT <= 800 ms: r0 (500, 500) and r3 (200, a single token counts as TPOT 0) are good,
    # r1 (1000 ms to its first token) is not, and the failed r2 is not
    metrics = mode_metrics(baseline_timeline(), "baseline", SloConfig(ttft_ms=600, tpot_ms=800))
    assert metrics["goodput_rps_baseline"] == pytest.approx(2 / 5)
    assert metrics["slo_attainment_baseline"] == pytest.approx(2 / 4)
    only_e2el = mode_metrics(baseline_timeline(), "baseline", SloConfig(e2el_ms=2600))  # r0 and r3
    assert only_e2el["goodput_rps_baseline"] == pytest.approx(2 / 5)
    tight = mode_metrics(baseline_timeline(), "baseline", SloConfig(ttft_ms=600, tpot_ms=400))  # r3 only
    assert tight["goodput_rps_baseline"] == pytest.approx(1 / 5)
    assert "goodput_rps_baseline" not in mode_metrics(baseline_timeline(), "baseline", SloConfig())


def test_speculative_chunks_make_itl_per_chunk_and_tpot_per_token():
    # 7 tokens in chunks of 1 (the prefill's), 3, 3 at 0.2, 0.5 and 0.8 s: 2 ITLs of 300 ms, TPOT 600 / 6 = 100 ms
    result = ServeResult([request(0, 0.0, 0.0, [0.2, 0.5, 0.8], [1, 3, 3])], [], wall_s=0.8)
    metrics = mode_metrics(result, "spec")
    assert metrics["itl_ms_mean_spec"] == pytest.approx(300)
    assert metrics["tpot_ms_mean_spec"] == pytest.approx(100)
    assert metrics["output_tokens_per_s_spec"] == pytest.approx(7 / 0.8)


def test_most_running_ends_a_request_before_admitting_one_at_the_same_instant():
    back_to_back = ServeResult([request(0, 0.0, 0.0, [1.0]), request(1, 0.0, 1.0, [2.0])], [], 2.0)
    assert most_running(back_to_back) == 1
    overlapping = ServeResult([request(0, 0.0, 0.0, [1.0]), request(1, 0.0, 0.99, [2.0])], [], 2.0)
    assert most_running(overlapping) == 2


def test_joins_per_request_counts_requests_admitted_together_once_and_only_for_our_scheduler():
    # r0 alone at 0 s; r1 and r2 joined together at 1.5 s; r3 alone at 2.2 s; the failed r4 is left out: 3 joins
    # for 4 served requests
    requests = [
        request(0, 0.0, 0.0, [0.5, 1.0]),
        request(1, 1.0, 1.5, [2.0, 3.0]),
        request(2, 1.2, 1.5, [2.0, 2.5]),
        request(3, 2.2, 2.2, [2.4]),
        request(4, 2.3, 2.3, [], error="out of memory"),
    ]
    steps = [StepRecord(time_s=1.0, rows=1, computed_rows=1, k=0)]
    assert mode_metrics(ServeResult(requests, steps, wall_s=3.0), "spec")["joins_per_request_spec"] == 3 / 4
    # no scheduler steps (a server's requests, admitted when sent): how the server batched them is unknown
    assert "joins_per_request_spec" not in mode_metrics(ServeResult(requests, [], wall_s=3.0), "spec")


def test_acceptance_by_occupancy_bucket():
    assert [occupancy_bucket(rows) for rows in (1, 2, 3, 4, 7, 8, 100)] == [
        (1, 1),
        (2, 3),
        (2, 3),
        (4, 7),
        (4, 7),
        (8, 15),
        (64, 127),
    ]
    steps = [
        StepRecord(0.1, rows=1, computed_rows=1, k=4, proposed=4, accepted=2),
        StepRecord(0.2, rows=2, computed_rows=2, k=4, proposed=8, accepted=8),
        StepRecord(0.3, rows=3, computed_rows=4, k=4, proposed=12, accepted=0),
        StepRecord(0.4, rows=5, computed_rows=8, k=4, proposed=20, accepted=5),
        StepRecord(0.5, rows=4, computed_rows=4, k=4, proposed=16, accepted=10),
        StepRecord(0.6, rows=9, computed_rows=16, k=0),  # a plain decode step proposes nothing
    ]
    assert acceptance_by_occupancy(steps) == pytest.approx(
        {
            "acceptance_rate_occupancy_1_1": 2 / 4,
            "acceptance_rate_occupancy_2_3": 8 / 20,
            "acceptance_rate_occupancy_4_7": 15 / 36,
        }
    )


def scaled(result: ServeResult, factor: float, wall_s: float) -> ServeResult:
    """The same requests, each one's times after its arrival stretched by `factor`."""
    return ServeResult(
        [
            request(
                r.request_id,
                r.arrival_s,
                r.arrival_s + factor * (r.admitted_s - r.arrival_s),
                [r.arrival_s + factor * (t - r.arrival_s) for t in r.chunk_times_s],
                r.chunk_sizes,
                r.error,
            )
            for r in result.requests
        ],
        [],
        wall_s,
    )


def many_requests(count: int = 40) -> ServeResult:
    """`count` requests of 3 to 9 tokens with TTFTs and step times that vary from request to request."""
    requests = []
    for index in range(count):
        arrival, ttft, step = index * 0.5, 0.1 + 0.05 * (index % 7), 0.02 + 0.01 * (index % 5)
        chunks = [arrival + ttft + step * position for position in range(3 + index % 7)]
        requests.append(request(index, arrival, arrival, chunks))
    return ServeResult(requests, [], wall_s=count * 0.5 + 1)


def test_paired_ratios_are_exact_when_every_request_scales_alike():
    # every request's TTFT, TPOT and E2EL doubles: each paired resample's p99 doubles too, so the interval is
    # [2, 2]; resampling the modes independently would give a wide one
    baseline = many_requests()
    spec = scaled(baseline, 2.0, wall_s=baseline.wall_s)
    metrics = ratio_metrics(baseline, spec, SloConfig(e2el_ms=300))
    assert metrics["paired_requests"] == 40
    for key in ("tpot_p99_ratio", "e2el_p99_ratio"):
        assert metrics[key] == pytest.approx(2.0)
        assert (metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]) == pytest.approx((2.0, 2.0))
    assert metrics["goodput_ratio"] < 1


def test_ratios_pair_requests_by_id_and_their_intervals_cover_the_estimate():
    baseline = many_requests()
    # the speculative mode halves the odd requests' times and doubles the even ones'; request 3 fails in it
    halved, doubled = scaled(baseline, 0.5, baseline.wall_s), scaled(baseline, 2.0, baseline.wall_s)
    mixed = [(halved if r.request_id % 2 else doubled).requests[r.request_id] for r in baseline.requests]
    mixed[3] = request(3, mixed[3].arrival_s, mixed[3].arrival_s, [], error="timeout")
    spec = ServeResult(mixed, [], baseline.wall_s)
    metrics = ratio_metrics(baseline, spec, seed=1)
    assert metrics["paired_requests"] == 39
    assert "goodput_ratio" not in metrics  # no SLO set
    # the point estimate is over the 39 requests both modes served (request 3 left out of the baseline's too)
    e2el = {
        mode: [r.finish_s - r.arrival_s for r in result.requests if r.request_id != 3]
        for mode, result in (("baseline", baseline), ("spec", spec))
    }
    assert metrics["e2el_p99_ratio"] == pytest.approx(
        np.percentile(e2el["spec"], 99) / np.percentile(e2el["baseline"], 99)
    )
    for key in ("tpot_p99_ratio", "e2el_p99_ratio"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"]
        assert metrics[f"{key}_ci_high"] - metrics[f"{key}_ci_low"] > 0.05
    assert ratio_metrics(baseline, spec, seed=1) == metrics  # seeded


def test_goodput_ratio_by_hand():
    # baseline: r0 and r3 meet an E2EL SLO of 2600 ms in 5 s; spec (all times halved, 4 s): r0, r1 (1500) and
    # r3, so (3 / 4) / (2 / 5) = 1.875
    baseline = baseline_timeline()
    spec = scaled(baseline, 0.5, wall_s=4.0)
    metrics = load_metrics({"baseline": baseline, "spec": spec}, SloConfig(e2el_ms=2600))
    assert metrics["goodput_ratio"] == pytest.approx(1.875)
    assert metrics["goodput_rps_spec"] == pytest.approx(3 / 4)
    assert metrics["paired_requests"] == 3  # r2 failed in both
    assert metrics["e2el_p99_ratio"] == pytest.approx(0.5)
    assert metrics["tpot_p99_ratio"] == pytest.approx(0.5)


def test_goodput_ratio_counts_a_request_failed_in_one_mode_as_not_good_there():
    # spec halves every time but r0 fails in it: baseline good r0, r3 (2 in 5 s), spec good r1, r3 (2 in 4 s):
    # (2 / 4) / (2 / 5) = 1.25; pairing only the requests both modes served would give (2 / 4) / (1 / 5)
    baseline = baseline_timeline()
    spec = scaled(baseline, 0.5, wall_s=4.0)
    spec.requests[0] = request(0, 0.0, 0.0, [], error="timeout")
    metrics = load_metrics({"baseline": baseline, "spec": spec}, SloConfig(e2el_ms=2600))
    assert metrics["goodput_ratio"] == pytest.approx(1.25)
    assert metrics["goodput_ratio"] == pytest.approx(metrics["goodput_rps_spec"] / metrics["goodput_rps_baseline"])
    assert metrics["paired_requests"] == 2  # r1 and r3: the latency ratios' requests
    assert metrics["e2el_p99_ratio"] == pytest.approx(0.5)


def test_pooled_traces_are_resampled_whole_so_traces_that_differ_widen_the_interval():
    # 4 traces of 10 requests pooled (ids 0-9 trace 0, ...): speculation halves the times of traces 0 and 2 and
    # doubles those of traces 1 and 3, alike within each trace, as one path through the queue would. Drawing
    # requests alone mixes the traces evenly in every resample; drawing traces first lets a resample hold three
    # doubled traces, and 4 traces give a t interval with 3 degrees of freedom
    baseline = many_requests()
    halved, doubled = scaled(baseline, 0.5, baseline.wall_s), scaled(baseline, 2.0, baseline.wall_s)
    spec = ServeResult([(doubled if r.request_id // 10 % 2 else halved).requests[r.request_id]
                        for r in baseline.requests], [], baseline.wall_s)  # fmt: skip
    traces = {r.request_id: r.request_id // 10 for r in baseline.requests}
    by_request, by_trace = ratio_metrics(baseline, spec, seed=1), ratio_metrics(baseline, spec, seed=1, traces=traces)
    for key in ("tpot_p99_ratio", "e2el_p99_ratio"):
        assert by_trace[key] == by_request[key]  # the estimate does not depend on how it is resampled
        assert by_trace[f"{key}_ci_low"] <= by_trace[key] <= by_trace[f"{key}_ci_high"]
        width = {name: m[f"{key}_ci_high"] - m[f"{key}_ci_low"] for name, m in (("request", by_request),
                                                                                   ("trace", by_trace))}  # fmt: skip
        assert width["trace"] > 1.5 * width["request"]
    # where every trace scales alike the traces agree, and the interval is exact again
    alike = ratio_metrics(baseline, scaled(baseline, 2.0, baseline.wall_s), traces=traces)
    assert (alike["tpot_p99_ratio_ci_low"], alike["tpot_p99_ratio_ci_high"]) == pytest.approx((2.0, 2.0))
    with pytest.raises(ValueError, match="as many requests each"):
        ratio_metrics(baseline, spec, traces={r.request_id: int(r.request_id >= 30) for r in baseline.requests})
