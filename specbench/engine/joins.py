"""When a running batch takes the requests that wait: the join gates of `continuous.serve`.

A join is a prefill that every running row waits for (no chunked prefill), and part of its cost is
fixed: a 1-row join into 128 rows of GPT-J-6B shapes on an H200 took about 6.4 ms, against about
2.9 ms more per 128-token row (`benchmarks/join_cost.py`, session ten). Joining at every step where a
slot is free pays that fixed part at most steps once rows leave out of step (spread output lengths,
or speculation): at 256 requests/s on the H200 with output lengths spread over 32-96 tokens the
baseline joined 67-69 times for 256 requests, against 20-22 with all 64, where rows that joined
together leave together (session nineteen, `benchmarks/NOTES.md`).

- `EagerJoins` (the default): the requests join at the first step where there is room.
- `DelayedJoins(d)` (vLLM's `--scheduler-delay-factor`): a running batch takes new rows only once
  d times the last join's prefill time has passed since that join.
- `CoalescedJoins`: a join into a running batch waits until the requests it would admit have
  waited, in all, as long as the running rows would stall for a join's fixed part (request-seconds
  against row-seconds, one unit: a waiting request and a stalled row each lose a second a second).
  That is the economic order quantity: joining every T seconds, with requests becoming joinable at
  f a second and b rows running, costs b j0 / T of stall and f T / 2 of waiting per second, least
  at T = sqrt(2 b j0 / f), where the two are equal. j0 is the intercept of a line fitted to the
  run's own joins into a running batch (seconds against the joining prompts' tokens); until joins
  of two sizes have been seen it is 0, and the requests join at once. It trades time to first token
  for fewer stalls of every running row: at 128 rows, f = 200 requests/s and j0 = 6.4 ms, T is 90 ms
  (about 18 requests a join). An empty batch takes requests at once. Measured on the H200 (the
  README's "Load settings"): with spread lengths at 64-256 requests/s, TPOT p50 9-19% lower and
  TTFT p50 1.35x-3.1x; at 4-16 requests/s, later first tokens and no gain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from specbench.engine.costs import CostLine


class JoinGate(Protocol):
    """Decides, before each step, whether the requests that could join a running batch join now."""

    timed: bool  # whether `joined` needs a join's own time: where steps read ahead, a reading that waits first

    def ready(self, now: float, running: int, joinable_since: Sequence[float]) -> bool:
        """Whether to join now, with `running` rows running and, for each request a join would admit, the time since
        which it could have joined (its arrival, or when its place in the batch came free). With no row running the
        scheduler joins whatever the answer."""

    def joined(self, now: float, prefill_s: float, tokens: int, into_running: bool) -> None:
        """A join started at `now` and its prefill of `tokens` prompt tokens took `prefill_s` (`into_running`: into a
        batch that had rows running, not an empty one)."""


class EagerJoins:
    """Requests join at the first step where there is room."""

    timed = False

    def ready(self, now: float, running: int, joinable_since: Sequence[float]) -> bool:
        return True

    def joined(self, now: float, prefill_s: float, tokens: int, into_running: bool) -> None:
        pass


@dataclass
class DelayedJoins:
    """A running batch takes new rows only once `factor` times the last join's prefill time has passed since it."""

    factor: float
    # the join's time as the scheduler sees it: where steps read ahead (a GPU), with what was left of the queued step
    timed = False
    _last_join_s: float = field(default=0.0, init=False)
    _last_prefill_s: float = field(default=0.0, init=False)

    def ready(self, now: float, running: int, joinable_since: Sequence[float]) -> bool:
        return now - self._last_join_s >= self.factor * self._last_prefill_s

    def joined(self, now: float, prefill_s: float, tokens: int, into_running: bool) -> None:
        self._last_join_s, self._last_prefill_s = now, prefill_s


@dataclass
class CoalescedJoins:
    """A join into a running batch waits until its requests have waited, in all, as long as the running rows would
    stall for a join's fixed part (see the module docstring)."""

    cost: CostLine = field(default_factory=CostLine)  # a join's seconds against its prompt tokens
    timed = True
    _waited_s: float = field(default=0.0, init=False)  # request-seconds the joinable ones waited since the last join
    _checked_s: float = field(default=0.0, init=False)  # when that was last added up

    @property
    def fixed_s(self) -> float:
        """A join's fixed part, j0: the fitted line's intercept (0 until joins of two sizes were seen)."""
        return self.cost.coefficients[0]

    def ready(self, now: float, running: int, joinable_since: Sequence[float]) -> bool:
        self._waited_s += sum(now - max(self._checked_s, since) for since in joinable_since)
        self._checked_s = now
        return self._waited_s >= running * self.fixed_s

    def joined(self, now: float, prefill_s: float, tokens: int, into_running: bool) -> None:
        if into_running:  # a fresh batch's first prefill also starts the drafters: not a join's cost
            self.cost.observe(tokens, prefill_s)
        self._waited_s = 0.0


def make_join_gate(delay_factor: float = 0.0, coalesce: bool = False) -> JoinGate:
    """A fresh gate (each serve needs its own): `CoalescedJoins` if `coalesce`, else `DelayedJoins(delay_factor)`
    if that is above 0, else `EagerJoins`."""
    if not delay_factor >= 0:
        raise ValueError(f"join delay factor {delay_factor}: 0 (no delay) or more is needed")
    if coalesce and delay_factor:
        raise ValueError("coalesced joins and a join delay factor are two ways to space joins: choose one")
    if coalesce:
        return CoalescedJoins()
    return DelayedJoins(delay_factor) if delay_factor else EagerJoins()
