"""The speedup model under load: TPOT and the crossover rate from the measured step costs, by Little's law.

Under load the batch size is not chosen: it is the occupancy b (running requests,
time-averaged) that the arrival rate produces. For each mode:

- a step of b rows costs s(b): the verifier over 1 token per row (baseline), or k
  draft steps plus the verifier over k+1 tokens per row (speculation), from the
  measured `StepCosts`, interpolated linearly in log b between measured batch
  sizes (below the smallest: its cost; above the largest: its cost, an
  underestimate);
- a step emits E tokens per row: 1 (baseline), or Leviathan et al.'s
  E = (1 - alpha^(k+1)) / (1 - alpha) with the measured per-token acceptance alpha;
- a request's prefill costs p (the verifier's, plus the drafts' under
  speculation) and yields its first token; the running rows wait for it, so
  requests joining at a rate a take a share a p of the time, and the decode steps
  get the rest. p is a share of the server's time, not a latency:
  `join_seconds_per_request` measures it from a served trace as each join's time
  (admission to first token) summed over the joins, per request, so requests that
  join together share one prefill (not the median admission-to-first-token latency,
  which charges each of them the whole group's). What that leaves out: the drafters
  read the rows that join a running batch at their next drafting step, not at the
  join, so speculation's join time carries the drafters' prefill only for joins into
  an empty batch (the drafts' part is speculation's join time per request over the
  baseline's), and the rest is in steps that the measured surface does not time;
  and where the baseline reads ahead (on a GPU), a join's time also holds what was
  left of the step queued before it;
- so a request of L output tokens decodes in n = (L - 1) / E steps and stays in
  the batch T = p + n s(b) / (1 - a p).

Little's law ties them: b = a T. For a given b this is a quadratic in u = a p,
u^2 - (1 + b + n s(b) / p) u + b = 0, whose smaller root gives the rate a(b)
that sustains occupancy b (a(b) = b / (n s(b)) without prefill). The occupancy
at arrival rate lambda is the fixed point a(b) = lambda: the smallest one in
(0, max_batch_size] (a scan, then bisection), which a server filling up from
empty settles at when a step cost that grows faster than b somewhere gives
several. When lambda is above a(max_batch_size), the mode is
saturated: the batch is full, requests leave at a(max_batch_size) per second, the
queue grows, and E2EL is not predicted.

Predicted per mode: occupancy b, TPOT = s(b) / (E (1 - a p)), E2EL = T (TTFT = p;
the wait for the running step to end and queueing below saturation are left out),
output tokens/s = a L, and the capacity a(max_batch_size). These are means.

The p99s add each row's acceptance luck, which the means hide: a baseline row
emits one token a step, so its L - 1 decode tokens take L - 1 steps whatever
happens, but a speculating row draws its own acceptances, and the row unlucky
at the 99th percentile needs N99 steps, more than the model's n = (L - 1) / E.
N is the first step at which the tokens emitted reach L - 1, each step yielding
1 + j tokens, j the accepted drafts (j < k with probability alpha^j (1 - alpha),
j = k with alpha^k); its distribution is computed exactly (`quantile_steps`). The
p99s are the means times N99 / n: p99 TPOT = s(b) N99 / ((L - 1)(1 - a p)) and
p99 E2EL = p + N99 s(b) / (1 - a p) (with L - 1 rounded to whole tokens in N99),
for the baseline its means. At alpha = 0.8, k = 4 and 64 tokens N99 is 25 steps,
1.33x n = 18.7. Left out: the stalls of joins, which every running row waits for
in both modes, and the spread of output lengths (L is the mean), which widens
speculation's tail more than the baseline's (a short output's steps spread more).

The predicted crossover rate is where the speculative and baseline p99 TPOT (or
p99 E2EL) predictions cross, searched on a log grid of rates and refined by
bisection. For E2EL a saturated mode loses to one that is not, and two saturated
modes compare by capacity. The model predicts no goodput: it needs the latency
distributions, not two quantiles.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from specbench.config import CrossoverMetric
from specbench.engine.costs import StepCosts
from specbench.engine.results import ServedRequest, ServeResult
from specbench.speedup_model import tokens_per_step

_GRID = 64  # rates scanned for the predicted crossover, log-spaced
_OCCUPANCY_GRID = 128  # occupancies scanned for the smallest fixed point
_BISECTIONS = 60
TAIL_QUANTILE = 0.99  # the p99s the load runs measure


def interpolate_log_batch(values: Mapping[int, float], batch: float) -> float:
    """`values` (by batch size) at `batch`, linear in log batch size between measured sizes, clamped outside."""
    sizes = sorted(values)
    return float(np.interp(math.log(max(batch, sizes[0])), np.log(sizes), [values[size] for size in sizes]))


# the load-aware k asks at every full-batch step, for each k and the running rows' mean limit: room for all of them
@functools.lru_cache(maxsize=4096)
def quantile_steps(alpha: float, k: int, tokens: int, quantile: float = TAIL_QUANTILE) -> int:
    """The steps a row needs to emit `tokens` tokens at `quantile` of rows: each step yields 1 + j tokens, j the
    accepted of k drafts (j < k with probability alpha^j (1 - alpha), k with alpha^k; k = 0 is the baseline)."""
    if tokens <= 0:
        return 0
    if k == 0 or alpha <= 0:
        return tokens
    if alpha >= 1:
        return math.ceil(tokens / (k + 1))
    yields = np.array([0.0, *(alpha**j * (1 - alpha) for j in range(k)), alpha**k])  # P(a step yields 0..k+1)
    below = np.zeros(tokens)  # P(t tokens emitted so far, still short of `tokens`), after each step
    below[0] = 1.0
    steps = 0
    while below.sum() > 1 - quantile + 1e-12:  # the tolerance keeps an exact tie from costing a step
        below = np.convolve(below, yields)[:tokens]
        steps += 1
    return steps


@dataclass(frozen=True)
class ModeModel:
    """One mode's step cost by occupancy, tokens per step and per-request prefill, and the drafts (alpha, k) that
    spread its rows' step counts (k = 0 for the baseline)."""

    step_s: Mapping[int, float]  # by measured batch size
    tokens_per_step: float
    prefill_s: float
    alpha: float = 0.0
    k: int = 0

    def step_at(self, occupancy: float) -> float:
        return interpolate_log_batch(self.step_s, occupancy)

    def sustaining_rate(self, occupancy: float, decode_steps: float) -> float:
        """The arrival rate a at which Little's law b = a (p + n s(b) / (1 - a p)) holds at occupancy b."""
        work = decode_steps * self.step_at(occupancy)  # n s(b): a request's decode time on a server of its own
        if self.prefill_s <= 0:
            return occupancy / work if work > 0 else math.inf
        middle = 1 + occupancy + work / self.prefill_s
        # the smaller root of u^2 - middle u + b = 0, written so that it does not cancel
        share = 2 * occupancy / (middle + math.sqrt(middle**2 - 4 * occupancy))
        return share / self.prefill_s


@dataclass(frozen=True)
class ModePrediction:
    """What the model predicts for one mode at one arrival rate (seconds, requests/s)."""

    occupancy: float
    tpot_s: float
    e2el_s: float | None  # None when saturated: the queue grows with the trace
    tpot_p99_s: float  # the row unlucky at the 99th percentile of acceptances
    e2el_p99_s: float | None
    admitted_rps: float  # requests/s joining (and leaving) the batch
    capacity_rps: float  # the most requests/s the mode sustains with a full batch
    saturated: bool


def predict_mode(mode: ModeModel, rate: float, mean_output_tokens: float, max_batch_size: int) -> ModePrediction:
    """One mode at arrival rate `rate`: the occupancy solving Little's law, and TPOT and E2EL there."""
    decode_steps = max(mean_output_tokens - 1, 0) / mode.tokens_per_step
    capacity = mode.sustaining_rate(max_batch_size, decode_steps)
    saturated = rate >= capacity
    if saturated:
        occupancy, admitted = float(max_batch_size), capacity
    else:
        occupancy, admitted = _smallest_occupancy(mode, rate, decode_steps, max_batch_size), rate
    step = mode.step_at(occupancy)
    decode_share = 1 - admitted * mode.prefill_s  # of the time, what the prefills of joining requests leave
    tpot = step / (mode.tokens_per_step * decode_share)
    # the steps of the row unlucky at p99 over the mean's: exactly 1 for the baseline, whose rows all take L - 1
    decode_tokens = round(mean_output_tokens - 1)
    tail = 1.0
    if decode_tokens >= 1:
        tail = quantile_steps(mode.alpha, mode.k, decode_tokens) * mode.tokens_per_step / decode_tokens
    return ModePrediction(
        occupancy=occupancy,
        tpot_s=tpot,
        e2el_s=None if saturated else mode.prefill_s + decode_steps * step / decode_share,
        tpot_p99_s=tail * tpot,
        e2el_p99_s=None if saturated else mode.prefill_s + tail * decode_steps * step / decode_share,
        admitted_rps=admitted,
        capacity_rps=capacity,
        saturated=saturated,
    )


def _smallest_occupancy(mode: ModeModel, rate: float, decode_steps: float, max_batch_size: int) -> float:
    """The smallest occupancy b whose sustaining rate reaches `rate` (below the capacity): the one a server
    filling up from empty settles at, when the per-row step cost does not fall with b everywhere and several
    occupancies satisfy Little's law. A scan over (0, max_batch_size], then bisection in the first bracket."""
    grid = np.linspace(0.0, max_batch_size, _OCCUPANCY_GRID + 1)
    first = next(i for i in range(1, len(grid)) if mode.sustaining_rate(grid[i], decode_steps) >= rate)
    low, high = grid[first - 1], grid[first]
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if mode.sustaining_rate(middle, decode_steps) < rate else (low, middle)
    return (low + high) / 2


def join_seconds_per_request(requests: list[ServedRequest]) -> float:
    """p: the seconds of joining per request, each join's time (admission to its rows' first token) summed over
    the joins and divided by the requests (requests admitted at the same time joined as one prefill)."""
    served = [request for request in requests if request.error is None]
    joins: dict[float, float] = {}
    for request in served:
        joins[request.admitted_s] = max(joins.get(request.admitted_s, 0.0), request.first_token_s - request.admitted_s)
    return sum(joins.values()) / len(served)


def mode_models(
    costs: StepCosts, alpha: float, k: int, prefill_s: float, draft_prefill_s: float = 0.0
) -> dict[str, ModeModel]:
    """The baseline's and speculation's step costs (at the batch sizes where both were measured) and yields."""
    sizes = [size for size, curve in costs.verify_s.items() if 1 in curve and k + 1 in curve and size in costs.draft_s]
    if not sizes:
        raise ValueError(f"the step costs have no batch size with verifier passes over 1 and {k + 1} tokens")
    return {
        "baseline": ModeModel({size: costs.verify_s[size][1] for size in sizes}, 1.0, prefill_s),
        "spec": ModeModel(
            {size: k * sum(costs.draft_s[size].values()) + costs.verify_s[size][k + 1] for size in sizes},
            tokens_per_step(alpha, k),
            prefill_s + draft_prefill_s,
            alpha,
            k,
        ),
    }


def predicted_load_metrics(
    costs: StepCosts,
    alpha: float,
    k: int,
    rate: float,
    mean_output_tokens: float,
    prefill_s: float,
    max_batch_size: int,
    draft_prefill_s: float = 0.0,
) -> dict[str, float]:
    """The model's figures at arrival rate `rate`, to log beside the measured ones (ms, requests/s; keys
    `predicted_*_{mode}`, and `predicted_tpot_ratio`, `predicted_e2el_ratio` spec over baseline, of the means, and
    `predicted_tpot_p99_ratio`, `predicted_e2el_p99_ratio` of the p99s)."""
    metrics: dict[str, float] = {}
    predictions = {
        mode: predict_mode(model, rate, mean_output_tokens, max_batch_size)
        for mode, model in mode_models(costs, alpha, k, prefill_s, draft_prefill_s).items()
    }
    for mode, prediction in predictions.items():
        metrics[f"predicted_occupancy_{mode}"] = prediction.occupancy
        metrics[f"predicted_tpot_ms_{mode}"] = 1000 * prediction.tpot_s
        metrics[f"predicted_tpot_ms_p99_{mode}"] = 1000 * prediction.tpot_p99_s
        if prediction.e2el_s is not None and prediction.e2el_p99_s is not None:
            metrics[f"predicted_e2el_ms_{mode}"] = 1000 * prediction.e2el_s
            metrics[f"predicted_e2el_ms_p99_{mode}"] = 1000 * prediction.e2el_p99_s
        metrics[f"predicted_output_tokens_per_s_{mode}"] = prediction.admitted_rps * mean_output_tokens
        metrics[f"predicted_capacity_rps_{mode}"] = prediction.capacity_rps
        metrics[f"predicted_saturated_{mode}"] = float(prediction.saturated)
    spec, baseline = predictions["spec"], predictions["baseline"]
    metrics["predicted_tpot_ratio"] = spec.tpot_s / baseline.tpot_s
    metrics["predicted_tpot_p99_ratio"] = spec.tpot_p99_s / baseline.tpot_p99_s
    if spec.e2el_s is not None and baseline.e2el_s is not None:
        metrics["predicted_e2el_ratio"] = spec.e2el_s / baseline.e2el_s
    if spec.e2el_p99_s is not None and baseline.e2el_p99_s is not None:
        metrics["predicted_e2el_p99_ratio"] = spec.e2el_p99_s / baseline.e2el_p99_s
    return metrics


def _spec_advantage(predictions: Mapping[str, ModePrediction], metric: CrossoverMetric) -> float:
    """Above 0 where the model says speculation wins on `metric` (a log ratio, baseline over spec)."""
    baseline, spec = predictions["baseline"], predictions["spec"]
    if metric is CrossoverMetric.tpot_p99:
        return math.log(baseline.tpot_p99_s / spec.tpot_p99_s)
    if baseline.e2el_p99_s is not None and spec.e2el_p99_s is not None:
        return math.log(baseline.e2el_p99_s / spec.e2el_p99_s)
    return math.log(spec.capacity_rps / baseline.capacity_rps)  # the mode that saturates later wins


def predicted_crossover_rate(
    costs: StepCosts,
    alpha: float,
    k: int,
    mean_output_tokens: float,
    prefill_s: float,
    max_batch_size: int,
    rate_min: float,
    rate_max: float,
    metric: CrossoverMetric = CrossoverMetric.tpot_p99,
    draft_prefill_s: float = 0.0,
) -> float | None:
    """The lowest rate in [rate_min, rate_max] where the model's speculative and baseline p99 TPOT (or p99 E2EL)
    cross; None when they do not cross in the range, or for goodput (which the model does not predict)."""
    if metric is CrossoverMetric.goodput:
        return None
    models = mode_models(costs, alpha, k, prefill_s, draft_prefill_s)

    def advantage(rate: float) -> float:
        predictions = {
            mode: predict_mode(model, rate, mean_output_tokens, max_batch_size) for mode, model in models.items()
        }
        return _spec_advantage(predictions, metric)

    rates = np.geomspace(rate_min, rate_max, _GRID)
    signs = [advantage(rate) > 0 for rate in rates]
    change = next((i for i in range(1, _GRID) if signs[i] != signs[i - 1]), None)
    if change is None:
        return None
    low, high = math.log(rates[change - 1]), math.log(rates[change])
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if (advantage(math.exp(middle)) > 0) == signs[change - 1] else (low, middle)
    return math.exp((low + high) / 2)


def served_predictions(
    costs: StepCosts,
    alpha: float,
    k: int,
    rate: float,
    served: Mapping[str, ServeResult],
    max_batch_size: int,
    rate_min: float,
    rate_max: float,
    metric: CrossoverMetric,
) -> dict[str, float]:
    """The model's figures at `rate` and its crossover rate (`predicted_crossover_rate`, when one lies in the range),
    fed from the served traces (`served["baseline"]`, `served["spec"]`) as a load run feeds it: each mode's join
    time per request (the drafts' part is speculation's excess over the baseline's) and the baseline's mean output
    length."""
    prefill = {mode: join_seconds_per_request(served[mode].requests) for mode in ("baseline", "spec")}
    arguments = {
        "mean_output_tokens": float(np.mean([request.num_tokens for request in served["baseline"].requests])),
        "prefill_s": prefill["baseline"],
        "max_batch_size": max_batch_size,
        "draft_prefill_s": max(prefill["spec"] - prefill["baseline"], 0.0),
    }
    metrics = predicted_load_metrics(costs, alpha, k, rate, **arguments)
    crossover = predicted_crossover_rate(
        costs, alpha, k, rate_min=rate_min, rate_max=rate_max, metric=metric, **arguments
    )
    return metrics | ({"predicted_crossover_rate": crossover} if crossover is not None else {})
