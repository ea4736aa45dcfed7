"""What a decode returns: per-row tokens, timings and acceptance counts, and the batch's totals; and under load,
the requests of a trace as the scheduler takes them (`EngineRequest`) and what serving them gave (`ServedRequest`,
`StepRecord`, `ServeResult`, with `after_first`: a serve measured from one request's arrival on)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace


@dataclass
class DrafterStats:
    """What one drafter did for one row during a decode."""

    proposed: int = 0  # tokens it proposed
    accepted: int = 0  # of those, tokens the row emitted (its proposal's shared prefix with the emitted path)
    wins: int = 0  # steps where its proposal covered the whole emitted accepted path, when not empty (ties count)
    # Proposing, over the row's steps (the proposal covers the whole batch). With a thread pool on a GPU,
    # each reading waits for the whole device, so this includes the other drafters' concurrent work.
    draft_time_s: float = 0.0
    prefill_s: float = 0.0  # reading the prompts once, before the first step


@dataclass
class DecodeResult:
    """One row's output tokens, timings and (for speculative runs) acceptance counts.

    Times are wall seconds from the start of the batch: a row shares every forward with the
    rows decoded beside it. The per-step lists have one entry per speculative step of the row.
    A row's mean k over steps that could draft: mean of k_per_step[i] where depth_per_step[i] > 0.
    """

    tokens: list[int]  # output tokens, the stop token included
    latency_s: float  # from the batch's start until this row's last token was produced
    ttft_s: float  # from the batch's start until this row's first token
    verifier_calls: int = 0  # verifier forwards while the row was unfinished, the prefill included
    steps: int = 0  # speculative steps (verifier calls after the prefill)
    proposed: int = 0  # draft positions offered to the verifier (the token tree's depth), over all steps
    accepted: int = 0  # draft tokens accepted and emitted (a stop inside an accepted block cuts the rest)
    proposed_by_position: list[int] = field(default_factory=list)  # [i]: steps offering a draft at depth i + 1
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: steps emitting the draft at depth i + 1
    k_per_step: list[int] = field(default_factory=list)  # the schedule's k at that step
    depth_per_step: list[int] = field(default_factory=list)  # k cut to the room left; 0: a verifier-only step
    offered_per_step: list[int] = field(default_factory=list)  # longest proposal made (<= depth)
    accepted_per_step: list[int] = field(default_factory=list)  # draft tokens emitted
    draft_time_s: float = 0.0  # wall time of the drafting phases of the row's steps
    verify_time_s: float = 0.0  # wall time of the verifying phases (forward, acceptance, cache rewind)
    drafters: dict[str, DrafterStats] = field(default_factory=dict)
    logprob: float | None = None  # the verifier's log-likelihood of the output (raw logits), when collected

    @property
    def draft_prefill_s(self) -> float:
        """Time the drafters spent reading the prompts."""
        return sum(stats.prefill_s for stats in self.drafters.values())


@dataclass
class BatchResult:
    """A decoded batch: one result per prompt, in order, and what the verifier computed for them."""

    rows: list[DecodeResult]
    wall_s: float  # from the batch's start until its last row's last token
    verifier_positions: int  # token positions the verifier computed after the prefill, padding included
    padded_positions: int  # of which padding: a row's unused slots, and rows already finished

    @property
    def padded_token_share(self) -> float:
        """Share of the verifier's post-prefill work spent on padding."""
        return self.padded_positions / self.verifier_positions if self.verifier_positions else 0.0


@dataclass(frozen=True)
class EngineRequest:
    """One request of an arrival trace, as the continuous-batching scheduler takes it."""

    request_id: int
    arrival_s: float  # seconds after the trace starts
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int


@dataclass
class ServedRequest:
    """One request served under load, in one mode: its output and when things happened.

    Times are seconds from the start of the trace (the scheduler's clock, or the load client's).
    Chunks are what a client would receive at once: one token per baseline step, the accepted
    tokens plus the verifier's own under speculation, a streamed chunk from a server.
    """

    request_id: int
    arrival_s: float
    admitted_s: float  # it left the queue: its prefill began (a server: the request was sent)
    first_token_s: float
    finish_s: float
    num_tokens: int  # output tokens (a server: from its usage report, else the tokenizer)
    tokens: list[int] = field(default_factory=list)  # output token ids, when known
    chunk_times_s: list[float] = field(default_factory=list)  # when each chunk reached the host; [0]: first token
    chunk_sizes: list[int] = field(default_factory=list)  # tokens in each chunk
    proposed: int = 0  # draft positions offered for this request (speculative mode)
    accepted: int = 0  # of which accepted and emitted
    error: str | None = None  # why the request failed (a server backend); its times are then not used

    def shifted(self, seconds: float) -> ServedRequest:
        """The same request on a clock moved by `seconds` (every time plus `seconds`)."""
        return replace(
            self,
            arrival_s=self.arrival_s + seconds,
            admitted_s=self.admitted_s + seconds,
            first_token_s=self.first_token_s + seconds,
            finish_s=self.finish_s + seconds,
            chunk_times_s=[time + seconds for time in self.chunk_times_s],
        )

    def in_window(self, start: float) -> ServedRequest:
        """What of the request falls in a window opening at `start`, on the window's clock: running from `start` at
        the earliest, with the chunks emitted from then on and their share of its output tokens (chunk sizes can be
        a server's chunk count where it reports no running usage, so the share is taken of `num_tokens`)."""
        chunks = [(time - start, size) for time, size in zip(self.chunk_times_s, self.chunk_sizes, strict=True)
                  if time >= start]  # fmt: skip
        sizes = sum(self.chunk_sizes)
        return replace(
            self.shifted(-start),
            admitted_s=max(self.admitted_s - start, 0.0),
            num_tokens=round(self.num_tokens * sum(size for _, size in chunks) / sizes) if sizes else 0,
            tokens=[],  # which ids fell in the window is not kept: only their number counts
            chunk_times_s=[time for time, _ in chunks],
            chunk_sizes=[size for _, size in chunks],
        )


@dataclass
class StepRecord:
    """One scheduler step under load: when it ended, how full the batch was, and what speculation did."""

    time_s: float  # seconds from the start of the trace
    rows: int  # running requests (occupancy)
    computed_rows: int  # rows the step computed, padding rows included (powers of two under CUDA graphs)
    k: int  # draft tokens per row this step (0: a plain decode step)
    proposed: int = 0
    accepted: int = 0


@dataclass
class ServeResult:
    """A whole arrival trace served in one mode."""

    requests: list[ServedRequest]  # in request-id order
    steps: list[StepRecord]
    wall_s: float  # from the trace's start until its last request finished
    verifier_positions: int = 0
    padded_positions: int = 0
    results: list[DecodeResult] = field(default_factory=list)  # each request's engine counts, in request-id order
    # the requests `after_first` left out that were still running when the window opened, cut to the window (from
    # time 0, or their admission, with the chunks and tokens they emitted in it): they count in occupancy and
    # output tokens/s, in nothing else
    earlier: list[ServedRequest] = field(default_factory=list)

    def after_first(self, count: int) -> ServeResult:
        """The serve as measured from the arrival of its request `count` on: the first `count` requests (request-id
        order is arrival order) moved to `earlier`, the steps before that arrival left out, and the clock started
        at it. The verifier's position counts stay the whole serve's."""
        if count <= 0:
            return self
        if count >= len(self.requests):
            raise ValueError(f"cannot leave out the first {count} of {len(self.requests)} requests: none would remain")
        start = self.requests[count].arrival_s
        return ServeResult(
            [request.shifted(-start) for request in itertools.islice(self.requests, count, None)],
            [replace(step, time_s=step.time_s - start) for step in self.steps if step.time_s >= start],
            self.wall_s - start,
            self.verifier_positions,
            self.padded_positions,
            self.results[count:],
            [
                request.in_window(start)
                for request in itertools.chain(self.earlier, itertools.islice(self.requests, count))
                if request.error is None and request.finish_s > start
            ],
        )
