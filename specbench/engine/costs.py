"""Micro-measurements behind the speedup model, by batch size: one draft step, one verifier pass over n tokens.

Speculative decoding pays when k draft steps plus one verifier pass over k+1
tokens per row cost less than the tokens they yield. On a GPU the verifier pass
costs about the same for 1 or 17 tokens at batch size 1, less so as the batch
grows; on a CPU it does not, so the curves are measured rather than assumed.
"""

from __future__ import annotations

import itertools
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from specbench.engine.cached_model import CachedModel
from specbench.engine.drafters import Drafter, drafter_models
from specbench.engine.sampling import DecodeSettings, TokenChooser
from specbench.engine.timing import Clock

log = logging.getLogger(__name__)

DISTURBED_BY = 0.2  # a pass measured this much dearer than a larger one is measured again
REMEASURE_ROUNDS = 2  # at most this many times


@dataclass
class StepCosts:
    """Median seconds of the steps that make up speculative decoding, by batch size.

    A batch size that ran out of memory or was over the time budget, and every larger one,
    is missing from both dicts.
    """

    verify_s: dict[int, dict[int, float]]  # verify_s[b][n]: one verifier forward of b rows x n new tokens
    draft_s: dict[int, dict[str, float]]  # draft_s[b][name]: one drafting step (one token per row) of b rows

    def dearer_than_larger(self, tolerance: float = DISTURBED_BY) -> dict[tuple[int, int], tuple[int, int]]:
        """Verifier passes (rows, tokens) measured dearer, by more than `tolerance`, than a larger pass (more tokens at
        as many rows, or as many tokens at more rows), each with the cheapest such larger pass. A pass does not
        cost more than a larger one: such a measurement was disturbed (another job, a clock change), unless the
        machine really runs that shape slower, which measuring it again tells apart."""
        found = {}
        for rows, curve in self.verify_s.items():
            for tokens, seconds in curve.items():
                larger = [(rows, more) for more in curve if more > tokens]
                larger += [(more, tokens) for more in self.verify_s if more > rows and tokens in self.verify_s[more]]
                cheaper = [shape for shape in larger if seconds > (1 + tolerance) * self.verify_s[shape[0]][shape[1]]]
                if cheaper:
                    found[(rows, tokens)] = min(cheaper, key=lambda shape: self.verify_s[shape[0]][shape[1]])
        return found

    def disturbed_passes(self, tolerance: float = DISTURBED_BY) -> list[str]:
        """`dearer_than_larger`, one sentence each."""
        ms = {(rows, n): 1000 * seconds for rows, curve in self.verify_s.items() for n, seconds in curve.items()}
        return [
            f"a verifier pass over {tokens} tokens at {rows} rows measured {ms[(rows, tokens)]:.1f} ms, more than over "
            f"{larger[1]} tokens at {larger[0]} rows ({ms[larger]:.1f} ms)"
            for (rows, tokens), larger in self.dearer_than_larger(tolerance).items()
        ]


class CostLine:
    """seconds = fixed + per_unit x units, fitted by least squares to what was observed, the older observations
    weighing less (each one's weight falls by 1 / `window` at every later one).

    Where the fit cannot say (one size observed, bigger ones not dearer, a negative fixed part) it falls back to
    what it can: proportional to the units, their mean, or through the origin. Nothing observed: 0.
    """

    def __init__(self, window: int = 32) -> None:
        self._decay = 1 - 1 / window
        self._sums = [0.0] * 5  # weight, units, seconds, units^2, units x seconds

    def observe(self, units: float, seconds: float) -> None:
        """Add one observation: `units` took `seconds`."""
        weight, total, spent, squares, products = (value * self._decay for value in self._sums)
        self._sums = [weight + 1, total + units, spent + seconds, squares + units**2, products + units * seconds]

    @property
    def coefficients(self) -> tuple[float, float]:
        """(fixed, per_unit): the fitted line, after the fallbacks."""
        weight, total, spent, squares, products = self._sums
        if weight == 0:
            return 0.0, 0.0
        spread = squares * weight - total**2
        if spread > 1e-9 * squares * weight:  # different sizes: fixed + per_unit x units
            per_unit = (products * weight - total * spent) / spread
            fixed = (spent - per_unit * total) / weight
            if per_unit < 0:  # bigger ones were not dearer: their mean
                return spent / weight, 0.0
            if fixed < 0:  # through the origin
                return 0.0, products / squares
            return fixed, per_unit
        return (0.0, spent / total) if total else (spent / weight, 0.0)

    def predict(self, units: float) -> float:
        """The expected seconds of `units`."""
        fixed, per_unit = self.coefficients
        return fixed + per_unit * units


def measure_step_costs(
    verifier: CachedModel,
    drafters: list[Drafter],
    prompts: Sequence[list[int]],
    settings: DecodeSettings,
    shapes: Mapping[int, Sequence[int]],
    repeats: int = 3,
    budget_s: float | None = None,
) -> StepCosts:
    """Time, for each batch size b of `shapes` (ascending), verifier passes of b rows x n tokens for each n of
    `shapes[b]`, and one step of each drafter at b rows.

    The b rows are the run's own prompts (cycling through `prompts`), prefilled left-padded as a
    decode batches them, so a pass attends over the same ragged layout and masks as the decode.
    Each shape runs once as a warm-up, then `repeats` times. The smallest batch size is always
    measured. With `budget_s`, the time is checked before every measurement (each prefill, each
    shape, each drafter): one that would take the grid past the budget, estimated from the same
    measurement at the last batch size scaled by rows (a prefill: by prompt tokens), is not started,
    and neither is any larger batch size; a batch size that ran out of memory ends the grid too.
    The static buffers and CUDA graphs of the batch sizes measured are freed after each, except those the models
    held before (graphs captured for a decode keep being replayed, never recaptured while it is timed).
    A verifier pass measured dearer than a larger one (`StepCosts.dearer_than_larger`) is measured again, at most
    `REMEASURE_ROUNDS` times, keeping the lower median: a disturbance (another job, a clock change) only adds time;
    one still so is named in a warning.
    Of the 69 surfaces in `benchmarks/results` (H200 and H100 calls to 2026-12-05), 32 had such passes, 1.2x-2.2x
    the larger pass.
    """
    clock = Clock(verifier.devices)
    budget = _Budget(clock, budget_s)

    def median_seconds(kind: object, rows: int, action: Callable[[], object], undo: Callable[[], None]) -> float:
        budget.check(kind, rows)
        samples = timed_runs(clock, action, undo, repeats)
        budget.spent(kind, rows, sum(samples))
        return statistics.median(samples[1:])

    costs = StepCosts({}, {})
    models = [verifier, *drafter_models(drafters)]
    held = [model.held_batch_sizes for model in models]

    def rows_of(batch: int) -> list[list[int]]:
        """The run's prompts, cycling, for `batch` rows."""
        return [list(prompts[index % len(prompts)]) for index in range(batch)]

    def release(batch: int) -> None:
        """Free the static buffers of `batch` rows that the measurement set up (those of every size would add up)."""
        for model, kept in zip(models, held, strict=True):
            if batch not in kept:
                model.release(batch)

    for batch in sorted(shapes):
        rows = rows_of(batch)
        try:
            verify_s = _verify_passes(verifier, rows, shapes[batch], budget, median_seconds)
            draft_s = {d.name: _draft_step(d, rows, settings, budget, median_seconds) for d in drafters}
        except (torch.cuda.OutOfMemoryError, _OverBudget) as stop:  # torch.OutOfMemoryError in newer releases
            verify_s = None
            if not isinstance(stop, _OverBudget) and verifier.device.type == "cuda":
                torch.cuda.empty_cache()
        release(batch)
        if verify_s is None:
            break
        costs.verify_s[batch] = verify_s
        costs.draft_s[batch] = draft_s
        budget.measured_first = True
    for _ in range(REMEASURE_ROUNDS):  # a disturbance only adds time: keep the lower of the two medians
        disturbed = sorted(costs.dearer_than_larger())
        if not disturbed:
            break
        for batch, shapes_of_batch in itertools.groupby(disturbed, key=lambda shape: shape[0]):
            token_counts = [tokens for _, tokens in shapes_of_batch]
            try:
                again = _verify_passes(verifier, rows_of(batch), token_counts, budget, median_seconds)
            except (torch.cuda.OutOfMemoryError, _OverBudget):  # then the first measurement stands
                again = {}
            release(batch)
            for tokens, seconds in again.items():
                costs.verify_s[batch][tokens] = min(costs.verify_s[batch][tokens], seconds)
    for sentence in costs.disturbed_passes():
        log.warning(
            "cost surface: %s, and so again when measured twice more: a shape this machine runs slowly, or a busy "
            "machine (then the prices made from it are off)",
            sentence,
        )
    verifier.reset()
    for drafter in drafters:
        drafter.reset(1)
    return costs


def timed_runs(clock: Clock, action: Callable[[], object], undo: Callable[[], None], repeats: int) -> list[float]:
    """Seconds of `action` run `repeats` + 1 times, `undo` after each; the first run is a warm-up."""
    samples = []
    for _ in range(repeats + 1):
        start = clock.now()
        action()
        samples.append(clock.now() - start)
        undo()
    return samples


class _OverBudget(Exception):
    """The next measurement would take the grid past its time budget."""


class _Budget:
    """The grid's time budget: each measurement's time is estimated from the same one at the last batch size."""

    def __init__(self, clock: Clock, budget_s: float | None) -> None:
        self.clock, self.budget_s, self.start = clock, budget_s, clock.now()
        self.measured_first = False  # the smallest batch size is always measured, whatever the budget
        self._last: dict[object, tuple[int, float]] = {}  # kind -> (units, seconds) when last measured

    def check(self, kind: object, units: int) -> None:
        """Raise `_OverBudget` if this measurement of `units` (rows, or prompt tokens) would pass the budget."""
        if self.budget_s is None or not self.measured_first or kind not in self._last:
            return
        last_units, last_seconds = self._last[kind]
        if self.clock.now() - self.start + last_seconds * units / last_units > self.budget_s:
            raise _OverBudget

    def spent(self, kind: object, units: int, seconds: float) -> None:
        """Record what a measurement took."""
        self._last[kind] = (units, seconds)


def _verify_passes(
    verifier: CachedModel, rows: list[list[int]], token_counts: Sequence[int], budget: _Budget, median_seconds
) -> dict[int, float]:
    cached = [row[:-1] for row in rows]
    prompt_tokens = sum(len(row) for row in cached)
    budget.check("prefill", prompt_tokens)
    began = budget.clock.now()
    verifier.prefill(cached)
    budget.spent("prefill", prompt_tokens, budget.clock.now() - began)
    prefix = verifier.lengths
    longest = max(token_counts)
    # each row feeds its own last prompt token, then its own tokens again (the ids do not change the cost)
    new_ids = torch.tensor([(row[-1:] + row * longest)[:longest] for row in rows], device=verifier.device)
    return {
        n: median_seconds(
            ("verify", n),
            len(rows),
            lambda n=n: verifier.forward(new_ids[:, :n], logits_to_keep=n),
            lambda: verifier.truncate(prefix),
        )
        for n in token_counts
    }


def _draft_step(drafter: Drafter, rows: list[list[int]], settings: DecodeSettings, budget: _Budget, median_seconds):
    depths = [1] * len(rows)
    choosers = [TokenChooser(settings, seed) for seed in range(len(rows))]
    prompt_tokens = sum(len(row) for row in rows)
    budget.check(("draft prefill", drafter.name), prompt_tokens)
    began = budget.clock.now()
    drafter.reset(len(rows))
    drafter.prefill(rows)
    budget.spent(("draft prefill", drafter.name), prompt_tokens, budget.clock.now() - began)
    # each proposal rolls the drafter back to the prompt less its last token, then drafts one token
    return median_seconds(
        ("draft", drafter.name), len(rows), lambda: drafter.propose(rows, depths, choosers), lambda: None
    )
