"""Continuous batching: requests arrive on a clock, join the running batch, and leave it when they finish.

`serve` replays an arrival trace through either decoder of `decode.py` (the baseline or
speculative decoding), the same way for both:
- Before each step, the requests that have arrived join the batch, up to `max_batch_size`
  running rows; the others wait in a FIFO queue. When nothing runs and nothing has
  arrived, the scheduler waits for the next arrival.
- A join gate (`joins.py`) may hold the joinable requests back so that they join a running batch
  in fewer, larger groups: fewer stalls of the running rows, later first tokens (`DelayedJoins`,
  vLLM's `--scheduler-delay-factor`; `CoalescedJoins`, priced by the joins' fixed cost). An empty
  batch takes them at once. Speculating rows finish at different steps and free their slots a few
  at a time, so without a gate they join at most steps (`benchmarks/join_events.py`).
- Joining is a prefill of the new rows alone (`CachedModel.admit`), then their first
  token: the running rows wait for it, so every running row's next inter-token latency
  includes that prefill (no chunked prefill; a join of n prompt tokens costs about one
  n-token forward of the verifier). Under CUDA graphs, `CachedModel.capture_joins` makes
  that forward one captured graph (rows padded to a power of two, prompts to a multiple of
  64 columns) instead of an eager forward's hundreds of kernel launches. Under speculation
  the drafters read the joined rows at the next step that drafts, so a run of plain steps
  (k = 0 under `k_schedule=load`) does not pay for them.
- A row leaves as soon as it finishes: its slot takes the next request, and its cache
  columns become holes that compaction removes.
- Before each step a speculative decoder is told the time and how many requests have arrived
  by then: a step policy (`k_schedule=load`) judges from them whether the arrivals will fill the batch.
- Slots: under CUDA graphs the batch has a bucketed number of slots (powers of two, and
  `max_batch_size` itself), the sizes whose graphs were captured, so a join never
  captures; padding slots are computed and counted in `padded_positions`. Without graphs
  the batch holds exactly the running rows. Re-forming the batch copies its caches once.
The clock is real: seconds since the trace started, read after the device's queued work
(`TraceClock`), or, with a decoder that reads ahead (the baseline's steps on a GPU, and the plain
steps of `k_schedule=load`: `PlainSteps`), as soon as a step's tokens reached the host: its next
forward is queued by then, and the scheduler's work between steps overlaps it. Every
request's times (admitted, each chunk of tokens, finished) are read on it; a chunk is what a
step emitted for the request (one token for the baseline, the accepted drafts and the
verifier's own token under speculation).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from specbench.engine.cached_model import slot_buckets
from specbench.engine.decode import BaselineDecoder, Row, SpeculativeDecoder, finish_logprobs
from specbench.engine.joins import EagerJoins, JoinGate
from specbench.engine.results import EngineRequest, ServedRequest, ServeResult, StepRecord
from specbench.engine.timing import Clock, frozen_heap


class TimeSource(Protocol):
    """What the scheduler reads time from: seconds since the trace started, and a wait until a given time."""

    def now(self, wait: bool = True) -> float: ...

    def wait_until(self, seconds: float) -> None: ...


class TraceClock:
    """Seconds since the trace started, read after the devices' queued work (an honest reading on a GPU)."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self._clock = Clock(devices)
        self.start = self._clock.now()

    def now(self, wait: bool = True) -> float:
        """Seconds since the trace started (see `Clock.now` for `wait`)."""
        return self._clock.now(wait) - self.start

    def wait_until(self, seconds: float) -> None:
        """Sleep until `seconds` after the start (the next arrival, when nothing runs)."""
        time.sleep(max(0.0, seconds - self.now()))


def serve(
    decoder: BaselineDecoder | SpeculativeDecoder,
    requests: Sequence[EngineRequest],
    make_row: Callable[[EngineRequest], Row],
    max_batch_size: int,
    bucketed: bool,
    clock: TimeSource | None = None,
    join_gate: JoinGate | None = None,
) -> ServeResult:
    """Serve `requests` (any order; sorted by arrival) with continuous batching; see the module docstring.

    `make_row` turns a request into the decoder's fresh row state; `bucketed` keeps the slot count
    to `slot_buckets` (CUDA graphs); `join_gate` says when the waiting requests join a running batch
    (default: at once).
    Returns every request's record (in request-id order), one record per step, and the verifier's
    computed and padded positions.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size}: at least one running row is needed")
    join_gate = join_gate if join_gate is not None else EagerJoins()
    clock = clock or TraceClock(decoder.verifier.devices)
    # a decoder that reads ahead has queued its next forward when a step returns: readings must not wait for it
    wait = not decoder.read_ahead
    pending = deque(sorted(requests, key=lambda request: (request.arrival_s, request.request_id)))
    waiting: deque[EngineRequest] = deque()
    served: dict[int, ServedRequest] = {}
    request_of: dict[int, EngineRequest] = {}  # id(row) -> its request
    rows: dict[int, Row] = {}  # request id -> its row
    steps: list[StepRecord] = []
    positions = [0, 0]  # verifier positions computed and padded, over every batch (an empty batch restarts them)
    freed_at = deque([0.0] * max_batch_size)  # when each free place in the batch came free, oldest first
    arrived = 0  # requests that have arrived by now

    def size_for(count: int) -> int:
        return next(size for size in slot_buckets(max_batch_size) if size >= count) if bucketed else count

    def record_chunk(row: Row, count: int, seconds: float) -> None:
        record = served[request_of[id(row)].request_id]
        record.chunk_times_s.append(seconds)
        record.chunk_sizes.append(count)

    def release_finished(at: float) -> None:
        finished = [slot for slot, row in enumerate(decoder.rows) if row is not None and row.finished]
        if not finished:
            return
        decoder.release(finished)
        freed_at.extend([at] * len(finished))
        running = [slot for slot, row in enumerate(decoder.rows) if row is not None]
        target = size_for(len(running))
        if running and target < len(decoder.rows):  # shrink: the running rows first, then empty slots
            decoder.keep_rows([*running, *[None] * (target - len(running))])

    with frozen_heap():  # a full garbage collection would stall the step it fell in
        while pending or waiting or decoder.running:
            now = clock.now(wait)
            while pending and pending[0].arrival_s <= now:
                waiting.append(pending.popleft())
                arrived += 1
            if not decoder.running and not waiting:
                clock.wait_until(pending[0].arrival_s)
                continue
            running = len(decoder.running)
            room = min(max_batch_size - running, len(waiting))
            # since when each request that could join now could have: its arrival, or the time its place came free
            joinable_since = [max(waiting[i].arrival_s, freed_at[i]) for i in range(room)]
            # asked at every step, with none to admit too (a gate may count the time they wait);
            # an empty batch takes them
            ready = join_gate.ready(now, running, joinable_since) or not running
            joining = [waiting.popleft() for _ in range(room)] if ready else []
            if joining:
                for _ in joining:
                    freed_at.popleft()
                if not decoder.running:
                    positions = _add_positions(positions, decoder)
                started = clock.now() if join_gate.timed else now  # a forward queued ahead is not the join's time
                _admit(decoder, joining, make_row, size_for(running + len(joining)), request_of, rows, served, now)
                admitted_at = clock.now(wait)
                tokens = sum(len(request.prompt_ids) for request in joining)
                join_gate.joined(now, admitted_at - started, tokens, into_running=running > 0)
                for request in joining:
                    record_chunk(rows[request.request_id], 1, admitted_at)
                release_finished(admitted_at)  # a row may end at its first token
            if not decoder.running:
                continue
            occupancy, computed = len(decoder.running), len(decoder.rows)
            if isinstance(decoder, SpeculativeDecoder):  # its step policy may judge the load by the arrivals
                decoder.arrivals = (now, arrived)
            report = decoder.step()
            ended = clock.now(wait)
            for row, count in report.emitted:
                if count:
                    record_chunk(row, count, ended)
            steps.append(StepRecord(ended, occupancy, computed, report.k, report.proposed, report.accepted))
            release_finished(ended)

    positions = _add_positions(positions, decoder)
    finish_logprobs(list(rows.values()))
    for request_id, record in served.items():
        row = rows[request_id]
        record.first_token_s, record.finish_s = record.chunk_times_s[0], record.chunk_times_s[-1]
        record.tokens = list(row.result.tokens)
        record.num_tokens = len(row.result.tokens)
        record.proposed, record.accepted = row.result.proposed, row.result.accepted
    order = sorted(served)
    return ServeResult(
        requests=[served[request_id] for request_id in order],
        steps=steps,
        wall_s=max(record.finish_s for record in served.values()) if served else 0.0,
        verifier_positions=positions[0],
        padded_positions=positions[1],
        results=[rows[request_id].result for request_id in order],
    )


def _add_positions(totals: list[int], decoder: BaselineDecoder | SpeculativeDecoder) -> list[int]:
    """Totals plus the verifier's counts since its batch started (they restart with the next empty batch)."""
    verifier = decoder.verifier
    counted = [totals[0] + verifier.fed_positions, totals[1] + verifier.padded_positions]
    verifier.fed_positions = verifier.padded_positions = 0
    return counted


def _admit(
    decoder: BaselineDecoder | SpeculativeDecoder,
    joining: list[EngineRequest],
    make_row: Callable[[EngineRequest], Row],
    batch_size: int,
    request_of: dict[int, EngineRequest],
    rows: dict[int, Row],
    served: dict[int, ServedRequest],
    now: float,
) -> None:
    """Give each joining request a free slot (growing the batch to `batch_size` slots if needed) and prefill it."""
    new_rows = [make_row(request) for request in joining]
    for request, row in zip(joining, new_rows, strict=True):
        request_of[id(row)] = request
        rows[request.request_id] = row
        served[request.request_id] = ServedRequest(
            request_id=request.request_id,
            arrival_s=request.arrival_s,
            admitted_s=now,
            first_token_s=0.0,
            finish_s=0.0,
            num_tokens=0,
        )
    if not decoder.running:
        decoder.admit(new_rows, list(range(len(new_rows))), batch_size)
        return
    free = [slot for slot, row in enumerate(decoder.rows) if row is None]
    if len(free) < len(new_rows):
        decoder.keep_rows([*range(len(decoder.rows)), *[None] * (batch_size - len(decoder.rows))])
        free = [slot for slot, row in enumerate(decoder.rows) if row is None]
    decoder.admit(new_rows, free[: len(new_rows)])
