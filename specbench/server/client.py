"""Replay an arrival trace against an OpenAI-compatible server: streamed completions, each sent at its time.

    result = replay(base_url, trace, prompts_text, settings, out_path, tokenizer)

The loop is open, as in `vllm bench serve`: each request is sent when the trace says it
arrives, whether or not earlier ones have finished, up to `settings.max_concurrency`
requests in flight (later arrivals then wait, first come first sent, and count that wait
as queueing). Each request streams (`stream=true`) from `/v1/completions`, or
`/v1/chat/completions` with the prompt as one user message, and asks for usage in the
stream (`stream_options`; vLLM and SGLang also report the running count in every chunk,
which gives each chunk's token count).

Times are seconds from the trace's start on `time.perf_counter`'s clock:
- `admitted_s`: the request was sent;
- `chunk_times_s`: each chunk carrying output text was parsed (empty chunks, such as a chat
  stream's opening role chunk or the closing usage chunk, are not output);
- `first_token_s`: the first of those (TTFT counts from the trace's arrival time);
- `finish_s`: the last of those, as vLLM's benchmark counts it.

A request fails, and the replay goes on, when the server answers with an HTTP error (429
included), the stream breaks or ends without `[DONE]`, it ends without a `finish_reason`
(cut short: llama-cpp-python's server does that to a stream when another request arrives,
unless started with `--interrupt_requests false`), it reports an error mid-stream, it
streams no text at all, or the whole request takes longer than `settings.timeout_s`. Its
record says why (`error`); a failed request's `first_token_s` and `finish_s` are then the
time it failed (or its first chunk's), and the load metrics leave it out.

Records stream to disk as requests end (`records.RequestSpool`): memory holds the requests
in flight, not the trace's outputs. Token counts are completed after the replay, outside
the timed window (`records.complete_tokens`), so no tokenizer runs while chunks arrive.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx

from specbench.engine.results import ServeResult
from specbench.load.trace import TraceRequest
from specbench.server.records import RequestSpool, finish_spool

ERROR_BODY_CHARS = 300  # of an HTTP error's body kept in the request's error


@dataclass(frozen=True)
class RequestSettings:
    """What every request of a mode sends, and the client's limits (the same for both modes)."""

    model: str
    max_tokens: int  # a trace request's own max_new_tokens overrides it
    chat: bool = False
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: not sent (the server's default; SGLang refuses 0, llama.cpp's default is 40)
    seed: int | None = None  # sampling: request i sends seed + i
    ignore_eos: bool = False
    max_concurrency: int | None = None
    timeout_s: float = 600.0
    api_key: str | None = None

    def payload(self, prompt: str, request: TraceRequest) -> dict[str, Any]:
        """The JSON body of `request`'s completion."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_new_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.top_k > 0:
            body["top_k"] = self.top_k
        if self.seed is not None:
            body["seed"] = self.seed + request.request_id
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def endpoint(base_url: str, chat: bool) -> str:
    """The completions URL under an OpenAI base URL."""
    return f"{base_url}/chat/completions" if chat else f"{base_url}/completions"


@dataclass
class StreamState:
    """What one request has received so far."""

    admitted_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_chars: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    usage_tokens: int | None = None  # the server's latest completion_tokens
    usage_at_last_chunk: int = 0
    usage_chunk_sizes: list[int] = field(default_factory=list)  # from running usage counts, when reported
    finish_reason: str | None = None
    done: bool = False  # [DONE] arrived
    proposed: int = 0  # draft tokens the server reports for this request (llama.cpp's `timings`)
    accepted: int = 0
    error: str | None = None

    def take(self, chunk: dict[str, Any], now_s: float) -> None:
        """Account for one parsed stream event."""
        if "error" in chunk:
            detail = chunk["error"]
            message = detail.get("message", detail) if isinstance(detail, dict) else detail
            self.error = f"the server reported an error mid-stream: {message}"
            return
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        timings = chunk.get("timings")
        if timings and "draft_n" in timings:  # llama.cpp's llama-server: cumulative per request
            self.proposed = int(timings["draft_n"])
            self.accepted = int(timings.get("draft_n_accepted", 0))
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            text = _choice_text(choice)
            if text:
                self.chunk_times_s.append(now_s)
                self.chunk_chars.append(len(text))
                self.text_parts.append(text)
                if self.usage_tokens is not None and usage:
                    self.usage_chunk_sizes.append(self.usage_tokens - self.usage_at_last_chunk)
                    self.usage_at_last_chunk = self.usage_tokens

    def problem(self) -> str | None:
        """Why a stream that ended is not a complete answer, if it is not."""
        chunks = len(self.chunk_times_s)
        if self.error:
            return self.error
        if not self.done:
            return f"the stream ended without [DONE] after {chunks} text chunks"
        if self.finish_reason is None:
            return (
                f"the stream ended without a finish_reason after {chunks} text chunks: the server cut it short "
                "(llama-cpp-python's server does when another request arrives; start it with "
                "--interrupt_requests false)"
            )
        if not chunks:
            return f"no output text (finish_reason={self.finish_reason})"
        return None

    def record(self, request: TraceRequest, end_s: float) -> dict[str, Any]:
        """The request's raw record (`records.complete_tokens` finishes its token counts)."""
        first = self.chunk_times_s[0] if self.chunk_times_s else end_s
        sizes_known = len(self.usage_chunk_sizes) == len(self.chunk_times_s)
        return {
            "request_id": request.request_id,
            "arrival_s": request.arrival_s,
            "admitted_s": self.admitted_s,
            "first_token_s": first,
            "finish_s": self.chunk_times_s[-1] if self.error is None else end_s,
            "chunk_times_s": self.chunk_times_s,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "error": self.error,
            "text": "".join(self.text_parts),
            "chunk_chars": self.chunk_chars,
            "usage_chunk_sizes": self.usage_chunk_sizes if sizes_known and self.usage_chunk_sizes else None,
            "usage_tokens": self.usage_tokens,
        }


def _choice_text(choice: dict[str, Any]) -> str | None:
    """A streamed choice's output text: `text` (completions) or the delta's content or reasoning (chat)."""
    if "text" in choice:
        return choice["text"]
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content")


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], state: StreamState, start: float) -> None:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace").strip()[:ERROR_BODY_CHARS]
            limited = " (rate limited)" if response.status_code == 429 else ""
            state.error = f"HTTP {response.status_code}{limited}: {text}"
            return
        async for event in httpx.EventSource(response):
            now = time.perf_counter() - start
            if event.data == "[DONE]":
                state.done = True
                return
            state.take(json.loads(event.data), now)
            if state.error:
                return


async def _send(
    client: httpx.AsyncClient,
    url: str,
    settings: RequestSettings,
    request: TraceRequest,
    prompt: str,
    start: float,
) -> dict[str, Any]:
    """Send one request and stream its answer; its raw record, whatever happened."""
    state = StreamState(admitted_s=time.perf_counter() - start)
    try:
        body = settings.payload(prompt, request)
        await asyncio.wait_for(_stream(client, url, body, state, start), settings.timeout_s)
        state.error = state.problem()
    except (TimeoutError, httpx.TimeoutException):
        state.error = (
            f"no complete answer within server.timeout_s={settings.timeout_s:g} s "
            f"({len(state.chunk_times_s)} text chunks received)"
        )
    except httpx.HTTPError as error:
        chunks = len(state.chunk_times_s)
        state.error = f"the stream failed after {chunks} text chunks ({type(error).__name__}: {error})"
    except (ValueError, TypeError, AttributeError) as error:  # JSON that is not a completion chunk
        state.error = f"a malformed stream event ({type(error).__name__}: {error})"
    return state.record(request, time.perf_counter() - start)


async def _replay(
    base_url: str,
    requests: Sequence[TraceRequest],
    prompts_text: Sequence[str],
    settings: RequestSettings,
    spool: RequestSpool,
    start_at: float | None,
) -> float:
    """Send every request at its arrival time; the seconds from the trace's start until the last one ended."""
    url = endpoint(base_url, settings.chat)
    limit = settings.max_concurrency
    slots = asyncio.Semaphore(limit) if limit else None
    in_flight: set[asyncio.Task] = set()
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(None),  # the whole request is bounded by settings.timeout_s instead
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        headers=settings.headers,
    )

    async def send(position: int, request: TraceRequest) -> None:
        prompt = request.text if request.text is not None else prompts_text[request.prompt_index]
        try:
            spool.write(position, await _send(client, url, settings, request, prompt, start))
        finally:
            if slots:
                slots.release()

    async with client:
        await client.get(f"{base_url}/models")  # connect before the trace starts: its setup is not timed
        start = time.perf_counter() if start_at is None else start_at
        for position, request in enumerate(requests):
            delay = start + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots:
                await slots.acquire()  # a later arrival waits here, in arrival order
            task = asyncio.create_task(send(position, request))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        return time.perf_counter() - start


def replay(
    base_url: str,
    requests: Sequence[TraceRequest],
    prompts_text: Sequence[str],
    settings: RequestSettings,
    out_path: Path,
    tokenizer: Any = None,
    start_at: float | None = None,
) -> ServeResult:
    """Send `requests` to the server at `base_url` (its OpenAI base URL, `.../v1`) at their arrival times.

    A request's prompt is `prompts_text[request.prompt_index]`, or its own text. The records are written to
    `out_path` (JSON lines in trace order, each with its output text) and read back from there by the returned
    result's `requests`. `tokenizer` (a transformers tokenizer, optional) counts tokens the server does not.
    `start_at` is the trace's start on `time.perf_counter`'s clock (default: now).
    """
    spool = RequestSpool(out_path.with_name(out_path.name + ".spool"), len(requests))
    try:
        wall_s = asyncio.run(_replay(base_url.rstrip("/"), requests, prompts_text, settings, spool, start_at))
    except BaseException:
        spool.close()
        spool.path.unlink()
        raise
    return ServeResult(requests=finish_spool(spool, out_path, tokenizer), steps=[], wall_s=wall_s)
