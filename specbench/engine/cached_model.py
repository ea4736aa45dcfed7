"""A causal LM paired with the KV cache of a batch of rows (one row per prompt), ragged and rewindable.

Layout (the cost of batching rows that accept different numbers of tokens):
- all rows share one physical column index, so transformers writes every row's
  new keys at the same columns: DynamicCache and StaticCache work unchanged, and
  a step has one shape, which is what CUDA graphs need;
- each row has a validity mask over the columns: the columns it does not use are
  holes (left padding of shorter prompts, draft tokens a row rejected while
  another row accepted more, the padding of a row's shorter feed, every column
  fed after a row finished);
- each row has its own logical positions: `position_ids` [rows, n] count only
  its valid columns, so rotary and absolute position embeddings see each row as
  if it were decoded alone.
A forward builds an additive 4-D mask [rows, 1, n, key columns] from the validity
mask, causality (or a token tree's ancestry) among the new columns, and a sliding
window where the model has one (see `attention`). When no row that reads has a
hole, the dynamic cache gets no mask and no positions: a batch of one chain is
decoded exactly as a plain `model(...)` call would.
Cost: rows that finished, and the padding of shorter feeds, are computed like
any other column (`padded_positions` counts them); holes are attended over
(masked) until compaction gathers each row's valid columns into a fresh
left-padded layout, which copies the whole cache once. Compaction runs when the
columns past the longest row exceed a quarter of the layout (and
`COMPACT_MIN_COLUMNS`), or when a static buffer would otherwise overflow, so a
static `max_len` only needs to hold the longest row (prompt, output, and the
widest feed of one step). Keys already carry their positions (rotary or absolute
embeddings are applied before caching), so moving them is safe. The mask is
built on the CPU each step that needs one ([rows, n, key columns]) and copied
to the device without waiting for it. Dropping finished rows instead would change
the batch shape (new graphs) and copy the cache at every finish.

Two cache types:
- dynamic (default): transformers' DynamicCache, grown by concatenation;
- static (`max_len` given): transformers' StaticCache, one per batch size used
  (each holds its buffers until the model is dropped), written in place. A model
  on SDPA is switched to `attention.PREFIX_ATTENTION`, so attention reads the
  columns in use (in steps of `PREFIX_BUCKET`), not the whole buffer. With
  `graph_sizes`, each listed feed length of a decode step is captured once per
  batch size and attention width as a CUDA graph (ids, positions and mask are its
  inputs; the graphs of a batch size share one memory pool) and replayed
  afterwards: one launch instead of hundreds. With `compile`, the step is first
  compiled by torch.compile (the width is a dynamic dimension, so it compiles once
  per feed length), then captured. Rows that finished stay in the batch as
  padding, so the shapes, and the graphs, stay the same.
"""

from __future__ import annotations

import functools
import gc
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from specbench.engine.attention import (
    PREFIX_ATTENTION,
    needs_plain_causal_mask,
    prefix_width,
    prefix_widths,
    ragged_mask,
)
from specbench.engine.timing import model_devices
from specbench.engine.tree import ancestor_matrix

# Architectures whose attention takes the additive 4-D mask a static cache needs. GPT-Neo adds its own
# local-window bias aligned to the end of the key buffer, which is wrong for a preallocated cache.
STATIC_CACHE_ARCHITECTURES = ("gpt2", "gptj", "llama", "qwen2", "mistral", "gemma", "phi3")
# Compaction runs when hole columns exceed a quarter of the layout and at least this many columns.
COMPACT_MIN_COLUMNS = 32
PAD_TOKEN = 0  # fed in padding slots; never attended to
# Under captured joins (`capture_joins`), joining prompts are prefilled at most JOIN_ROWS at a time, and
# fewer where the static buffers are long: at most JOIN_TOKENS columns of them in all (their memory).
JOIN_ROWS, JOIN_TOKENS = 16, 4096


def slot_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a batch under CUDA graphs takes: powers of two below `max_batch_size`, and itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


class CachedModel:
    """A model plus the KV cache of the rows it has seen so far.

    Each row's cache holds `lengths[row]` tokens: those fed since `prefill`, less those
    dropped by `commit` or `truncate`. Logits are cut (or padded) to `vocab_size`, the
    verifier tokenizer's size, so that ids the tokenizer does not have (GPT-J's head has
    143 spare rows) are never chosen and draft and verifier distributions line up.
    Returned logits stay valid until the next forward.
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
        # where inputs go (and logits come back): the input embeddings' device; a model sharded with
        # transformers' device_map has layers on several devices, which every clock reading waits for
        self.device = model.get_input_embeddings().weight.device
        self.devices = model_devices(model)
        self.plain_mask_only = needs_plain_causal_mask(model.config)
        self.max_len: int | None = None
        # a static cache always takes the engine's mask, which windowed attentions it cannot express would misread
        static = max_len is not None and model.config.model_type in STATIC_CACHE_ARCHITECTURES
        if static and not self.plain_mask_only:
            probe = StaticCache(config=model.config, max_cache_len=max_len)
            if not any(layer.is_sliding for layer in probe.layers):  # sliding layers keep host-side counters
                self.max_len = max_len
        # attention over the used columns only (see the module docstring); other implementations read the buffer
        self.reads_prefix = self.max_len is not None and model.config._attn_implementation in ("sdpa", PREFIX_ATTENTION)
        if self.reads_prefix:
            model.set_attn_implementation(PREFIX_ATTENTION)
        # without a static cache, the dynamic one (every architecture supports it) and no graphs
        self.graph_sizes = set(graph_sizes) if self.max_len is not None and self.device.type == "cuda" else set()
        self._static_caches: dict[int, StaticCache] = {}
        self._graphs: dict[tuple[int, int, int, int], Callable[..., torch.Tensor]] = {}  # rows, n, width, logits
        self._graph_pools: dict[int, tuple[int, int]] = {}  # by rows
        self._capture_stream = torch.cuda.Stream(self.device) if self.graph_sizes else None
        self._graph_step = self._run
        self._joins: CachedModel | None = None  # prefills joining rows on buffers of their own (`capture_joins`)
        self._join_rows: list[int] = []  # the row counts it prefills at once
        self._join_widths: list[int] = []  # and the prompt widths (a prompt is left-padded to the next one)
        if compile and self.graph_sizes:
            # torch.compile fuses the many small kernels of a decode step before the graph captures them;
            # every (model, batch, feed length) is one more compiled variant of the same code
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._graph_step = torch.compile(self._run, dynamic=False)
        # transformers 5.2x renamed `past_key_values` to `cache`; older 5.x releases only know the old name
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache: DynamicCache | StaticCache | None = None
        self.reset()

    # ---- state -------------------------------------------------------------------------------------

    def reset(self, batch_size: int = 1) -> None:
        """Forget every cached token and set the number of rows; static buffers are kept per batch size."""
        if self.max_len is None:
            self.cache = DynamicCache()
        else:
            if batch_size not in self._static_caches:
                # one spare column when attention reads a prefix: every width is then shorter than the buffer,
                # so torch.compile keeps the width dynamic instead of specialising the full-buffer case
                buffer_columns = self.max_len + self.reads_prefix
                self._static_caches[batch_size] = StaticCache(config=self.model.config, max_cache_len=buffer_columns)
            self.cache = self._static_caches[batch_size]
        self._valid = torch.zeros(batch_size, 0, dtype=torch.bool)  # [rows, columns], on the CPU
        self._counts = [0] * batch_size  # valid columns per row
        self._columns = 0  # physical columns in use, shared by all rows
        self._last_feed: tuple[int, list[int], list[int]] | None = None  # start column, counts before, feed lengths
        self._tree_pending = False
        self.fed_positions = 0  # columns computed by `forward` since the last prefill, all rows together
        self.padded_positions = 0  # of which padding: a row's unused slots, or rows fed nothing
        self._set_columns(0)

    def release(self, batch_size: int) -> None:
        """Free the static buffers and CUDA graphs of one batch size (one no longer decoded at)."""
        self._static_caches.pop(batch_size, None)
        self._graph_pools.pop(batch_size, None)
        for key in [key for key in self._graphs if key[0] == batch_size]:
            del self._graphs[key]
        if self.cache is not None and self.cache not in self._static_caches.values() and self.max_len is not None:
            self.cache = None  # it was the released one: the next reset allocates again

    @property
    def held_batch_sizes(self) -> frozenset[int]:
        """The batch sizes whose static buffers (and CUDA graphs) are held, until `release`."""
        return frozenset(self._static_caches)

    @property
    def graph_count(self) -> int:
        """CUDA graphs held, the joins' too (a count that grows while a decode is timed means captures inside the
        timing)."""
        return len(self._graphs) + (self._joins.graph_count if self._joins is not None else 0)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return len(self._counts)

    @property
    def lengths(self) -> list[int]:
        """Cached tokens per row."""
        return list(self._counts)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in (whose rounding can flip a near-tie between two decodes)."""
        return self.model.dtype

    @property
    def columns(self) -> int:
        """Physical columns in use: the longest row plus the holes."""
        return self._columns

    # ---- forwards ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], logits_to_keep: int = 1) -> torch.Tensor:
        """Start over with one row per prompt (left-padded); return each row's last logits, [rows, keep, vocab]."""
        self.reset(len(prompts))
        width = max(len(prompt) for prompt in prompts)
        if width == 0:
            raise ValueError("every prompt is empty")
        ids, slot_valid, positions = _left_padded(prompts, width)
        visible = None
        if not slot_valid.all():  # a row's first token must not see the padding before it
            visible = torch.ones(width, width, dtype=torch.bool).tril_() & slot_valid[:, None, :]
        logits = self._feed(ids.to(self.device), slot_valid, positions, visible, logits_to_keep)
        self.fed_positions = self.padded_positions = 0
        return logits

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        feed_lengths: Sequence[int] | None = None,
        tree_parents: Sequence[Sequence[int]] | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Feed `input_ids` [rows, n] after each row's cached tokens; return the last logits, [rows, keep, vocab].

        Row r feeds its first `feed_lengths[r]` ids (all n by default); the rest of its row is
        padding. With `tree_parents`, row r's fed ids are a token tree (`tree_parents[r][i]`: the
        parent slot of slot i, -1 for slot 0) and `commit` must follow before the next forward.
        `logits_to_keep` defaults to 1 (the last column).
        """
        if self._tree_pending:
            raise RuntimeError("a token tree was fed: commit the accepted path before the next forward")
        rows, n = input_ids.shape
        lengths = [n] * rows if feed_lengths is None else list(feed_lengths)
        if rows != self.batch_size or max(lengths) > n or n == 0:
            raise ValueError(f"fed ids of shape {tuple(input_ids.shape)} to {self.batch_size} rows")
        slot_valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
        offsets = torch.arange(n).expand(rows, n).clone()
        visible = None
        if tree_parents is not None:
            visible = torch.ones(rows, n, n, dtype=torch.bool).tril_()
            for row, parents in enumerate(tree_parents):
                if parents:
                    visible[row, : len(parents), : len(parents)] = ancestors = ancestor_matrix(list(parents))
                    offsets[row, : len(parents)] = ancestors.sum(1) - 1  # depth in the tree
            self._tree_pending = True
        positions = torch.where(slot_valid, offsets + torch.tensor(self._counts)[:, None], 0)
        counts_before = list(self._counts)
        logits = self._feed(input_ids, slot_valid, positions, visible, logits_to_keep or 1)
        self._last_feed = (self._columns - n, counts_before, lengths)
        return logits

    def _feed(
        self,
        input_ids: torch.Tensor,
        slot_valid: torch.Tensor,
        positions: torch.Tensor,
        new_visible: torch.Tensor | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """Run the model over n new columns; `new_visible` None means causal among the new columns."""
        rows, n = slot_valid.shape
        if self.max_len is not None and self._columns + n > self.max_len:
            self._compact()
            if self._columns + n > self.max_len:
                raise ValueError(f"the static cache holds {self.max_len} tokens; {self._columns + n} were fed")
        reading = slot_valid.any(1).tolist()
        holes = any(read and count < self._columns for read, count in zip(reading, self._counts, strict=True))
        if self.max_len is None and new_visible is None and not holes:
            # every row that reads holds all columns: plain causal attention, positions from the cache length
            logits = self._run(input_ids, None, None, logits_to_keep)
        else:
            if self.plain_mask_only:
                raise ValueError(
                    f"{self.model.config.model_type} only decodes under its own causal mask (windowed layers): "
                    "use one drafter, or batch_size=1."
                )
            if new_visible is None:
                new_visible = torch.ones(n, n, dtype=torch.bool).tril_().expand(rows, n, n)
            # padding slots are nobody's keys; every slot sees itself, so no softmax row is empty
            new_visible = (new_visible & slot_valid[:, None, :]) | torch.eye(n, dtype=torch.bool)
            width = self._key_width(self._columns + n)
            mask = ragged_mask(self._valid, new_visible, positions, width, self.model.dtype, self.model.config)
            mask = to_device(mask, self.device)
            position_ids = to_device(positions, self.device)
            if n in self.graph_sizes and self._columns > 0:
                # the graph computes logits for all n columns; the extra rows cost next to nothing at decode sizes
                logits = self._graph(rows, n, width)(input_ids, position_ids, mask)[:, -logits_to_keep:]
            else:
                logits = self._run(input_ids, position_ids, mask, logits_to_keep)
        self._valid = torch.cat([self._valid, slot_valid], dim=1)
        self._counts = [count + int(fed) for count, fed in zip(self._counts, slot_valid.sum(1).tolist(), strict=True)]
        self._columns += n
        self.fed_positions += rows * n
        self.padded_positions += rows * n - int(slot_valid.sum())
        return self._fit_vocab(logits)

    def _key_width(self, columns: int) -> int:
        """Key columns a forward attends over when `columns` will be in use."""
        if self.max_len is None:
            return columns
        return prefix_width(columns, self.max_len) if self.reads_prefix else self.max_len

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
        logits = logits[..., : self.vocab_size].to(self.device)  # a sharded model's head may sit elsewhere
        if logits.shape[-1] < self.vocab_size:  # a draft head smaller than the verifier's vocabulary
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=-torch.inf)
        return logits

    # ---- rows joining and leaving a running batch (continuous batching) ----------------------------

    @torch.inference_mode()
    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], logits_to_keep: int = 1) -> torch.Tensor:
        """Prefill `prompts` into row `slots` while every other row keeps its cache; return their last logits.

        The new rows are prefilled apart (`_prefill_apart`; the running rows wait for it), then their keys
        and values are copied into their slots' columns, right-aligned with the layout (which widens on the
        left if a prompt is longer than the columns in use). A slot past the batch size grows the batch
        (see `keep_rows`); a slot's earlier contents are dropped. Returns [len(prompts), logits_to_keep, vocab].
        """
        if self._tree_pending:
            raise RuntimeError("a token tree was fed: commit the accepted path before admitting rows")
        width = max(len(prompt) for prompt in prompts)
        if min(len(prompt) for prompt in prompts) == 0:
            raise ValueError("an admitted prompt is empty")
        if self.max_len is not None and width > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} tokens; a prompt of {width} was admitted")
        if not any(self._counts) and self._joins is None:  # nothing cached: a plain prefill, rows in their slots
            placed: list[list[int]] = [[] for _ in range(max(self.batch_size, max(slots) + 1))]
            for slot, prompt in zip(slots, prompts, strict=True):
                placed[slot] = list(prompt)
            counted = self.fed_positions, self.padded_positions  # a prefill restarts them; a load run keeps them
            logits = self.prefill(placed, logits_to_keep)
            self.fed_positions, self.padded_positions = counted
            return logits[list(slots)]
        if max(slots) >= self.batch_size:
            self.keep_rows([*range(self.batch_size), *[None] * (max(slots) + 1 - self.batch_size)])
        if self._columns < width:
            self._widen(width - self._columns)
        start = self._columns - width
        logits: torch.Tensor | None = None
        initialized = False
        for group, keys_values, slot_valid, group_logits in self._prefill_apart(prompts, width, logits_to_keep):
            index = torch.tensor([slots[member] for member in group])
            index_on = _copies_on_devices(index)
            for layer, (keys, values) in zip(self.cache.layers, keys_values, strict=True):
                if not layer.is_initialized:  # a static buffer no forward has written yet (an empty batch)
                    layer.lazy_initialization(keys[:1].expand(self.batch_size, -1, -1, -1), values[:1])
                    initialized = True
                for states, new in ((layer.keys, keys), (layer.values, values)):
                    states[index_on(states.device), :, start : self._columns] = new.to(states.device, states.dtype)
            self._valid[index] = False
            self._valid[index, start:] = slot_valid
            fitted = self._fit_vocab(group_logits)
            if logits is None:
                logits = fitted.new_empty(len(prompts), *fitted.shape[1:])
            # copied now: a captured group's logits are overwritten by the next group (groups are consecutive)
            logits[group[0] : group[-1] + 1] = fitted
        for slot, prompt in zip(slots, prompts, strict=True):
            self._counts[slot] = len(prompt)
        self._last_feed = None
        if initialized:  # a buffer initialized just now writes after the columns in use
            self._set_columns(self._columns)
        return logits

    def _prefill_apart(
        self, prompts: Sequence[Sequence[int]], width: int, logits_to_keep: int
    ) -> Iterator[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]]:
        """The forward of the prompts alone (left-padded), on caches of their own, by groups.

        Yields, per group: the indices of its prompts, each layer's (keys, values) [group, heads, width,
        dim], which of the `width` columns hold a token [group, width] and the logits; a group's tensors
        are valid until the next group. After `capture_joins`, the prompts go `_join_rows[-1]` at a time,
        each group padded to a captured row count and prompt width and run as one captured graph; otherwise
        one eager forward takes them all. Every padding slot attends to itself, so its keys are finite.
        """
        joins = self._joins
        padded_width = next((size for size in self._join_widths if size >= width), None)
        if joins is None or padded_width is None or logits_to_keep != 1:
            ids, slot_valid, positions = _left_padded(prompts, width)
            apart = DynamicCache()
            mask = None
            if not slot_valid.all() or self.max_len is not None:  # a static-cache model attends with the engine's masks
                mask = to_device(_prefill_mask(slot_valid, positions, width, self.model), self.device)
            logits = self.model(
                input_ids=ids.to(self.device),
                use_cache=True,
                logits_to_keep=logits_to_keep,
                position_ids=to_device(positions, self.device),
                attention_mask=mask,
                **{self._cache_argument: apart},
            ).logits
            yield list(range(len(prompts))), [(layer.keys, layer.values) for layer in apart.layers], slot_valid, logits
            return
        most = self._join_rows[-1]
        for first in range(0, len(prompts), most):
            group = list(range(first, min(first + most, len(prompts))))
            rows = next(count for count in self._join_rows if count >= len(group))
            ids, slot_valid, positions = _left_padded(
                [*(prompts[member] for member in group), *[[PAD_TOKEN]] * (rows - len(group))], padded_width
            )
            logits = joins._prefill_captured(ids, slot_valid, positions, rows, padded_width)
            keys_values = [
                (layer.keys[: len(group), :, padded_width - width : padded_width],
                 layer.values[: len(group), :, padded_width - width : padded_width])
                for layer in joins.cache.layers
            ]  # fmt: skip
            yield group, keys_values, slot_valid[: len(group), padded_width - width :], logits[: len(group)]

    def _widen(self, extra: int) -> None:
        """Prepend `extra` hole columns to every row (a prompt longer than the columns in use is joining)."""
        for layer in self.cache.layers if self._columns else ():  # nothing to move in an empty cache
            for name in ("keys", "values"):
                states = getattr(layer, name)
                if isinstance(self.cache, StaticCache):
                    states[:, :, extra : extra + self._columns] = states[:, :, : self._columns].clone()
                else:
                    holes = states.new_zeros(states.shape[0], states.shape[1], extra, states.shape[3])
                    setattr(layer, name, torch.cat([holes, states], dim=2))
        self._valid = torch.cat([torch.zeros(self.batch_size, extra, dtype=torch.bool), self._valid], dim=1)
        self._set_columns(self._columns + extra)

    @torch.inference_mode()
    def remove_rows(self, slots: Sequence[int]) -> None:
        """Forget the cached tokens of row `slots` (requests that finished); their columns become holes."""
        for slot in slots:
            self._valid[slot] = False
            self._counts[slot] = 0
        self._last_feed = None
        self._crop_and_compact()

    @torch.inference_mode()
    def keep_rows(self, rows: Sequence[int | None]) -> None:
        """Re-form the batch: new row i holds old row `rows[i]`'s cache (None: an empty row).

        Copies the cache once (into the other batch size's static buffers, with a static cache).
        """
        index = torch.tensor([-1 if row is None else row for row in rows])
        present = index >= 0
        # index tensors copied to each device once, without waiting; empty rows zeroed by index (a boolean mask syncs)
        source_on = _copies_on_devices(index.clamp(min=0))
        empty_on = _copies_on_devices((~present).nonzero().flatten()) if not present.all() else None
        old_cache, columns = self.cache, self._columns
        if self.max_len is None:
            for layer in old_cache.layers:
                if layer.is_initialized:
                    for name in ("keys", "values"):
                        states = getattr(layer, name)
                        moved = states[source_on(states.device)]
                        if empty_on is not None:
                            moved.index_fill_(0, empty_on(states.device), 0)
                        setattr(layer, name, moved)
        else:
            if len(rows) not in self._static_caches:
                self._static_caches[len(rows)] = StaticCache(
                    config=self.model.config, max_cache_len=self.max_len + self.reads_prefix
                )
            new_cache = self._static_caches[len(rows)]
            for old, new in zip(old_cache.layers, new_cache.layers, strict=True):
                if not old.is_initialized:
                    continue
                if not new.is_initialized:
                    new.lazy_initialization(
                        old.keys.new_empty(len(rows), *old.keys.shape[1:]),
                        old.values.new_empty(len(rows), *old.values.shape[1:]),
                    )
                for name in ("keys", "values"):
                    source, target = getattr(old, name), getattr(new, name)
                    target[:, :, :columns] = source[source_on(source.device), :, :columns]
                    if empty_on is not None:
                        target.index_fill_(0, empty_on(target.device), 0)
            self.cache = new_cache
        valid = self._valid[index.clamp(min=0)]
        valid[~present] = False
        self._valid = valid
        self._counts = [self._counts[row] if row is not None else 0 for row in rows]
        self._last_feed = None
        self._set_columns(columns)

    # ---- rewinding ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def commit(self, kept: Sequence[Sequence[int]]) -> None:
        """After a forward, row r keeps only its fed slots `kept[r]` (ascending offsets into its feed).

        Used after verification: the accepted path is a prefix of a chain, or a path of a tree.
        """
        if self._last_feed is None:
            raise RuntimeError("commit follows a forward")
        start, counts_before, feed_lengths = self._last_feed
        n = self._columns - start
        kept = [list(slots) for slots in kept]
        if any(slots and slots[-1] >= length for slots, length in zip(kept, feed_lengths, strict=True)):
            raise ValueError("kept a slot that was not fed")
        if any(slots != list(range(len(slots))) for slots in kept):
            # move each row's kept slots to the front of the fed columns (other rows: identity)
            index = [[start + (slots[j] if j < len(slots) else j) for j in range(n)] for slots in kept]
            self._gather(start, torch.tensor(index))
        self._valid[:, start:] = torch.arange(n)[None, :] < torch.tensor([len(slots) for slots in kept])[:, None]
        self._counts = [before + len(slots) for before, slots in zip(counts_before, kept, strict=True)]
        self._last_feed = None
        self._tree_pending = False
        self._crop_and_compact()

    @torch.inference_mode()
    def truncate(self, lengths: Sequence[int]) -> None:
        """Keep only the first `lengths[r]` cached tokens of each row r (longer lengths change nothing)."""
        self._last_feed = None
        if any(length < count for length, count in zip(lengths, self._counts, strict=True)):
            # a row keeps the valid columns up to its length-th: the others' cumulative counts never pass theirs
            self._valid &= self._valid.cumsum(1) <= torch.tensor(lengths)[:, None]
            self._counts = [min(length, count) for length, count in zip(lengths, self._counts, strict=True)]
        self._crop_and_compact()

    def _crop_and_compact(self) -> None:
        """Drop trailing columns no row uses, then compact if holes make up too much of the layout."""
        used = self._valid.any(0).nonzero()
        self._crop(int(used[-1]) + 1 if used.numel() else 0)
        holes = self._columns - max(self._counts)
        if holes > max(COMPACT_MIN_COLUMNS, self._columns // 4):
            self._compact()

    def _crop(self, columns: int) -> None:
        excess = self._columns - columns
        if excess <= 0:
            return
        if isinstance(self.cache, DynamicCache):
            self.cache.crop(-excess)
        self._valid = self._valid[:, :columns]
        self._set_columns(columns)

    @torch.inference_mode()
    def _compact(self) -> None:
        """Gather each row's valid columns into a fresh left-padded layout of max(lengths) columns."""
        width = max(self._counts)
        # a stable sort puts each row's valid columns last, in order; the padding before them reads column 0
        valid_last = torch.sort(self._valid.to(torch.uint8), dim=1, stable=True).indices[:, self._columns - width :]
        padding = torch.arange(width)[None, :] < torch.tensor([width - count for count in self._counts])[:, None]
        self._gather(0, valid_last.masked_fill(padding, 0))
        self._valid = ~padding
        self._set_columns(width)

    def _gather(self, start: int, index: torch.Tensor) -> None:
        """Cache columns start..start+width become, per row, the columns `index` [rows, width] names.

        A dynamic cache ends at start+width afterwards; the caller sets the column count.
        """
        width = index.shape[1]
        index_on = _copies_on_devices(index[:, None, :, None])
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            for name in ("keys", "values"):
                states = getattr(layer, name)
                where = index_on(states.device)
                moved = states.gather(2, where.expand(-1, states.shape[1], -1, states.shape[3]))
                if isinstance(self.cache, StaticCache):
                    states[:, :, start : start + width] = moved
                else:
                    setattr(layer, name, torch.cat([states[:, :, :start], moved], dim=2))

    @torch.inference_mode()
    def _set_columns(self, columns: int) -> None:
        self._columns = columns
        if isinstance(self.cache, StaticCache):
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.cumulative_length.fill_(columns)

    # ---- CUDA graphs -------------------------------------------------------------------------------

    @torch.inference_mode()  # the static buffers are inference tensors: capture writes them in the same mode
    def capture_graphs(self, batch_sizes: Sequence[int] = (1,), shortest_prompt: int = 1) -> int:
        """Capture (and compile) every graph size and attention width for each batch size now, before timing.

        A step starts from at least `shortest_prompt` - 1 cached columns (a row's cache never holds
        less than its prompt but the last token), so narrower attention widths are not captured.
        Call it on the main thread before decoding, and before drafting in a thread pool: a graph
        is never captured inside a pool thread. Leaves the model reset; returns how many graphs it holds.
        """
        if not self.graph_sizes:
            return 0
        for batch_size in batch_sizes:
            self.prefill([[PAD_TOKEN]] * batch_size)  # allocates this batch size's static buffers
            for size in sorted(self.graph_sizes):
                least_columns = max(shortest_prompt - 1, 1) + size
                widths = prefix_widths(least_columns, self.max_len) if self.reads_prefix else [self.max_len]
                for width in widths:
                    self._graph(batch_size, size, width)
        self.reset()
        return len(self._graphs)

    @torch.inference_mode()
    def capture_joins(self, most_rows: int, shortest_prompt: int = 1) -> int:
        """Prefill joining rows (`admit`) on static buffers of their own, under CUDA graphs captured now.

        Rows join up to `most_rows` at a time (at most `JOIN_ROWS`, and `JOIN_TOKENS` // `max_len`; row
        counts are powers of two, a smaller group padded), each prompt left-padded to the next multiple of
        `PREFIX_BUCKET` from `shortest_prompt` up to `max_len`: a join then costs one graph launch per group
        instead of an eager forward's hundreds of kernel launches. Without CUDA graphs the groups run eagerly.
        Needs a static cache (`max_len`); returns how many join graphs are held.
        """
        if self.max_len is None:
            return 0
        group = min(most_rows, JOIN_ROWS, max(1, JOIN_TOKENS // self.max_len))
        self._join_rows = slot_buckets(1 << (group.bit_length() - 1))  # powers of two, up to `group`
        self._join_widths = prefix_widths(shortest_prompt, self.max_len)
        if self._joins is None:
            self._joins = CachedModel(self.model, self.vocab_size, self.max_len, self._join_widths)
        joins = self._joins
        for rows in self._join_rows if joins.graph_sizes else ():
            joins.prefill([[PAD_TOKEN]] * rows)  # allocates this row count's static buffers
            for width in self._join_widths:
                joins._graph(rows, width, joins._key_width(width), keep=1)
        joins.reset()
        return joins.graph_count

    def _prefill_captured(
        self, ids: torch.Tensor, slot_valid: torch.Tensor, positions: torch.Tensor, rows: int, width: int
    ) -> torch.Tensor:
        """Start over with `rows` rows of `width` left-padded ids (the graph `capture_joins` captured, eager
        without one); return the last logits [rows, 1, vocab], valid until the next forward."""
        self.reset(rows)
        key_width = self._key_width(width)
        mask = to_device(_prefill_mask(slot_valid, positions, key_width, self.model), self.device)
        ids, positions = to_device(ids, self.device), to_device(positions, self.device)
        if self.graph_sizes:
            return self._graph(rows, width, key_width, keep=1)(ids, positions, mask)
        return self._run(ids, positions, mask, 1)

    def _graph(
        self, rows: int, n: int, width: int, keep: int | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The CUDA graph of a forward of `rows` rows over n new columns attending over `width` key columns,
        returning the logits of the last `keep` columns (all n by default).

        Captured on first use (main thread only).
        """
        keep = keep or n
        if (rows, n, width, keep) not in self._graphs:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    f"no CUDA graph for {rows} rows x {n} tokens: call capture_graphs(({rows},)) before drafting "
                    "in threads"
                )
            ids = torch.zeros(rows, n, dtype=torch.long, device=self.device)
            positions = torch.zeros(rows, n, dtype=torch.long, device=self.device)
            mask = torch.zeros(rows, 1, n, width, dtype=self.model.dtype, device=self.device)
            if self._graph_step is not self._run:
                torch._dynamo.maybe_mark_dynamic(mask, 3)  # one compiled step serves every width

            def step() -> torch.Tensor:
                return self._graph_step(ids, positions, mask, keep)

            columns = self._columns
            torch.cuda.set_device(self.device)  # graph capture uses the current device's streams
            side = self._capture_stream  # one stream for every capture that shares a memory pool
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
                for _ in range(2):
                    step()
                    self._set_columns(columns)  # both warm-ups write the same n columns, past the cached ones
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # one pool per batch size: graphs never run at once, and each output is read before the next replay
            if rows not in self._graph_pools:
                self._graph_pools[rows] = torch.cuda.graph_pool_handle()
            pool = self._graph_pools[rows]
            # a dead model the garbage collector frees mid-capture would destroy its graphs, which breaks the capture
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph, pool=pool, stream=side):  # the warm-up's stream (cuBLAS workspaces)
                    output = step()
            finally:
                if collecting:
                    gc.enable()
            self._set_columns(columns)  # the capture only recorded the counters' advance; keep them as they were

            def replay(new_ids: torch.Tensor, new_positions: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
                ids.copy_(new_ids)
                positions.copy_(new_positions)
                mask.copy_(new_mask)
                graph.replay()
                return output

            self._graphs[rows, n, width, keep] = replay
        return self._graphs[rows, n, width, keep]


def _left_padded(prompts: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prompts` left-padded to `width` columns: the ids, which columns hold a token, and each column's position."""
    pads = torch.tensor([width - len(prompt) for prompt in prompts])
    ids = torch.tensor([[PAD_TOKEN] * (width - len(prompt)) + list(prompt) for prompt in prompts])
    slot_valid = torch.arange(width)[None, :] >= pads[:, None]
    return ids, slot_valid, (torch.arange(width)[None, :] - pads[:, None]).clamp_(min=0)


def _prefill_mask(slot_valid: torch.Tensor, positions: torch.Tensor, key_width: int, model: PreTrainedModel):
    """The mask of a prefill from an empty cache: causal among each row's tokens, padding seen by itself alone."""
    rows, width = slot_valid.shape
    visible = torch.ones(width, width, dtype=torch.bool).tril_() & slot_valid[:, None, :]
    visible |= torch.eye(width, dtype=torch.bool)
    return ragged_mask(torch.zeros(rows, 0, dtype=torch.bool), visible, positions, key_width, model.dtype, model.config)


def _copies_on_devices(tensor: torch.Tensor) -> Callable[[torch.device], torch.Tensor]:
    """`tensor` (on the CPU) on any device, copied there once: a sharded model's layers sit on several, and a
    copy per layer from pageable memory would make the host wait for the device's queued work each time."""
    return functools.cache(lambda device: to_device(tensor, device))


def to_device(tensors, device: torch.device):
    """A CPU tensor (or dict of them) on `device`, without waiting for queued GPU work."""
    if isinstance(tensors, dict):
        return {key: to_device(value, device) for key, value in tensors.items()}
    if device.type == "cuda":
        return tensors.pin_memory().to(device, non_blocking=True)
    return tensors.to(device)
