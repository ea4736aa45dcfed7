"""The arrival trace: seeded arrivals with the right law, trace files checked line by line, requests.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from specbench.config import ArrivalKind, LoadConfig
from specbench.engine.results import ServedRequest, ServeResult
from specbench.errors import ConfigError
from specbench.load.trace import (
    TraceRequest,
    arrival_times,
    build_trace,
    generated_trace,
    read_trace,
    request_lines,
    resolve_prompts,
    write_requests,
)


def test_constant_arrivals_are_evenly_spaced_from_one_gap_after_the_start():
    assert arrival_times(ArrivalKind.constant, 4.0, 5, seed=0).tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25])


@pytest.mark.parametrize("kind", [ArrivalKind.poisson, ArrivalKind.gamma])
def test_arrivals_are_seeded_and_ascending(kind):
    first = arrival_times(kind, 2.0, 50, seed=7, burstiness=0.5)
    assert np.array_equal(first, arrival_times(kind, 2.0, 50, seed=7, burstiness=0.5))  # one trace for both modes
    assert not np.array_equal(first, arrival_times(kind, 2.0, 50, seed=8, burstiness=0.5))
    assert (np.diff(first) >= 0).all() and first[0] > 0


def test_poisson_gaps_have_mean_one_over_rate_and_the_exponential_variance():
    gaps = np.diff(arrival_times(ArrivalKind.poisson, 2.0, 40_001, seed=1), prepend=0.0)
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)
    assert gaps.var() == pytest.approx(0.25, rel=0.06)  # exponential: variance = mean^2


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_mean_one_over_rate_and_variance_one_over_burstiness_rate_squared(burstiness):
    rate = 2.0
    gaps = np.diff(arrival_times(ArrivalKind.gamma, rate, 50_000, seed=3, burstiness=burstiness), prepend=0.0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # vLLM's gamma: shape = burstiness, scale = 1 / (rate * burstiness)
    assert gaps.var() == pytest.approx(1 / (burstiness * rate**2), rel=0.1)


def test_generated_prompts_follow_the_dataset_order_and_cycle():
    trace = generated_trace(ArrivalKind.constant, 1.0, 7, seed=0, record_ids=["a", "b", "c"])
    assert [request.prompt_index for request in trace] == [0, 1, 2, 0, 1, 2, 0]
    assert [request.record_id for request in trace] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [request.request_id for request in trace] == list(range(7))
    assert all(request.max_new_tokens is None and request.text is None for request in trace)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_trace_file_gives_record_ids_or_texts_and_limits(tmp_path):
    path = write_lines(
        tmp_path / "trace.jsonl",
        '{"arrival_s": 0, "record_id": 12}',
        "",
        '{"arrival_s": 0.5, "text": "Hello there", "max_new_tokens": 8, "note": "ignored"}',
        '{"arrival_s": 0.5, "record_id": "b"}',
    )
    trace = read_trace(path)
    assert trace == [
        TraceRequest(0, 0.0, record_id="12"),
        TraceRequest(1, 0.5, text="Hello there", max_new_tokens=8),
        TraceRequest(2, 0.5, record_id="b"),
    ]
    resolved = resolve_prompts(trace, ["b", "12"])
    assert [request.prompt_index for request in resolved] == [1, None, 0]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"arrival_s": 0, "record_id": "a"}', "{arrival_s: 1}"], r"line 2 is not JSON"),
        (['[0.5, "a"]'], r"line 1 is not a JSON object"),
        (['{"record_id": "a"}'], r"line 1 has arrival_s=None"),
        (['{"arrival_s": "soon", "record_id": "a"}'], r"line 1 has arrival_s='soon'"),
        (['{"arrival_s": -0.5, "record_id": "a"}'], r"line 1 has arrival_s=-0.5: .* 0 or more"),
        (
            [
                '{"arrival_s": 0, "record_id": "a"}',
                '{"arrival_s": 2, "record_id": "a"}',
                "",
                '{"arrival_s": 1, "text": "x"}',
            ],
            r"line 4 arrives at 1.0 s, before the line above \(2.0 s\): sort the requests by arrival_s",
        ),
        (['{"arrival_s": 0}'], r"line 1 needs a prompt"),
        (['{"arrival_s": 0, "record_id": "a", "text": "x"}'], r"line 1 needs a prompt: either"),
        (['{"arrival_s": 0, "text": "x", "max_new_tokens": 0}'], r"line 1 has max_new_tokens=0"),
        ([""], r"holds no request"),
    ],
)
def test_bad_trace_files_are_named_with_the_line_and_the_fix(tmp_path, lines, message):
    path = write_lines(tmp_path / "trace.jsonl", *lines)
    with pytest.raises(ConfigError, match=rf"^load\.trace_path={path} .*{message}"):
        read_trace(path)


def test_a_missing_trace_file_and_an_unknown_record_id(tmp_path):
    with pytest.raises(ConfigError, match=r"^load\.trace_path=.*absent\.jsonl does not exist: point it at a JSONL"):
        read_trace(tmp_path / "absent.jsonl")
    trace = read_trace(write_lines(tmp_path / "trace.jsonl", '{"arrival_s": 0, "record_id": "zz"}'))
    with pytest.raises(
        ConfigError,
        match=r"^load\.trace_path=t\.jsonl request 0 \(counting its requests from 0\) names record_id 'zz', which",
    ):
        resolve_prompts(trace, ["a", "b"], "t.jsonl")


def test_build_trace_reads_the_file_or_generates_from_the_seed(tmp_path):
    path = write_lines(tmp_path / "trace.jsonl", '{"arrival_s": 0.25, "record_id": "b"}')
    from_file = build_trace(LoadConfig(arrival=ArrivalKind.trace, trace_path=str(path)), ["a", "b"], seed=0)
    assert from_file == [TraceRequest(0, 0.25, prompt_index=1, record_id="b")]
    generated = build_trace(LoadConfig(arrival=ArrivalKind.gamma, rate=3.0, num_requests=4, burstiness=0.5), ["a"], 5)
    assert [request.arrival_s for request in generated] == arrival_times(ArrivalKind.gamma, 3.0, 4, 5, 0.5).tolist()


def served(request_id: int, arrival_s: float, tokens: list[int], error: str | None = None) -> ServedRequest:
    return ServedRequest(
        request_id, arrival_s, arrival_s + 0.1, arrival_s + 0.2, arrival_s + 1.0, len(tokens), tokens, error=error
    )


def test_requests_jsonl_has_each_mode_and_replays_as_a_trace(tmp_path):
    trace = [TraceRequest(0, 0.5, 0, "a"), TraceRequest(1, 1.5, text="free text", max_new_tokens=3)]
    results = {
        "baseline": ServeResult([served(0, 0.5, [5, 6]), served(1, 1.5, [7])], [], 2.5),
        "spec": ServeResult([served(0, 0.5, [5, 6]), served(1, 1.5, [], error="timeout")], [], 2.5),
    }
    path = tmp_path / "requests.jsonl"
    assert write_requests(path, trace, results) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "request_id": 0,
        "arrival_s": 0.5,
        "record_id": "a",
        "prompt_index": 0,
        "baseline": {"admitted_s": 0.6, "first_token_s": 0.7, "finish_s": 1.5, "num_tokens": 2, "tokens": [5, 6]},
        "spec": {"admitted_s": 0.6, "first_token_s": 0.7, "finish_s": 1.5, "num_tokens": 2, "tokens": [5, 6]},
    }
    assert lines[1]["text"] == "free text" and lines[1]["max_new_tokens"] == 3
    assert lines[1]["spec"]["error"] == "timeout" and "error" not in lines[1]["baseline"]
    assert read_trace(path) == [
        TraceRequest(0, 0.5, record_id="a"),
        TraceRequest(1, 1.5, text="free text", max_new_tokens=3),
    ]


def test_request_lines_are_built_one_at_a_time_and_must_follow_the_trace():
    trace = [TraceRequest(0, 0.0, 0, "a"), TraceRequest(1, 1.0, 0, "a")]
    results = {"baseline": ServeResult([served(0, 0.0, [1]), served(5, 1.0, [1])], [], 2.0)}
    lines = request_lines(trace, results)
    assert next(lines)["request_id"] == 0  # the first line exists before the second request is looked at
    with pytest.raises(ValueError, match="do not list request 1 in trace order"):
        next(lines)
