"""Drafters: whatever proposes the next k tokens of each row for the verifier to check.

A drafter sees each row's committed tokens (prompt + output so far) and returns,
per row, up to that row's depth of proposed tokens, plus, when it sampled them,
the distributions it sampled from (speculative sampling needs q). Two kinds:
- `ModelDrafter`: a small causal LM with its own batched KV cache; each row is
  rolled back to the longest prefix it shares with that row's committed tokens
  before each proposal, and rows catching up by different numbers of tokens are
  padded (see `CachedModel`);
- `PromptLookupDrafter`: no model; per row, copies what followed the latest
  earlier occurrence of the current n-gram (prompt lookup decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specbench.engine.cached_model import PAD_TOKEN, CachedModel
from specbench.engine.sampling import TokenChooser


@dataclass
class Proposal:
    """Proposed tokens and, for sampled proposals, the distribution of each ([len(tokens), vocab])."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    """Anything that proposes tokens for a batch of rows."""

    name: str

    def reset(self, batch_size: int) -> None:
        """Forget the previous batch; the next one has `batch_size` rows."""

    def prefill(self, contexts: Sequence[list[int]]) -> None:
        """Read each row's prompt and first token before the first proposal (an empty row: a finished one)."""

    def propose(
        self, contexts: Sequence[list[int]], depths: Sequence[int], choosers: Sequence[TokenChooser | None]
    ) -> list[Proposal]:
        """Per row, propose at most `depths[row]` tokens to follow `contexts[row]` (nothing when it is 0; an idle
        row has no chooser)."""


class JoiningDrafter(Drafter, Protocol):
    """A drafter that serves a running batch: rows join it and leave it between steps (continuous batching)."""

    def admit(self, slots: Sequence[int], contexts: Sequence[list[int]], batch_size: int) -> None:
        """Read the joining rows' tokens into `slots` of a batch that now has `batch_size` rows."""

    def keep_rows(self, order: Sequence[int | None]) -> None:
        """Re-form the batch: new row i is old row `order[i]` (None: an empty row)."""

    def remove_rows(self, slots: Sequence[int]) -> None:
        """Forget the rows in `slots` (their requests finished)."""

    def catch_up(self, contexts: Sequence[list[int]]) -> None:
        """Read each row's tokens but the last that the drafter has not read yet (those of steps it sat out)."""


class ModelDrafter:
    """A draft language model with a KV cache that survives across steps."""

    def __init__(self, name: str, model: CachedModel) -> None:
        self.name = name
        self.model = model
        # Per row, the cache holds `_committed` committed tokens, then `_drafted`, this drafter's own
        # proposal (all but its last token), which the verifier may or may not have kept.
        self._committed: list[int] = []
        self._drafted: list[list[int]] = []

    def reset(self, batch_size: int) -> None:
        """Forget the previous batch."""
        self.model.reset(batch_size)
        self._committed = [0] * batch_size
        self._drafted = [[] for _ in range(batch_size)]

    @torch.inference_mode()
    def prefill(self, contexts: Sequence[list[int]]) -> None:
        """Cache all of each row's tokens but the last, so that each proposal starts from a short feed."""
        cached = [tokens[:-1] for tokens in contexts]
        if any(cached):
            self.model.prefill(cached)
        else:
            self.model.reset(len(contexts))
        self._committed = [len(tokens) for tokens in cached]
        self._drafted = [[] for _ in contexts]

    @torch.inference_mode()
    def admit(self, slots: Sequence[int], contexts: Sequence[list[int]], batch_size: int) -> None:
        """Cache all of each joining row's tokens but the last, in its slot (the other rows keep theirs)."""
        grow = batch_size - len(self._committed)
        if grow > 0:
            self.keep_rows([*range(len(self._committed)), *[None] * grow])
        self.model.admit(slots, [tokens[:-1] for tokens in contexts])
        for slot, tokens in zip(slots, contexts, strict=True):
            self._committed[slot] = len(tokens) - 1
            self._drafted[slot] = []

    def keep_rows(self, order: Sequence[int | None]) -> None:
        """Re-form the batch: new row i is old row `order[i]` (None: an empty row)."""
        self.model.keep_rows(order)
        self._committed = [0 if row is None else self._committed[row] for row in order]
        self._drafted = [[] if row is None else self._drafted[row] for row in order]

    def remove_rows(self, slots: Sequence[int]) -> None:
        """Forget the rows in `slots`."""
        self.model.remove_rows(slots)
        for slot in slots:
            self._committed[slot] = 0
            self._drafted[slot] = []

    @torch.inference_mode()
    def catch_up(self, contexts: Sequence[list[int]]) -> None:
        """Cache each row's tokens but the last that the cache lacks (those of steps the drafter sat out), in one
        forward, so that the next proposal feeds one token per row."""
        rows = [row for row, tokens in enumerate(contexts) if tokens]
        feeds = [feed[:-1] for feed in self._unread(contexts, rows)]
        width = max((len(feed) for feed in feeds), default=0)
        if width:
            self.model.forward(self._padded(feeds, width), [len(feed) for feed in feeds], logits_to_keep=1)
        for row in rows:
            self._committed[row] = len(contexts[row]) - 1
            self._drafted[row] = []

    def _unread(self, contexts: Sequence[list[int]], rows: Sequence[int]) -> list[list[int]]:
        """Roll each of `rows` back to its longest cached prefix still valid; return, per row of the batch, the
        tokens its cache lacks (at least the last one; nothing for rows not in `rows`)."""
        reusable = self.model.lengths
        for row in rows:
            reusable[row] = self._reusable_prefix(row, contexts[row])
        self.model.truncate(reusable)
        chosen = set(rows)
        return [contexts[row][reusable[row] :] if row in chosen else [] for row in range(len(contexts))]

    def _padded(self, feeds: list[list[int]], width: int) -> torch.Tensor:
        """The feeds as one [rows, width] id tensor on the model's device, right-padded."""
        return torch.tensor([feed + [PAD_TOKEN] * (width - len(feed)) for feed in feeds], device=self.model.device)

    def _reusable_prefix(self, row: int, tokens: list[int]) -> int:
        """Length of the row's cached prefix still valid for `tokens`, leaving at least one token to feed."""
        committed = min(self._committed[row], len(tokens) - 1)
        drafted = self._drafted[row]
        kept = 0  # drafted tokens the verifier accepted
        while kept < min(len(drafted), len(tokens) - 1 - committed) and drafted[kept] == tokens[committed + kept]:
            kept += 1
        return committed + kept

    @torch.inference_mode()
    def propose(
        self, contexts: Sequence[list[int]], depths: Sequence[int], choosers: Sequence[TokenChooser | None]
    ) -> list[Proposal]:
        """Draft each row's tokens autoregressively, greedy or sampled like the verifier, all rows per forward."""
        rows = range(len(contexts))
        drafting = [row for row in rows if depths[row] > 0]
        if not drafting:
            return [Proposal([]) for _ in rows]
        feeds = self._unread(contexts, drafting)
        width = max(len(feed) for feed in feeds)
        ids = self._padded(feeds, width)
        if all(len(feed) == width for feed in feeds):
            logits = self.model.forward(ids)[:, -1]
        else:  # each row's last fed slot
            fed = self.model.forward(ids, [len(feed) for feed in feeds], logits_to_keep=width)
            last = torch.tensor([max(len(feed), 1) - 1 for feed in feeds], device=fed.device)
            logits = fed[torch.arange(len(feeds), device=fed.device), last]
        steps = max(depths)
        chooser = choosers[drafting[0]]  # the warping is the same for every row
        columns, distributions = [], []
        for position in range(steps):
            if chooser.do_sample:
                probs = chooser.distribution(logits)
                tokens = torch.cat([_draw(choosers[row], probs, row, depths[row] > position) for row in rows])
                distributions.append(probs)
            else:
                tokens = logits.argmax(dim=-1)
            columns.append(tokens)
            if position < steps - 1:
                feeding = [int(depths[row] > position + 1) for row in rows]
                logits = self.model.forward(tokens[:, None], feeding)[:, -1]
        drafted = torch.stack(columns, dim=1).tolist()
        proposals = []
        for row in rows:
            depth = depths[row]
            if depth == 0:
                proposals.append(Proposal([]))
                continue
            probs = torch.stack([column[row] for column in distributions[:depth]]) if distributions else None
            proposals.append(Proposal(drafted[row][:depth], probs))
            self._committed[row] = len(contexts[row])
            self._drafted[row] = drafted[row][: depth - 1]
        return proposals

    def take_drafts(self, drafts: Sequence[list[int]]) -> None:
        """Take each row's cached draft tokens to be `drafts[row]` but its last (rows with no draft keep theirs).

        For a stand-in drafter whose proposals this model's forwards pay for (`OracleDrafter`): the next step
        then feeds what that drafter would (the verifier's token, and the last draft when all were accepted), not
        every token the verifier accepted. The cache holds this model's own tokens either way; its outputs go unused.
        """
        for row, tokens in enumerate(drafts):
            if tokens:
                self._drafted[row] = list(tokens[:-1])


def drafter_models(drafters: Sequence[Drafter]) -> list[CachedModel]:
    """The cached models the drafters run (model drafters, and any drafter that exposes the model it runs)."""
    return [drafter.model for drafter in drafters if isinstance(getattr(drafter, "model", None), CachedModel)]


def _draw(chooser: TokenChooser, probs: torch.Tensor, row: int, drafting: bool) -> torch.Tensor:
    """The row's sampled token (one element), or a placeholder that draws nothing from its generator."""
    if drafting:
        return chooser.sample(probs[row : row + 1])
    return torch.zeros(1, dtype=torch.long, device=probs.device)


class PromptLookupDrafter:
    """Model-free drafter: match the last n tokens earlier in the text and propose what followed."""

    def __init__(self, name: str = "prompt_lookup", max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.name = name
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self, batch_size: int) -> None:
        """Nothing to forget: the drafter keeps no state."""

    def prefill(self, contexts: Sequence[list[int]]) -> None:
        """Nothing to read ahead: matches are searched at each proposal."""

    def admit(self, slots: Sequence[int], contexts: Sequence[list[int]], batch_size: int) -> None:
        """Nothing to read: the drafter keeps no state."""

    def keep_rows(self, order: Sequence[int | None]) -> None:
        """Nothing to move: the drafter keeps no state."""

    def catch_up(self, contexts: Sequence[list[int]]) -> None:
        """Nothing to read: matches are searched at each proposal."""

    def remove_rows(self, slots: Sequence[int]) -> None:
        """Nothing to forget: the drafter keeps no state."""

    def propose(
        self, contexts: Sequence[list[int]], depths: Sequence[int], choosers: Sequence[TokenChooser | None]
    ) -> list[Proposal]:
        """Per row, the continuation of the latest earlier match of the longest matching n-gram."""
        return [Proposal(self.lookup(tokens, depth)) for tokens, depth in zip(contexts, depths, strict=True)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching n-gram."""
        if k == 0:
            return []
        for size in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            pattern = tokens[-size:]
            for start in range(len(tokens) - size - 1, -1, -1):
                if tokens[start : start + size] == pattern:
                    return tokens[start + size : start + size + k]
        return []
