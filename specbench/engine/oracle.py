"""A synthetic draft of chosen acceptance, for machines where no trained draft reaches the verifier.

With random weights (the GPU benchmarks here), a real draft is never accepted, so the point where speculation
stops paying cannot be shown. The oracle draft proposes, for each token, the verifier's own greedy
continuation (from a reference decode of the same prompt) with independent probability `acceptance`,
and otherwise a token that differs from it. Its cost is real: every proposal runs the forward passes of a
cost model (e.g. distilgpt2) at the same batch shape, and discards that model's tokens.

Greedy only (sampled verification needs the draft's distribution). The verifier still decides, so outputs
stay lossless. Once a row's output parts from the reference (in bfloat16 a near-tie can flip), the reference
is no longer the verifier's continuation: such steps are counted (`off_path_steps`) and propose tokens
drawn at random.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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

    def set_references(self, references: Mapping[tuple[int, ...], list[int]]) -> None:
        """The verifier's greedy output for each prompt (the continuation proposals are drawn from)."""
        self.references = dict(references)
        self._prompt_lengths = sorted({len(prompt) for prompt in self.references}, reverse=True)

    def reset(self, batch_size: int) -> None:
        self.cost.reset(batch_size)

    def prefill(self, contexts: Sequence[list[int]]) -> None:
        self.cost.prefill([self._cost_ids(tokens) for tokens in contexts])

    def admit(self, slots: Sequence[int], contexts: Sequence[list[int]], batch_size: int) -> None:
        self.cost.admit(slots, [self._cost_ids(tokens) for tokens in contexts], batch_size)

    def keep_rows(self, order: Sequence[int | None]) -> None:
        self.cost.keep_rows(order)

    def remove_rows(self, slots: Sequence[int]) -> None:
        self.cost.remove_rows(slots)

    def catch_up(self, contexts: Sequence[list[int]]) -> None:
        self.cost.catch_up([self._cost_ids(tokens) for tokens in contexts])

    def propose(
        self, contexts: Sequence[list[int]], depths: Sequence[int], choosers: Sequence[TokenChooser | None]
    ) -> list[Proposal]:
        """Run the cost model's drafting steps, then propose each row's reference tokens, each kept with probability
        `acceptance` (a differing token otherwise); the draws depend only on the row's seed and position."""
        self.cost.propose([self._cost_ids(tokens) for tokens in contexts], depths, choosers)
        proposals = []
        for tokens, depth, chooser in zip(contexts, depths, choosers, strict=True):
            if depth == 0:
                proposals.append(Proposal([]))
                continue
            prompt_length, reference = self._reference(tokens)
            output = tokens[prompt_length:]
            rng = np.random.default_rng([chooser.seed, len(output)])
            if reference is None or output != reference[: len(output)]:
                self.off_path_steps += 1
                proposals.append(Proposal(rng.integers(0, self.vocab_size, depth).tolist()))
                continue
            drafted = []
            for position in range(len(output), len(output) + depth):
                truth = reference[position] if position < len(reference) else int(rng.integers(self.vocab_size))
                other = (truth + 1 + int(rng.integers(self.vocab_size - 1))) % self.vocab_size
                drafted.append(truth if rng.random() < self.acceptance else other)
            proposals.append(Proposal(drafted))
        return proposals

    def _reference(self, tokens: list[int]) -> tuple[int, list[int] | None]:
        """The row's prompt length and reference output (the longest known prompt the row starts with)."""
        for length in self._prompt_lengths:
            reference = self.references.get(tuple(tokens[:length]))
            if reference is not None and len(tokens) > length:
                return length, reference
        return len(tokens), None

    def _cost_ids(self, tokens: list[int]) -> list[int]:
        """Token ids the cost model can embed (its vocabulary may be smaller: its tokens are never used)."""
        rows = self.cost.model.model.get_input_embeddings().weight.shape[0]
        return [token % rows for token in tokens]
