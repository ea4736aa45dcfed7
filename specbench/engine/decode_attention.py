"""Decode attention over a static KV cache on CUDA, the key columns split across thread blocks (flash-decoding).

A decode or verify step feeds a few tokens per row (1 to k + 1, or a token tree's
nodes) that attend over a few hundred cached columns. A kernel with one block per
(row, head) leaves most of the GPU idle at small batches, and SDPA's kernels are
built for long queries. Here each block takes one row, one key head and one split
of the key columns, and attends all its query vectors (the query heads sharing the
key head, times the new tokens: grouped-query heads read each key once) with an
online softmax; a second kernel combines the splits' partial softmaxes. Columns
are split until about `PROGRAMS_PER_MULTIPROCESSOR` blocks per multiprocessor run:
at one row a step's few hundred columns are spread over many blocks, at 64 rows
there are enough (row, head) pairs and each pair reads its columns in one block,
so no partial sums are written. Columns that the mask hides from all of a block's
queries are not read (the padding up to the attention width, holes of ragged rows).

The mask is the engine's additive [rows, 1, n, width] mask; entries at or below
the mask dtype's lowest value hide their column. Outputs equal `matmul_attention`'s
to float rounding, except for a query that sees no column at all, which gets
zeros (`matmul_attention` gives the mean of every column there; the engine never
asks: every fed slot sees itself).

`decode_attention` is the custom op `specbench::decode_attention` (CUDA only, with
a fake implementation), so eager steps, CUDA-graph capture and torch.compile all
call the same kernels; torch.compile keeps it as one opaque call.
"""

from __future__ import annotations

import importlib.util

import torch

# at most this many query vectors (query heads per key head x new tokens) in one block; more go to SDPA
MAX_QUERIES = 64
MAX_HEAD_DIM = 256
# blocks aimed for per multiprocessor when splitting the key columns
PROGRAMS_PER_MULTIPROCESSOR = 4
TRITON = importlib.util.find_spec("triton") is not None


def serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> bool:
    """True when `decode_attention` takes these tensors: CUDA, few queries per key head, the engine's mask shape."""
    rows, heads, n, dim = query.shape
    return (
        TRITON
        and query.is_cuda
        and heads % key.shape[1] == 0
        and heads // key.shape[1] * n <= MAX_QUERIES
        and dim <= MAX_HEAD_DIM
        and key.shape[-1] == value.shape[-1] == dim
        and query.dtype == key.dtype == value.dtype
        and mask.dim() == 4
        and mask.shape[:3] == (rows, 1, n)
    )


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def block_sizes(queries: int, dim: int) -> tuple[int, int, int]:
    """(query vectors, key columns, head dims) of one block's tiles: powers of two, at least 16 (matrix units)."""
    block_m = max(16, _next_power_of_2(queries))
    block_d = max(16, _next_power_of_2(dim))
    block_n = max(16, min(64, 8192 // block_d))  # 16 KB of bfloat16 keys per tile at 256 dims
    return block_m, block_n, block_d


def columns_per_split(pairs: int, width: int, block_n: int, programs: int) -> int:
    """Key columns per block: `width` split (in whole tiles) until `pairs` x splits reaches `programs` blocks."""
    tiles = -(-width // block_n)
    splits = min(tiles, max(1, -(-programs // pairs)))
    return -(-tiles // splits) * block_n


def launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    split_columns: int | None = None,
) -> torch.Tensor:
    """Run the kernels (see the module docstring); `split_columns` overrides the columns per block.

    query [rows, heads, n, dim]; key and value [rows, key heads, >= width, dim]; mask [rows, 1, n, width].
    Returns [rows, n, heads, dim]. Runs wherever Triton does (CUDA; the CPU under TRITON_INTERPRET=1).
    """
    from specbench.engine import decode_kernels  # Triton is installed with CUDA builds of torch only

    rows, heads, n, dim = query.shape
    key_heads, width = key.shape[1], mask.shape[-1]
    group = heads // key_heads
    block_m, block_n, block_d = block_sizes(group * n, dim)
    pairs = rows * key_heads
    if split_columns is None:
        multiprocessors = torch.cuda.get_device_properties(query.device).multi_processor_count
        split_columns = columns_per_split(pairs, width, block_n, PROGRAMS_PER_MULTIPROCESSOR * multiprocessors)
    splits = -(-width // split_columns)
    output = query.new_empty(rows, n, heads, dim)
    partial_values = partial_max = partial_sum = output  # unused with one split
    if splits > 1:
        partial_values = torch.empty(pairs, splits, block_m, block_d, dtype=torch.float32, device=query.device)
        partial_max = torch.empty(pairs, splits, block_m, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
    precision = "ieee" if query.dtype == torch.float32 else None  # float32 dots stay float32, not tf32
    decode_kernels.split_attention[(pairs, splits)](
        query, key, value, mask, output, partial_values, partial_max, partial_sum,
        scaling, torch.finfo(mask.dtype).min, n, group, key_heads, width, split_columns, dim,
        *query.stride(), *key.stride(), *value.stride(), mask.stride(0), mask.stride(2), mask.stride(3),
        *output.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, WRITE_OUTPUT=splits == 1, INPUT_PRECISION=precision,
        num_warps=8 if block_m * block_d >= 8192 else 4, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        decode_kernels.combine_splits[(pairs,)](
            partial_values, partial_max, partial_sum, output, splits, n, group, key_heads, dim, *output.stride(),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return output


@torch.library.custom_op("specbench::decode_attention", mutates_args=(), device_types="cuda")
def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of a few query tokens per row over the mask's first key columns; [rows, n, heads, dim].

    Shapes as `matmul_attention` takes them (key and value may be longer than the mask: only
    its width is read). Check `serves` first.
    """
    return launch(query, key, value, mask, scaling)


@decode_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    rows, heads, n, dim = query.shape
    return query.new_empty(rows, n, heads, dim)
