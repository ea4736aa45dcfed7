"""The Triton kernels of `decode_attention`: attention over one split of the key columns, then the splits combined.

`split_attention` runs one program per (row, key head, split). Its queries are the
row's query heads that share the key head, times the new tokens: up to BLOCK_M
vectors, attended together over the split's key columns, BLOCK_N at a time, with
a running maximum and sum (the online softmax). A column the mask hides from
every one of the program's queries is not read: its loads are predicated off.
Masked scores are -inf, so a query that sees nothing ends with a sum of 0 and
gets zeros. With one split the program writes the output itself; otherwise it
writes its unnormalised sum of values, its maximum and its sum of weights
(float32), and `combine_splits` rescales and adds them per query.
This module needs Triton; `decode_attention` imports it only when it runs on CUDA.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_attention(
    query,  # [rows, heads, n, dim]
    key,  # [rows, key heads, columns, dim]
    value,  # [rows, key heads, columns, dim]
    mask,  # [rows, 1, n, width], additive
    output,  # [rows, n, heads, dim], written when WRITE_OUTPUT
    partial_values,  # [rows * key heads, splits, BLOCK_M, BLOCK_D] float32, written otherwise
    partial_max,  # [rows * key heads, splits, BLOCK_M] float32
    partial_sum,  # [rows * key heads, splits, BLOCK_M] float32
    scaling,
    masked_value,  # mask entries at or below it hide their column
    n,
    group,  # query heads per key head
    key_heads,
    width,
    columns_per_split,
    dim,
    q_row, q_head, q_token, q_dim,
    k_row, k_head, k_column, k_dim,
    v_row, v_head, v_column, v_dim,
    m_row, m_token, m_column,
    o_row, o_token, o_head, o_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_OUTPUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row = pair // key_heads
    key_head = pair % key_heads
    queries = tl.arange(0, BLOCK_M)  # query vector i: head key_head * group + i // n, token i % n
    query_valid = queries < group * n
    head = key_head * group + queries // n
    token = queries % n
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < dim
    q = tl.load(
        query + row * q_row + head[:, None] * q_head + token[:, None] * q_token + dims[None, :] * q_dim,
        mask=query_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    accumulated = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = split * columns_per_split
    key_start = key + row * k_row + key_head * k_head
    value_start = value + row * v_row + key_head * v_head
    mask_start = mask + row * m_row + token[:, None] * m_token
    for offset in range(0, columns_per_split, BLOCK_N):  # the last split may end past the width
        in_split = offset + tl.arange(0, BLOCK_N)
        columns = first + in_split
        column_valid = (columns < width) & (in_split < columns_per_split)
        additive = tl.load(
            mask_start + columns[None, :] * m_column,
            mask=query_valid[:, None] & column_valid[None, :],
            other=float("-inf"),
        ).to(tl.float32)
        visible = additive > masked_value
        read = tl.max(visible.to(tl.int32), 0) > 0  # columns some query of this program sees
        load_mask = read[:, None] & dim_valid[None, :]
        k = tl.load(key_start + columns[:, None] * k_column + dims[None, :] * k_dim, mask=load_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scaling
        scores = tl.where(visible, scores + additive, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a query that has seen nothing yet: no NaN
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(running_max - shift)
        v = tl.load(value_start + columns[:, None] * v_column + dims[None, :] * v_dim, mask=load_mask, other=0.0)
        running_sum = running_sum * rescale + tl.sum(weights, 1)
        accumulated = accumulated * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=INPUT_PRECISION)
        running_max = new_max
    if WRITE_OUTPUT:
        result = accumulated / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(
            output + row * o_row + token[:, None] * o_token + head[:, None] * o_head + dims[None, :] * o_dim,
            result.to(output.dtype.element_ty),
            mask=query_valid[:, None] & dim_valid[None, :],
        )
    else:
        slot = pair * splits + split
        tl.store(partial_values + (slot * BLOCK_M + queries[:, None]) * BLOCK_D + dims[None, :], accumulated)
        tl.store(partial_max + slot * BLOCK_M + queries, running_max)
        tl.store(partial_sum + slot * BLOCK_M + queries, running_sum)


@triton.jit
def combine_splits(
    partial_values,
    partial_max,
    partial_sum,
    output,
    splits,
    n,
    group,
    key_heads,
    dim,
    o_row, o_token, o_head, o_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    row = pair // key_heads
    key_head = pair % key_heads
    queries = tl.arange(0, BLOCK_M)
    head = key_head * group + queries // n
    token = queries % n
    dims = tl.arange(0, BLOCK_D)
    total_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total_sum = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(splits):
        slot = pair * splits + split
        split_max = tl.load(partial_max + slot * BLOCK_M + queries)
        new_max = tl.maximum(total_max, split_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        old_scale = tl.exp(total_max - shift)
        split_scale = tl.exp(split_max - shift)
        split_values = tl.load(partial_values + (slot * BLOCK_M + queries[:, None]) * BLOCK_D + dims[None, :])
        total_sum = total_sum * old_scale + tl.load(partial_sum + slot * BLOCK_M + queries) * split_scale
        total = total * old_scale[:, None] + split_values * split_scale[:, None]
        total_max = new_max
    result = total / tl.where(total_sum > 0, total_sum, 1.0)[:, None]
    tl.store(
        output + row * o_row + token[:, None] * o_token + head[:, None] * o_head + dims[None, :] * o_dim,
        result.to(output.dtype.element_ty),
        mask=(queries < group * n)[:, None] & (dims < dim)[None, :],
    )
