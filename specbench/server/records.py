"""A mode's served requests on disk: written one JSON line each as requests end, read back one at a time.

A trace of 10,000 requests at a high rate would otherwise keep every output and every chunk
time in memory until the mode ends. Here each request is written to a spool file the moment
it ends (in whatever order requests end: what the client noted, its raw stream and read
times), and memory holds only the file offset of each (8 bytes a request). When the mode
is over, `finish_spool` rewrites the spool in trace order into the mode's
`responses_{mode}.jsonl` artifact, each stream parsed (`stream.request_record`) and its
tokens counted (`complete_tokens`); `SpooledRequests` is that file seen as the
`ServeResult.requests` sequence, parsing one line per access.

A line holds the `ServedRequest` fields and the output `text`, the only place a server's
output text is kept (`ServedRequest` has no text field; `tokens` are the tokenizer's).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from specbench.engine.results import ServedRequest
from specbench.server.stream import request_record

# the ServedRequest fields a line holds, in order
FIELDS = (
    "request_id",
    "arrival_s",
    "admitted_s",
    "first_token_s",
    "finish_s",
    "num_tokens",
    "tokens",
    "chunk_times_s",
    "chunk_sizes",
    "proposed",
    "accepted",
    "error",
)


class RequestSpool:
    """A file that takes one JSON line per ended request, in any order, and remembers where each line starts."""

    def __init__(self, path: Path, num_requests: int) -> None:
        self.path = path
        self._offsets = np.full(num_requests, -1, dtype=np.int64)  # by position in the trace
        self._file = path.open("w+b")

    def __len__(self) -> int:
        return len(self._offsets)

    def write(self, position: int, record: dict[str, Any]) -> None:
        """Append the record of the request at `position` in the trace."""
        self._offsets[position] = self._file.tell()
        self._file.write(json.dumps(record).encode() + b"\n")

    def read(self) -> Iterator[dict[str, Any]]:
        """Every record, in trace order (a request never written raises: the replay lost it)."""
        self._file.flush()
        for position, offset in enumerate(self._offsets):
            if offset < 0:
                raise RuntimeError(f"the request at position {position} of the trace has no record")
            self._file.seek(offset)
            yield json.loads(self._file.readline())

    def close(self) -> None:
        self._file.close()


class SpooledRequests(Sequence[ServedRequest]):
    """The requests of a `responses_{mode}.jsonl` file in trace order, parsed one line per access."""

    def __init__(self, path: Path, offsets: np.ndarray) -> None:
        self.path = path
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, index: int) -> ServedRequest: ...

    @overload
    def __getitem__(self, index: slice) -> list[ServedRequest]: ...

    def __getitem__(self, index: int | slice) -> ServedRequest | list[ServedRequest]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return served_request(self.line(index))

    def __iter__(self) -> Iterator[ServedRequest]:
        for line in self.lines():
            yield served_request(line)

    def line(self, index: int) -> dict[str, Any]:
        """The whole record at `index` (the text included)."""
        with self.path.open("rb") as lines:
            lines.seek(self._offsets[index])
            return json.loads(lines.readline())

    def lines(self) -> Iterator[dict[str, Any]]:
        """Every whole record, in trace order, read in one pass."""
        with self.path.open("rb") as lines:
            for raw in lines:
                yield json.loads(raw)

    def texts(self) -> Iterator[str | None]:
        """Each request's output text (None for a failed request), in trace order."""
        for line in self.lines():
            yield None if line["error"] else line["text"]


def served_request(line: dict[str, Any]) -> ServedRequest:
    """The `ServedRequest` of a record line."""
    return ServedRequest(**{name: line[name] for name in FIELDS})


def finish_spool(spool: RequestSpool, path: Path, tokenizer: Any = None) -> SpooledRequests:
    """Write the spool's records to `path` in trace order, each stream parsed (`stream.request_record`) and its token
    counts completed (`complete_tokens`), and return them as a sequence; the spool file is removed."""
    offsets = np.zeros(len(spool), dtype=np.int64)
    with path.open("wb") as out:
        for position, record in enumerate(spool.read()):
            offsets[position] = out.tell()
            out.write(json.dumps(complete_tokens(request_record(record), tokenizer)).encode() + b"\n")
    spool.close()
    spool.path.unlink()
    return SpooledRequests(path, offsets)


def complete_tokens(record: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
    """A raw record with `tokens`, `num_tokens` and `chunk_sizes` filled in, and its working fields dropped.

    - `num_tokens`: the server's usage count, else the tokenizer's count of the text, else one per chunk;
    - `chunk_sizes`: from the server's running usage counts (vLLM, SGLang with continuous usage), else the
      tokenizer's tokens of the text assigned to the chunk where each starts, else 1 per chunk;
    - `tokens`: the tokenizer's ids of the output text (not necessarily the server's ids: a text can be
      tokenized more than one way), else empty.
    """
    record = dict(record)
    chunk_chars: list[int] = record.pop("chunk_chars")
    usage_sizes: list[int] | None = record.pop("usage_chunk_sizes")
    usage_tokens: int | None = record.pop("usage_tokens")
    tokens: list[int] = []
    tokenizer_sizes = None
    if tokenizer is not None and record["text"]:
        tokens, tokenizer_sizes = tokens_per_chunk(tokenizer, record["text"], chunk_chars)
    record["tokens"] = tokens
    if usage_tokens is not None:
        record["num_tokens"] = usage_tokens
    elif tokenizer is not None:
        record["num_tokens"] = len(tokens)
    else:
        record["num_tokens"] = len(chunk_chars)
    record["chunk_sizes"] = usage_sizes or tokenizer_sizes or [1] * len(chunk_chars)
    return record


def tokens_per_chunk(tokenizer: Any, text: str, chunk_chars: list[int]) -> tuple[list[int], list[int]]:
    """The tokenizer's ids of `text` and how many start in each chunk (chunks of `chunk_chars` characters).

    A fast tokenizer tokenizes the whole text once (its offsets place each token); a slow one tokenizes each
    chunk's text alone, which can count a token split across two chunks twice.
    """
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.array([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
        ends = np.cumsum(chunk_chars)
        chunk_of_token = np.minimum(np.searchsorted(ends, starts, side="right"), len(chunk_chars) - 1)
        return list(encoding["input_ids"]), np.bincount(chunk_of_token, minlength=len(chunk_chars)).tolist()
    bounds = np.concatenate([[0], np.cumsum(chunk_chars)])
    sizes = [
        len(tokenizer.encode(text[start:end], add_special_tokens=False)) for start, end in itertools.pairwise(bounds)
    ]
    return tokenizer.encode(text, add_special_tokens=False), sizes
