"""A synthetic draft of chosen acceptance, for machines where no trained draft reaches the verifier.

With random weights (the GPU benchmarks here), a real draft is never accepted, so the point where speculation
stops paying cannot be shown. The oracle draft proposes, for each token, the verifier's own greedy
continuation (from a reference decode of the same prompt) with independent probability `acceptance`,
and otherwise a token that differs from it. Its cost is real: every proposal runs the forward passes of a
cost model (e.g. distilgpt2) at the same batch shape, and discards that model's tokens. The cost model's cache
is taken to hold the oracle's drafts (`ModelDrafter.take_drafts`), so that each step feeds it what a real
draft of this acceptance would read: one or two tokens a row, not all the accepted ones again. The oracle's
own work is a lookup: each seed's draws are made once, by position.

Greedy only (sampled verification needs the draft's distribution). The verifier still decides, so outputs
stay lossless. Once a row's output parts from the reference (in bfloat16 a near-tie can flip), the reference
is no longer the verifier's continuation: such steps are counted (`off_path_steps`) and propose tokens
drawn at random.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from specbench.engine.drafters import ModelDrafter, Proposal
from specbench.engine.sampling import TokenChooser


class OracleDrafter:
    """Proposes the reference continuation with per-token probability `acceptance`; costs a real model's steps."""

    def __init__(self, name: str, acceptance: float, cost: ModelDrafter, vocab_size: int) -> None:
        if not 0 <= acceptance <= 1:
            raise ValueError(f"acceptance={acceptance} must be within [0, 1]")
        self.name = name
        self.acceptance = acceptance
        self.cost = cost
        self.model = cost.model  # the engine captures and releases its CUDA graphs like any model drafter's
        self.vocab_size = vocab_size
        self.references: dict[tuple[int, ...], list[int]] = {}  # prompt -> the verifier's greedy output
        self._prompt_lengths: list[int] = []
        self.off_path_steps = 0  # row-steps proposed after the row's output parted from its reference
        self._cost_vocab = cost.model.model.get_input_embeddings().weight.shape[0]
        self._drawn: dict[int, _Draws] = {}  # by seed

    def set_references(self, references: Mapping[tuple[int, ...], list[int]]) -> None:
        """The verifier's greedy output for each prompt (the continuation proposals are drawn from)."""
        self.references = dict(references)
        self._prompt_lengths = sorted({len(prompt) for prompt in self.references}, reverse=True)

    def reset(self, batch_size: int) -> None:
        self.cost.reset(batch_size)

    def prefill(self, contexts: Sequence[list[int]]) -> None:
        self.cost.prefill([_CostIds(tokens, self._cost_vocab)[:] for tokens in contexts])

    def admit(self, slots: Sequence[int], contexts: Sequence[list[int]], batch_size: int) -> None:
        self.cost.admit(slots, [_CostIds(tokens, self._cost_vocab) for tokens in contexts], batch_size)

    def keep_rows(self, order: Sequence[int | None]) -> None:
        self.cost.keep_rows(order)

    def remove_rows(self, slots: Sequence[int]) -> None:
        self.cost.remove_rows(slots)

    def catch_up(self, contexts: Sequence[list[int]]) -> None:
        self.cost.catch_up([_CostIds(tokens, self._cost_vocab) for tokens in contexts])

    def propose(
        self, contexts: Sequence[list[int]], depths: Sequence[int], choosers: Sequence[TokenChooser | None]
    ) -> list[Proposal]:
        """Run the cost model's drafting steps, then propose each row's reference tokens, each kept with probability
        `acceptance` (a differing token otherwise); the draws depend only on the row's seed and position."""
        self.cost.propose([_CostIds(tokens, self._cost_vocab) for tokens in contexts], depths, choosers)
        proposals = []
        for tokens, depth, chooser in zip(contexts, depths, choosers, strict=True):
            if depth == 0:
                proposals.append(Proposal([]))
                continue
            prompt_length, reference = self._reference(tokens)
            start = len(tokens) - prompt_length  # the output position of the first drafted token
            draws = self._draws(chooser.seed, start + depth)
            if reference is None or tokens[prompt_length:] != reference[:start]:
                self.off_path_steps += 1
                proposals.append(Proposal(draws.tokens[start : start + depth]))
                continue
            known = reference[start : start + depth]
            truths = known + draws.tokens[start + len(known) : start + depth]
            kept, offsets = draws.kept[start : start + depth], draws.offsets[start : start + depth]
            drafted = [
                truth if keep else (truth + offset) % self.vocab_size
                for truth, keep, offset in zip(truths, kept, offsets, strict=True)
            ]
            proposals.append(Proposal(drafted))
        self.cost.take_drafts([_CostIds(proposal.tokens, self._cost_vocab)[:] for proposal in proposals])
        return proposals

    def _draws(self, seed: int, positions: int) -> _Draws:
        """The seed's draws for at least `positions` output positions (drawn once a seed, longer when needed)."""
        draws = self._drawn.get(seed)
        if draws is None or len(draws.kept) < positions:
            draws = _Draws.make(seed, max(2 * positions, 64), self.acceptance, self.vocab_size)
            self._drawn[seed] = draws
        return draws

    def _reference(self, tokens: list[int]) -> tuple[int, list[int] | None]:
        """The row's prompt length and reference output (the longest known prompt the row starts with)."""
        for length in self._prompt_lengths:
            reference = self.references.get(tuple(tokens[:length]))
            if reference is not None and len(tokens) > length:
                return length, reference
        return len(tokens), None


@dataclass(frozen=True)
class _Draws:
    """One seed's draws by output position: whether the reference token is kept, the offset of the token that
    replaces it, and a random token (past the reference, or off its path). Each kind comes from its own stream,
    so drawing more positions leaves the first ones as they were."""

    kept: list[bool]
    offsets: list[int]  # in 1..vocab-1: the replacement differs from the reference token
    tokens: list[int]

    @staticmethod
    def make(seed: int, positions: int, acceptance: float, vocab_size: int) -> _Draws:
        kept, offsets, tokens = (np.random.default_rng([seed, stream]) for stream in range(3))
        return _Draws(
            (kept.random(positions) < acceptance).tolist(),
            (1 + offsets.integers(vocab_size - 1, size=positions)).tolist(),
            tokens.integers(vocab_size, size=positions).tolist(),
        )


class _CostIds(Sequence[int]):
    """A row's tokens as the cost model embeds them (its vocabulary may be smaller: its tokens are never used),
    mapped as they are read: the cost model reads a few new tokens a step, not the whole row."""

    def __init__(self, tokens: Sequence[int], vocab_size: int) -> None:
        self._tokens, self._vocab_size = tokens, vocab_size

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [token % self._vocab_size for token in self._tokens[index]]
        return self._tokens[index] % self._vocab_size
