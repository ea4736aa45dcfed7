"""Decode-step attention kernels for GPT-J-6B's shapes on a GPU: which one a compiled CUDA graph should hold.

One query token per row attends over the used columns of a static KV buffer (16 heads x 256 dims),
28 layers back to back inside one CUDA graph, so launch gaps do not count. Kernels:
scaled_dot_product_attention as dispatched (cuDNN on an H200), its memory-efficient kernel forced, the
engine's `matmul_attention` (matmul, softmax, matmul) eager and compiled, and one query token written as
products and sums (no matmul), compiled. Each is captured and timed three times. Prints and writes
microseconds per layer, median [min, max], and the largest difference from the dispatched SDPA.

    python benchmarks/attention_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from repeats import graph_replay_ms, show, spread
from torch.nn.attention import SDPBackend, sdpa_kernel

from specbench.engine.attention import matmul_attention

LAYERS, HEADS, HEAD_DIM = 28, 16, 256


def dispatched_sdpa(query, key, value, mask):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


def efficient_sdpa(query, key, value, mask):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return dispatched_sdpa(query, key, value, mask)


def engine_matmul(query, key, value, mask):
    return matmul_attention(query, key, value, mask, query.shape[-1] ** -0.5)


def reduced_attention(query, key, value, mask):
    """One query token as products and sums, no matmul: torch.compile writes each step as its own reduction."""
    scores = (query * key).sum(-1, dtype=torch.float32) * query.shape[-1] ** -0.5 + mask[:, :, 0]
    weights = torch.softmax(scores, dim=-1)
    return (weights[..., None] * value).sum(-2, dtype=torch.float32).to(query.dtype)[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--columns", type=int, nargs="+", default=[128, 256], help="key columns attended over")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kernels = {
        "sdpa": dispatched_sdpa,
        "sdpa_efficient": efficient_sdpa,
        "matmul": engine_matmul,
        "matmul_compiled": torch.compile(engine_matmul, dynamic=False),
        "reduced_compiled": torch.compile(reduced_attention, dynamic=False),
    }
    torch._dynamo.config.recompile_limit = 64  # one compilation per shape and kernel
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for rows, columns in itertools.product(args.rows, args.columns):
        layers = [
            [torch.randn(rows, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for n in (1, columns, columns)]
            for _ in range(LAYERS)
        ]
        mask = torch.zeros(rows, 1, 1, columns, device="cuda", dtype=torch.bfloat16)
        mask[..., -20:] = torch.finfo(torch.bfloat16).min  # the bucket's unused columns at the end
        reference = [dispatched_sdpa(*tensors, mask).float() for tensors in layers]
        for name, kernel in kernels.items():
            micros, difference = [], 0.0
            for _ in range(args.repeats):
                ms, outputs = graph_replay_ms(lambda k=kernel, ls=layers, m=mask: [k(*tensors, m) for tensors in ls])
                micros.append(1000 * ms / LAYERS)
                pairs = zip(outputs, reference, strict=True)
                difference = max(difference, *((out.float() - ref).abs().max().item() for out, ref in pairs))
            key = f"rows{rows}/columns{columns}/{name}"
            results[key] = {"us_per_layer": spread(micros), "max_abs_difference": difference}
            print(f"{key:36s} {show(results[key]['us_per_layer'], 1)} us/layer  max |diff| {difference:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_kernels.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
