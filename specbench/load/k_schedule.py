"""k_schedule=load: the draft length of each step chosen from the batch's state (SmartSpec's idea).

A fixed k hurts at high load: with b rows, a verify pass over k+1 tokens per row stops being
nearly free, and drafted tokens that are rejected cost real time. Before each step the
schedule picks the k in 0..k_max with the fewest expected seconds per output token of each
running row,

    (s + J(s)) / E(alpha, k)  [+ R(u) / T when k > 0 and u > 0],
    s = r(k, b) (k c(b) + v(b, k + 1)),
    E = (1 - alpha^(k+1)) / (1 - alpha), E(alpha, 0) = 1,

with c(b) the measured draft step and v(b, n) the measured verifier pass over n tokens per
row (interpolated in log b between the measured batch sizes, `load.model.interpolate_log_batch`).
k = 0 is a plain decode step (the verifier alone, one token per row).

The micro-measured surface leaves out what a whole step adds: the host's work per row (trees,
the acceptance walk, bookkeeping), the drafters reading the rows that join, and the device
waits between phases. r(k, b) corrects for it from the steps the run has taken: the running
mean of measured over modelled seconds of the recent steps at that k and occupancy bucket
(1, 2-3, 4-7, ...), with the surface as a prior worth one step. A bucket where no step has
drafted at k borrows the nearest bucket's r (what the surface leaves out grows with the rows,
and trying a dear draft length costs a step); a plain step never tried at a bucket keeps the
surface's r = 1, as does a k never run: trying it costs no more than the step.

Rows join between steps: the verifier prefills them while the running rows wait, J(s) seconds
a step of s seconds. Joins arrive at a rate lambda (the run's admitted rows per second), and a
prefill of n rows takes P(n) = a + c n (fitted to the run's joins): J(s) = a (1 - e^(-lambda s))
+ c lambda s, Poisson arrivals in s seconds. On a GPU a prefill of a few rows costs what reading
the weights costs (a dominates): a step that emits more tokens per row pays it once for all of
them, which drafting does. Where a prefill costs its tokens (c dominates, a CPU), J is a share
of s, whatever k, and leaves the choice as it was.

Plain steps are not free for later: the drafters sit them out, and before they can draft again
they must read the u tokens they skipped (every running row's tokens of those steps, and the
rows that joined meanwhile). That reading is a one-off cost, R(u) seconds, which drafting must
earn back over the T tokens the running rows may still emit, so it is spread over them. R is
fitted to the run's own reads (R(u) = a + c u, least squares over the recent reads). Without
this price a per-step choice is myopic: it drafts as soon as a step looks cheaper, pays for
the reading, and the next plain step starts the debt again.

alpha is a running estimate: the maximum-likelihood alpha of the iid model from the steps
seen so far, accepted drafts / (accepted drafts + steps that ended on a rejection), started
from a prior worth a few steps.
"""

from __future__ import annotations

import math

from specbench.engine.costs import StepCosts
from specbench.engine.schedule import StepState
from specbench.load.model import interpolate_log_batch, tokens_per_step

RATIO_WINDOW = 32  # steps (or reads, joins): the corrections follow the recent ones, about this many


class RecentLine:
    """y = a + c x by least squares over the recent observations (each older one weighs 1 - 1/RATIO_WINDOW less),
    for costs that grow with a size: a from the observations alone is not trusted below 0."""

    def __init__(self) -> None:
        self._sums = [0.0] * 5  # weighted sums: weight, x, y, x^2, x y

    def observe(self, x: float, y: float) -> None:
        """Add one observation; the older ones fade."""
        decay = 1 - 1 / RATIO_WINDOW
        weight, total, spent, squares, products = (value * decay for value in self._sums)
        self._sums = [weight + 1, total + x, spent + y, squares + x**2, products + x * y]

    def predict(self, x: float) -> float:
        """The expected y at x (0 before any observation; proportional to x while all were at one size)."""
        weight, total, spent, squares, products = self._sums
        if weight == 0:
            return 0.0
        spread = squares * weight - total**2
        if spread > 1e-9 * squares * weight:  # observations of different sizes: a + c x
            slope = (products * weight - total * spent) / spread
            intercept = (spent - slope * total) / weight
            if slope < 0:  # bigger was not dearer: the mean
                return spent / weight
            if intercept < 0:  # through the origin
                return products / squares * x
            return intercept + slope * x
        return spent / total * x if total else spent / weight


class LoadAwareK:
    """Chooses every running row's k for each step from the batch's state: a `KSchedule` whose `next` only
    observes, and a `StepPolicy`."""

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
        self._reads = RecentLine()  # R(u): seconds to read u skipped tokens
        self._joins = RecentLine()  # P(n): seconds to prefill n joining rows
        self._admitted = [0.0, 0.0]  # recent rows joined and seconds elapsed (steps and joins), fading as _ratio
        self._since_step = [0, 0.0]  # rows joined and their prefill seconds since the last step
        self._modelled: dict[tuple[int, int], float] = {}  # (k, occupancy) -> modelled step seconds

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

    def k_for_step(self, state: StepState) -> int:
        """The k with the fewest expected seconds per output token (the model above)."""
        costs = {k: self.seconds_per_token(k, state) for k in range(self.k_max + 1)}
        return min(costs, key=costs.get)

    def seconds_per_token(self, k: int, state: StepState) -> float:
        """Expected seconds per output token of each running row at `k`: a corrected step over its expected tokens,
        plus, to draft, the reading of what the drafters skipped, spread over the rows' remaining tokens."""
        step_s = self.correction(k, state.occupancy) * self.modelled_step_s(k, state.occupancy)
        seconds = (step_s + self.join_s(step_s)) / tokens_per_step(self.alpha, k)
        if k and state.unread_tokens:
            seconds += self.read_s(state.unread_tokens) / max(state.remaining_tokens, 1.0)
        return seconds

    def observe_step(self, k: int, occupancy: int, seconds: float) -> None:
        """Correct the surface at (k, the occupancy's bucket) by what a step there took."""
        key = (k, _bucket(occupancy))
        mean, steps = self._ratio.get(key, (1.0, 1))  # the surface, worth one step: one slow step cannot condemn k
        steps = min(steps + 1, RATIO_WINDOW)
        self._ratio[key] = (mean + (seconds / self.modelled_step_s(k, occupancy) - mean) / steps, steps)
        decay = 1 - 1 / RATIO_WINDOW
        rows, elapsed = self._since_step
        self._admitted = [self._admitted[0] * decay + rows, self._admitted[1] * decay + elapsed + seconds]
        self._since_step = [0, 0.0]

    def observe_read(self, tokens: int, seconds: float) -> None:
        """Fit R(u) to what the drafters took to read `tokens` skipped tokens."""
        self._reads.observe(tokens, seconds)

    def observe_join(self, rows: int, seconds: float) -> None:
        """Fit P(n) to what the verifier took to prefill `rows` joining rows, and count them towards lambda."""
        self._joins.observe(rows, seconds)
        self._since_step = [self._since_step[0] + rows, self._since_step[1] + seconds]

    def read_s(self, tokens: int) -> float:
        """R(u): the expected seconds for the drafters to read `tokens` skipped tokens (0 before any read)."""
        return self._reads.predict(tokens)

    def join_s(self, step_s: float) -> float:
        """J(s): the expected seconds of prefilling the rows that join during a step of `step_s` seconds."""
        rows, elapsed = self._admitted
        expected = rows / elapsed * step_s if elapsed else 0.0  # joining rows, Poisson in the step
        if expected <= 0:
            return 0.0
        some = -math.expm1(-expected)  # the chance that any row joins
        return some * self._joins.predict(expected / some)  # a prefill of the rows that joined, given any did

    def correction(self, k: int, occupancy: int) -> float:
        """r(k, b): measured over modelled step time at (k, the occupancy's bucket); where none ran, a drafting k
        borrows the nearest bucket's, and a plain step, or a k never run, keeps the surface (r = 1)."""
        bucket = _bucket(occupancy)
        tried = [other for step_k, other in self._ratio if step_k == k]
        if (k, bucket) not in self._ratio and (k == 0 or not tried):
            return 1.0
        nearest = min(tried, key=lambda other: (abs(other - bucket), other))
        return self._ratio[(k, nearest)][0]

    def modelled_step_s(self, k: int, occupancy: int) -> float:
        """Seconds of a step at `k` with `occupancy` rows, from the measured surface alone."""
        if (k, occupancy) not in self._modelled:  # asked before every step: worked out once
            verify = interpolate_log_batch(self._verify[k + 1], occupancy)
            draft = interpolate_log_batch(self._draft, occupancy) if k else 0.0
            self._modelled[(k, occupancy)] = k * draft + verify
        return self._modelled[(k, occupancy)]


def _bucket(occupancy: int) -> int:
    """The occupancy's power-of-two bucket: 1 -> 0, 2-3 -> 1, 4-7 -> 2, ..."""
    return max(occupancy, 1).bit_length() - 1
