"""Verifier-only decoding (the baseline) and speculative decoding, timed the same way.

Both start the same: the verifier prefills the prompt and chooses the first
token (time to first token). The baseline then feeds one token per verifier
call. Speculative decoding then lets each drafter read the prompt once (its
prefill), and each step:
1. every drafter proposes up to k tokens after the committed ones;
2. the proposals are merged into a tree and the verifier scores all of it in one
   forward pass (a chain needs no special mask);
3. the tree walk keeps the longest prefix the verifier agrees with (greedy) or
   accepts it by speculative sampling, and adds one token of the verifier's own;
4. the verifier cache keeps only the accepted path; each drafter rolls its cache
   back to what it shares with the committed tokens on its next proposal.
Invariant: the verifier cache holds every committed token but the last one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from specbench.engine.cached_model import CachedModel
from specbench.engine.drafters import Drafter, Proposal
from specbench.engine.sampling import DecodeSettings, TokenChooser
from specbench.engine.tree import DraftTree, build_tree, tree_attention_mask, walk_greedy, walk_sampling


class Clock:
    """Wall clock that first waits for queued GPU work, so readings are honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None

    def now(self) -> float:
        """Seconds, after all queued work on the device is done."""
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@dataclass
class DrafterStats:
    """What one drafter did during a decode."""

    proposed: int = 0
    accepted: int = 0
    wins: int = 0  # steps where its proposal covered the whole accepted path (ties count for each)
    draft_time_s: float = 0.0  # proposing, over all steps
    prefill_s: float = 0.0  # reading the prompt once, before the first step


@dataclass
class DecodeResult:
    """Output tokens, timings and (for speculative runs) acceptance counts of one decode."""

    tokens: list[int]
    latency_s: float
    ttft_s: float
    verifier_calls: int = 0
    steps: int = 0  # speculative steps (verifier calls after the prefill)
    proposed: int = 0  # draft positions offered to the verifier (tree depth per step)
    accepted: int = 0  # draft tokens the verifier kept
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    k_per_step: list[int] = field(default_factory=list)  # draft length asked for (the schedule's k)
    offered_per_step: list[int] = field(default_factory=list)  # longest proposal actually made
    accepted_per_step: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0  # wall time of the drafting phases
    verify_time_s: float = 0.0
    drafters: dict[str, DrafterStats] = field(default_factory=dict)

    @property
    def draft_prefill_s(self) -> float:
        """Time the drafters spent reading the prompt."""
        return sum(stats.prefill_s for stats in self.drafters.values())


def _append_until_stop(generated: list[int], new_tokens: list[int], settings: DecodeSettings) -> bool:
    """Append `new_tokens` up to the first stop (EOS, length limit); return True when decoding is over."""
    for token in new_tokens:
        generated.append(token)
        if token in settings.eos_token_ids or len(generated) >= settings.max_new_tokens:
            return True
    return False


def _prefill(verifier: CachedModel, prompt_ids: list[int], chooser: TokenChooser) -> torch.Tensor:
    """Feed the prompt to the verifier and choose the first token (a 1-element tensor)."""
    verifier.reset()
    logits = verifier.forward(torch.tensor(prompt_ids, device=verifier.device))
    return chooser.choose(logits)


def decode_baseline(
    verifier: CachedModel, prompt_ids: list[int], settings: DecodeSettings, seed: int = 0
) -> DecodeResult:
    """Verifier-only decoding with a KV cache: one token per forward pass, as `generate()` does."""
    chooser = TokenChooser(settings, seed)
    clock = Clock(verifier.device)
    start = clock.now()
    token = _prefill(verifier, prompt_ids, chooser)
    generated: list[int] = []
    finished = _append_until_stop(generated, [int(token)], settings)
    ttft = clock.now() - start
    calls = 1
    while not finished:
        token = chooser.choose(verifier.forward(token))
        finished = _append_until_stop(generated, [int(token)], settings)
        calls += 1
    return DecodeResult(tokens=generated, latency_s=clock.now() - start, ttft_s=ttft, verifier_calls=calls)


def _verify(verifier: CachedModel, tree: DraftTree) -> torch.Tensor:
    """One verifier forward over the whole tree; row i holds the logits after node i."""
    ids = torch.tensor(tree.tokens, device=verifier.device)
    if tree.is_chain:
        return verifier.forward(ids, logits_to_keep=tree.size)
    cache_len = verifier.cache_len
    positions = torch.tensor(tree.depths, device=verifier.device)[None] + cache_len
    mask = tree_attention_mask(tree, cache_len, verifier.mask_width(tree.size), verifier.model.dtype, verifier.device)
    return verifier.forward(ids, logits_to_keep=tree.size, position_ids=positions, attention_mask=mask)


def next_k(k: int, accepted: int, offered: int, schedule: str, k_max: int) -> int:
    """Draft length for the next step: fixed, or +2 after a fully accepted block and -1 otherwise.

    A step where nothing was offered (prompt lookup found no match) leaves k as it is.
    """
    if schedule == "constant" or offered == 0:
        return k
    return min(k + 2, k_max) if accepted == offered else max(k - 1, 1)


def decode_speculative(
    verifier: CachedModel,
    drafters: list[Drafter],
    prompt_ids: list[int],
    settings: DecodeSettings,
    k: int,
    seed: int = 0,
    k_schedule: str = "constant",
    k_max: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> DecodeResult:
    """Speculative decoding with one or several drafters; lossless for greedy and sampled decoding.

    With a thread `pool`, the drafters propose concurrently (each draws from its own seeded
    generator either way, so a seed gives the same output with or without the pool).
    """
    k_max = k_max or k
    chooser = TokenChooser(settings, seed)
    # one generator per drafter: independent draft samples, whatever order threads run in
    draft_choosers = [TokenChooser(settings, seed * 1_000_003 + index + 1) for index in range(len(drafters))]
    clock = Clock(verifier.device)
    result = DecodeResult(
        tokens=[],
        latency_s=0.0,
        ttft_s=0.0,
        proposed_by_position=[0] * k_max,
        accepted_by_position=[0] * k_max,
        drafters={drafter.name: DrafterStats() for drafter in drafters},
    )
    start = clock.now()
    for drafter in drafters:
        drafter.reset()
    first = int(_prefill(verifier, prompt_ids, chooser))
    tokens = [*prompt_ids, first]
    finished = _append_until_stop(result.tokens, [first], settings)
    phase_start = clock.now()
    result.ttft_s = phase_start - start
    result.verifier_calls = 1
    for drafter in drafters if not finished else []:
        drafter.prefill(tokens)
        now = clock.now()
        result.drafters[drafter.name].prefill_s = now - phase_start
        phase_start = now
    step_k = k
    while not finished:
        depth = min(step_k, settings.max_new_tokens - len(result.tokens) - 1)
        draft_start = clock.now()
        proposals = _propose_all(drafters, draft_choosers, tokens, depth, clock, pool, result)
        phase_start = clock.now()
        result.draft_time_s += phase_start - draft_start  # wall time: drafters in a pool overlap
        tree = build_tree(tokens[-1], [proposal.tokens for proposal in proposals])
        start_len = verifier.cache_len
        logits = _verify(verifier, tree)
        if settings.do_sample:
            draft_probs = [p.probs.to(verifier.device) if p.probs is not None else None for p in proposals]
            path, next_token = walk_sampling(tree, chooser.distribution(logits), draft_probs, chooser)
        else:
            path, next_token = walk_greedy(tree, logits.argmax(dim=-1).tolist())
        verifier.keep_rows(start_len, [0, *path])
        result.verify_time_s += clock.now() - phase_start
        result.verifier_calls += 1

        new_tokens = [tree.tokens[node] for node in path] + [next_token]
        finished = _append_until_stop(result.tokens, new_tokens, settings)
        tokens.extend(new_tokens)
        offered = _count_step(result, tree, path, depth)
        step_k = next_k(step_k, len(path), offered, k_schedule, k_max)
    result.latency_s = clock.now() - start
    return result


def _propose_all(
    drafters: list[Drafter],
    choosers: list[TokenChooser],
    tokens: list[int],
    depth: int,
    clock: Clock,
    pool: ThreadPoolExecutor | None,
    result: DecodeResult,
) -> list[Proposal]:
    """Every drafter's proposal of `depth` tokens (in parallel threads with a pool); time each drafter."""

    def propose(index: int) -> tuple[Proposal, float]:
        if depth == 0:
            return Proposal([]), 0.0
        begin = clock.now()
        proposal = drafters[index].propose(tokens, depth, choosers[index])
        return proposal, clock.now() - begin

    indices = range(len(drafters))
    drafted = list(pool.map(propose, indices)) if pool else [propose(index) for index in indices]
    for drafter, (_, seconds) in zip(drafters, drafted, strict=True):
        result.drafters[drafter.name].draft_time_s += seconds
    return [proposal for proposal, _ in drafted]


def _count_step(result: DecodeResult, tree: DraftTree, path: list[int], k: int) -> int:
    """Add one step's proposals and acceptances to the result; return the longest proposal."""
    offered = max((len(branch) for branch in tree.branches), default=0)
    result.steps += 1
    result.k_per_step.append(k)
    result.offered_per_step.append(offered)
    result.accepted_per_step.append(len(path))
    result.proposed += offered
    result.accepted += len(path)
    for position in range(offered):
        result.proposed_by_position[position] += 1
        result.accepted_by_position[position] += position < len(path)
    for stats, branch in zip(result.drafters.values(), tree.branches, strict=True):
        shared = 0
        while shared < min(len(branch), len(path)) and branch[shared] == path[shared]:
            shared += 1
        stats.proposed += len(branch)
        stats.accepted += shared
        stats.wins += bool(path) and shared == len(path)
    return offered
