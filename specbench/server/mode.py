"""One mode of a load run served by an OpenAI-compatible server (engine.backend=server).

    trace = server_trace(cfg, record_ids)
    outcome = serve_on_server(cfg, trace, prompts_text, "baseline", out_dir, tokenizer)
    outcome.result     # ServeResult: the mode's requests (failures carry `error`), for the load metrics
    outcome.readings   # its /metrics before and after the trace
    outcome.artifacts  # responses_{mode}.jsonl (records with output texts), server_{mode}.log (a started server)
    metrics, notes = server_figures({"baseline": [outcome], "spec": [...]})  # acceptance, what is missing

For each mode: start its server if it has a command (`managed`), or take its URL; check
that it answers (`GET /v1/models`, which also names the model when `server.model` is
unset) before any request, else one sentence (`ServerError`); send the warm-up requests
(`warmup_prompts` of `warmup_tokens`, not timed; a failed one stops the run, since every
request would fail alike); read `/metrics`; replay the trace (`client.replay`); read
`/metrics` again; stop the server. The caller runs the modes in turn (alternating their
order over repeats), so the two servers never share the machine.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from specbench.config import BenchmarkMode, SpecBenchConfig
from specbench.engine.results import ServeResult
from specbench.errors import ServerError
from specbench.load.trace import TraceRequest, build_trace, cycled_trace
from specbench.server import prometheus
from specbench.server.client import RequestSettings, replay
from specbench.server.http import get
from specbench.server.managed import base_url, root_url, started_server
from specbench.server.records import SpooledRequests

log = logging.getLogger(__name__)
CHECK_TIMEOUT_S = 10.0


@dataclass
class ModeOutcome:
    """What serving one mode's trace produced."""

    result: ServeResult
    readings: tuple[prometheus.Scrape, prometheus.Scrape]  # the server's /metrics before and after the trace
    artifacts: list[Path] = field(default_factory=list)


def server_trace(cfg: SpecBenchConfig, record_ids: Sequence[str], seed: int | None = None) -> list[TraceRequest]:
    """The run's trace: the load settings' (`build_trace`, arrivals drawn from `seed`, by default the run's), or with
    server.fixed_batch=true every request at time 0 (load.num_requests of them under mode=load, prompts cycling;
    each prompt once under mode=batch)."""
    if not cfg.server.fixed_batch:
        return build_trace(cfg.load, record_ids, cfg.seed if seed is None else seed)
    count = len(record_ids) if cfg.mode is BenchmarkMode.batch else cfg.load.num_requests
    log.warning("server.fixed_batch=true: all %d requests are sent at time 0 (a fixed batch, not arrivals)", count)
    return cycled_trace([0.0] * count, record_ids)


def request_settings(cfg: SpecBenchConfig, model: str) -> RequestSettings:
    """What every request sends: the model, `generation`'s limits and sampling, and the client's limits."""
    gen, server = cfg.generation, cfg.server
    return RequestSettings(
        model=model,
        max_tokens=gen.max_new_tokens,
        chat=server.chat,
        temperature=gen.temperature if gen.do_sample else 0.0,
        top_p=gen.top_p if gen.do_sample else 1.0,
        top_k=gen.top_k if gen.do_sample else 0,
        seed=cfg.seed if gen.do_sample else None,
        ignore_eos=not gen.stop_at_eos,
        max_concurrency=server.max_concurrency,
        timeout_s=server.timeout_s,
        api_key=os.environ.get(server.api_key_env) or None,
    )


def served_model(base: str, mode: str, model: str | None, api_key: str | None) -> str:
    """The model to ask for; raises ServerError in one sentence if the server does not answer `GET /v1/models`."""
    try:
        status, text = get(f"{base}/models", api_key, CHECK_TIMEOUT_S)
    except OSError as error:
        raise ServerError(
            f"the {mode} server at {base} does not answer ({_reason(error)}): start it, or point "
            f"server.{mode}_url at it."
        ) from error
    if status != 200:
        raise ServerError(
            f"the {mode} server answered GET {base}/models with HTTP {status}: point "
            f"server.{mode}_url at an OpenAI-compatible server's base URL (http://HOST:PORT/v1)."
        )
    if model:
        return model
    try:
        return str(json.loads(text)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ServerError(
            f"the {mode} server lists no model at {base}/models: set server.model to the name it serves."
        ) from error


def _reason(error: OSError) -> str:
    """What an OSError from urllib says, without its wrapper (`URLError`)."""
    reason = getattr(error, "reason", error)
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)


def serve_on_server(
    cfg: SpecBenchConfig,
    trace: Sequence[TraceRequest],
    prompts_text: Sequence[str],
    mode: str,
    out_dir: Path,
    tokenizer: Any = None,
) -> ModeOutcome:
    """Serve `trace` in `mode` (baseline or spec) on that mode's server; see the module docstring.

    Raises ServerError (one sentence, a started server's log tail after it) when the server does not answer,
    exits, never becomes ready, or fails its warm-up; failed trace requests are records, not errors. The result's
    requests are read from `out_dir/responses_{mode}.jsonl`, so each call needs a folder of its own.
    """
    server = cfg.server
    responses = out_dir / f"responses_{mode}.jsonl"
    if responses.exists():  # an earlier result reads its requests from there
        raise FileExistsError(f"{responses} exists: give each serve_on_server call a folder of its own")
    out_dir.mkdir(parents=True, exist_ok=True)
    api_key = os.environ.get(server.api_key_env) or None
    log_path = out_dir / f"server_{mode}.log"
    with _mode_server(cfg, mode, log_path) as (base, check_alive):
        settings = request_settings(cfg, served_model(base, mode, server.model, api_key))
        _warm_up(base, mode, trace, prompts_text, settings, cfg, out_dir)
        before = prometheus.scrape(root_url(base), api_key)
        result = replay(base, trace, prompts_text, settings, responses, tokenizer)
        after = prometheus.scrape(root_url(base), api_key)
        check_alive()  # a started server that died mid-trace ends the run, not just its requests
    artifacts = [responses, *([log_path] if log_path.is_file() else [])]
    return ModeOutcome(result, (before, after), artifacts)


@contextmanager
def _mode_server(cfg: SpecBenchConfig, mode: str, log_path: Path) -> Iterator[tuple[str, Any]]:
    """The mode's OpenAI base URL and a check that raises if its server has died; a command is started first."""
    url, command = getattr(cfg.server, f"{mode}_url"), getattr(cfg.server, f"{mode}_cmd")
    if not command:
        yield base_url(url), lambda: None
        return
    with started_server(command, mode, url, log_path, cfg.server.start_timeout_s) as started:
        yield started.base_url, started.check_alive


def _warm_up(
    base: str,
    mode: str,
    trace: Sequence[TraceRequest],
    prompts_text: Sequence[str],
    settings: RequestSettings,
    cfg: SpecBenchConfig,
    out_dir: Path,
) -> None:
    """Send `warmup_prompts` requests of `warmup_tokens` one after the other; raise if one fails."""
    if cfg.warmup_prompts < 1:
        return
    requests = [
        TraceRequest(index, 0.0, request.prompt_index, request.record_id, request.text, cfg.warmup_tokens)
        for index, request in enumerate(trace[: cfg.warmup_prompts])
    ]
    one_at_a_time = replace(settings, max_concurrency=1)
    path = out_dir / f"warmup_{mode}.jsonl"
    warm = replay(base, requests, prompts_text, one_at_a_time, path)
    errors = [request.error for request in warm.requests if request.error]
    path.unlink()
    if errors:
        raise ServerError(
            f"the {mode} server at {base} failed the warm-up request ({errors[0]}): check server.model and the "
            "server's options."
        )


def server_figures(served: Mapping[str, Sequence[ModeOutcome]]) -> tuple[dict[str, float], list[str]]:
    """The servers' own figures over a run's repeats, and one line for each thing missing or wrong.

    The spec server's acceptance comes from its counters (`prometheus.acceptance_metrics`), else from the draft
    counts its responses carried (llama.cpp's llama-server), else a note says it is not logged; a baseline server
    whose counters show drafts gets a note (it speculates).
    """
    metrics: dict[str, float] = {}
    notes = []
    baseline_drafted = prometheus.drafted_tokens([outcome.readings for outcome in served.get("baseline", ())])
    if baseline_drafted > 0:
        notes.append(f"the baseline server drafted {baseline_drafted:g} tokens: it speculates, check its command")
    spec = served.get("spec", ())
    if spec:
        metrics |= prometheus.acceptance_metrics([outcome.readings for outcome in spec])
    if spec and not metrics:
        served_ok = [request for outcome in spec for request in outcome.result.requests if request.error is None]
        proposed = sum(request.proposed for request in served_ok)
        accepted = sum(request.accepted for request in served_ok)
        if proposed > 0:  # llama.cpp's llama-server reports each response's drafts
            metrics = {"server_draft_tokens": proposed, "server_accepted_tokens": accepted,
                       "acceptance_rate": accepted / proposed}  # fmt: skip
        else:
            reason = next(reading.missing for outcome in spec for reading in outcome.readings if reading.missing)
            notes.append(f"the spec server's acceptance is not logged: {reason}, and its responses count no drafts")
    return metrics, notes


def text_disagreement(results: Mapping[str, ServeResult]) -> dict[str, float]:
    """`disagreement_rate` and `exact_match_rate` over the requests both modes served: the share whose output texts
    differ (or are equal). Servers are not batch-invariant: at temperature 0 the same request can get another text
    beside other requests, in either mode, so a nonzero rate does not by itself show speculation is lossy."""
    baseline, spec = results["baseline"].requests, results["spec"].requests
    if not (isinstance(baseline, SpooledRequests) and isinstance(spec, SpooledRequests)):
        return {}
    pairs = [(a, b) for a, b in zip(baseline.texts(), spec.texts(), strict=True) if a is not None and b is not None]
    if not pairs:
        return {}
    same = sum(a == b for a, b in pairs) / len(pairs)
    return {"disagreement_rate": 1.0 - same, "exact_match_rate": same}
