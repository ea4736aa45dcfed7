"""Replay an arrival trace against an OpenAI-compatible server: streamed completions, each sent at its time.

    result = replay(base_url, trace, prompts_text, settings, out_path, tokenizer)

The loop is open, as in `vllm bench serve`: each request is sent when the trace says it
arrives, whether or not earlier ones have finished, up to `settings.max_concurrency`
requests in flight (later arrivals then wait, first come first sent, and count that wait
as queueing). Each request streams (`stream=true`) from `/v1/completions`, or
`/v1/chat/completions` with the prompt as one user message, and asks for usage in the
stream (`stream_options`; vLLM and SGLang also report the running count in every chunk,
which gives each chunk's token count).

While a request streams, the client does no more than note each network read and its
time: parsing the events, a tokenizer, writing records all wait until the request or the
whole replay has ended, so that they delay no other stream's timestamps. aiohttp, whose
HTTP parser is compiled, reads the streams: the client's CPU time per chunk, events parsed,
was 30 us against 146 us with httpx2 (20 streams of 200 chunks, the shared 2-core
machine). Times are seconds from the trace's start on `time.perf_counter`'s clock:
- `admitted_s`: the request was sent;
- `chunk_times_s`: the read that completed each event carrying output text arrived
  (`stream`: empty events, such as a chat stream's opening role chunk or the closing usage
  chunk, are not output);
- `first_token_s`: the first of those (TTFT counts from the trace's arrival time);
- `finish_s`: the last of those, as vLLM's benchmark counts it.

A request fails, and the replay goes on, when the server answers with an HTTP error (429
included), the connection breaks, the stream ends without `[DONE]` or without a
`finish_reason` (cut short: llama-cpp-python's server does that to a stream when another
request arrives, unless started with `--interrupt_requests false`), it reports an error
mid-stream, it streams no text at all, or the whole request takes longer than
`settings.timeout_s`. Its record says why (`error`), and the load metrics leave it out.

Records stream to disk as requests end (`records.RequestSpool`): memory holds the requests
in flight, not the trace's outputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from specbench.engine.results import ServeResult
from specbench.engine.timing import frozen_heap
from specbench.load.trace import TraceRequest
from specbench.server.http import auth_headers
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


def endpoint(base_url: str, chat: bool) -> str:
    """The completions URL under an OpenAI base URL."""
    return f"{base_url}/chat/completions" if chat else f"{base_url}/completions"


@dataclass
class Exchange:
    """What the client noted of one request: when it was sent, each network read and its time, how it ended."""

    request: TraceRequest
    admitted_s: float
    reads: list[bytes] = field(default_factory=list)
    read_times: list[float] = field(default_factory=list)
    # the transport's: an HTTP status, a broken connection, the timeout ("{chunks}" in it: the text chunks that
    # arrived, counted when the stream is parsed)
    error: str | None = None
    end_s: float = 0.0

    def raw(self) -> dict[str, Any]:
        """The spool's record of it (`stream.request_record` parses it later)."""
        ends, total = [], 0
        for read in self.reads:
            total += len(read)
            ends.append(total)
        return {
            "request_id": self.request.request_id,
            "arrival_s": self.request.arrival_s,
            "admitted_s": self.admitted_s,
            "end_s": self.end_s,
            "error": self.error,
            "body": b"".join(self.reads).decode("utf-8", errors="replace"),
            "read_ends": ends,
            "read_times": self.read_times,
        }


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], exchange: Exchange, start: float):
    async with session.post(url, json=body) as response:
        if response.status != 200:
            text = (await response.text(errors="replace")).strip()[:ERROR_BODY_CHARS]
            limited = " (rate limited)" if response.status == 429 else ""
            exchange.error = f"HTTP {response.status}{limited}: {text}"
            return
        async for data in response.content.iter_any():
            exchange.read_times.append(time.perf_counter() - start)
            exchange.reads.append(data)


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    settings: RequestSettings,
    request: TraceRequest,
    prompt: str,
    start: float,
) -> Exchange:
    """Send one request and note its stream, whatever happens."""
    exchange = Exchange(request, admitted_s=time.perf_counter() - start)
    try:
        body = settings.payload(prompt, request)
        await asyncio.wait_for(_stream(session, url, body, exchange, start), settings.timeout_s)
    except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
        exchange.error = (
            f"no complete answer within server.timeout_s={settings.timeout_s:g} s ({{chunks}} text chunks received)"
        )
    except aiohttp.ClientError as error:
        exchange.error = f"the connection failed after {{chunks}} text chunks ({type(error).__name__}: {error})"
    exchange.end_s = time.perf_counter() - start
    return exchange


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
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit or 0),  # 0: no limit
        timeout=aiohttp.ClientTimeout(total=None),  # each request is bounded by settings.timeout_s instead
        headers=auth_headers(settings.api_key),
    )

    async def send(position: int, request: TraceRequest) -> None:
        prompt = request.text if request.text is not None else prompts_text[request.prompt_index]
        try:
            exchange = await _send(session, url, settings, request, prompt, start)
        finally:
            if slots:
                slots.release()
        spool.write(position, exchange.raw())

    async with session:
        async with session.get(f"{base_url}/models") as response:  # connect before the trace starts: not timed
            await response.read()
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
        with frozen_heap():  # a full garbage collection would delay the reads it fell among
            wall_s = asyncio.run(_replay(base_url.rstrip("/"), requests, prompts_text, settings, spool, start_at))
    except BaseException:
        spool.close()
        spool.path.unlink()
        raise
    return ServeResult(requests=finish_spool(spool, out_path, tokenizer), steps=[], wall_s=wall_s)
