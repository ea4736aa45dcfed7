"""k_schedule=load: the draft length of each step chosen from the batch's state (SmartSpec's idea).

A fixed k hurts at high load: with b rows, a verify pass over k+1 tokens per row stops being
nearly free, and drafted tokens that are rejected cost real time. Before each step the
schedule picks the k in 0..k_max with the fewest expected seconds per output token of each
running row,

    r(k, b) (k c(b) + v(b, k + 1)) / E(alpha, k)  [+ R(u) / T when k > 0 and u > 0],
    E = (1 - alpha^(k+1)) / (1 - alpha), E(alpha, 0) = 1 (alpha: the upper end of its interval, below),
    at a full batch E = n / (the steps of its row unlucky at p99) instead (below),

with c(b) the measured draft step and v(b, n) the measured verifier pass over n tokens per
row (interpolated in log b between the measured batch sizes, `load.model.interpolate_log_batch`).
k = 0 is a plain decode step (the verifier alone, one token per row).

The micro-measured surface leaves out what a whole step adds: the host's work per row (trees,
the acceptance walk, bookkeeping), the drafters reading the rows that join, and the device
waits between phases. r(k, b) corrects for it from the steps the run has taken: the median
of measured over modelled seconds of the recent steps at that k and occupancy bucket
(1, 2-3, 4-7, ...), with the surface as a prior worth one step (a median, so that one slow
step, a page fault or a stall, cannot condemn a k). A drafting k not yet run at a bucket
borrows the r of the nearest drafting step that ran: another draft length at the same bucket
first (what the surface leaves out grows with the rows far more than with k), else the nearest
bucket. Taking the surface's r = 1 for it instead would favour every untried k over the tried
ones, and borrowing only the same k's r from another bucket would keep a k priced by, say, the
warm-up's 8 rows at one row, where it may never be tried. A plain step never tried at a bucket
keeps the surface's r = 1: it has no drafting overhead to borrow, and trying it is cheap.

Plain steps are not free for later: the drafters sit them out, and before they can draft again
they must read the u tokens they skipped (every running row's tokens of those steps, and the
rows that joined meanwhile). That reading is a one-off cost, R(u) seconds, which drafting must
earn back over the T tokens the running rows may still emit, so it is spread over them. R is
fitted to the run's own reads (R(u) = a + c u, least squares with older reads weighing less,
`engine.costs.CostLine`). Without this price a per-step choice is myopic: it drafts as soon as a
step looks cheaper, pays for the reading, and the next plain step starts the debt again. Rows
that join right after a drafting step are read the same way, at the next step that drafts, and
priced the same way:
their reading is the same at every k > 0, so it is kept out of r(k, b), where the joins that
happened to fall on a k's steps would make that k look dear for good (it would not be tried again).

alpha is a running estimate: the maximum-likelihood alpha of the iid model from the steps
seen so far, accepted drafts / (accepted drafts + steps that ended on a rejection), started
from a prior worth a few steps. Plain steps teach it nothing, so a prior that favours them
would keep the run from ever drafting: until rows have drafted as many times as the prior is
worth, each step drafts (the best k > 0), whatever the model says, for at most as many steps
(a drafter that offers nothing, such as prompt lookup without a match, teaches alpha nothing either).

For the same reason an estimate that a few unlucky drafts pulled low would stop drafting for good
(on the H200, an 8-row warm-up whose one forced step accepted 4 drafts of 8 left alpha at 0.5 where
the oracle's was 0.8, and the run never drafted again at one row, where k = 4 was 1.8x faster).
So a drafting k is priced at the upper end of alpha's 95% interval (Wilson's, over the drafts seen
and the prior's), as a bandit prices an arm by its upper confidence bound: while the evidence is
thin, drafting is given the benefit of the doubt and is tried, which is what narrows the interval;
once rows have drafted a few hundred tokens the bound is within a few hundredths of the estimate.

At a full batch (every slot taken, so requests wait) a drafting k is priced by the tokens a step
yields the row unlucky at p99, n / S99, with n the tokens the running rows decode (their output
limit on average, less the prefill's first token) and S99 the steps that row needs
(`load.model.quantile_steps`, the exact law of the iid model, as the load model's p99s), not by the
mean. What a load run judges is the p99 TPOT, and there a step's gain on the mean is small while
its tail is not: each row draws its own acceptances, so rows that join together and leave
together under the baseline, one token a step each, end up to a third apart in TPOT under a fixed
k (README, "Load-aware k"). Below a full batch the mean stands: there drafting keeps the queue
short, which the tail price does not see (priced so at every step on the H200, it went plain at
44-56 of 128 rows at 64 requests/s and ran 1.19x the best fixed k).

Where the rows' output limits differ, their departures are scattered already under the baseline, and
a row's luck adds to that scatter instead of making it. Independent spreads add in variance, so the
unlucky row is priced at n / E + hypot(a, b) - b steps: a = S99 - n / E is the luck's share at p99,
and b the limits' own at p99, in steps at k (z99 times their standard deviation, over E, as if
normal). With equal limits b = 0 and this is S99. With limits spread as `vllm bench serve
--random-range-ratio 0.5` spreads them (64 +- 32 tokens), k = 2 at alpha 0.8 is priced 3% over the
mean, not 20%. Priced by S99 there, on the H100 at 256 requests/s, the policy kept to plain steps
while a fixed k = 2 beat the baseline by 3-6% on three traces: the baseline's own p99 TPOT was
1.30-1.36x its mean, and k = 2 added only 1.06-1.08x to that (benchmarks/NOTES.md, session thirty-one).
Priced so, it drafted there and ran 0.98x-1.007x the baseline's p99, against 1.006x-1.029x (session thirty-two).

Where a full or draining batch is judged by its p99 row, a drafting k is also corrected at the upper end of
its r's 95% interval (an order statistic of the recent ratios, as a median's interval is), not at r itself:
there a wrong draft costs every running row's tail, and a wrong plain step a few percent of the mean, so a
choice within the corrections' noise goes plain. With equal limits on the H100 at 256 requests/s, k = 2
priced at 10.7-11.1 ms a token at 128 rows, against a plain step's 10.9: corrected at the median, 2 of 6
instances of the policy drafted there and ran 1.31x the baseline's p99 TPOT; corrected at the upper end,
the one served beside the worse of them went plain at 98% of the steps and ran 1.019x (session thirty-two).
With spread limits at 256 requests/s it went plain at 94-96% of the steps too, and ran 0.95x-1.03x the
baseline; the median's rule, served beside it, drafted on two traces of three and ran 0.94x and 1.08x, and
fixed k = 2 ran 0.98x-1.08x: on that machine drafting at a full batch was a tie there. On another, where
k = 2 ran 0.96x-0.98x, the caution cost 5% against it (1.004x-1.028x the baseline), and the median's rule
ran 1.004x and 1.107x (session thirty-three).

A batch the arrivals will fill is priced as the full batch it will be, at every step while it fills
up: its occupancy is taken to be the slots when the arrival rate over the last request lifetime L
(a row's output at full-batch plain steps) times L, the rows those arrivals keep busy by Little's
law, reaches them (`demand_rows`; no rate from fewer than `RATE_ARRIVALS` arrivals). Priced by its
few rows instead, such a batch drafts while it fills up (cheap at few rows), and each row's luck
moves the step at which it finishes: rows that joined together leave apart, the requests queued
behind them join in many small groups, each a prefill every running row waits for, and the full
batch that follows, plain, pays for them (on the H200 at 256 requests/s, 21 joins past the fill-up
against the baseline's 9, and a p99 TPOT 9-14% over the baseline's). Priced as the full batch, it
keeps the steady state's k from the start: plain where a full batch's price is (a GPU at 128 rows),
drafting where it is not (a CPU at 4).

A batch that only drains, no request having arrived over the last lifetime L (`draining`), is priced by
its p99 row too, whatever its occupancy: no queue is left for drafting to keep short, and the rows still
running are the ones judged. Priced by the mean, a batch that ran plain while full drafted again as soon
as its first row left, with 127 rows, and the rows that finished then set the p99 (on the H200 at 256
requests/s, 1.07x the baseline's p99 TPOT; 11 of its 16 drafting steps, of 126, were the drain's).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import replace
from statistics import NormalDist

from scipy import stats

from specbench.engine.costs import CostLine, StepCosts
from specbench.engine.schedule import StepState
from specbench.intervals import wilson_interval
from specbench.load.metrics import occupancy_bucket_index
from specbench.load.model import TAIL_QUANTILE, interpolate_log_batch, quantile_steps
from specbench.speedup_model import tokens_per_step

RATIO_WINDOW = 32  # the corrections are medians of this many recent steps; a read's weight in R falls by 1/32 a read
RATE_ARRIVALS = 8  # fewer arrivals than this in the window give no rate (its relative error would pass a third)
TAIL_Z = NormalDist().inv_cdf(TAIL_QUANTILE)  # how many standard deviations a normal law's p99 lies above its mean
# UPPER_RANK[n]: the index, in n sorted ratios, of the upper end of their median's 95% interval
UPPER_RANK = [min(int(stats.binom.ppf(0.975, n, 0.5)), n - 1) for n in range(1, RATIO_WINDOW + 1)]


class LoadAwareK:
    """Chooses every running row's k for each step from the batch's state: a `KSchedule` whose `next` only
    observes, and a `StepPolicy`."""

    # a drafting k judged by the batch's p99 row is corrected at the upper end of r's 95% interval, not at r
    cautious_at_tail = True

    def __init__(
        self, costs: StepCosts, k_max: int, slots: int, prior_alpha: float = 0.5, prior_steps: float = 4.0
    ) -> None:
        sizes = [size for size, curve in costs.verify_s.items() if all(n in curve for n in range(1, k_max + 2))]
        if not sizes:
            raise ValueError(f"k_schedule=load needs verifier passes over 1..{k_max + 1} tokens at some batch size")
        self.k_max = k_max
        self.slots = slots  # a batch of this many running rows is full: drafting is priced by its p99 row there
        self._verify = {n: {size: costs.verify_s[size][n] for size in sizes} for n in range(1, k_max + 2)}
        self._draft = {size: sum(costs.draft_s[size].values()) for size in sizes if size in costs.draft_s}
        # prior pseudo-counts: `prior_steps` steps of the iid model at `prior_alpha`
        self._accepted = prior_alpha * prior_steps / (1 - prior_alpha) if prior_alpha < 1 else prior_steps
        self._rejections = prior_steps
        self._prior_steps = prior_steps
        self._drafted_rows = 0  # rows' steps that drafted: the evidence on alpha beyond the prior
        self._forced_steps = 0  # steps that drafted because that evidence was missing
        self._ratios: dict[tuple[int, int], deque[float]] = {}  # (k, bucket) -> recent measured/modelled seconds
        self._ratio: dict[tuple[int, int], float] = {}  # (k, bucket) -> their median, r(k, b)
        self._upper_ratio: dict[tuple[int, int], float] = {}  # (k, bucket) -> the upper end of r's 95% interval
        self._reads = CostLine(RATIO_WINDOW)  # R(u), fitted to the drafters' recent reads
        self._modelled: dict[tuple[int, int], float] = {}  # (k, occupancy) -> modelled step seconds
        self._arrivals: deque[tuple[float, int]] = deque([(0.0, 0)])  # (seconds, arrived) of this trace's steps
        self.demand_rows = 0.0  # the rows the arrivals keep busy, as of the last step (`observe_arrivals`)
        self.draining = False  # no request arrived over the last lifetime, as of the last step (`observe_arrivals`)

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

    @property
    def alpha_bound(self) -> float:
        """The upper end of alpha's 95% interval: what a drafting k is priced at."""
        return wilson_interval(self._accepted, self._accepted + self._rejections)[1]

    @property
    def corrections(self) -> dict[tuple[int, int], float]:
        """r(k, b) where steps ran, by (k, occupancy bucket: 0 for 1 row, 1 for 2-3, 2 for 4-7, ...)."""
        return dict(self._ratio)

    def next(self, k: int, accepted: int, offered: int) -> int:
        """Observe one row's step (k is chosen per step by `k_for_step`, not per row)."""
        if offered:
            self._accepted += accepted
            self._rejections += accepted < offered
            self._drafted_rows += 1
        return k

    def k_for_step(self, state: StepState) -> int:
        """The k with the fewest expected seconds per output token (the model above); a k > 0 until alpha has been
        measured on as many rows' steps as the prior is worth, for at most as many steps."""
        self.observe_arrivals(state)
        if state.occupancy < self.slots <= self.demand_rows:  # priced as the full batch the arrivals will make
            state = replace(state, occupancy=self.slots)
        forced = self._drafted_rows < self._prior_steps and self._forced_steps < self._prior_steps
        self._forced_steps += forced
        costs = {k: self.seconds_per_token(k, state) for k in range(1 if forced else 0, self.k_max + 1)}
        return min(costs, key=costs.get)

    def seconds_per_token(self, k: int, state: StepState) -> float:
        """Expected seconds per output token of each running row at `k`: a corrected step over the tokens it is
        priced to yield (`priced_tokens`), plus, to draft, the reading of what the drafters skipped, spread over
        the rows' remaining tokens."""
        step_s = self.correction(k, state.occupancy) * self.modelled_step_s(k, state.occupancy)
        seconds = step_s / self.priced_tokens(k, state)
        if k and state.unread_tokens:
            seconds += self.read_s(state.unread_tokens) / max(state.remaining_tokens, 1.0)
        return seconds

    def priced_tokens(self, k: int, state: StepState) -> float:
        """Tokens a step at `k` is priced to yield a row, at `alpha_bound`: the mean, or at a full batch or one that
        only drains what it yields the row unlucky at p99 over the rows' decoded tokens, its luck added in variance
        to the scatter of the rows' output limits."""
        if k == 0 or not self.judged_by_tail(state.occupancy):
            return tokens_per_step(self.alpha_bound, k)
        decoded = max(round(state.output_tokens) - 1, 1)  # the first token is the prefill's
        # alpha rounded so that the cached quantile is reused while the bound drifts (a price changed < 0.1%)
        alpha = round(self.alpha_bound, 3)
        mean_tokens = tokens_per_step(alpha, k)
        mean_steps = decoded / mean_tokens
        luck = max(quantile_steps(alpha, k, decoded) - mean_steps, 0.0)  # the unlucky row's steps past the mean
        scatter = TAIL_Z * state.output_tokens_std / mean_tokens  # the limits' scatter at p99, in steps at k
        return decoded / (mean_steps + math.hypot(luck, scatter) - scatter)

    def judged_by_tail(self, occupancy: int) -> bool:
        """Whether a step at `occupancy` is priced by the batch's p99 row: the batch is full, or only drains."""
        return occupancy >= self.slots or self.draining

    def observe_arrivals(self, state: StepState) -> None:
        """Update `demand_rows` by Little's law: the trace's arrival rate over the last request lifetime (a row's
        output at full-batch plain steps) times that lifetime; 0 while fewer than `RATE_ARRIVALS` arrived in it.
        `draining`: none arrived in it, in a served trace (outside one, nothing ever arrives)."""
        plain_step_s = self.correction(0, self.slots) * self.modelled_step_s(0, self.slots)
        lifetime = max(state.output_tokens - 1, 1) * plain_step_s
        history = self._arrivals
        if state.now_s < history[-1][0]:  # the clock went back: another trace
            history.clear()
            history.append((0.0, 0))
        history.append((state.now_s, state.arrived))
        while len(history) > 1 and history[1][0] <= state.now_s - lifetime:  # keep the last one before the window
            history.popleft()
        since_s, arrived_then = history[0]
        arrivals = state.arrived - arrived_then
        enough = arrivals >= RATE_ARRIVALS and state.now_s > since_s
        self.demand_rows = arrivals / (state.now_s - since_s) * lifetime if enough else 0.0
        self.draining = state.arrived > 0 and arrivals == 0

    def observe_step(self, k: int, occupancy: int, seconds: float) -> None:
        """Correct the surface at (k, the occupancy's bucket) by what a step there took."""
        key = (k, occupancy_bucket_index(occupancy))
        ratios = self._ratios.setdefault(key, deque([1.0], maxlen=RATIO_WINDOW))  # the surface, worth one step
        ratios.append(seconds / self.modelled_step_s(k, occupancy))
        ordered = sorted(ratios)
        self._ratio[key] = statistics.median(ordered)
        self._upper_ratio[key] = ordered[UPPER_RANK[len(ordered) - 1]]

    def observe_read(self, tokens: int, seconds: float) -> None:
        """Fit R(u) to what the drafters took to read `tokens` skipped tokens (older reads weigh less)."""
        self._reads.observe(tokens, seconds)

    def read_s(self, tokens: int) -> float:
        """R(u): the expected seconds for the drafters to read `tokens` skipped tokens (0 before any read)."""
        return self._reads.predict(tokens)

    def correction(self, k: int, occupancy: int) -> float:
        """r(k, b): measured over modelled step time at (k, the occupancy's bucket), for a drafting k judged by the
        batch's p99 row the upper end of its 95% interval; where none ran, a drafting k borrows the nearest
        drafting step's (the nearest bucket, then the nearest k), and a plain step, or any k before a drafting
        step ran, keeps the surface (r = 1)."""
        key = self.correction_key(k, occupancy)
        if key is None:
            return 1.0
        cautious = self.cautious_at_tail and k > 0 and self.judged_by_tail(occupancy)
        return self._upper_ratio[key] if cautious else self._ratio[key]

    def correction_key(self, k: int, occupancy: int) -> tuple[int, int] | None:
        """The (k, bucket) whose steps correct k at `occupancy`: its own, else for a drafting k the nearest drafting
        step's (the nearest bucket, then the nearest k); None where the surface stands."""
        bucket = occupancy_bucket_index(occupancy)
        if (k, bucket) in self._ratio:
            return (k, bucket)
        drafted = [key for key in self._ratio if key[0]]
        if k == 0 or not drafted:
            return None
        return min(drafted, key=lambda key: (abs(key[1] - bucket), abs(key[0] - k), key))

    def modelled_step_s(self, k: int, occupancy: int) -> float:
        """Seconds of a step at `k` with `occupancy` rows, from the measured surface alone."""
        if (k, occupancy) not in self._modelled:  # asked before every step: worked out once
            verify = interpolate_log_batch(self._verify[k + 1], occupancy)
            draft = interpolate_log_batch(self._draft, occupancy) if k else 0.0
            self._modelled[(k, occupancy)] = k * draft + verify
        return self._modelled[(k, occupancy)]
