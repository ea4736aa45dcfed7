"""Verifier-only decoding (the baseline) and speculative decoding of a batch of prompts, timed the same way.

Both start the same: the verifier prefills the prompts and chooses each row's
first token (time to first token). The baseline then feeds one token per row per
verifier call. Speculative decoding lets each drafter read the prompts once (its
prefill), then repeats one step until every row has finished:
1. draft: every drafter proposes up to k tokens after each unfinished row's
   committed tokens (each row has its own k, from the schedule);
2. verify: each row's proposals are merged into a token tree, and the verifier
   scores every row's tree in one forward pass (chains need no tree mask);
3. accept: per row, the tree walk keeps the longest prefix the verifier agrees
   with (greedy), or accepts it by speculative sampling, and adds one token of
   the verifier's own;
4. commit: the verifier cache keeps each row's accepted path and nothing else;
   the row emits its new tokens up to its stop. Each drafter rolls its own cache
   back at its next proposal.
Invariant: for each row, the verifier cache holds every committed token but the last one.

Each mode is a decoder object (`BaselineDecoder`, `SpeculativeDecoder`) with two
operations: `admit` prefills new rows into free slots of the batch, `step` advances
every running row by one verifier call. `decode_baseline` and `decode_speculative`
admit all prompts at once and step until they finish (a static batch: a finished
row stays as padding until the last one ends); the continuous-batching scheduler
(`continuous.py`) admits requests as they arrive and frees the slots of finished ones.

Rows are independent: each has its own seeded random streams (`stream_seed`), drawn
from in the same order as when the row is decoded alone, its own k, and its own stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from specbench.engine.cached_model import PAD_TOKEN, CachedModel, to_device
from specbench.engine.drafters import Drafter, Proposal, drafter_models
from specbench.engine.results import BatchResult, DecodeResult, DrafterStats
from specbench.engine.sampling import DecodeSettings, TokenChooser, stream_seed
from specbench.engine.schedule import KSchedule, StepPolicy, StepState
from specbench.engine.timing import Stopwatch, frozen_heap
from specbench.engine.tree import DraftTree, build_tree, walk_greedy, walk_sampling_batch

Outcome = tuple[list[int], int]  # a row's accepted tree nodes, and the verifier's own next token


@dataclass
class StepReport:
    """What one step did: the rows that emitted (with how many tokens each) and what speculation offered."""

    emitted: list[tuple[Row, int]]
    k: int = 0  # the most draft tokens a row was asked for (0: a plain decode step)
    proposed: int = 0  # draft positions offered, all rows together
    accepted: int = 0


@dataclass
class Row:
    """One prompt's decoding state."""

    tokens: list[int]  # the prompt, then every committed output token
    result: DecodeResult
    max_new_tokens: int
    chooser: TokenChooser
    draft_choosers: list[TokenChooser]  # one per drafter: independent draws, whatever order threads run in
    k: int = 0
    finished: bool = False
    logprobs: list[torch.Tensor] = field(default_factory=list)  # the verifier's log-probabilities of its tokens

    def emit(self, new_tokens: list[int], settings: DecodeSettings) -> int:
        """Append `new_tokens` up to the first stop (EOS, length limit); return how many were appended."""
        for count, token in enumerate(new_tokens, start=1):
            self.tokens.append(token)
            self.result.tokens.append(token)
            if token in settings.eos_token_ids or len(self.result.tokens) >= self.max_new_tokens:
                self.finished = True
                return count
        return len(new_tokens)


def new_row(
    prompt: Sequence[int], seed: int, settings: DecodeSettings, drafter_names: Sequence[str], max_k: int, first_k: int,
    max_new_tokens: int | None = None,
) -> Row:  # fmt: skip
    """Fresh state for one prompt: its random streams derive from `seed` (verifier 0, drafter d: d + 1)."""
    result = DecodeResult(
        tokens=[],
        latency_s=0.0,
        ttft_s=0.0,
        proposed_by_position=[0] * max_k,
        accepted_by_position=[0] * max_k,
        drafters={name: DrafterStats() for name in drafter_names},
    )
    draft_choosers = [TokenChooser(settings, stream_seed(seed, index + 1)) for index in range(len(drafter_names))]
    limit = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
    return Row(list(prompt), result, limit, TokenChooser(settings, stream_seed(seed, 0)), draft_choosers, first_k)


class PlainSteps:
    """The verifier's plain decode steps over a batch: one forward, one token for each running row.

    With `read_ahead` (by default on a GPU), a step queues the next step's forward before its own tokens are
    read back, so the host's work on a step (mask, copies, reading tokens, the scheduler's bookkeeping)
    overlaps the GPU's work on the next forward. The queued forward feeds every row the length limit does
    not stop; a row whose token turns out to be a stop token is rolled back. Rows may join, leave and be
    re-formed while a forward is queued (continuous batching): a row that joins after it emits its next
    token one step later, from the forward queued after it joined. Outputs are the same.
    """

    def __init__(
        self, verifier: CachedModel, settings: DecodeSettings, watch: Stopwatch, read_ahead: bool | None = None
    ) -> None:
        self.verifier = verifier
        self.settings = settings
        self.watch = watch
        self.read_ahead = verifier.device.type == "cuda" if read_ahead is None else read_ahead
        self.queued: tuple[torch.Tensor, list[bool]] | None = None  # a forward queued ahead, and the rows it fed

    def keep_rows(self, order: list[int | None]) -> None:
        """Re-index a queued forward after the batch is re-formed (new slot i holds old slot `order[i]`)."""
        if self.queued is not None:
            logits, fed = self.queued
            index = to_device(torch.tensor([0 if slot is None else slot for slot in order]), logits.device)
            self.queued = (logits[index], [slot is not None and fed[slot] for slot in order])

    def step(self, rows: Sequence[Row | None], next_is_plain: Callable[[], bool]) -> list[tuple[Row, int]]:
        """One token for each running row of `rows` (None or finished: not running); return the rows that emitted.

        With read-ahead, `next_is_plain` is asked, once this step's tokens are chosen and before they are read,
        whether the next step is a plain one too; if so, its forward is queued now.
        """
        running = [row is not None and not row.finished for row in rows]
        if self.queued is None:
            fed = running
            logits = self.verifier.forward(self._last_tokens(rows)[:, None], fed)[:, -1]
        else:
            logits, fed = self.queued
            self.queued = None
        feeding = [row if feeds else None for row, feeds in zip(rows, fed, strict=True)]
        tokens = _choose(feeding, logits)
        if fed != running:  # rows that joined after the queued forward keep their first token, to be fed next
            tokens = torch.where(to_device(torch.tensor(fed), tokens.device), tokens, self._last_tokens(rows))
        _collect_logprobs(self.settings, feeding, logits[:, None], tokens[:, None], [int(feeds) for feeds in fed])
        read_tokens = _start_reading(tokens)
        ahead = []
        if self.read_ahead:
            # a row fed now emits one token before the queued forward's; a row that joined after the last one, none
            ahead = [
                runs and len(row.result.tokens) + feeds < row.max_new_tokens
                for row, runs, feeds in zip(rows, running, fed, strict=True)
            ]
            if any(ahead) and next_is_plain():
                self.queued = (self.verifier.forward(tokens[:, None], ahead)[:, -1], ahead)
        emitted, finishing = [], []
        for row, token in zip(feeding, read_tokens(), strict=True):
            if row is not None:
                row.emit([token], self.settings)
                emitted.append((row, 1))
                if row.finished:
                    finishing.append(row)
        # a clock reading only when a row ends; a queued forward is not this step's time
        _record_latency(finishing, self.watch, wait=not self.read_ahead)
        if self.queued is not None:
            stopped = [feeds and row.finished for feeds, row in zip(ahead, rows, strict=True)]  # fed one too many
            if any(stopped):
                lengths = self.verifier.lengths
                self.verifier.truncate([count - stop for count, stop in zip(lengths, stopped, strict=True)])
            still = [feeds and not row.finished for feeds, row in zip(ahead, rows, strict=True)]
            self.queued = (self.queued[0], still) if any(still) else None
        return emitted

    def _last_tokens(self, rows: Sequence[Row | None]) -> torch.Tensor:
        """Each slot's last committed token (a placeholder for an empty slot), on the device without waiting."""
        last = torch.tensor([PAD_TOKEN if row is None else row.tokens[-1] for row in rows])
        return to_device(last, self.verifier.device)


class BaselineDecoder:
    """Verifier-only decoding with a KV cache: one token per running row per forward pass, as `generate()` does.

    With `read_ahead` (by default on a GPU), each forward is queued before the tokens of the one before are read
    back (see `PlainSteps`). A decode that ends on a stop token has queued one step it throws away: the clock
    stops at the last token read, so that step is not counted (the next measurement's clock waits for it).
    """

    def __init__(
        self, verifier: CachedModel, settings: DecodeSettings, watch: Stopwatch, read_ahead: bool | None = None
    ) -> None:
        self.verifier = verifier
        self.settings = settings
        self.watch = watch
        self._plain = PlainSteps(verifier, settings, watch, read_ahead)
        self.read_ahead = self._plain.read_ahead
        self.rows: list[Row | None] = []

    @property
    def running(self) -> list[Row]:
        """Rows that have not finished."""
        return [row for row in self.rows if row is not None and not row.finished]

    def admit(self, rows: list[Row], slots: list[int], batch_size: int | None = None) -> None:
        """Prefill `rows` into `slots` and emit their first tokens (their time to first token).

        Into an empty batch, the verifier starts over with `batch_size` slots (default: just enough).
        """
        fresh = not self.running  # nothing is queued then: the last step's rows all finished
        if fresh:
            self.rows = [None] * (batch_size or max(slots) + 1)
        elif max(slots) >= len(self.rows):
            self.keep_rows([*range(len(self.rows)), *[None] * (max(slots) + 1 - len(self.rows))])
        _place(self.rows, rows, slots)
        if fresh:
            self.verifier.reset(len(self.rows))
        _prefill(self.verifier, rows, slots, self.settings, self.watch)

    def keep_rows(self, order: list[int | None]) -> None:
        """Re-form the batch between steps: new slot i holds old slot `order[i]` (None: an empty slot)."""
        self.verifier.keep_rows(order)
        self.rows = [None if slot is None else self.rows[slot] for slot in order]
        self._plain.keep_rows(order)

    def release(self, slots: list[int]) -> None:
        """Free the slots of finished rows: their cache columns become holes, the slots take new rows."""
        self.verifier.remove_rows(slots)
        for slot in slots:
            self.rows[slot] = None

    def step(self) -> StepReport:
        """One verifier call for every running row, each emitting one token (but a row that joined after the
        queued call, which is fed in the next one)."""
        emitted = self._plain.step(self.rows, lambda: True)
        for row, _ in emitted:
            row.result.verifier_calls += 1
        return StepReport(emitted)


class SpeculativeDecoder:
    """Speculative decoding with one or several drafters; lossless for greedy and sampled decoding.

    With a thread `pool`, the drafters propose concurrently (each row draws from one seeded
    generator per drafter either way, so a seed gives the same output with or without the pool).
    `step_policy`, when given, sets every running row's k at the start of each step from the batch's state
    (a load-aware schedule) and is told what each step took; otherwise each row keeps its own k from
    `schedule`. A step it sets to k = 0 is a plain decode step, the baseline's own (`PlainSteps`): no
    drafting, no tree, no acceptance walk. The drafters sit it out: at the next step that drafts they first
    read, in one forward each, the tokens they skipped and the rows that joined meanwhile. That reading is
    timed apart from the step (`observe_read`): it is a one-off price, the same for every k > 0. With
    `read_ahead` (by default on a GPU, under a step policy), a plain step asks the policy for the next step's
    k before its tokens are read, from the state then (that step keeps it), and queues the next forward if
    that k is 0, as the baseline does; such a step is not timed for the policy (it costs its forward's device
    time, which the surface measured: the host's work overlaps it).
    """

    def __init__(
        self,
        verifier: CachedModel,
        drafters: list[Drafter],
        settings: DecodeSettings,
        schedule: KSchedule,
        watch: Stopwatch,
        pool: ThreadPoolExecutor | None = None,
        step_policy: StepPolicy | None = None,
        read_ahead: bool | None = None,
    ) -> None:
        self.verifier = verifier
        self.drafters = drafters
        self.settings = settings
        self.schedule = schedule
        self.watch = watch
        self.pool = pool
        self.step_policy = step_policy
        self._plain = PlainSteps(verifier, settings, watch, read_ahead)
        self.read_ahead = step_policy is not None and self._plain.read_ahead  # only a step policy takes plain steps
        self.rows: list[Row | None] = []
        self._unread: set[int] = set()  # slots that joined a running batch, not yet read by the drafters
        self._plain_run = 0  # plain steps since the drafters last drafted
        self._next_k: int | None = None  # the next step's k, when a plain step that read ahead chose it
        # what the scheduler saw before this step (`continuous.serve`): seconds since the trace started, and the
        # requests arrived by then; the step policy reads them in its `StepState`
        self.arrivals: tuple[float, int] = (0.0, 0)

    @property
    def running(self) -> list[Row]:
        """Rows that have not finished."""
        return [row for row in self.rows if row is not None and not row.finished]

    def admit(self, rows: list[Row], slots: list[int], batch_size: int | None = None) -> None:
        """Prefill `rows` into `slots` in the verifier (first tokens) and in every drafter.

        Into an empty batch of `batch_size` slots (default: just enough), the verifier and drafters start
        over (`reset`, `prefill`). Into a running one, the verifier admits the rows now and the drafters at
        the next step that drafts: plain steps (k = 0) never pay for them.
        """
        fresh = not self.running
        if fresh:
            self.rows = [None] * (batch_size or max(slots) + 1)
            self._unread, self._plain_run, self._next_k = set(), 0, None
        _place(self.rows, rows, slots)
        if fresh:
            self.verifier.reset(len(self.rows))
        _prefill(self.verifier, rows, slots, self.settings, self.watch)
        live = [slot for row, slot in zip(rows, slots, strict=True) if not row.finished]
        if not live:
            return
        if fresh:
            contexts = [row.tokens if row is not None and not row.finished else [] for row in self.rows]

            def read(drafter: Drafter) -> None:
                drafter.reset(len(self.rows))
                drafter.prefill(contexts)

            seconds = self._read_into_drafters(read, live)
            if self.step_policy is not None:
                self.step_policy.observe_read(sum(len(self.rows[slot].tokens) - 1 for slot in live), seconds)
        else:
            self._unread.update(live)

    def _read_into_drafters(self, read: Callable[[Drafter], None], slots: list[int]) -> float:
        """Run `read` on each drafter in turn, each one's seconds being the drafter prefill of the rows in
        `slots`; return the seconds of all of them."""
        self.watch.mark()
        total = 0.0
        for drafter in self.drafters:
            read(drafter)
            seconds = self.watch.lap()
            total += seconds
            for slot in slots:
                self.rows[slot].result.drafters[drafter.name].prefill_s = seconds
        return total

    def _read_joined(self) -> float:
        """The drafters read the rows that joined since their last proposal (their prompt and first tokens);
        return the seconds it took."""
        slots = sorted(slot for slot in self._unread if self.rows[slot] is not None)
        self._unread = set()
        if not slots:
            return 0.0
        contexts = [self.rows[slot].tokens for slot in slots]
        return self._read_into_drafters(lambda drafter: drafter.admit(slots, contexts, len(self.rows)), slots)

    def _state(self, rows: list[Row | None], occupancy: int) -> StepState:
        """What the step policy sees: the occupancy, what the drafters have not read, the rows' remaining tokens and
        output limits (their mean and spread), and the arrivals the scheduler counted."""
        running = [row for row in rows if row is not None]
        remaining = sum(row.max_new_tokens - len(row.result.tokens) for row in running)
        limits = [row.max_new_tokens for row in running]
        per_row = max(occupancy, 1)
        mean_limit = sum(limits) / per_row
        # by hand: `statistics.pstdev` is exact, in fractions, and this runs before every step
        limits_std = (sum((limit - mean_limit) ** 2 for limit in limits) / per_row) ** 0.5
        unread = self._unread_tokens(rows, occupancy)
        return StepState(occupancy, unread, remaining / per_row, mean_limit, *self.arrivals, limits_std)

    def _unread_tokens(self, rows: list[Row | None], occupancy: int) -> int:
        """Tokens the drafters must read before they draft: the joined rows', and the plain steps' of the others."""
        joined = [rows[slot] for slot in self._unread if rows[slot] is not None]
        # every other running row has run since the drafters last drafted: one token a plain step
        return sum(len(row.tokens) - 1 for row in joined) + self._plain_run * (occupancy - len(joined))

    def _catch_up(self, rows: list[Row | None]) -> float:
        """The drafters read the tokens of the plain steps they sat out (not the joined rows': `_read_joined`);
        return the seconds it took."""
        self.watch.mark()
        rows = [None if slot in self._unread else row for slot, row in enumerate(rows)]
        contexts = [row.tokens if row is not None else [] for row in rows]
        total = 0.0
        for drafter in self.drafters:
            drafter.catch_up(contexts)
            seconds = self.watch.lap()
            total += seconds
            for row in rows:
                if row is not None:
                    row.result.drafters[drafter.name].draft_time_s += seconds
        for row in rows:
            if row is not None:
                row.result.draft_time_s += total
        return total

    def keep_rows(self, order: list[int | None]) -> None:
        """Re-form the batch between steps: new slot i holds old slot `order[i]` (None: an empty slot)."""
        self.verifier.keep_rows(order)
        for drafter in self.drafters:
            drafter.keep_rows(order)
        self.rows = [None if slot is None else self.rows[slot] for slot in order]
        self._plain.keep_rows(order)
        self._unread = {new for new, old in enumerate(order) if old is not None and old in self._unread}

    def release(self, slots: list[int]) -> None:
        """Free the slots of finished rows in the verifier and every drafter."""
        self.verifier.remove_rows(slots)
        for drafter in self.drafters:
            drafter.remove_rows(slots)
        for slot in slots:
            self.rows[slot] = None
        self._unread -= set(slots)

    def step(self) -> StepReport:
        """Draft, verify, accept and commit once for every running row."""
        rows = [row if row is not None and not row.finished else None for row in self.rows]
        occupancy = sum(row is not None for row in rows)
        behind = self._plain_run > 0  # the drafters sat out the last steps
        if self.step_policy is not None:
            # chosen before the last step's tokens were read, when that step read ahead (a forward queued if 0)
            k, self._next_k = self._next_k, None
            if k is None:
                k = self.step_policy.k_for_step(self._state(rows, occupancy))
            for row in rows:
                if row is not None:
                    row.k = k
            if k == 0:
                self._plain_run += 1
                return self._plain_step(rows, occupancy)
        depths = [_draft_depth(row) for row in rows]
        unread = self._unread_tokens(rows, occupancy) if self.step_policy is not None else 0  # before the reading
        # the running rows catch up before the joined rows are read: a catch-up forward adds its widest feed to
        # every row's columns, which a joined row's many tokens would push past a static cache
        read_s = (self._catch_up(rows) if behind else 0.0) + self._read_joined()
        proposals, draft_s = _draft(self.drafters, rows, depths, self.pool, self.watch)
        trees = [
            None if row is None else build_tree(row.tokens[-1], [proposal.tokens for proposal in row_proposals])
            for row, row_proposals in zip(rows, proposals, strict=True)
        ]
        logits = _verify(self.verifier, trees)
        outcomes = _accept(rows, trees, logits, proposals, self.settings)
        emitted = _commit(self.verifier, rows, trees, outcomes, self.settings)
        if self.settings.logprobs:
            _collect_step_logprobs(self.settings, rows, logits, outcomes, emitted)
        verify_s = _end_step(rows, trees, outcomes, emitted, depths, self.schedule, self.watch)
        if self.step_policy is not None:
            if unread:  # reading joined rows, or what plain steps skipped, is a one-off price, not this k's
                self.step_policy.observe_read(unread, read_s)
            self.step_policy.observe_step(max(depths), occupancy, draft_s + verify_s)
        self._plain_run = 0
        took_part = [row for row in rows if row is not None]
        return StepReport(
            emitted=[(row, count) for row, count in zip(rows, emitted, strict=True) if row is not None],
            k=max(depths),
            proposed=sum(row.result.offered_per_step[-1] for row in took_part),
            accepted=sum(row.result.accepted_per_step[-1] for row in took_part),
        )

    def _plain_step(self, rows: list[Row | None], occupancy: int) -> StepReport:
        """One verifier call for every running row, each emitting one token: the baseline's step."""

        def next_is_plain() -> bool:
            self._next_k = self.step_policy.k_for_step(self._state(rows, occupancy))
            return self._next_k == 0

        self.watch.mark(wait=not self.read_ahead)
        emitted = self._plain.step(rows, next_is_plain)
        seconds = self.watch.lap(wait=not self.read_ahead)  # read ahead: the host's wait for the tokens
        for row, _ in emitted:
            _record_step(row.result, k=0, depth=0, offered=0, accepted=0)
            row.result.verify_time_s += seconds
        if not self.read_ahead:
            self.step_policy.observe_step(0, occupancy, seconds)
        return StepReport(emitted)


def decode_baseline(
    verifier: CachedModel,
    prompts: Sequence[list[int]],
    settings: DecodeSettings,
    seeds: Sequence[int],
    read_ahead: bool | None = None,
) -> BatchResult:
    """Verifier-only decoding of a static batch; `read_ahead` defaults to on for a GPU (see `BaselineDecoder`)."""
    check_masks(verifier, [], len(prompts))
    rows = _start_rows(prompts, settings, seeds, [], None)
    with frozen_heap():
        decoder = BaselineDecoder(verifier, settings, Stopwatch(verifier.devices), read_ahead)
        decoder.admit(rows, list(range(len(rows))))
        while decoder.running:
            decoder.step()
    return _batch_result(rows, verifier, settings)


def decode_speculative(
    verifier: CachedModel,
    drafters: list[Drafter],
    prompts: Sequence[list[int]],
    settings: DecodeSettings,
    schedule: KSchedule,
    seeds: Sequence[int],
    pool: ThreadPoolExecutor | None = None,
) -> BatchResult:
    """Speculative decoding of a static batch (see `SpeculativeDecoder`)."""
    check_masks(verifier, drafters, len(prompts))
    rows = _start_rows(prompts, settings, seeds, drafters, schedule)
    with frozen_heap():
        decoder = SpeculativeDecoder(verifier, drafters, settings, schedule, Stopwatch(verifier.devices), pool)
        decoder.admit(rows, list(range(len(rows))))
        while decoder.running:
            decoder.step()
    return _batch_result(rows, verifier, settings)


def check_masks(verifier: CachedModel, drafters: list[Drafter], batch_size: int) -> None:
    """Refuse what a model's own causal mask must do (see `attention.needs_plain_causal_mask`)."""
    if len(drafters) > 1 and verifier.plain_mask_only:
        raise ValueError(
            f"the verifier ({verifier.model.config.model_type}) cannot verify token trees under its windowed "
            "attention: use one drafter."
        )
    models = [verifier, *drafter_models(drafters)]
    if batch_size > 1 and any(model.plain_mask_only for model in models):
        raise ValueError("a model with windowed attention cannot decode ragged batches: use batch_size=1.")


def _start_rows(
    prompts: Sequence[list[int]],
    settings: DecodeSettings,
    seeds: Sequence[int],
    drafters: list[Drafter],
    schedule: KSchedule | None,
) -> list[Row]:
    """Fresh state for each prompt, seeded with its own seed."""
    if not prompts or len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
    names = [drafter.name for drafter in drafters]
    if len(set(names)) != len(names):
        raise ValueError(f"drafter names must be distinct: {names}")
    max_k, first_k = (schedule.max_k, schedule.first) if schedule else (0, 0)
    return [new_row(prompt, seed, settings, names, max_k, first_k) for prompt, seed in zip(prompts, seeds, strict=True)]


def _place(slots_rows: list[Row | None], rows: list[Row], slots: list[int]) -> None:
    """Put `rows` into the batch's `slots`, growing it if a slot is past its end."""
    slots_rows.extend([None] * (max(slots) + 1 - len(slots_rows)))
    for row, slot in zip(rows, slots, strict=True):
        slots_rows[slot] = row


def _draft_depth(row: Row | None) -> int:
    """Tokens the row drafts this step: its k, cut so that the step cannot pass the length limit; 0 when finished."""
    return 0 if row is None or row.finished else min(row.k, row.max_new_tokens - len(row.result.tokens) - 1)


def _choose(rows: Sequence[Row | None], logits: torch.Tensor) -> torch.Tensor:
    """One token per row from its logits [rows, vocab] (a placeholder for rows that are None), on the device."""
    live = next((row for row in rows if row is not None), None)
    if live is None or not live.chooser.do_sample:
        return logits.argmax(dim=-1)
    probs = live.chooser.distribution(logits)  # the warping is the same for every row
    draws = [
        row.chooser.sample(probs[index : index + 1]) if row is not None else probs.new_zeros(1, dtype=torch.long)
        for index, row in enumerate(rows)
    ]
    return torch.cat(draws)


def _start_reading(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying `tokens` to the host; the returned function waits for that copy, not for work queued later."""
    if tokens.device.type != "cuda":
        return tokens.tolist
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tokens.device))

    def read() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return read


def _prefill(
    verifier: CachedModel, rows: list[Row], slots: list[int], settings: DecodeSettings, watch: Stopwatch
) -> None:
    """Feed the rows' prompts to the verifier in their slots and emit each row's first token."""
    logits = verifier.admit(slots, [row.tokens for row in rows])[:, -1]
    tokens = _choose(rows, logits)
    _collect_logprobs(settings, rows, logits[:, None], tokens[:, None], [1] * len(rows))
    for row, token in zip(rows, tokens.tolist(), strict=True):
        row.emit([token], settings)
        row.result.verifier_calls = 1
    ttft = watch.elapsed()
    for row in rows:
        row.result.ttft_s = ttft
    _record_latency([row for row in rows if row.finished], watch, ttft)


def _collect_logprobs(
    settings: DecodeSettings,
    rows: Sequence[Row | None],
    logits: torch.Tensor,
    tokens: torch.Tensor,
    counts: Sequence[int],
    nodes: torch.Tensor | None = None,
) -> None:
    """Keep, on the device, the verifier's log-probability of each row's first `counts[r]` emitted tokens.

    `logits` [rows, n, vocab]; `nodes` [rows, >= max count] says which of the n columns predicted each
    token (default: column i the i-th token); `tokens` [rows, >= max count]. Raw logits, unwarped:
    the figure is the verifier's perplexity of the text. Nothing is read back here (no sync).
    """
    if not settings.logprobs or not any(counts):
        return
    width = max(counts)
    if nodes is None:
        nodes = torch.arange(width, device=logits.device).expand(logits.shape[0], width)
    predicting = logits.gather(1, nodes[:, :width, None].expand(-1, -1, logits.shape[-1])).float()
    chosen = predicting.gather(2, tokens[:, :width, None].to(logits.device))[..., 0]
    logprobs = chosen - predicting.logsumexp(dim=-1)
    for index, (row, count) in enumerate(zip(rows, counts, strict=True)):
        if row is not None and count:
            row.logprobs.append(logprobs[index, :count])


def _collect_step_logprobs(
    settings: DecodeSettings,
    rows: Sequence[Row | None],
    logits: torch.Tensor,
    outcomes: Sequence[Outcome | None],
    emitted: Sequence[int],
) -> None:
    """The log-probabilities of a speculative step's emitted tokens: each is predicted at its parent node."""
    width = logits.shape[1]
    nodes, tokens = [], []
    for row, outcome, count in zip(rows, outcomes, emitted, strict=True):
        row_nodes = [0, *outcome[0]][:count] if outcome else []
        row_tokens = row.result.tokens[len(row.result.tokens) - count :] if row is not None and count else []
        nodes.append(row_nodes + [0] * (width - len(row_nodes)))
        tokens.append(row_tokens + [0] * (width - len(row_tokens)))
    device = logits.device
    _collect_logprobs(settings, rows, logits, torch.tensor(tokens, device=device), emitted,
                      torch.tensor(nodes, device=device))  # fmt: skip


def _draft(
    drafters: list[Drafter],
    rows: list[Row | None],
    depths: list[int],
    pool: ThreadPoolExecutor | None,
    watch: Stopwatch,
) -> tuple[list[list[Proposal]], float]:
    """Every drafter's proposal for every row, as [row][drafter] (in parallel threads with a pool), and the
    phase's seconds."""
    watch.mark()
    contexts = [row.tokens if row is not None else [] for row in rows]
    choosers = [[row and row.draft_choosers[index] for row in rows] for index in range(len(drafters))]

    def propose(index: int) -> tuple[list[Proposal], float]:
        if max(depths) == 0:
            return [Proposal([]) for _ in rows], 0.0
        begin = watch.clock.now()
        proposals = drafters[index].propose(contexts, depths, choosers[index])
        return proposals, watch.clock.now() - begin

    indices = range(len(drafters))
    drafted = list(pool.map(propose, indices)) if pool else [propose(index) for index in indices]
    phase_s = watch.lap()  # wall time: drafters in a pool overlap
    for row in rows:
        if row is not None:
            row.result.draft_time_s += phase_s
            for drafter, (_, seconds) in zip(drafters, drafted, strict=True):
                row.result.drafters[drafter.name].draft_time_s += seconds
    return [[proposals[index] for proposals, _ in drafted] for index in range(len(rows))], phase_s


def _verify(verifier: CachedModel, trees: list[DraftTree | None]) -> torch.Tensor:
    """One verifier forward over every row's tree, [rows, nodes, vocab]: row r's node i at [r, i]."""
    sizes = [tree.size if tree else 0 for tree in trees]
    width = max(sizes)
    ids = [
        (tree.tokens if tree else []) + [PAD_TOKEN] * (width - size) for tree, size in zip(trees, sizes, strict=True)
    ]
    parents = None
    if not all(tree is None or tree.is_chain for tree in trees):
        parents = [tree.parents if tree else [] for tree in trees]
    return verifier.forward(torch.tensor(ids, device=verifier.device), sizes, parents, logits_to_keep=width)


def _accept(
    rows: list[Row | None],
    trees: list[DraftTree | None],
    logits: torch.Tensor,
    proposals: list[list[Proposal]],
    settings: DecodeSettings,
) -> list[Outcome | None]:
    """Each running row's accepted path and next token: greedy walk, or multi-step speculative sampling."""
    if not settings.do_sample:
        verifier_tokens = logits.argmax(dim=-1).tolist()
        return [
            walk_greedy(tree, tokens) if tree else None for tree, tokens in zip(trees, verifier_tokens, strict=True)
        ]
    live = next(row for row in rows if row is not None)
    probs = live.chooser.distribution(logits.flatten(0, 1)).view(logits.shape)
    draft_probs = [
        [p.probs.to(logits.device) if p.probs is not None else None for p in row_proposals]
        for row_proposals in proposals
    ]
    choosers = [row.chooser if row is not None else None for row in rows]
    return walk_sampling_batch(trees, probs, draft_probs, choosers)


def _commit(
    verifier: CachedModel,
    rows: list[Row | None],
    trees: list[DraftTree | None],
    outcomes: list[Outcome | None],
    settings: DecodeSettings,
) -> list[int]:
    """Keep each row's root and accepted path in the verifier cache; emit its tokens; return how many each emitted."""
    verifier.commit([[0, *outcome[0]] if outcome else [] for outcome in outcomes])
    emitted = []
    for row, tree, outcome in zip(rows, trees, outcomes, strict=True):
        if tree is None:
            emitted.append(0)
            continue
        path, next_token = outcome
        emitted.append(row.emit([tree.tokens[node] for node in path] + [next_token], settings))
    return emitted


def _end_step(
    rows: list[Row | None],
    trees: list[DraftTree | None],
    outcomes: list[Outcome | None],
    emitted: list[int],
    depths: list[int],
    schedule: KSchedule,
    watch: Stopwatch,
) -> float:
    """Close the verify phase's timing, count the step for each row that took part, and set its next k; return
    the verify phase's seconds."""
    verify_s = watch.lap()
    finishing = []
    for row, tree, outcome, count, depth in zip(rows, trees, outcomes, emitted, depths, strict=True):
        if tree is None:
            continue
        path = outcome[0]
        row.result.verify_time_s += verify_s
        offered = _count_step(row.result, tree, path, count, row.k, depth)
        row.k = schedule.next(row.k, min(len(path), count), offered)
        if row.finished:
            finishing.append(row)
    _record_latency(finishing, watch)
    return verify_s


def _count_step(result: DecodeResult, tree: DraftTree, path: list[int], emitted: int, k: int, depth: int) -> int:
    """Add one step to a row's counts; return the draft positions it offered.

    Every drafted position counts as offered (those after a rejection as rejected), except after a stop
    token inside the accepted drafts: the row ends there whatever the later positions held, so they are
    neither offered nor accepted. `emitted` is the tokens the row emitted this step, at most len(path) + 1.
    """
    longest = max((len(branch) for branch in tree.branches), default=0)
    cut = emitted <= len(path)  # the row stopped on one of the accepted drafts
    offered = emitted if cut else longest
    emitted_path = path[:emitted]
    _record_step(result, k, depth, offered, len(emitted_path))
    for position in range(offered):
        result.proposed_by_position[position] += 1
        result.accepted_by_position[position] += position < len(emitted_path)
    for stats, branch in zip(result.drafters.values(), tree.branches, strict=True):
        shared = 0
        while shared < min(len(branch), len(emitted_path)) and branch[shared] == emitted_path[shared]:
            shared += 1
        stats.proposed += min(len(branch), emitted) if cut else len(branch)
        stats.accepted += shared
        stats.wins += bool(emitted_path) and shared == len(emitted_path)
    return offered


def _record_step(result: DecodeResult, k: int, depth: int, offered: int, accepted: int) -> None:
    """Append one verifier step to a row's per-step counts."""
    result.verifier_calls += 1
    result.steps += 1
    result.k_per_step.append(k)
    result.depth_per_step.append(depth)
    result.offered_per_step.append(offered)
    result.accepted_per_step.append(accepted)
    result.proposed += offered
    result.accepted += accepted


def _record_latency(finishing: list[Row], watch: Stopwatch, seconds: float | None = None, wait: bool = True) -> None:
    """The rows that just produced their last token: their latency is the time since the watch started."""
    if finishing:
        seconds = watch.elapsed(wait) if seconds is None else seconds
        for row in finishing:
            row.result.latency_s = seconds


def finish_logprobs(rows: Sequence[Row]) -> None:
    """Sum each row's collected log-probabilities into its result (reads the device: call after timing)."""
    for row in rows:
        if row.logprobs:
            row.result.logprob = float(torch.cat(row.logprobs).sum())
            row.logprobs = []


def _batch_result(rows: list[Row], verifier: CachedModel, settings: DecodeSettings) -> BatchResult:
    """The rows' results; the batch's wall time is its last row's latency (the last token read)."""
    finish_logprobs(rows)
    return BatchResult(
        rows=[row.result for row in rows],
        wall_s=max(row.result.latency_s for row in rows),
        verifier_positions=verifier.fed_positions,
        padded_positions=verifier.padded_positions,
    )
