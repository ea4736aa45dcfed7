"""One load run, without Hydra or MLflow: one arrival trace replayed through the engine in both modes.

    setup = prepare(cfg, records, cache)          # runner: the same models and prompts as a batch run
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
then requests within them. Figures pool every serve (each mode's serves laid end to end, as
one longer trace; with `load.exclude_first` = N, each serve from its request N's arrival on);
the ratio of the crossover metric is also given per serve (`*_repeat_min/median/max`).
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from specbench import speedup_model
from specbench.config import KScheduleKind, SpecBenchConfig
from specbench.engine import KSchedule
from specbench.engine.continuous import serve, slot_buckets
from specbench.engine.costs import StepCosts, measure_step_costs
from specbench.engine.decode import BaselineDecoder, SpeculativeDecoder, new_row
from specbench.engine.drafters import drafter_models
from specbench.engine.joins import make_join_gate
from specbench.engine.oracle import OracleDrafter
from specbench.engine.results import EngineRequest, ServeResult
from specbench.engine.timing import Stopwatch
from specbench.errors import ConfigError
from specbench.intervals import wilson_interval
from specbench.load.crossover import RATIO_KEYS
from specbench.load.k_schedule import LoadAwareK
from specbench.load.metrics import load_metrics
from specbench.load.model import served_predictions
from specbench.load.trace import MODES, TraceRequest, build_trace
from specbench.runner import RunSetup, curve_tokens, k_schedule, prepare_oracles

WARMUP_REQUESTS = 2


@dataclass
class LoadResult:
    """Everything one load run measured: its traces, each mode's served requests (one result per serve: repeat by
    repeat, each trace in turn), figures."""

    title: str
    rate: float | None  # requests/s of a generated trace; None for a trace file
    traces: list[list[TraceRequest]]  # load.traces of them (a trace file: one)
    served: dict[str, list[ServeResult]]  # mode -> one result per serve, serve = repeat * len(traces) + trace
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    exclude_first: int = 0  # load.exclude_first: requests of each serve served but left out of the figures

    @functools.cached_property
    def measured(self) -> dict[str, list[ServeResult]]:
        """Each mode's serves as the figures see them: from the arrival of each serve's request `exclude_first`."""
        return {mode: [result.after_first(self.exclude_first) for result in results]
                for mode, results in self.served.items()}  # fmt: skip

    def pooled(self) -> dict[str, ServeResult]:
        """Each mode's measured serves laid end to end (what the figures are computed on)."""
        return {mode: concatenate(results) for mode, results in self.measured.items()}

    def pooled_traces(self) -> dict[int, int] | None:
        """The trace of each request id as `pooled` numbers them (what the ratios' bootstrap draws first); None with
        one trace."""
        if len(self.traces) == 1:
            return None
        traces, offset = {}, 0
        for number, result in enumerate(self.measured[MODES[0]]):
            traces |= {request.request_id + offset: number % len(self.traces) for request in result.requests}
            offset += len(result.requests)
        return traces

    def steps_table(self) -> pd.DataFrame:
        """One row per scheduler step: mode, repeat, trace, when it ended, occupancy, rows computed, k, acceptance."""
        return pd.DataFrame(
            [
                {"mode": mode, "repeat": number // len(self.traces), "trace": number % len(self.traces), **vars(step)}
                for mode, results in self.served.items()
                for number, result in enumerate(results)
                for step in result.steps
            ],
            columns=["mode", "repeat", "trace", "time_s", "rows", "computed_rows", "k", "proposed", "accepted"],
        )


def load_title(cfg: SpecBenchConfig, rate: float | None) -> str:
    """A load run's name in figures and logs."""
    load = f"{rate:g} requests/s" if rate is not None else "trace file"
    return f"{cfg.verifier.name} + {cfg.draft.name}, k={cfg.k}, {load}, up to {cfg.load.max_batch_size} rows"


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


def warm_up_load(cfg: SpecBenchConfig, setup: RunSetup, requests: list[EngineRequest], schedule) -> None:
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


def run_load(cfg: SpecBenchConfig, setup: RunSetup, rate: float | None, costs: StepCosts | None) -> LoadResult:
    """Build the traces at `rate` (or read the file's), warm up, serve each in both modes `repeats` times, and
    measure."""
    load = cfg.load if rate is None else replace(cfg.load, rate=rate)
    record_ids = [prompt.pubid for prompt in setup.prompts]
    traces = [build_trace(load, record_ids, cfg.seed + number) for number in range(load.traces)]
    requests = [engine_requests(cfg, setup, trace) for trace in traces]
    static = [drafter.name for drafter in setup.drafters if not hasattr(drafter, "admit")]
    if static:
        raise ConfigError(
            f"drafter {', '.join(static)} cannot take requests into a running batch (it has no `admit`): "
            "mode=load needs model, prompt_lookup or oracle drafters, or a drafter kind that implements admit, "
            "keep_rows and remove_rows."
        )
    schedule = LoadAwareK(costs, cfg.k_max) if cfg.k_schedule is KScheduleKind.load else k_schedule(cfg)
    prepare_oracles(setup, [(request.prompt_ids, request.max_new_tokens) for request in itertools.chain(*requests)])
    warm_up_load(cfg, setup, requests[0], schedule)
    for oracle in (drafter for drafter in setup.drafters if isinstance(drafter, OracleDrafter)):
        oracle.off_path_steps = 0  # the warm-up's do not count
    served: dict[str, list[ServeResult]] = {mode: [] for mode in MODES}
    for repeat in range(cfg.repeats):
        for trace_requests in requests:
            for mode in MODES if repeat % 2 == 0 else reversed(MODES):
                served[mode].append(serve_mode(cfg, setup, mode, trace_requests, schedule))
    result = LoadResult(load_title(cfg, rate), rate, traces, served, {}, exclude_first=cfg.load.exclude_first)
    result.metrics = load_run_metrics(cfg, result, costs, setup)
    if isinstance(schedule, LoadAwareK):  # what the schedule believed at the end: its prices followed the bound
        result.metrics |= {"k_schedule_alpha": schedule.alpha, "k_schedule_alpha_bound": schedule.alpha_bound}
    if cfg.k_schedule is not KScheduleKind.constant:
        result.notes.append(f"No predicted figures: k_schedule={cfg.k_schedule.value} changes k from step to step.")
    result.notes += excluded_note(cfg)
    return result


def served_counts(cfg: SpecBenchConfig, traces: list[list[TraceRequest]]) -> dict[str, int]:
    """What a load run served: requests a trace, repeats, traces, and the requests of each serve left out."""
    counts = {"num_requests": len(traces[0]), "repeats": cfg.repeats, "traces": len(traces)}
    return counts | ({"excluded_requests": cfg.load.exclude_first} if cfg.load.exclude_first else {})


def excluded_note(cfg: SpecBenchConfig) -> list[str]:
    """The summary's note on the requests left out of the figures (none without load.exclude_first)."""
    count = cfg.load.exclude_first
    if not count:
        return []
    return [
        f"Figures leave out the first {count} requests of each serve (load.exclude_first): they start at the arrival "
        f"of request {count}, every mode over the same requests. requests.jsonl lists them all."
    ]


def load_run_metrics(cfg: SpecBenchConfig, result: LoadResult, costs: StepCosts | None, setup: RunSetup) -> dict:
    """The load figures on the pooled serves, the per-serve spread of the crossover ratio, the oracle's check,
    the agreement of the two modes' outputs, and the model's prediction beside the measurement."""
    pooled, measured = result.pooled(), result.measured
    metrics = load_metrics(pooled, cfg.slo, cfg.seed, result.pooled_traces())
    metrics |= served_counts(cfg, result.traces)
    if result.rate is not None:
        metrics["request_rate"] = result.rate
    ratio_key = RATIO_KEYS[cfg.load.crossover_metric]
    serves = len(measured["baseline"])
    if serves > 1:
        per_serve = [
            load_metrics({mode: measured[mode][number] for mode in MODES}, cfg.slo, cfg.seed).get(ratio_key)
            for number in range(serves)
        ]
        values = [value for value in per_serve if value is not None and math.isfinite(value)]
        if values:
            metrics |= {
                f"{ratio_key}_repeat_min": min(values),
                f"{ratio_key}_repeat_median": statistics.median(values),
                f"{ratio_key}_repeat_max": max(values),
            }
    baseline, spec = pooled["baseline"].requests, pooled["spec"].requests
    metrics["disagreement_rate"] = float(np.mean([a.tokens != b.tokens for a, b in zip(baseline, spec, strict=True)]))
    metrics |= _acceptance(pooled["spec"])
    metrics |= _oracle_metrics(setup, pooled, cfg.k)
    if costs is not None and cfg.k_schedule is KScheduleKind.constant and len(setup.drafters) == 1:
        metrics |= _predicted(cfg, result, pooled, costs)
    return metrics


def _acceptance(spec: ServeResult) -> dict[str, float]:
    """Acceptance over the speculative requests, and the iid model's alpha from their full-k steps."""
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


def concatenate(results: list[ServeResult]) -> ServeResult:
    """Results of the same trace laid end to end in time (request ids kept per repeat, offset by the trace's size)."""
    if len(results) == 1:
        return results[0]
    requests, steps, outcomes, earlier, offset, id_offset = [], [], [], [], 0.0, 0
    for result in results:
        requests += [
            replace(request.shifted(offset), request_id=request.request_id + id_offset) for request in result.requests
        ]
        earlier += [request.shifted(offset) for request in result.earlier]
        steps += [replace(step, time_s=step.time_s + offset) for step in result.steps]
        outcomes += result.results
        offset += result.wall_s
        id_offset += len(result.requests)
    return ServeResult(
        requests,
        steps,
        offset,
        sum(result.verifier_positions for result in results),
        sum(result.padded_positions for result in results),
        outcomes,
        earlier,
    )
