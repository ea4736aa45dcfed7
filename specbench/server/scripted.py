"""A small OpenAI-compatible server that streams scripted answers at once and misbehaves when a prompt asks.

For the tests and the client's precision benchmark (a real HTTP server: starlette under
uvicorn), never for measuring a model. Each prompt is a script of `key=value` words:

- `chunks=N` (default 4): text chunks streamed; chunk i reads " w{i}", or with `stamp=1`
  the server's `time.perf_counter()` as it sent the chunk (the benchmark's reference);
- `tokens=T` (default 1): tokens each chunk stands for (the usage counts them);
- `interval_ms=M` (default 0, or the server's `--interval-ms`): the pause before each chunk after the first;
- `status=S`: answer HTTP S (500, 429, ...) with an OpenAI error body instead;
- `drop=N`: close the connection after N chunks, mid-stream;
- `hang=1`: never answer (wait until the client goes away);
- `no_finish=1`: end with [DONE] but without a finish_reason (a stream cut short);
- `error_after=N`: an in-stream error event after N chunks (vLLM reports errors so);
- `draft=D accepted=A`: llama.cpp llama-server's per-response `timings` in the last chunk.

Usage follows vLLM: the last event carries it when `stream_options.include_usage` is
set, every chunk a running count with `continuous_usage_stats`. With `spec_k > 0` the
server counts speculation as vLLM does at /metrics: each chunk of T tokens is one draft
of `spec_k` tokens of which T - 1 were accepted (positions 0 .. T - 2).

    with ScriptedServer(spec_k=4) as base_url: ...   # in a thread, on a free port
    python -m specbench.server.scripted --port 8000  # in a process of its own
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "scripted"


class DroppedStream(Exception):
    """Raised mid-stream on purpose: uvicorn then closes the connection without ending the response."""


def parse_script(prompt: str) -> dict[str, int]:
    """The `key=value` words of a prompt whose value is a whole number."""
    script = {}
    for word in prompt.split():
        key, _, value = word.partition("=")
        if value.isdigit():
            script[key] = int(value)
    return script


class SpecCounters:
    """vLLM's speculation counters in a registry of this server's own: at 0 from the start with `spec_k > 0`, absent
    without (as vLLM registers them only when it speculates)."""

    def __init__(self, spec_k: int) -> None:
        self.spec_k = spec_k
        self.registry = CollectorRegistry()
        if not spec_k:
            return
        labels = ["model_name", "engine"]

        def counter(name: str, *extra: str) -> Counter:
            return Counter(name, name, [*labels, *extra], registry=self.registry)

        self.drafts = counter("vllm:spec_decode_num_drafts").labels(MODEL, "0")
        self.draft_tokens = counter("vllm:spec_decode_num_draft_tokens").labels(MODEL, "0")
        self.accepted = counter("vllm:spec_decode_num_accepted_tokens").labels(MODEL, "0")
        per_position = counter("vllm:spec_decode_num_accepted_tokens_per_pos", "position")
        self.per_position = [per_position.labels(MODEL, "0", str(position)) for position in range(spec_k)]

    def count_chunk(self, tokens: int) -> None:
        """One verification step that emitted `tokens` tokens (its accepted drafts and the verifier's own)."""
        if not self.spec_k:
            return
        accepted = min(tokens - 1, self.spec_k)
        self.drafts.inc()
        self.draft_tokens.inc(self.spec_k)
        self.accepted.inc(accepted)
        for position in range(accepted):
            self.per_position[position].inc()


def build_app(spec_k: int = 0, interval_ms: int = 0) -> Starlette:
    """The server's routes: completions, chat completions, models, health and metrics; `interval_ms` paces the chunks
    of prompts that set no `interval_ms` of their own."""
    counters = SpecCounters(spec_k)

    async def completions(request: Request) -> Response:
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        script = {"interval_ms": interval_ms, **parse_script(prompt)}
        if "status" in script:
            error = {"error": {"message": f"scripted HTTP {script['status']}", "code": script["status"]}}
            return JSONResponse(error, status_code=script["status"])
        if script.get("hang"):
            while (await request.receive())["type"] != "http.disconnect":
                pass
            return Response(status_code=499)
        options = body.get("stream_options") or {}
        return StreamingResponse(_events(script, chat, options, counters), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(counters.registry), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
            Route("/metrics", metrics),
        ]
    )


async def _events(
    script: dict[str, int], chat: bool, options: dict[str, Any], counters: SpecCounters
) -> AsyncIterator[str]:
    """The scripted stream, as server-sent events."""
    chunks, tokens, interval_s = script.get("chunks", 4), script.get("tokens", 1), script["interval_ms"] / 1000

    def event(choice: dict[str, Any] | None, usage: int | None = None, **extra: Any) -> str:
        data: dict[str, Any] = {"id": "cmpl-scripted", "model": MODEL, "choices": [choice] if choice else [], **extra}
        if usage is not None:
            data["usage"] = {"prompt_tokens": 1, "completion_tokens": usage, "total_tokens": usage + 1}
        return f"data: {json.dumps(data)}\n\n"

    def choice(text: str, finish: str | None = None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish}

    if chat:
        yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    for index in range(chunks):
        if index and interval_s:
            await asyncio.sleep(interval_s)
        if index == script.get("drop"):
            raise DroppedStream(f"scripted drop after {index} chunks")
        if index == script.get("error_after"):
            yield f"data: {json.dumps({'error': {'message': 'scripted mid-stream error', 'code': 500}})}\n\n"
            return
        counters.count_chunk(tokens)
        text = f" {time.perf_counter():.9f}" if script.get("stamp") else f" w{index}"
        running = (index + 1) * tokens if options.get("continuous_usage_stats") else None
        yield event(choice(text), running)
    finish = None if script.get("no_finish") else "length"
    last = {"index": 0, "delta": {}, "finish_reason": finish} if chat else choice("", finish)
    if "draft" in script:
        yield event(last, timings={"draft_n": script["draft"], "draft_n_accepted": script.get("accepted", 0)})
    else:
        yield event(last)
    if options.get("include_usage"):
        yield event(None, chunks * tokens)
    yield "data: [DONE]\n\n"


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling a thread when it listens."""

    def __init__(self, config: uvicorn.Config, listening: threading.Event) -> None:
        super().__init__(config)
        self.listening = listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class ScriptedServer:
    """The scripted server in a background thread on a free port; the context gives its OpenAI base URL."""

    def __init__(self, spec_k: int = 0) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        listening = threading.Event()
        config = uvicorn.Config(build_app(spec_k), log_level="critical", lifespan="off", timeout_graceful_shutdown=2)
        self.server = _Uvicorn(config, listening)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.listening = listening

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> str:
        self.thread.start()
        if not self.listening.wait(timeout=30):
            raise RuntimeError("the scripted server did not start")
        return self.base_url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec-k", type=int, default=0, help="count vLLM speculation counters for drafts of k tokens")
    parser.add_argument("--interval-ms", type=int, default=0, help="the pause between chunks of unscripted prompts")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.spec_k, args.interval_ms), host="127.0.0.1", port=args.port, log_level="warning", lifespan="off"
    )


if __name__ == "__main__":
    main()
