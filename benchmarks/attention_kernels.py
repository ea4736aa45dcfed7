"""Decode-step attention kernels for GPT-J-6B's shapes on a GPU: which one a compiled CUDA graph should hold.

One or a few query tokens per row (--queries) attend over the used columns of a static KV buffer (16
heads x 256 dims), 28 layers back to back inside one CUDA graph, so launch gaps do not count. Kernels
(--kernels): scaled_dot_product_attention as dispatched (cuDNN on an H200), its memory-efficient kernel
forced, the engine's `matmul_attention` (matmul, softmax, matmul) eager and compiled, one query token
written as products and sums (no matmul), compiled, and the engine's decode kernel (`decode_attention`,
split-KV) with its automatic split and with fixed columns per block. Each is captured and timed three
times. Prints and writes microseconds per layer, median [min, max], the largest difference from the
dispatched SDPA, and the bandwidth the keys and values were read at (GB/s).

    python benchmarks/attention_kernels.py --out DIR
    python benchmarks/attention_kernels.py --out DIR --rows 1 64 128 --queries 1 5 --kernels sdpa decode decode_split64
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import describe_machine
from repeats import graph_replay_ms, show, spread
from torch.nn.attention import SDPBackend, sdpa_kernel

from specbench.engine.attention import matmul_attention
from specbench.engine.decode_attention import decode_attention, launch

LAYERS, HEADS, HEAD_DIM = 28, 16, 256


def dispatched_sdpa(query, key, value, mask):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


def efficient_sdpa(query, key, value, mask):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return dispatched_sdpa(query, key, value, mask)


def engine_matmul(query, key, value, mask):
    return matmul_attention(query, key, value, mask, query.shape[-1] ** -0.5)


def engine_decode(query, key, value, mask, split_columns=None):
    if split_columns is None:
        return decode_attention(query, key, value, mask, query.shape[-1] ** -0.5)
    return launch(query, key, value, mask, query.shape[-1] ** -0.5, split_columns)


def reduced_attention(query, key, value, mask):
    """One query token as products and sums, no matmul: torch.compile writes each step as its own reduction."""
    scores = (query * key).sum(-1, dtype=torch.float32) * query.shape[-1] ** -0.5 + mask[:, :, 0]
    weights = torch.softmax(scores, dim=-1)
    return (weights[..., None] * value).sum(-2, dtype=torch.float32).to(query.dtype)[:, None]


KERNELS = {
    "sdpa": dispatched_sdpa,
    "sdpa_efficient": efficient_sdpa,
    "matmul": engine_matmul,
    "matmul_compiled": lambda: torch.compile(engine_matmul, dynamic=False),
    "reduced_compiled": lambda: torch.compile(reduced_attention, dynamic=False),
    "decode": engine_decode,
    **{f"decode_split{columns}": functools.partial(engine_decode, split_columns=columns) for columns in (32, 64, 128)},
}
COMPILED = ("matmul_compiled", "reduced_compiled")  # built when chosen: each compiles per shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--columns", type=int, nargs="+", default=[128, 256], help="key columns attended over")
    parser.add_argument("--queries", type=int, nargs="+", default=[1], help="query tokens per row")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kernels = {name: KERNELS[name]() if name in COMPILED else KERNELS[name] for name in args.kernels}
    torch._dynamo.config.recompile_limit = 64  # one compilation per shape and kernel
    results: dict = {"device": torch.cuda.get_device_name(), "host": describe_machine(), "torch": torch.__version__}
    for rows, columns, n in itertools.product(args.rows, args.columns, args.queries):
        layers = [
            [
                torch.randn(rows, HEADS, size, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                for size in (n, columns, columns)
            ]
            for _ in range(LAYERS)
        ]
        mask = torch.zeros(rows, 1, n, columns, device="cuda", dtype=torch.bfloat16)
        mask[..., -20:] = torch.finfo(torch.bfloat16).min  # the bucket's unused columns at the end
        read_gb = 2 * rows * HEADS * (columns - 20) * HEAD_DIM * 2 / 1e9  # keys and values of the visible columns
        reference = [dispatched_sdpa(*tensors, mask).float() for tensors in layers]
        for name, kernel in kernels.items():
            micros, difference = [], 0.0
            for _ in range(args.repeats):
                ms, outputs = graph_replay_ms(lambda k=kernel, ls=layers, m=mask: [k(*tensors, m) for tensors in ls])
                micros.append(1000 * ms / LAYERS)
                pairs = zip(outputs, reference, strict=True)
                difference = max(difference, *((out.float() - ref).abs().max().item() for out, ref in pairs))
            key = f"rows{rows}/columns{columns}/queries{n}/{name}"
            figures = spread(micros)
            results[key] = {"us_per_layer": figures, "max_abs_difference": difference,
                            "gb_per_s": read_gb / (figures["median"] / 1e6)}  # fmt: skip
            rate = results[key]["gb_per_s"]
            print(f"{key:46s} {show(figures, 1)} us/layer  {rate:6.0f} GB/s  max |diff| {difference:.4f}", flush=True)
        del layers, reference
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_kernels.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
