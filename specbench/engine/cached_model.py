"""A causal LM paired with its own KV cache, which can be cropped and compacted.

Two cache layouts:
- dynamic (default): transformers' DynamicCache, grown by concatenation;
- static (`max_len` given): transformers' StaticCache, preallocated once and
  written in place, which is what CUDA graphs need. With `graph_sizes`, each
  listed feed length of a plain (chain) forward is captured once as a CUDA
  graph and replayed afterwards: one launch instead of hundreds, which is where
  small-batch decoding on a GPU loses most of its time. With `compile`, the step
  is first compiled by torch.compile (fused kernels), then captured.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

# Architectures whose attention takes the additive 4-D mask a static cache needs. GPT-Neo adds its own
# local-window bias aligned to the end of the key buffer, which is wrong for a preallocated cache.
STATIC_CACHE_ARCHITECTURES = ("gpt2", "gptj", "llama", "qwen2", "mistral", "gemma", "phi3")


class CachedModel:
    """A model plus the KV cache of the tokens it has seen so far.

    The cache length always equals the number of tokens fed since `reset()`, less
    those removed by `crop` or `keep_rows`. Logits are cut (or padded) to
    `vocab_size`, the verifier tokenizer's size, so that ids the tokenizer does not
    have (GPT-J's head has 143 spare rows) are never chosen and draft and verifier
    distributions line up. Returned logits stay valid until the next forward.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        vocab_size: int,
        max_len: int | None = None,
        graph_sizes: Sequence[int] = (),
        compile: bool = False,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | StaticCache | None = None
        if max_len is not None and model.config.model_type in STATIC_CACHE_ARCHITECTURES:
            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
            if any(layer.is_sliding for layer in self.cache.layers):  # sliding layers keep host-side counters
                self.cache = None
        # without a static cache, the dynamic one (every architecture supports it) and no graphs
        self.max_len = max_len if self.cache is not None else None
        self.graph_sizes = set(graph_sizes) if self.max_len is not None and self.device.type == "cuda" else set()
        self._graphs: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        self._graph_step = self._run
        if compile and self.graph_sizes:
            # torch.compile fuses the many small kernels of a decode step before the graph captures them;
            # every (model, feed length) is one more compiled variant of the same code
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._graph_step = torch.compile(self._run, dynamic=False)
        # transformers 5.2x renamed `past_key_values` to `cache`; older 5.x releases only know the old name
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._length = 0
        self.reset()

    def reset(self) -> None:
        """Forget every cached token (start of a new prompt); a static cache keeps its buffers."""
        if self.max_len is None:
            self.cache = DynamicCache()
        self._set_length(0)

    def capture_graphs(self) -> None:
        """Capture (and compile) every graph size now, so that none is first captured inside a timed decode.

        Needs a cache that has seen at least one token (the static buffers are allocated lazily).
        """
        for size in sorted(self.graph_sizes):
            self._graph(size)

    @property
    def cache_len(self) -> int:
        """Number of tokens whose keys and values are cached."""
        return self._length

    def mask_width(self, new_tokens: int) -> int:
        """Key positions a custom attention mask must cover when feeding `new_tokens`."""
        return self.max_len if self.max_len is not None else self._length + new_tokens

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        logits_to_keep: int = 1,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed `input_ids` (shape [n]) after the cached tokens; return the last rows of logits, [rows, vocab]."""
        n = input_ids.numel()
        if self.max_len is not None and self._length + n > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} tokens; {self._length + n} were fed")
        if attention_mask is None and n in self.graph_sizes and logits_to_keep <= n and self._length > 0:
            # the graph computes logits for all n tokens; the extra rows cost next to nothing at decode sizes
            logits = self._graph(n)(input_ids.view(1, -1), self._positions(n))[:, -logits_to_keep:]
        else:
            if self.max_len is not None and attention_mask is None:
                position_ids = self._positions(n)
                attention_mask = self._causal_mask(position_ids)
            logits = self._run(input_ids.view(1, -1), position_ids, attention_mask, logits_to_keep)
        self._length += n
        return self._fit_vocab(logits[0])

    def _run(self, input_ids, position_ids, attention_mask, logits_to_keep) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            position_ids=position_ids,
            attention_mask=attention_mask,
            **{self._cache_argument: self.cache},
        ).logits

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, : self.vocab_size]
        if logits.shape[-1] < self.vocab_size:  # a draft head smaller than the verifier's vocabulary
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=-torch.inf)
        return logits

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(self._length, self._length + n, device=self.device)[None]

    def _causal_mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Additive mask over the static buffer: a token sees every key up to its own position."""
        keys = torch.arange(self.max_len, device=self.device)
        visible = keys[None, :] <= position_ids.view(-1, 1)
        dtype = self.model.dtype
        return torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill_(
            ~visible, torch.finfo(dtype).min
        )[None, None]

    def _graph(self, n: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The CUDA graph of a forward over n new tokens, captured on first use."""
        if n not in self._graphs:
            ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
            positions = self._positions(n)

            def step() -> torch.Tensor:
                return self._graph_step(ids, positions, self._causal_mask(positions), n)

            length = self._length
            torch.cuda.set_device(self.device)  # graph capture uses the current device's streams
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
                step()
                step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = step()
            self._set_length(length)  # undo the warm-up writes

            def replay(new_ids: torch.Tensor, new_positions: torch.Tensor) -> torch.Tensor:
                ids.copy_(new_ids)
                positions.copy_(new_positions)
                graph.replay()
                return output

            self._graphs[n] = replay
        return self._graphs[n]

    @torch.inference_mode()
    def _set_length(self, length: int) -> None:
        self._length = length
        if isinstance(self.cache, StaticCache):
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.cumulative_length.fill_(length)

    def crop(self, length: int) -> None:
        """Keep only the first `length` cached tokens."""
        excess = self._length - length
        if excess <= 0:
            return
        if isinstance(self.cache, DynamicCache):
            self.cache.crop(-excess)
        self._set_length(length)

    @torch.inference_mode()
    def keep_rows(self, start: int, rows: list[int]) -> None:
        """Keep the cached tokens before `start`, then only `rows` (offsets from `start`) of those after it.

        Used after a tree verification: the accepted path is a subset of the fed tree nodes.
        """
        if rows == list(range(len(rows))):
            self.crop(start + len(rows))
            return
        index = torch.tensor(rows, device=self.device) + start
        end = start + len(rows)
        for layer in self.cache.layers:
            kept_keys, kept_values = layer.keys.index_select(-2, index), layer.values.index_select(-2, index)
            if isinstance(self.cache, StaticCache):
                layer.keys[..., start:end, :] = kept_keys
                layer.values[..., start:end, :] = kept_values
            else:
                layer.keys = torch.cat([layer.keys[..., :start, :], kept_keys], dim=-2)
                layer.values = torch.cat([layer.values[..., :start, :], kept_values], dim=-2)
        self._set_length(end)
