"""Drafters: whatever proposes the next k tokens for the verifier to check.

A drafter sees the committed tokens (prompt + output so far) and returns up to
k proposed tokens, plus, when it sampled them, the distributions it sampled
from (speculative sampling needs q). Two kinds:
- `ModelDrafter`: a small causal LM with its own KV cache, rolled back to the
  longest prefix it shares with the committed tokens before each proposal;
- `PromptLookupDrafter`: no model; copies what followed the latest earlier
  occurrence of the current n-gram (prompt lookup decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specbench.engine.cached_model import CachedModel
from specbench.engine.sampling import TokenChooser


@dataclass
class Proposal:
    """Proposed tokens and, for sampled proposals, the distribution of each ([len(tokens), vocab])."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    """Anything that proposes tokens."""

    name: str

    def reset(self) -> None:
        """Forget the previous prompt."""

    def prefill(self, tokens: list[int]) -> None:
        """Read the prompt (and first token) before the first proposal."""

    def propose(self, tokens: list[int], k: int, chooser: TokenChooser) -> Proposal:
        """Propose at most `k` tokens to follow `tokens`."""


class ModelDrafter:
    """A draft language model with a KV cache that survives across steps."""

    def __init__(self, name: str, model: CachedModel) -> None:
        self.name = name
        self.model = model
        # The cache holds `_committed` committed tokens, then `_drafted`, this drafter's own proposal
        # (all but its last token), which the verifier may or may not have kept.
        self._committed = 0
        self._drafted: list[int] = []

    def reset(self) -> None:
        """Forget the previous prompt."""
        self.model.reset()
        self._committed = 0
        self._drafted = []

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> None:
        """Cache all of `tokens` but the last, so that each proposal starts from a short feed."""
        self.model.forward(torch.tensor(tokens[:-1], device=self.model.device))
        self._committed = len(tokens) - 1
        self._drafted = []

    def _reusable_prefix(self, tokens: list[int]) -> int:
        """Length of the cached prefix still valid for `tokens`, leaving at least one token to feed."""
        committed = min(self._committed, len(tokens) - 1)
        kept = 0  # drafted tokens the verifier accepted
        while kept < min(len(self._drafted), len(tokens) - 1 - committed) and (
            self._drafted[kept] == tokens[committed + kept]
        ):
            kept += 1
        return committed + kept

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, chooser: TokenChooser) -> Proposal:
        """Draft `k` tokens autoregressively, greedy or sampled like the verifier."""
        reusable = self._reusable_prefix(tokens)
        self.model.crop(reusable)
        new_ids = torch.tensor(tokens[reusable:], device=self.model.device)
        logits = self.model.forward(new_ids)
        drafted, distributions = [], []
        for position in range(k):
            if chooser.do_sample:
                probs = chooser.distribution(logits)
                token = chooser.sample(probs)
                distributions.append(probs)
            else:
                token = logits.argmax(dim=-1)
            drafted.append(token)
            if position < k - 1:
                logits = self.model.forward(token)
        proposed = torch.cat(drafted).tolist()
        self._committed = len(tokens)
        self._drafted = proposed[:-1]
        return Proposal(proposed, torch.cat(distributions) if distributions else None)


class PromptLookupDrafter:
    """Model-free drafter: match the last n tokens earlier in the text and propose what followed."""

    def __init__(self, name: str = "prompt_lookup", max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.name = name
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self) -> None:
        """Nothing to forget: the drafter keeps no state."""

    def prefill(self, tokens: list[int]) -> None:
        """Nothing to read ahead: matches are searched at each proposal."""

    def propose(self, tokens: list[int], k: int, chooser: TokenChooser) -> Proposal:
        """Continuation of the latest earlier match of the longest matching n-gram (possibly empty)."""
        for size in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            pattern = tokens[-size:]
            for start in range(len(tokens) - size - 1, -1, -1):
                if tokens[start : start + size] == pattern:
                    return Proposal(tokens[start + size : start + size + k])
        return Proposal([])
