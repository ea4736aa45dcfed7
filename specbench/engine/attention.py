"""Which attention masks a model can take, and the 4-D masks of a ragged batch.

The engine passes its own additive 4-D mask ([rows, 1, new tokens, key columns])
whenever plain causal attention would be wrong: rows with holes in their cache,
token trees, or a static cache whose buffer is longer than what was written.
A model with a sliding window needs that window in the mask too, because a custom
mask replaces the one transformers would have built:
- Mistral applies one mask to every layer: the engine passes the windowed mask;
- Qwen2 takes a dict of masks by layer type: the engine passes the full and the
  windowed mask under "full_attention" and "sliding_attention".
Other windowed or chunked attentions (GPT-Neo's local layers add their own bias
over physical key columns; Gemma-style hybrids are untested here) cannot take a
custom mask: `needs_plain_causal_mask` says so, and the engine refuses to use
them where a mask would be needed (draft sets on the verifier, batches > 1).

A static cache's buffer is sized for the whole run, but only its first columns
are in use. `PREFIX_ATTENTION` attends over as many key columns as the mask has:
the engine passes masks `prefix_width` columns wide, so attention reads the used
columns (rounded up to `PREFIX_BUCKET`, one CUDA graph per width) rather than
the whole buffer; without a mask it is plain SDPA. With the engine's mask, inside
a step that torch.compile traces (the engine's compiled decode steps), it is
`matmul_attention` rather than SDPA: for a few query tokens per row, SDPA's kernels take
longer than two matrix products and a softmax that inductor fuses with the mask
(GPT-J-6B on an H200: `benchmarks/NOTES.md`). On CUDA, a step of a few query tokens
per row (eager, captured or compiled) runs `decode_attention` instead, which splits
the key columns across blocks; the CPU keeps the paths above.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from specbench.engine.decode_attention import decode_attention, serves

# model type -> how it takes a windowed mask: one mask for all layers, or a dict keyed by layer type
WINDOWED_MASK_STYLES = {"mistral": "single", "qwen2": "by_layer_type"}
# the name models are switched to when the engine gives them a static cache (see the module docstring)
PREFIX_ATTENTION = "specbench_prefix"
# key columns are read in steps of this many: fewer widths mean fewer CUDA graphs to capture
PREFIX_BUCKET = 64


def sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window of the model's sliding layers, or None when every layer attends to all keys."""
    if config.model_type == "gpt_neo":
        return config.window_size if "local" in config.attention_layers else None
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    single_mask = WINDOWED_MASK_STYLES.get(config.model_type) == "single"  # windows every layer, whatever its type
    if window is not None and not single_mask and layer_types is not None and "sliding_attention" not in layer_types:
        return None  # e.g. Qwen2 with sliding_window set but no layer using it
    return window


def needs_plain_causal_mask(config: PretrainedConfig) -> bool:
    """True when the model only decodes correctly under transformers' own causal mask.

    Such a model can verify one drafter's chains at batch size 1, but not a draft set (token
    trees) nor a batch of several prompts; as a draft model it cannot run at batch size > 1.
    Check it on the config, before loading weights.
    """
    if getattr(config, "attention_chunk_size", None):
        return True
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        return True  # linear, chunked or other attentions
    return sliding_window(config) is not None and config.model_type not in WINDOWED_MASK_STYLES


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility [rows, queries, keys] as the additive float mask [rows, 1, queries, keys] models take."""
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def ragged_mask(
    cached_valid: torch.Tensor,
    new_visible: torch.Tensor,
    query_positions: torch.Tensor,
    width: int,
    dtype: torch.dtype,
    config: PretrainedConfig,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask of one forward over a ragged batch, on the CPU.

    `cached_valid` [rows, cached columns]: which cached columns hold one of the row's tokens;
    `new_visible` [rows, n, n]: which new columns each new column sees (causal, or a token tree's
    ancestors; always itself); `query_positions` [rows, n]: logical positions of the new columns.
    `width`: key columns the model attends over (cached + n, or a static cache's whole buffer).
    """
    rows, n = query_positions.shape
    cached = cached_valid.shape[1]
    visible = torch.zeros(rows, n, width, dtype=torch.bool)
    visible[:, :, :cached] = cached_valid[:, None, :]
    visible[:, :, cached : cached + n] = new_visible
    full = additive(visible, dtype)
    window = sliding_window(config)
    if window is None:
        return full
    # a row's valid columns are in logical order, so a column's position is the count of valid columns before it
    key_positions = torch.zeros(rows, width, dtype=torch.long)
    key_positions[:, :cached] = cached_valid.long().cumsum(1) - 1
    key_positions[:, cached : cached + n] = query_positions
    in_window = query_positions[:, :, None] - key_positions[:, None, :] < window
    windowed = additive(visible & in_window, dtype)
    if WINDOWED_MASK_STYLES.get(config.model_type) == "by_layer_type":
        return {"full_attention": full, "sliding_attention": windowed}
    return windowed


def prefix_width(columns: int, buffer_columns: int) -> int:
    """Key columns attention reads when `columns` are in use: rounded up to `PREFIX_BUCKET`, at most the buffer."""
    return min(buffer_columns, -(-columns // PREFIX_BUCKET) * PREFIX_BUCKET)


def prefix_widths(min_columns: int, buffer_columns: int) -> list[int]:
    """Every width `prefix_width` returns for `min_columns` up to `buffer_columns` columns in use."""
    first = prefix_width(min_columns, buffer_columns)
    return sorted({*range(first, buffer_columns, PREFIX_BUCKET), buffer_columns})


def matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention as matmul, softmax (in float32) and matmul, like transformers' eager attention.

    query [rows, heads, n, dim]; key and value [rows, key heads, width, dim], each key head shared
    by `heads // key heads` consecutive query heads; mask additive, [rows, 1, n, width].
    Returns [rows, n, heads, dim], the layout transformers' attention functions return.
    """
    rows, heads, n, dim = query.shape
    key_heads, width = key.shape[1], key.shape[2]
    grouped = query.reshape(rows, key_heads, heads // key_heads * n, dim)  # no copy of the keys for shared heads
    scores = torch.matmul(grouped * scaling, key.transpose(-1, -2)).view(rows, key_heads, -1, n, width)
    weights = torch.softmax(scores + mask[:, :, None], dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights.view(rows, key_heads, -1, width), value)
    return output.view(rows, heads, n, value.shape[-1]).transpose(1, 2).contiguous()


def prefix_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA over the first key columns only, as many as `attention_mask` has."""
    key, value = _used_columns(key, value, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over the first key columns only: `decode_attention` where it serves (CUDA), else as without it."""
    if attention_mask is not None and attention_mask.is_floating_point() and serves(query, key, value, attention_mask):
        return decode_attention(query, key, value, attention_mask, _scaling(query, kwargs)), None
    return prefix_attention_without_kernel(module, query, key, value, attention_mask, **kwargs)


def prefix_attention_without_kernel(module, query, key, value, attention_mask, **kwargs):
    """Attention over the first key columns only: `matmul_attention` in a compiled step, else `prefix_sdpa`."""
    if attention_mask is not None and attention_mask.is_floating_point() and torch.compiler.is_compiling():
        key, value = _used_columns(key, value, attention_mask)
        return matmul_attention(query, key, value, attention_mask, _scaling(query, kwargs)), None
    return prefix_sdpa(module, query, key, value, attention_mask, **kwargs)


def _scaling(query: torch.Tensor, kwargs: dict) -> float:
    scaling = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def _used_columns(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Keys and values cut to the mask's width (sliced unconditionally: torch.compile sees no branch on it)."""
    if mask is None:
        return key, value
    width = mask.shape[-1]
    return key[:, :, :width], value[:, :, :width]


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, sdpa_mask)  # masks transformers builds itself: as SDPA's
