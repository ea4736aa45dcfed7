"""What a load run served, and the figures every backend logs from it: the result of our engine's load run
(`load.pipeline.run_load`) and of a run against servers (`server.run.run_server_load`) alike.

    result = LoadResult.of(cfg, rate, traces, served)     # served[mode]: one ServeResult per serve
    result.metrics = served_figures(cfg, result) | what only that backend measures

Each mode's serves are laid end to end in time (`concatenate`), as one longer trace: the figures are computed
on that. With `load.exclude_first` = N each serve is first cut to the window from its request N's arrival
(`ServeResult.after_first`), and the request ids of the pooled serves are renumbered so that each serve's
requests follow the previous serve's (`request_offsets`), which the bootstrap over traces, then requests,
follows (`LoadResult.pooled_traces`).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field, replace

import pandas as pd

from specbench.config import Backend, SpecBenchConfig
from specbench.engine.results import ServeResult
from specbench.load.crossover import RATIO_KEYS
from specbench.load.metrics import load_metrics
from specbench.load.trace import MODES, TraceRequest


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

    @classmethod
    def of(cls, cfg: SpecBenchConfig, rate: float | None, traces: list[list[TraceRequest]],
           served: dict[str, list[ServeResult]]) -> LoadResult:  # fmt: skip
        """A run's result before its figures: named by `load_title`, its serves cut by load.exclude_first."""
        return cls(load_title(cfg, traffic(cfg, rate)), rate, traces, served, {}, exclude_first=cfg.load.exclude_first)

    @functools.cached_property
    def measured(self) -> dict[str, list[ServeResult]]:
        """Each mode's serves as the figures see them: from the arrival of each serve's request `exclude_first`."""
        return {mode: [result.after_first(self.exclude_first) for result in results]
                for mode, results in self.served.items()}  # fmt: skip

    @functools.cached_property
    def pooled(self) -> dict[str, ServeResult]:
        """Each mode's measured serves laid end to end (what the figures are computed on)."""
        return {mode: concatenate(results) for mode, results in self.measured.items()}

    def pooled_traces(self) -> dict[int, int] | None:
        """The trace of each request id as `pooled` numbers them (what the ratios' bootstrap draws first); None with
        one trace."""
        return None if len(self.traces) == 1 else request_traces(self.measured[MODES[0]], len(self.traces))

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


def request_offsets(results: list[ServeResult]) -> list[int]:
    """What `concatenate` adds to each serve's request ids: the requests of the serves before it."""
    offsets = [0]
    for result in results[:-1]:
        offsets.append(offsets[-1] + len(result.requests))
    return offsets


def request_traces(results: list[ServeResult], traces: int) -> dict[int, int]:
    """The trace of each request id as `concatenate` numbers the serves' requests, the serves made repeat by repeat,
    each repeat serving every one of `traces` traces in turn (serve = repeat * traces + trace)."""
    return {
        request.request_id + offset: number % traces
        for number, (result, offset) in enumerate(zip(results, request_offsets(results), strict=True))
        for request in result.requests
    }


def concatenate(results: list[ServeResult]) -> ServeResult:
    """Serves laid end to end in time, each serve's request ids offset by `request_offsets`."""
    if len(results) == 1:
        return results[0]
    requests, steps, outcomes, earlier, start = [], [], [], [], 0.0
    for result, id_offset in zip(results, request_offsets(results), strict=True):
        requests += [
            replace(request.shifted(start), request_id=request.request_id + id_offset) for request in result.requests
        ]
        earlier += [request.shifted(start) for request in result.earlier]
        steps += [replace(step, time_s=step.time_s + start) for step in result.steps]
        outcomes += result.results
        start += result.wall_s
    return ServeResult(
        requests,
        steps,
        start,
        sum(result.verifier_positions for result in results),
        sum(result.padded_positions for result in results),
        outcomes,
        earlier,
    )


def served_figures(cfg: SpecBenchConfig, result: LoadResult) -> dict[str, float]:
    """The figures of a load run on any backend: the load metrics of the pooled serves (`load.metrics`), what was
    served, and with several serves the per-serve spread of the crossover metric's ratio
    (`{ratio}_repeat_min/median/max`: each serve, every repeat of every trace, computed alone)."""
    metrics = load_metrics(result.pooled, cfg.slo, cfg.seed, result.pooled_traces())
    metrics |= served_counts(cfg, result.traces)
    measured, ratio_key = result.measured, RATIO_KEYS[cfg.load.crossover_metric]
    serves = len(measured["baseline"])
    if serves == 1:
        return metrics
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
    return metrics


def load_title(cfg: SpecBenchConfig, traffic: str) -> str:
    """A load run's name in figures and logs, for our engine or for servers; `traffic` is what it served (`traffic`)."""
    if cfg.engine.backend is Backend.server:
        return f"{cfg.server.model or 'the served model'} on its servers (engine.backend=server), {traffic}"
    return f"{cfg.verifier.name} + {cfg.draft.name}, k={cfg.k}, {traffic}, up to {cfg.load.max_batch_size} rows"


def traffic(cfg: SpecBenchConfig, rate: float | None) -> str:
    """What one load run serves, in words: a rate, a trace file, or (servers) a fixed batch."""
    if cfg.engine.backend is Backend.server and cfg.server.fixed_batch:
        return "a fixed batch"
    return f"{rate:g} requests/s" if rate is not None else "trace file"


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
