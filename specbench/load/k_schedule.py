"""k_schedule=load: the draft length of each step chosen from the batch's occupancy (SmartSpec's idea).

A fixed k hurts at high load: with b rows, a verify pass over k+1 tokens per row stops being
nearly free, and drafted tokens that are rejected cost real time. Before each step the
schedule picks, for the current number of running rows b, the k in 0..k_max that maximizes
the expected tokens per second of the step,

    E(alpha, k) / (r(k, b) (k c(b) + v(b, k + 1))),    E = (1 - alpha^(k+1)) / (1 - alpha), E(alpha, 0) = 1,

with c(b) the measured draft step and v(b, n) the measured verifier pass over n tokens per
row (interpolated in log b between the measured batch sizes, `load.model.interpolate_log_batch`).
k = 0 is a plain decode step (the verifier alone, one token per row).

The micro-measured surface leaves out what a whole step adds: the host's work per row (trees,
the acceptance walk, bookkeeping), the drafters reading tokens they skipped, and the device
waits between phases. r(k, b) corrects for it from the steps the run has taken: the running
mean of measured over modelled seconds of the recent steps at that k and occupancy bucket
(1, 2-3, 4-7, ...), starting at 1 (the surface) worth one step. An untried (k, bucket) keeps
the surface's optimism, so it is tried once it looks best, and corrected from then on.

alpha is a running estimate: the maximum-likelihood alpha of the iid model from the steps
seen so far, accepted drafts / (accepted drafts + steps that ended on a rejection), started
from a prior worth a few steps.
"""

from __future__ import annotations

from specbench.engine.costs import StepCosts
from specbench.load.model import interpolate_log_batch, tokens_per_step

RATIO_WINDOW = 32  # steps: the correction r(k, b) follows the recent steps (a running mean over at most this many)


class LoadAwareK:
    """Chooses every running row's k for each step from the occupancy: a `KSchedule` whose `next` only observes,
    and a `StepPolicy`."""

    def __init__(self, costs: StepCosts, k_max: int, prior_alpha: float = 0.5, prior_steps: float = 4.0) -> None:
        sizes = [size for size, curve in costs.verify_s.items() if all(n in curve for n in range(1, k_max + 2))]
        if not sizes:
            raise ValueError(f"k_schedule=load needs verifier passes over 1..{k_max + 1} tokens at some batch size")
        self.k_max = k_max
        self._verify = {n: {size: costs.verify_s[size][n] for size in sizes} for n in range(1, k_max + 2)}
        self._draft = {size: sum(costs.draft_s[size].values()) for size in sizes if size in costs.draft_s}
        # prior pseudo-counts: `prior_steps` steps of the iid model at `prior_alpha`
        self._accepted = prior_alpha * prior_steps / (1 - prior_alpha) if prior_alpha < 1 else prior_steps
        self._rejections = prior_steps
        self._ratio: dict[tuple[int, int], tuple[float, int]] = {}  # (k, bucket) -> (mean measured/modelled, steps)

    @property
    def first(self) -> int:
        return self.k_max

    @property
    def max_k(self) -> int:
        return self.k_max

    @property
    def alpha(self) -> float:
        """The running per-token acceptance estimate."""
        return self._accepted / (self._accepted + self._rejections)

    def next(self, k: int, accepted: int, offered: int) -> int:
        """Observe one row's step (k is chosen per step by `k_for_step`, not per row)."""
        if offered:
            self._accepted += accepted
            self._rejections += accepted < offered
        return k

    def k_for_step(self, occupancy: int) -> int:
        """The k that maximizes expected tokens per second at `occupancy` running rows."""
        rates = {k: self.expected_tokens_per_s(k, occupancy) for k in range(self.k_max + 1)}
        return max(rates, key=rates.get)

    def observe_step(self, k: int, occupancy: int, seconds: float) -> None:
        """Correct the surface at (k, the occupancy's bucket) by what a step there took."""
        key = (k, _bucket(occupancy))
        mean, steps = self._ratio.get(key, (1.0, 1))
        steps = min(steps + 1, RATIO_WINDOW)
        self._ratio[key] = (mean + (seconds / self.modelled_step_s(k, occupancy) - mean) / steps, steps)

    def correction(self, k: int, occupancy: int) -> float:
        """r(k, b): measured over modelled step time at (k, the occupancy's bucket), 1 before any step there."""
        return self._ratio.get((k, _bucket(occupancy)), (1.0, 1))[0]

    def modelled_step_s(self, k: int, occupancy: int) -> float:
        """Seconds of a step at `k` with `occupancy` rows, from the measured surface alone."""
        verify = interpolate_log_batch(self._verify[k + 1], occupancy)
        draft = interpolate_log_batch(self._draft, occupancy) if k else 0.0
        return k * draft + verify

    def expected_tokens_per_s(self, k: int, occupancy: int) -> float:
        """Expected tokens per second of a step at `k` with `occupancy` rows, per row (the model above)."""
        step_s = self.correction(k, occupancy) * self.modelled_step_s(k, occupancy)
        return tokens_per_step(self.alpha, k) / step_s


def _bucket(occupancy: int) -> int:
    """The occupancy's power-of-two bucket: 1 -> 0, 2-3 -> 1, 4-7 -> 2, ..."""
    return max(occupancy, 1).bit_length() - 1
