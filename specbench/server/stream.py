"""What a streamed completion said: its server-sent events, parsed after the stream, into the request's record.

While a request streams, the client only notes each network read and its time
(`client.replay`); everything here runs after, outside the timed window. An event is
timed by the read that completed it (the earliest the client could have known it).

OpenAI-compatible servers stream `data: {json}` events, one blank line after each, and
end with `data: [DONE]`. Comment lines (`: ping`) are skipped, several `data:` lines of
one event are joined with newlines, and an event the stream ends without its blank line
is still read (some servers end so). The chunks that carry output text (`text`, or a chat
delta's `content` or `reasoning_content`) are the request's chunks; an event with
`error` is the server reporting a failure mid-stream.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def sse_events(body: bytes, read_ends: list[int], read_times: list[float]) -> Iterator[tuple[float, str]]:
    """(time, data) of each event of `body`, timed by the read (ending at `read_ends[i]` bytes) that completed it."""
    start = 0
    for separator in EVENT_END.finditer(body):
        data = _event_data(body[start : separator.start()])
        start = separator.end()
        if data is not None:
            yield read_times[min(bisect_left(read_ends, start), len(read_times) - 1)], data
    data = _event_data(body[start:])
    if data is not None:
        yield read_times[-1], data


def _event_data(block: bytes) -> str | None:
    """The data of one event block (None when it has none)."""
    lines = [line for line in block.decode("utf-8", errors="replace").splitlines() if not line.startswith(":")]
    data = [line.removeprefix("data:").removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


@dataclass
class Answer:
    """What one request's events said, in order."""

    chunk_times_s: list[float] = field(default_factory=list)
    chunk_chars: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    usage_tokens: int | None = None  # the server's latest completion_tokens
    usage_chunk_sizes: list[int] = field(default_factory=list)  # from running usage counts, when reported
    usage_at_last_chunk: int = 0
    finish_reason: str | None = None
    done: bool = False  # [DONE] arrived
    proposed: int = 0  # draft tokens the server reported for this request (llama.cpp's `timings`)
    accepted: int = 0
    error: str | None = None  # an error event

    def take(self, time_s: float, data: str) -> None:
        """Account for one event."""
        if self.done or self.error:
            return
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
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
                self.chunk_times_s.append(time_s)
                self.chunk_chars.append(len(text))
                self.text_parts.append(text)
                if usage and self.usage_tokens is not None:  # a running count in every chunk (vLLM, SGLang)
                    self.usage_chunk_sizes.append(self.usage_tokens - self.usage_at_last_chunk)
                    self.usage_at_last_chunk = self.usage_tokens

    def problem(self) -> str | None:
        """Why the stream is not a complete answer, if it is not."""
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


def _choice_text(choice: dict[str, Any]) -> str | None:
    """A streamed choice's output text: `text` (completions) or the delta's content or reasoning (chat)."""
    if "text" in choice:
        return choice["text"]
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content")


def request_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A request's record from what the client noted (`client.Exchange.raw`): its chunks, times and error.

    The error is the transport's when there is one (an HTTP status, a broken connection, the timeout, with the
    text chunks that arrived before), else what the stream itself shows (`Answer.problem`). A failed request's
    `first_token_s` is its first chunk's time or, with none, the time it failed, and `finish_s` the time it failed.
    """
    answer = Answer()
    body = raw["body"].encode()
    try:
        for time_s, data in sse_events(body, raw["read_ends"], raw["read_times"]) if body else ():
            answer.take(time_s, data)
        stream_problem = answer.problem()
    except (ValueError, TypeError, AttributeError) as error:  # JSON that is not a completion chunk
        stream_problem = f"a malformed stream event ({type(error).__name__}: {error})"
    chunks = len(answer.chunk_times_s)
    error = raw["error"].replace("{chunks}", str(chunks)) if raw["error"] else stream_problem
    end_s = raw["end_s"]
    sizes_known = answer.usage_chunk_sizes and len(answer.usage_chunk_sizes) == chunks
    return {
        "request_id": raw["request_id"],
        "arrival_s": raw["arrival_s"],
        "admitted_s": raw["admitted_s"],
        "first_token_s": answer.chunk_times_s[0] if chunks else end_s,
        "finish_s": answer.chunk_times_s[-1] if error is None else end_s,
        "chunk_times_s": answer.chunk_times_s,
        "proposed": answer.proposed,
        "accepted": answer.accepted,
        "error": error,
        "text": "".join(answer.text_parts),
        "chunk_chars": answer.chunk_chars,
        "usage_chunk_sizes": answer.usage_chunk_sizes if sizes_known else None,
        "usage_tokens": answer.usage_tokens,
    }
