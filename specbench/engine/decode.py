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

Rows are independent: each has its own seeded choosers, drawn from in the same
order as when the row is decoded alone, its own k, and its own stop. A finished
row stays in the batch as padding until the last row finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from specbench.engine.cached_model import PAD_TOKEN, CachedModel
from specbench.engine.drafters import Drafter, ModelDrafter, Proposal
from specbench.engine.results import BatchResult, DecodeResult, DrafterStats
from specbench.engine.sampling import DecodeSettings, TokenChooser
from specbench.engine.schedule import KSchedule
from specbench.engine.timing import Stopwatch
from specbench.engine.tree import DraftTree, build_tree, walk_greedy, walk_sampling

Outcome = tuple[list[int], int]  # a row's accepted tree nodes, and the verifier's own next token


@dataclass
class _Row:
    """One prompt's decoding state."""

    tokens: list[int]  # the prompt, then every committed output token
    result: DecodeResult
    chooser: TokenChooser
    draft_choosers: list[TokenChooser]  # one per drafter: independent draws, whatever order threads run in
    k: int = 0
    finished: bool = False

    def emit(self, new_tokens: list[int], settings: DecodeSettings) -> int:
        """Append `new_tokens` up to the first stop (EOS, length limit); return how many were appended."""
        for count, token in enumerate(new_tokens, start=1):
            self.tokens.append(token)
            self.result.tokens.append(token)
            if token in settings.eos_token_ids or len(self.result.tokens) >= settings.max_new_tokens:
                self.finished = True
                return count
        return len(new_tokens)


def decode_baseline(
    verifier: CachedModel,
    prompts: Sequence[list[int]],
    settings: DecodeSettings,
    seeds: Sequence[int],
    read_ahead: bool | None = None,
) -> BatchResult:
    """Verifier-only decoding with a KV cache: one token per row per forward pass, as `generate()` does.

    With `read_ahead` (the default on a GPU), each forward is queued before the tokens of the one
    before are read back, so the host's work on a step (mask, copies, reading tokens) overlaps the
    GPU's work on the previous one. The queued forward feeds every row the length limit does not
    stop; a row whose token turns out to be a stop token is rolled back, and a decode that ends on a
    stop token computes one step it throws away (counted in `wall_s`). Outputs are the same.
    """
    _check_masks(verifier, [], len(prompts))
    rows = _start_rows(prompts, settings, seeds, [], None)
    if read_ahead is None:
        read_ahead = verifier.device.type == "cuda"
    watch = Stopwatch(verifier.devices)
    tokens = _prefill(verifier, rows, settings, watch)
    fed = [not row.finished for row in rows]
    logits = verifier.forward(tokens[:, None], fed)[:, -1] if any(fed) else None
    wasted_step = False
    while logits is not None:
        tokens = _choose(rows, logits)
        read_tokens = _start_reading(tokens)
        logits = None
        if read_ahead:
            limit = settings.max_new_tokens
            ahead = [feeds and len(row.result.tokens) + 1 < limit for feeds, row in zip(fed, rows, strict=True)]
            if any(ahead):
                logits = verifier.forward(tokens[:, None], ahead)[:, -1]
        finishing = []
        for row, token, feeds in zip(rows, read_tokens(), fed, strict=True):
            if feeds:
                row.result.verifier_calls += 1
                row.emit([token], settings)
                if row.finished:
                    finishing.append(row)
        if finishing:  # a clock reading only when a row ends; the queued step is not this step's time
            _record_latency(finishing, watch, watch.elapsed(wait=not read_ahead))
        if read_ahead:
            stopped = [feeds and row.finished for feeds, row in zip(ahead, rows, strict=True)]  # fed one token too many
            if any(stopped):
                verifier.truncate([length - stop for length, stop in zip(verifier.lengths, stopped, strict=True)])
            fed = [feeds and not row.finished for feeds, row in zip(ahead, rows, strict=True)]
            if logits is not None and not any(fed):
                logits, wasted_step = None, True
        else:
            fed = [not row.finished for row in rows]
            logits = verifier.forward(tokens[:, None], fed)[:, -1] if any(fed) else None
    return _batch_result(rows, verifier, watch.elapsed() if wasted_step else None)


def decode_speculative(
    verifier: CachedModel,
    drafters: list[Drafter],
    prompts: Sequence[list[int]],
    settings: DecodeSettings,
    schedule: KSchedule,
    seeds: Sequence[int],
    pool: ThreadPoolExecutor | None = None,
) -> BatchResult:
    """Speculative decoding with one or several drafters; lossless for greedy and sampled decoding.

    With a thread `pool`, the drafters propose concurrently (each row draws from one seeded
    generator per drafter either way, so a seed gives the same output with or without the pool).
    """
    _check_masks(verifier, drafters, len(prompts))
    rows = _start_rows(prompts, settings, seeds, drafters, schedule)
    watch = Stopwatch(verifier.devices)
    for drafter in drafters:
        drafter.reset(len(rows))
    _prefill(verifier, rows, settings, watch)
    _prefill_drafters(drafters, rows, watch)
    while not all(row.finished for row in rows):
        depths = [_draft_depth(row, settings) for row in rows]
        proposals = _draft(drafters, rows, depths, pool, watch)
        trees = [
            None if row.finished else build_tree(row.tokens[-1], [proposal.tokens for proposal in row_proposals])
            for row, row_proposals in zip(rows, proposals, strict=True)
        ]
        logits = _verify(verifier, trees)
        outcomes = _accept(rows, trees, logits, proposals, settings)
        emitted = _commit(verifier, rows, trees, outcomes, settings)
        _end_step(rows, trees, outcomes, emitted, depths, schedule, watch)
    return _batch_result(rows, verifier)


def _check_masks(verifier: CachedModel, drafters: list[Drafter], batch_size: int) -> None:
    """Refuse what a model's own causal mask must do (see `attention.needs_plain_causal_mask`)."""
    if len(drafters) > 1 and verifier.plain_mask_only:
        raise ValueError(
            f"the verifier ({verifier.model.config.model_type}) cannot verify token trees under its windowed "
            "attention: use one drafter."
        )
    models = [verifier, *(drafter.model for drafter in drafters if isinstance(drafter, ModelDrafter))]
    if batch_size > 1 and any(model.plain_mask_only for model in models):
        raise ValueError("a model with windowed attention cannot decode ragged batches: use batch_size=1.")


def _start_rows(
    prompts: Sequence[list[int]],
    settings: DecodeSettings,
    seeds: Sequence[int],
    drafters: list[Drafter],
    schedule: KSchedule | None,
) -> list[_Row]:
    """Fresh state for each prompt, seeded with its own seed."""
    if not prompts or len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
    names = [drafter.name for drafter in drafters]
    if len(set(names)) != len(names):
        raise ValueError(f"drafter names must be distinct: {names}")
    max_k = schedule.max_k if schedule else 0
    rows = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        result = DecodeResult(
            tokens=[],
            latency_s=0.0,
            ttft_s=0.0,
            proposed_by_position=[0] * max_k,
            accepted_by_position=[0] * max_k,
            drafters={name: DrafterStats() for name in names},
        )
        draft_choosers = [TokenChooser(settings, seed * 1_000_003 + index + 1) for index in range(len(names))]
        k = schedule.first if schedule else 0
        rows.append(_Row(list(prompt), result, TokenChooser(settings, seed), draft_choosers, k))
    return rows


def _draft_depth(row: _Row, settings: DecodeSettings) -> int:
    """Tokens the row drafts this step: its k, cut so that the step cannot pass the length limit; 0 when finished."""
    return 0 if row.finished else min(row.k, settings.max_new_tokens - len(row.result.tokens) - 1)


def _choose(rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
    """One token per row from its logits [rows, vocab] (a placeholder for finished rows), on the device."""
    if not rows[0].chooser.do_sample:
        return logits.argmax(dim=-1)
    probs = rows[0].chooser.distribution(logits)  # the warping is the same for every row
    draws = [
        row.chooser.sample(probs[index : index + 1]) if not row.finished else probs.new_zeros(1, dtype=torch.long)
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


def _prefill(verifier: CachedModel, rows: list[_Row], settings: DecodeSettings, watch: Stopwatch) -> torch.Tensor:
    """Feed the prompts to the verifier and emit each row's first token; return those tokens (on the device)."""
    tokens = _choose(rows, verifier.prefill([row.tokens for row in rows])[:, -1])
    for row, token in zip(rows, tokens.tolist(), strict=True):
        row.emit([token], settings)
        row.result.verifier_calls = 1
    ttft = watch.elapsed()
    for row in rows:
        row.result.ttft_s = ttft
    _record_latency([row for row in rows if row.finished], watch, ttft)
    return tokens


def _prefill_drafters(drafters: list[Drafter], rows: list[_Row], watch: Stopwatch) -> None:
    """Each drafter reads the unfinished rows' prompts and first tokens; time each drafter."""
    if all(row.finished for row in rows):
        return
    contexts = [[] if row.finished else row.tokens for row in rows]
    watch.mark()
    for drafter in drafters:
        drafter.prefill(contexts)
        seconds = watch.lap()
        for row in rows:
            if not row.finished:
                row.result.drafters[drafter.name].prefill_s = seconds


def _draft(
    drafters: list[Drafter],
    rows: list[_Row],
    depths: list[int],
    pool: ThreadPoolExecutor | None,
    watch: Stopwatch,
) -> list[list[Proposal]]:
    """Every drafter's proposal for every row, as [row][drafter] (in parallel threads with a pool)."""
    watch.mark()
    contexts = [row.tokens for row in rows]

    def propose(index: int) -> tuple[list[Proposal], float]:
        if max(depths) == 0:
            return [Proposal([]) for _ in rows], 0.0
        begin = watch.clock.now()
        proposals = drafters[index].propose(contexts, depths, [row.draft_choosers[index] for row in rows])
        return proposals, watch.clock.now() - begin

    indices = range(len(drafters))
    drafted = list(pool.map(propose, indices)) if pool else [propose(index) for index in indices]
    phase_s = watch.lap()  # wall time: drafters in a pool overlap
    for row in rows:
        if not row.finished:
            row.result.draft_time_s += phase_s
            for drafter, (_, seconds) in zip(drafters, drafted, strict=True):
                row.result.drafters[drafter.name].draft_time_s += seconds
    return [[proposals[index] for proposals, _ in drafted] for index in range(len(rows))]


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
    rows: list[_Row],
    trees: list[DraftTree | None],
    logits: torch.Tensor,
    proposals: list[list[Proposal]],
    settings: DecodeSettings,
) -> list[Outcome | None]:
    """Each unfinished row's accepted path and next token: greedy walk, or multi-step speculative sampling."""
    if not settings.do_sample:
        verifier_tokens = logits.argmax(dim=-1).tolist()
        return [
            walk_greedy(tree, tokens) if tree else None for tree, tokens in zip(trees, verifier_tokens, strict=True)
        ]
    probs = rows[0].chooser.distribution(logits.flatten(0, 1)).view(logits.shape)
    outcomes: list[Outcome | None] = []
    for index, (row, tree) in enumerate(zip(rows, trees, strict=True)):
        if tree is None:
            outcomes.append(None)
            continue
        draft_probs = [p.probs.to(logits.device) if p.probs is not None else None for p in proposals[index]]
        outcomes.append(walk_sampling(tree, probs[index], draft_probs, row.chooser))
    return outcomes


def _commit(
    verifier: CachedModel,
    rows: list[_Row],
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
    rows: list[_Row],
    trees: list[DraftTree | None],
    outcomes: list[Outcome | None],
    emitted: list[int],
    depths: list[int],
    schedule: KSchedule,
    watch: Stopwatch,
) -> None:
    """Close the verify phase's timing, count the step for each row that took part, and set its next k."""
    verify_s = watch.lap()
    finishing = []
    for row, tree, outcome, count, depth in zip(rows, trees, outcomes, emitted, depths, strict=True):
        if tree is None:
            continue
        path = outcome[0]
        row.result.verify_time_s += verify_s
        offered = _count_step(row.result, tree, path[:count], row.k, depth)
        row.k = schedule.next(row.k, len(path), offered)
        if row.finished:
            finishing.append(row)
    _record_latency(finishing, watch)


def _count_step(result: DecodeResult, tree: DraftTree, emitted_path: list[int], k: int, depth: int) -> int:
    """Add one step to a row's counts, counting only the draft tokens it emitted; return the longest proposal."""
    offered = max((len(branch) for branch in tree.branches), default=0)
    result.verifier_calls += 1
    result.steps += 1
    result.k_per_step.append(k)
    result.depth_per_step.append(depth)
    result.offered_per_step.append(offered)
    result.accepted_per_step.append(len(emitted_path))
    result.proposed += offered
    result.accepted += len(emitted_path)
    for position in range(offered):
        result.proposed_by_position[position] += 1
        result.accepted_by_position[position] += position < len(emitted_path)
    for stats, branch in zip(result.drafters.values(), tree.branches, strict=True):
        shared = 0
        while shared < min(len(branch), len(emitted_path)) and branch[shared] == emitted_path[shared]:
            shared += 1
        stats.proposed += len(branch)
        stats.accepted += shared
        stats.wins += bool(emitted_path) and shared == len(emitted_path)
    return offered


def _record_latency(finishing: list[_Row], watch: Stopwatch, seconds: float | None = None) -> None:
    """The rows that just produced their last token: their latency is the time since the batch's start."""
    if finishing:
        seconds = watch.elapsed() if seconds is None else seconds
        for row in finishing:
            row.result.latency_s = seconds


def _batch_result(rows: list[_Row], verifier: CachedModel, wall_s: float | None = None) -> BatchResult:
    """The rows' results; the batch's wall time is its last row's latency unless given."""
    return BatchResult(
        rows=[row.result for row in rows],
        wall_s=max(row.result.latency_s for row in rows) if wall_s is None else wall_s,
        verifier_positions=verifier.fed_positions,
        padded_positions=verifier.padded_positions,
    )
