"""The arrival trace of a load run, replayed for both modes, and the `requests.jsonl` artifact.

A trace is a list of `TraceRequest`s in arrival order. It is generated from a seed
(`poisson`, `gamma`, `constant` arrivals at `load.rate` requests/s, prompts from the
dataset in order, cycling when there are more requests than prompts) or read from
`load.trace_path`: JSONL, one request a line,

    {"arrival_s": 0.0, "record_id": "pubmed-1"}
    {"arrival_s": 1.7, "text": "Write a haiku about queues.", "max_new_tokens": 32}

with `arrival_s` in seconds from the trace's start (0 or more, in order), a dataset
record id or the prompt's text, and optionally `max_new_tokens`. Other keys are
ignored, so a run's `requests.jsonl` replays as a trace file.

Arrivals follow `vllm bench serve`: the gap before each request (the first one
included) is drawn from a gamma distribution of shape `burstiness` and scale
1 / (rate x burstiness), whose mean is 1 / rate and whose variance is
1 / (burstiness x rate^2); burstiness 1 is the exponential gap of a Poisson
process. Unlike vLLM, the gaps are not rescaled so that the last request arrives
at exactly num_requests / rate: the trace is the process itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from specbench.config import ArrivalKind, LoadConfig
from specbench.engine.results import ServedRequest, ServeResult
from specbench.errors import ConfigError

TRACE_KEY = "load.trace_path"
MODES = ("baseline", "spec")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives, which prompt it sends, and how many tokens it may get."""

    request_id: int
    arrival_s: float  # seconds after the trace starts
    prompt_index: int | None = None  # into the run's prompt list (None: the prompt is `text`)
    record_id: str | None = None  # the dataset record of that prompt
    text: str | None = None  # a prompt a trace file gives as text
    max_new_tokens: int | None = None  # None: generation.max_new_tokens


def arrival_times(kind: ArrivalKind, rate: float, num_requests: int, seed: int, burstiness: float = 1.0) -> np.ndarray:
    """Seconds from the trace's start at which each of `num_requests` requests arrives (seeded, ascending).

    Each request arrives one gap after the previous one (the first one gap after the start):
    exponential gaps of mean 1/rate (poisson), gamma gaps of shape `burstiness` and the same mean
    (gamma), or exactly 1/rate (constant).
    """
    rng = np.random.default_rng(seed)
    if kind is ArrivalKind.constant:
        gaps = np.full(num_requests, 1.0 / rate)
    elif kind is ArrivalKind.poisson:
        gaps = rng.exponential(1.0 / rate, num_requests)
    elif kind is ArrivalKind.gamma:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests)
    else:
        raise ValueError(f"arrival {kind.value} is read from a file, not generated")
    return np.cumsum(gaps)


def generated_trace(
    kind: ArrivalKind, rate: float, num_requests: int, seed: int, record_ids: Sequence[str], burstiness: float = 1.0
) -> list[TraceRequest]:
    """A seeded trace over the run's prompts (`record_ids`, in order), cycling through them as needed."""
    return cycled_trace(arrival_times(kind, rate, num_requests, seed, burstiness), record_ids)


def cycled_trace(times: Sequence[float], record_ids: Sequence[str]) -> list[TraceRequest]:
    """Requests arriving at `times`, over the run's prompts (`record_ids`, in order), cycling through them."""
    return [
        TraceRequest(index, float(time), index % len(record_ids), str(record_ids[index % len(record_ids)]))
        for index, time in enumerate(times)
    ]


def serve_order(repeats: int, traces: int) -> Iterator[tuple[int, int, str]]:
    """(repeat, trace, mode) in the order a load run serves them: each repeat serves every trace in both modes, the
    modes' order alternating from one repeat to the next, so that a mode's serves come repeat by repeat, each trace
    in turn (serve number repeat * traces + trace)."""
    for repeat in range(repeats):
        for trace in range(traces):
            for mode in MODES if repeat % 2 == 0 else reversed(MODES):
                yield repeat, trace, mode


def build_trace(load: LoadConfig, record_ids: Sequence[str], seed: int) -> list[TraceRequest]:
    """The run's trace: read from `load.trace_path` and resolved against the run's prompts, or generated."""
    if load.arrival is ArrivalKind.trace:
        return resolve_prompts(read_trace(load.trace_path), record_ids, load.trace_path)
    return generated_trace(load.arrival, load.rate, load.num_requests, seed, record_ids, load.burstiness)


def read_trace(path: str | Path) -> list[TraceRequest]:
    """The requests of a trace file, checked (exists, one JSON object a line, a prompt each, arrivals in order
    and not negative); prompts by record id are resolved later, against the run's prompts (`resolve_prompts`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{TRACE_KEY}={path} does not exist: point it at a JSONL file with one request a line, "
            'e.g. {"arrival_s": 0.5, "record_id": "..."}.'
        )
    requests: list[TraceRequest] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            request = _parse_line(path, number, line, len(requests))
            if requests and request.arrival_s < requests[-1].arrival_s:
                raise ConfigError(
                    f"{TRACE_KEY}={path} line {number} arrives at {request.arrival_s} s, before the line above "
                    f"({requests[-1].arrival_s} s): sort the requests by arrival_s."
                )
            requests.append(request)
    if not requests:
        raise ConfigError(f"{TRACE_KEY}={path} holds no request: add one JSON object a line.")
    return requests


def _parse_line(path: Path, number: int, line: str, request_id: int) -> TraceRequest:
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{TRACE_KEY}={path} line {number} {problem}.")

    try:
        item: Any = json.loads(line)
    except json.JSONDecodeError as error:
        raise fail(f"is not JSON ({error.msg}): write one JSON object a line") from error
    if not isinstance(item, dict):
        raise fail('is not a JSON object: write e.g. {"arrival_s": 0.5, "record_id": "..."}')
    arrival = item.get("arrival_s")
    if isinstance(arrival, bool) or not isinstance(arrival, int | float) or not np.isfinite(arrival):
        raise fail(f"has arrival_s={arrival!r}: give the seconds from the trace's start as a number")
    if arrival < 0:
        raise fail(f"has arrival_s={arrival}: arrival times count seconds from the trace's start, so 0 or more")
    record_id, text = item.get("record_id"), item.get("text")
    if (record_id is None) == (text is None) or (text is not None and not isinstance(text, str)):
        raise fail("needs a prompt: either record_id (a dataset record id) or text (the prompt), not both")
    limit = item.get("max_new_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise fail(f"has max_new_tokens={limit!r}: give a whole number of 1 or more, or leave it out")
    return TraceRequest(
        request_id,
        float(arrival),
        record_id=None if record_id is None else str(record_id),
        text=text,
        max_new_tokens=limit,
    )


def resolve_prompts(trace: Sequence[TraceRequest], record_ids: Sequence[str], path: str = "") -> list[TraceRequest]:
    """The trace with each record id pointed at the run's prompt of that id (`prompt_index`).

    Raises ConfigError, naming load.trace_path and the line's request, for an id the run has no prompt for.
    """
    index_of = {str(record_id): index for index, record_id in enumerate(record_ids)}
    resolved = []
    for request in trace:
        if request.record_id is None:
            resolved.append(request)
            continue
        if request.record_id not in index_of:
            raise ConfigError(
                f"{TRACE_KEY}={path} request {request.request_id} (counting its requests from 0) names record_id "
                f"{request.record_id!r}, which is "
                f"not among the run's {len(record_ids)} prompts: use one of the dataset's record ids (widen "
                "dataset.num_samples or dataset.start), or give the prompt as text."
            )
        resolved.append(replace(request, prompt_index=index_of[request.record_id]))
    return resolved


def request_lines(trace: Sequence[TraceRequest], results: Mapping[str, ServeResult]) -> Iterator[dict[str, Any]]:
    """One `requests.jsonl` record per request, built as it is written: the trace's fields, and per mode (baseline,
    spec) when it was admitted, its first token and finish times, its output token ids and any error."""
    served = {mode: iter(result.requests) for mode, result in results.items()}
    for request in trace:
        line: dict[str, Any] = {
            "request_id": request.request_id,
            "arrival_s": request.arrival_s,
            "record_id": request.record_id,
            "prompt_index": request.prompt_index,
        }
        if request.text is not None:
            line["text"] = request.text
        if request.max_new_tokens is not None:
            line["max_new_tokens"] = request.max_new_tokens
        for mode, records in served.items():
            record = next(records, None)
            if record is None or record.request_id != request.request_id:
                raise ValueError(f"the {mode} results do not list request {request.request_id} in trace order")
            line[mode] = _mode_fields(record)
        yield line


def _mode_fields(record: ServedRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "admitted_s": record.admitted_s,
        "first_token_s": record.first_token_s,
        "finish_s": record.finish_s,
        "num_tokens": record.num_tokens,
        "tokens": record.tokens,
    }
    if record.error is not None:
        fields["error"] = record.error
    return fields


def write_requests(path: Path, trace: Sequence[TraceRequest], results: Mapping[str, ServeResult]) -> int:
    """Write `requests.jsonl` at `path`, each line as soon as it is built (the records are not copied whole); the
    number of lines written."""
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for line in request_lines(trace, results):
            out.write(json.dumps(line) + "\n")
            count += 1
    return count
