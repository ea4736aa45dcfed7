"""A causal LM paired with its own KV cache, which can be cropped and compacted."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel


class CachedModel:
    """A model plus the KV cache of the tokens it has seen so far.

    The cache length always equals the number of tokens fed since `reset()`, less
    those removed by `crop` or `keep_rows`. Logits are cut (or padded) to
    `vocab_size`, the verifier tokenizer's size, so that ids the tokenizer does not
    have (GPT-J's head has 143 spare rows) are never chosen and draft and verifier
    distributions line up.
    """

    def __init__(self, model: PreTrainedModel, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        # transformers 5.2x renamed `past_key_values` to `cache`; older 5.x releases only know the old name
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def reset(self) -> None:
        """Forget every cached token (start of a new prompt)."""
        self.cache = DynamicCache()

    @property
    def cache_len(self) -> int:
        """Number of tokens whose keys and values are cached."""
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        logits_to_keep: int = 1,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed `input_ids` (shape [n]) after the cached tokens; return the last rows of logits, [rows, vocab]."""
        output = self.model(
            input_ids=input_ids.view(1, -1),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            position_ids=position_ids,
            attention_mask=attention_mask,
            **{self._cache_argument: self.cache},
        )
        logits = output.logits[0, :, : self.vocab_size]
        if logits.shape[-1] < self.vocab_size:  # a draft head smaller than the verifier's vocabulary
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=-torch.inf)
        return logits

    def crop(self, length: int) -> None:
        """Keep only the first `length` cached tokens."""
        excess = self.cache_len - length
        if excess > 0:
            self.cache.crop(-excess)

    def keep_rows(self, start: int, rows: list[int]) -> None:
        """Keep the cached tokens before `start`, then only `rows` (offsets from `start`) of those after it.

        Used after a tree verification: the accepted path is a subset of the fed tree nodes.
        """
        if rows == list(range(len(rows))):
            self.crop(start + len(rows))
            return
        index = torch.tensor(rows, device=self.device) + start
        for layer in self.cache.layers:
            layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, index)], dim=-2)
            layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, index)], dim=-2)
