"""Draft-length policies: how many tokens a row drafts at its next step.

The engine keeps one k per row and asks its `KSchedule` for the next one after each
step, from what that row's step offered and accepted. A `StepPolicy` (under load:
`load.k_schedule.LoadAwareK`) instead sets one k for every running row before each
step, from the batch's state (`StepState`), and is told what each step and each
reading of the drafters took.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class KSchedule(Protocol):
    """A draft-length policy: k for the first step, an upper bound, and the next k after a step."""

    @property
    def first(self) -> int:
        """k at a row's first step."""

    @property
    def max_k(self) -> int:
        """No step drafts more than this."""

    def next(self, k: int, accepted: int, offered: int) -> int:
        """k for the next step, after a step that asked for k, offered `offered` and had `accepted` accepted."""


@dataclass(frozen=True)
class StepState:
    """What a step policy sees before a step."""

    occupancy: int  # running rows
    unread_tokens: int  # tokens the drafters must read before they draft: joined rows', and plain steps'
    remaining_tokens: float  # output tokens the running rows may still emit, on average per row
    output_tokens: float  # the running rows' output limits, on average
    now_s: float = 0.0  # seconds since the served trace started (0 outside one)
    arrived: int = 0  # requests of the trace that had arrived by `now_s`, running, waiting or done
    output_tokens_std: float = 0.0  # the running rows' output limits' standard deviation


class StepPolicy(Protocol):
    """A draft length for a whole step, chosen from the batch's state (every running row drafts it)."""

    def k_for_step(self, state: StepState) -> int:
        """k for the next step (0: a plain decode step)."""

    def observe_step(self, k: int, occupancy: int, seconds: float) -> None:
        """What a step at `k` with `occupancy` running rows took, without the drafters' reading of unread tokens."""

    def observe_read(self, tokens: int, seconds: float) -> None:
        """What the drafters took to read `tokens` unread tokens (rows that joined, steps they sat out)."""


@dataclass(frozen=True)
class ConstantK:
    """The same k at every step."""

    k: int

    @property
    def first(self) -> int:
        return self.k

    @property
    def max_k(self) -> int:
        return self.k

    def next(self, k: int, accepted: int, offered: int) -> int:
        return k


@dataclass(frozen=True)
class AdaptiveK:
    """Start at k; +2 after a fully accepted block, -1 otherwise, within 1..k_max.

    A step where nothing was offered (prompt lookup found no match, or no room was left) leaves k as it is.
    """

    k: int
    k_max: int

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.k_max:
            raise ValueError(f"AdaptiveK needs 1 <= k <= k_max, got k={self.k}, k_max={self.k_max}")

    @property
    def first(self) -> int:
        return self.k

    @property
    def max_k(self) -> int:
        return self.k_max

    def next(self, k: int, accepted: int, offered: int) -> int:
        if offered == 0:
            return k
        return min(k + 2, self.k_max) if accepted == offered else max(k - 1, 1)
