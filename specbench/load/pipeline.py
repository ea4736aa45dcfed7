"""One load run, without Hydra or MLflow: one arrival trace replayed through the engine in both modes.

    setup = prepare(cfg, records, cache)          # runner: the same models and prompts as a batch run
    check_joinable_drafters(setup)                 # every drafter takes requests into a running batch
    costs = load_costs(cfg, setup)                 # step costs over the batch sizes a load run reaches
    result = run_load(cfg, setup, rate, costs)     # both modes on one trace: metrics and the model's prediction

The sibling of `pipeline.run_benchmark` for `mode=load`. The trace (arrival times,
prompts, length limits) is built once and replayed for the baseline and for speculative
decoding by the continuous-batching scheduler (`engine.continuous`), on a real clock; with
`repeats` > 1 it is replayed that many times, the order of the modes alternating. Each
request is decoded with seed `seed + request id` in both modes. Replays of one trace take
nearly the same path through joins and leaves, so they measure the machine; with
`load.traces` > 1, that many traces (arrival seeds `seed`, `seed + 1`, ...; the same prompts
and limits) are each replayed `repeats` times, and the ratios' intervals resample traces,
then requests within them. The figures are `load.result.served_figures` (every serve pooled,
and the crossover ratio per serve), plus what only our engine knows: the verifier's padded
share, the oracle's check, the outputs' agreement and the load model's prediction.

With `k_schedule=load` one schedule serves the warm-up and then every serve of the run, and
keeps learning throughout (acceptance, its corrections r(k, b), the cost of reading): the
first serve's choices are made on less evidence than the last's, so the per-serve spread
mixes that learning with the machine's noise.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from specbench import speedup_model
from specbench.config import KScheduleKind, SpecBenchConfig
from specbench.engine import KSchedule
from specbench.engine.cached_model import slot_buckets
from specbench.engine.continuous import serve
from specbench.engine.costs import StepCosts, measure_step_costs
from specbench.engine.decode import BaselineDecoder, SpeculativeDecoder, new_row
from specbench.engine.drafters import drafter_models
from specbench.engine.joins import make_join_gate
from specbench.engine.oracle import OracleDrafter
from specbench.engine.results import EngineRequest, ServeResult
from specbench.engine.timing import Stopwatch
from specbench.errors import ConfigError
from specbench.intervals import wilson_interval
from specbench.load.k_schedule import LoadAwareK
from specbench.load.model import served_predictions
from specbench.load.result import LoadResult, excluded_note, served_figures
from specbench.load.trace import MODES, TraceRequest, build_trace, serve_order
from specbench.runner import RunSetup, curve_tokens, k_schedule, prepare_oracles

WARMUP_REQUESTS = 2


def load_costs(cfg: SpecBenchConfig, setup: RunSetup) -> StepCosts | None:
    """Step costs at the batch sizes a load run can reach (`slot_buckets` up to load.max_batch_size): 1 and k+1 tokens
    per row for the model, 1..k_max+1 for `k_schedule=load`; None when neither is asked for."""
    load_k = cfg.k_schedule is KScheduleKind.load
    if not (cfg.cost_curve or load_k):
        return None
    tokens = range(1, cfg.k_max + 2) if load_k else sorted({1, cfg.k + 1})
    shapes = {size: tokens for size in slot_buckets(cfg.load.max_batch_size)}
    if cfg.cost_curve:  # the verify curve at one row, as a batch run measures it
        shapes[1] = range(1, max(curve_tokens(cfg), max(tokens)) + 1)
    prompts = [prompt.input_ids for prompt in setup.prompts]
    budget = None if load_k else cfg.cost_grid_budget_s  # k_schedule=load cannot run without its surface
    return measure_step_costs(setup.verifier, setup.drafters, prompts, setup.settings, shapes, budget_s=budget)


def engine_requests(cfg: SpecBenchConfig, setup: RunSetup, trace: list[TraceRequest]) -> list[EngineRequest]:
    """The trace's requests as the scheduler takes them: token ids, length limit, seed `seed + request id`."""
    requests = []
    for request in trace:
        if request.prompt_index is not None:
            ids = setup.prompts[request.prompt_index].input_ids
        else:
            ids = setup.prompt_builder.encode(request.text)
            if len(ids) > setup.prompt_builder.max_tokens:
                raise ConfigError(
                    f"load.trace_path: request {request.request_id}'s text needs {len(ids)} tokens but only "
                    f"{setup.prompt_builder.max_tokens} fit the models' context after generation.max_new_tokens: "
                    "shorten it or lower generation.max_new_tokens."
                )
        limit = request.max_new_tokens or cfg.generation.max_new_tokens
        seed = cfg.seed + request.request_id
        requests.append(EngineRequest(request.request_id, request.arrival_s, list(ids), limit, seed))
    return requests


def serve_mode(cfg: SpecBenchConfig, setup: RunSetup, mode: str, requests: list[EngineRequest],
               schedule: KSchedule) -> ServeResult:  # fmt: skip
    """Serve the requests in one mode with continuous batching, on a clock that starts now."""
    verifier = setup.verifier
    watch = Stopwatch(verifier.devices)
    names = [drafter.name for drafter in setup.drafters] if mode == "spec" else []
    if mode == "baseline":
        decoder = BaselineDecoder(verifier, setup.settings, watch)
    else:
        policy = schedule if isinstance(schedule, LoadAwareK) else None
        decoder = SpeculativeDecoder(verifier, setup.drafters, setup.settings, schedule, watch, setup.pool, policy)

    def make_row(request: EngineRequest):
        first_k, limit = schedule.first, request.max_new_tokens
        return new_row(request.prompt_ids, request.seed, setup.settings, names, schedule.max_k, first_k, limit)

    bucketed = bool(verifier.graph_sizes)
    gate = make_join_gate(cfg.load.join_delay_factor, cfg.load.coalesce_joins)
    return serve(decoder, requests, make_row, cfg.load.max_batch_size, bucketed, join_gate=gate)


def warm_up_load(cfg: SpecBenchConfig, setup: RunSetup, requests: list[EngineRequest], schedule: KSchedule) -> None:
    """Capture the CUDA graphs of every slot bucket and of the joins, then serve a few short requests in both
    modes, untimed."""
    buckets = slot_buckets(cfg.load.max_batch_size)
    shortest = min(len(request.prompt_ids) for request in requests)
    for model in [setup.verifier, *drafter_models(setup.drafters)]:
        if model.capture_graphs(buckets, shortest):
            model.capture_joins(cfg.load.max_batch_size, shortest)
    short = [
        replace(
            request, request_id=number, arrival_s=0.0, max_new_tokens=min(cfg.warmup_tokens, request.max_new_tokens)
        )
        for number, request in enumerate(requests[: max(WARMUP_REQUESTS, cfg.warmup_prompts)])
    ]
    for mode in MODES:
        serve_mode(cfg, setup, mode, short, schedule)


def check_joinable_drafters(setup: RunSetup) -> None:
    """Raise ConfigError, in one sentence, when a drafter cannot take requests into a running batch."""
    static = [drafter.name for drafter in setup.drafters if not hasattr(drafter, "admit")]
    if static:
        raise ConfigError(
            f"drafter {', '.join(static)} cannot take requests into a running batch (it has no `admit`): "
            "mode=load needs model, prompt_lookup or oracle drafters, or a drafter kind that implements admit, "
            "keep_rows and remove_rows."
        )


def run_load(cfg: SpecBenchConfig, setup: RunSetup, rate: float | None, costs: StepCosts | None) -> LoadResult:
    """Build the traces at `rate` (or read the file's), warm up, serve each in both modes `repeats` times, and
    measure."""
    load = cfg.load if rate is None else replace(cfg.load, rate=rate)
    record_ids = [prompt.pubid for prompt in setup.prompts]
    traces = [build_trace(load, record_ids, cfg.seed + number) for number in range(load.traces)]
    requests = [engine_requests(cfg, setup, trace) for trace in traces]
    check_joinable_drafters(setup)  # run_load_job checks first, before the costs; this guards a direct call
    load_aware = cfg.k_schedule is KScheduleKind.load
    schedule = LoadAwareK(costs, cfg.k_max, load.max_batch_size) if load_aware else k_schedule(cfg)
    prepare_oracles(setup, [(request.prompt_ids, request.max_new_tokens) for request in itertools.chain(*requests)])
    warm_up_load(cfg, setup, requests[0], schedule)
    for oracle in (drafter for drafter in setup.drafters if isinstance(drafter, OracleDrafter)):
        oracle.off_path_steps = 0  # the warm-up's do not count
    served: dict[str, list[ServeResult]] = {mode: [] for mode in MODES}
    for _, trace, mode in serve_order(cfg.repeats, len(requests)):
        served[mode].append(serve_mode(cfg, setup, mode, requests[trace], schedule))
    result = LoadResult.of(cfg, rate, traces, served)
    result.metrics = load_run_metrics(cfg, result, costs, setup)
    if isinstance(schedule, LoadAwareK):  # what the schedule believed at the end: its prices followed the bound
        result.metrics |= {"k_schedule_alpha": schedule.alpha, "k_schedule_alpha_bound": schedule.alpha_bound}
    if cfg.k_schedule is not KScheduleKind.constant:
        result.notes.append(f"No predicted figures: k_schedule={cfg.k_schedule.value} changes k from step to step.")
    result.notes += excluded_note(cfg)
    return result


def load_run_metrics(cfg: SpecBenchConfig, result: LoadResult, costs: StepCosts | None, setup: RunSetup) -> dict:
    """The figures of every backend (`served_figures`), the verifier's padded share, the oracle's check, the
    agreement of the two modes' outputs, and the model's prediction beside the measurement."""
    pooled = result.pooled
    metrics = served_figures(cfg, result)
    if result.rate is not None:
        metrics["request_rate"] = result.rate
    for mode, key in (("spec", "padded_token_share"), ("baseline", "padded_token_share_baseline")):
        if pooled[mode].verifier_positions:  # every serve whole: the counts are the verifier's, not per request
            metrics[key] = pooled[mode].padded_positions / pooled[mode].verifier_positions
    baseline, spec = pooled["baseline"].requests, pooled["spec"].requests
    metrics["disagreement_rate"] = float(np.mean([a.tokens != b.tokens for a, b in zip(baseline, spec, strict=True)]))
    metrics |= _acceptance(pooled["spec"])
    metrics |= _oracle_metrics(setup, pooled, cfg.k)
    if costs is not None and cfg.k_schedule is KScheduleKind.constant and len(setup.drafters) == 1:
        metrics |= _predicted(cfg, result, pooled, costs)
    return metrics


def _acceptance(spec: ServeResult) -> dict[str, float]:
    """Acceptance over the speculative requests: overall and by draft position."""
    proposed = sum(result.proposed for result in spec.results)
    accepted = sum(result.accepted for result in spec.results)
    metrics = {"acceptance_rate": accepted / proposed} if proposed else {}
    by_position = np.sum([result.proposed_by_position for result in spec.results], axis=0)
    kept = np.sum([result.accepted_by_position for result in spec.results], axis=0)
    for position, (offered, hit) in enumerate(zip(by_position, kept, strict=True), start=1):
        if offered:
            metrics[f"acceptance_rate_pos_{position}"] = hit / offered
    return metrics


def _oracle_metrics(setup: RunSetup, pooled: dict[str, ServeResult], k: int) -> dict[str, float]:
    """For an oracle draft: steps proposed off the reference path, and position-1 acceptance over the steps that
    were on it (each step starts at an output position; on path while the output equals the baseline's so far)."""
    oracles = [drafter for drafter in setup.drafters if isinstance(drafter, OracleDrafter)]
    if not oracles:
        return {}
    offered = accepted = 0
    for base, spec, result in zip(pooled["baseline"].requests, pooled["spec"].requests, pooled["spec"].results,
                                  strict=True):  # fmt: skip
        pairs = zip(base.tokens, spec.tokens, strict=False)
        parted = next((index for index, (a, b) in enumerate(pairs) if a != b), None)
        position = 1  # the prefill emitted the first token
        for depth_offered, kept in zip(result.offered_per_step, result.accepted_per_step, strict=True):
            if parted is not None and position > parted:
                break
            if depth_offered:
                offered += 1
                accepted += kept >= 1
            position += kept + 1
    metrics = {"oracle_off_path_steps": sum(oracle.off_path_steps for oracle in oracles)}
    if offered:
        low, high = wilson_interval(accepted, offered)
        metrics["oracle_acceptance_pos_1"] = accepted / offered
        metrics["oracle_acceptance_pos_1_ci_low"], metrics["oracle_acceptance_pos_1_ci_high"] = low, high
        metrics["oracle_acceptance_target"] = oracles[0].acceptance
    return metrics


def _predicted(cfg: SpecBenchConfig, result: LoadResult, pooled: dict[str, ServeResult], costs: StepCosts) -> dict:
    """The load model's figures at this rate (and its crossover rate) from the measured costs and acceptance."""
    alpha = speedup_model.full_step_alpha(pooled["spec"].results, cfg.k)
    if alpha is None or result.rate is None:
        return {}
    load = cfg.load
    predictions = served_predictions(
        costs, alpha, cfg.k, result.rate, pooled, load.max_batch_size, load.rate_min, load.rate_max,
        load.crossover_metric,
    )  # fmt: skip
    return {"alpha_iid": alpha} | predictions
