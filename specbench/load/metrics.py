"""The figures of a trace served under load, per mode (`baseline`, `spec`), and spec over baseline.

Definitions follow `vllm bench serve`. For each request that did not fail:

- TTFT: first token - arrival (the queue and the prefill included);
- TPOT: (E2EL - TTFT) / (output tokens - 1), for outputs of 2 tokens or more;
- ITL: the gaps between consecutive chunks a client receives, pooled over requests;
- E2EL: finish - arrival;
- queue: admitted (its prefill began; a server: the request was sent) - arrival.

Each is logged as p50, p90, p99 (numpy's linear percentiles) and mean, in ms:
`ttft_ms_p99_spec`, `tpot_ms_mean_baseline`, ... The duration is from the trace's
start to the last request's finish (`ServeResult.wall_s`, vLLM's benchmark
duration); `requests_per_s` is completed requests over it, `output_tokens_per_s`
their output tokens over it. Goodput (DistServe, as vLLM computes it) is the
requests meeting every SLO set (`slo.ttft_ms`, `slo.tpot_ms`, `slo.e2el_ms`) over
the duration; a request of one token has TPOT 0 for it. Failed requests (`error`
set) are counted (`failed_requests_{mode}`) and left out of everything else.

Where ours differ from vLLM's:
- ITL is per emitted chunk: one token per baseline step, but under speculation a
  chunk is the accepted tokens plus the verifier's own, so speculative ITLs are
  fewer and longer. TPOT is the per-token figure to compare the modes on.
- TTFT and E2EL count from the request's arrival time in the trace; vLLM counts
  from when its client sent it, which lags the schedule when the client is busy.
- A figure with no value (e.g. TPOT when every output is one token) is not
  logged; vLLM reports 0.

With `load.exclude_first` = N, every figure is computed as above on each serve from the
arrival of its request N on (`ServeResult.after_first`): the duration starts there, the
steps before it are left out, and so are the first N requests, except that the part of
them that ran in the window counts in occupancy and their tokens emitted in it in output
tokens/s (so both say what the server did in the window); requests/s and goodput count
the measured requests.

Occupancy is the number of running requests (rows of the batch), time-weighted
over the whole duration, idle time counting as 0: the sum over requests of
(finish - admitted), over the duration, which is Little's law's L =
requests_per_s x mean time in the batch (with `load.exclude_first`, plus the requests
left out, for their time in the window). `occupancy_max` is the most requests
running at once ([admitted, finish) intervals, a finish before an admission at
the same instant). Both come from the requests, so they exist for server
backends too. `joins_per_request` is the scheduler's admissions (requests admitted
at the same instant joined as one prefill) per served request: 1 when every
request joined alone, less where joins were shared (`load.coalesce_joins` aims
there). Only for our engine: a server's admission time is when its request was
sent, which says nothing about how the server batched it. Acceptance by occupancy
groups the scheduler's steps by their running rows (1, 2-3, 4-7, ...):
`acceptance_rate_occupancy_{low}_{high}`.

The ratios `tpot_p99_ratio`, `e2el_p99_ratio` and `goodput_ratio` (spec over
baseline) have 95% bootstrap intervals (`_ci_low`, `_ci_high`) over the trace's
requests, paired by request id: a drawn request brings its figures in both modes.
The latency ratios are over the `paired_requests` that both modes served; for
goodput a request that failed in a mode is simply not good there. With several
traces pooled (`load.traces`), the bootstrap draws traces, then requests within
each drawn trace (`intervals.resample_cells`), and the interval is
`intervals.interval`'s over the traces: with few traces, a t interval, as wide
as what a few paths through the queue can tell.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from specbench.config import SloConfig
from specbench.engine.results import ServeResult, StepRecord
from specbench.intervals import interval, resample_cells

PERCENTILES = (50, 90, 99)
BOOTSTRAP_SAMPLES = 1000
_CHUNK = 100  # resamples drawn at once: a trace of 10,000 requests needs 100 x 10,000 draws in memory


@dataclass
class RequestTimes:
    """Per-request figures of one mode in seconds, over the requests that did not fail, in request-id order."""

    request_ids: np.ndarray
    ttft_s: np.ndarray
    tpot_s: np.ndarray  # NaN for outputs of one token
    e2el_s: np.ndarray
    queue_s: np.ndarray
    num_tokens: np.ndarray
    itl_s: np.ndarray  # every gap between consecutive chunks, pooled
    in_batch_s: np.ndarray  # finish - admitted: time as a running row

    @classmethod
    def of(cls, result: ServeResult) -> RequestTimes:
        """The figures of the requests of `result` that have no error."""
        served = [request for request in result.requests if request.error is None]

        def column(values) -> np.ndarray:
            return np.fromiter(values, dtype=float, count=len(served))

        tokens = column(request.num_tokens for request in served)
        ttft = column(request.first_token_s - request.arrival_s for request in served)
        e2el = column(request.finish_s - request.arrival_s for request in served)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(tokens > 1, (e2el - ttft) / (tokens - 1), np.nan)
        gaps = [np.diff(request.chunk_times_s) for request in served if len(request.chunk_times_s) > 1]
        return cls(
            request_ids=np.array([request.request_id for request in served], dtype=int),
            ttft_s=ttft,
            tpot_s=tpot,
            e2el_s=e2el,
            queue_s=column(request.admitted_s - request.arrival_s for request in served),
            num_tokens=tokens,
            itl_s=np.concatenate(gaps) if gaps else np.zeros(0),
            in_batch_s=column(request.finish_s - request.admitted_s for request in served),
        )

    def meets(self, slo: SloConfig) -> np.ndarray:
        """Which requests meet every SLO set (vLLM: a one-token output has TPOT 0 for this)."""
        good = np.ones(len(self.request_ids), dtype=bool)
        for target_ms, seconds in (
            (slo.ttft_ms, self.ttft_s),
            (slo.tpot_ms, np.nan_to_num(self.tpot_s, nan=0.0)),
            (slo.e2el_ms, self.e2el_s),
        ):
            if target_ms is not None:
                good &= seconds <= target_ms / 1000
        return good


def slo_set(slo: SloConfig | None) -> bool:
    """Whether any SLO is set (goodput is then logged)."""
    return slo is not None and any(value is not None for value in (slo.ttft_ms, slo.tpot_ms, slo.e2el_ms))


def mode_metrics(result: ServeResult, mode: str, slo: SloConfig | None = None) -> dict[str, float]:
    """The latency percentiles, throughput, goodput and occupancy of one mode's served trace (keys end `_{mode}`)."""
    times = RequestTimes.of(result)
    failed = len(result.requests) - len(times.request_ids)
    metrics: dict[str, float] = {f"failed_requests_{mode}": failed}
    for name, seconds in (
        ("ttft", times.ttft_s),
        ("tpot", times.tpot_s[~np.isnan(times.tpot_s)]),
        ("itl", times.itl_s),
        ("e2el", times.e2el_s),
        ("queue", times.queue_s),
    ):
        if len(seconds):
            for q in PERCENTILES:
                metrics[f"{name}_ms_p{q}_{mode}"] = 1000 * float(np.percentile(seconds, q))
            metrics[f"{name}_ms_mean_{mode}"] = 1000 * float(np.mean(seconds))
    duration = result.wall_s
    if duration > 0:
        earlier = RequestTimes.of(replace(result, requests=result.earlier))  # what they ran and emitted in the window
        metrics[f"requests_per_s_{mode}"] = len(times.request_ids) / duration
        metrics[f"output_tokens_per_s_{mode}"] = float(times.num_tokens.sum() + earlier.num_tokens.sum()) / duration
        metrics[f"occupancy_mean_{mode}"] = float(times.in_batch_s.sum() + earlier.in_batch_s.sum()) / duration
        if slo_set(slo):
            good = int(times.meets(slo).sum())
            metrics[f"goodput_rps_{mode}"] = good / duration
            metrics[f"slo_attainment_{mode}"] = good / len(result.requests)
    metrics[f"occupancy_max_{mode}"] = most_running(result)
    if result.steps and len(times.request_ids):  # steps: our scheduler served it (see the module's docstring)
        metrics[f"joins_per_request_{mode}"] = joins_per_request(result)
    return metrics


def joins_per_request(result: ServeResult) -> float:
    """The scheduler's admissions per served request, requests admitted at the same instant counting once."""
    admitted = [request.admitted_s for request in result.requests if request.error is None]
    return len(set(admitted)) / len(admitted)


def most_running(result: ServeResult) -> int:
    """The most requests running at once: a sweep over [admitted, finish), finishes first at equal times."""
    events = sorted(
        (time, change)
        for request in itertools.chain(result.requests, result.earlier)
        if request.error is None
        for time, change in ((request.admitted_s, 1), (request.finish_s, -1))
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def occupancy_bucket(rows: int) -> tuple[int, int]:
    """The power-of-two bucket of a step's running rows: 1, 2-3, 4-7, ..."""
    low = 1 << occupancy_bucket_index(rows)
    return low, 2 * low - 1


def occupancy_bucket_index(rows: int) -> int:
    """The number of `occupancy_bucket`: 1 row -> 0, 2-3 -> 1, 4-7 -> 2, ..."""
    return max(rows, 1).bit_length() - 1


def acceptance_by_occupancy(steps: list[StepRecord]) -> dict[str, float]:
    """Accepted / proposed draft tokens over the steps of each occupancy bucket (steps that proposed any)."""
    totals: dict[tuple[int, int], list[int]] = {}
    for step in steps:
        if step.proposed > 0:
            counts = totals.setdefault(occupancy_bucket(step.rows), [0, 0])
            counts[0] += step.accepted
            counts[1] += step.proposed
    return {
        f"acceptance_rate_occupancy_{low}_{high}": accepted / proposed
        for (low, high), (accepted, proposed) in sorted(totals.items())
    }


def ratio_metrics(
    baseline: ServeResult,
    spec: ServeResult,
    slo: SloConfig | None = None,
    seed: int = 0,
    traces: Mapping[int, int] | None = None,
) -> dict[str, float]:
    """`tpot_p99_ratio`, `e2el_p99_ratio` and (with SLOs) `goodput_ratio`, spec over baseline, with 95% bootstrap
    intervals over the trace's requests, paired by request id (a drawn request brings its figures in both modes);
    with `traces` (each request id's trace, when several are pooled), over the traces, then their requests.

    The latency ratios are over the requests both modes served (`paired_requests`); goodput counts a request
    that failed in a mode as not good there, so its ratio is goodput_rps_spec / goodput_rps_baseline. A ratio
    that cannot be computed (no TPOT in a mode, no good baseline request) is left out, and an unbounded interval.
    """
    ids = np.union1d(*(np.array([r.request_id for r in result.requests], dtype=int) for result in (baseline, spec)))
    if not len(ids):
        return {}
    modes = {"baseline": RequestTimes.of(baseline), "spec": RequestTimes.of(spec)}
    rows = {mode: np.searchsorted(ids, times.request_ids) for mode, times in modes.items()}
    served_by_both = np.zeros(len(ids), dtype=bool)
    served_by_both[np.intersect1d(rows["baseline"], rows["spec"])] = True

    def by_request(mode: str, values: np.ndarray, missing: float | bool) -> np.ndarray:
        """`values` of the mode's served requests, aligned on `ids`, `missing` elsewhere."""
        aligned = np.full(len(ids), missing, dtype=np.asarray(values).dtype)
        aligned[rows[mode]] = values
        return aligned

    latencies = {
        name: {
            mode: np.where(served_by_both, by_request(mode, getattr(times, name), np.nan), np.nan)
            for mode, times in modes.items()
        }
        for name in ("tpot_s", "e2el_s")
    }
    good = {mode: by_request(mode, times.meets(slo), False) for mode, times in modes.items()} if slo_set(slo) else None

    def ratios(picks: np.ndarray) -> dict[str, np.ndarray]:
        """Each ratio over the requests at `picks` (one row of picks: one resample)."""
        values = {}
        for name, seconds in latencies.items():
            if all((~np.isnan(mode_seconds)).any() for mode_seconds in seconds.values()):
                values[f"{name.removesuffix('_s')}_p99_ratio"] = _p99(seconds["spec"], picks) / _p99(
                    seconds["baseline"], picks
                )
        if good is not None:
            rates = {
                mode: good[mode][picks].sum(axis=-1) / result.wall_s
                for mode, result in (("baseline", baseline), ("spec", spec))
            }
            values["goodput_ratio"] = rates["spec"] / rates["baseline"]
        return values

    rng = np.random.default_rng(seed)
    metrics: dict[str, float] = {"paired_requests": int(served_by_both.sum())}
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample whose TPOTs are all undefined
        points = ratios(np.arange(len(ids)))
        if traces is None:
            draws = [ratios(rng.integers(0, len(ids), (_CHUNK, len(ids)))) for _ in range(BOOTSTRAP_SAMPLES // _CHUNK)]
        else:
            picks = _trace_resamples(ids, traces, seed)
            draws = [ratios(picks[start : start + _CHUNK]) for start in range(0, len(picks), _CHUNK)]
        for key, point in points.items():
            if not np.isfinite(point):
                continue
            metrics[key] = float(point)
            resampled = np.concatenate([draw[key] for draw in draws])
            if traces is None:
                low, high = np.nanpercentile(resampled, (2.5, 97.5))
            else:
                low, high = interval(float(point), resampled, len(set(traces.values())))
            if np.isfinite(low) and np.isfinite(high):
                metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = float(low), float(high)
    return metrics


def _trace_resamples(ids: np.ndarray, traces: Mapping[int, int], seed: int) -> np.ndarray:
    """Bootstrap picks (indices into `ids`, one row a resample) that draw traces with replacement, then each drawn
    trace's requests with replacement."""
    trace_of = np.array([traces[int(request_id)] for request_id in ids])
    groups = [np.flatnonzero(trace_of == trace) for trace in np.unique(trace_of)]
    if len({len(group) for group in groups}) > 1:
        raise ValueError("pooled traces must hold as many requests each to be resampled together")
    return np.concatenate(groups)[resample_cells(len(groups), len(groups[0]), seed)]


def _p99(values: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """The 99th percentile of `values` at `picks` (along the last axis), ignoring NaN (one-token outputs' TPOT)."""
    drawn = values[picks]
    return np.nanpercentile(drawn, 99, axis=-1) if np.isnan(drawn).any() else np.percentile(drawn, 99, axis=-1)


def load_metrics(
    results: Mapping[str, ServeResult],
    slo: SloConfig | None = None,
    seed: int = 0,
    traces: Mapping[int, int] | None = None,
) -> dict[str, float]:
    """Every load figure of a run: each mode's, the speculative steps' acceptance by occupancy, and the ratios
    (`traces`: each request id's trace, when several are pooled; see `ratio_metrics`)."""
    metrics: dict[str, float] = {}
    for mode, result in results.items():
        metrics |= mode_metrics(result, mode, slo)
    if "spec" in results:
        metrics |= acceptance_by_occupancy(results["spec"].steps)
    if {"baseline", "spec"} <= set(results):
        metrics |= ratio_metrics(results["baseline"], results["spec"], slo, seed, traces)
    return metrics
