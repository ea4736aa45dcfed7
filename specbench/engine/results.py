"""What a decode returns: per-row tokens, timings and acceptance counts, and the batch's totals."""

from __future__ import annotations

from dataclasses import dataclass, field


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
