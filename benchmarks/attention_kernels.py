"""Decode-step attention kernels for GPT-J-6B's shapes on a GPU: which one a CUDA graph should hold.

One query token per row attends over a static KV buffer (16 heads x 256 dims, 292 columns: 128-token
prompt + 128 new tokens + slack, as in `gpu.py`), 28 layers back to back inside one CUDA graph, so
launch gaps do not count. Kernels: scaled_dot_product_attention as dispatched (cuDNN on an H200),
its memory-efficient kernel forced, and a plain bfloat16 matmul-softmax-matmul, eager and compiled.
Prints and writes microseconds per layer and the largest difference from the dispatched SDPA.

    python benchmarks/attention_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

LAYERS, HEADS, HEAD_DIM, COLUMNS = 28, 16, 256, 292


def plain_attention(query, key, value, mask):
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5 + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value)


def dispatched_sdpa(query, key, value, mask):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def efficient_sdpa(query, key, value, mask):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def time_in_graph(step: Callable[[], list[torch.Tensor]], replays: int = 50) -> tuple[float, list[torch.Tensor]]:
    """Microseconds per layer of `step` captured in one CUDA graph, and its outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        outputs = step()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / LAYERS * 1000, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    kernels = {
        "sdpa": dispatched_sdpa,
        "sdpa_efficient": efficient_sdpa,
        "plain": plain_attention,
        "plain_compiled": torch.compile(plain_attention, dynamic=False),
    }
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for rows in args.rows:
        layers = [
            [torch.randn(rows, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for n in (1, COLUMNS, COLUMNS)]
            for _ in range(LAYERS)
        ]
        mask = torch.zeros(rows, 1, 1, COLUMNS, device="cuda", dtype=torch.bfloat16)
        mask[..., -20:] = torch.finfo(torch.bfloat16).min  # unused columns at the end, as in a static buffer
        reference = [dispatched_sdpa(*tensors, mask).float() for tensors in layers]
        for name, kernel in kernels.items():
            micros, outputs = time_in_graph(lambda k=kernel, ls=layers, m=mask: [k(*tensors, m) for tensors in ls])
            pairs = zip(outputs, reference, strict=True)
            difference = max((out.float() - ref).abs().max().item() for out, ref in pairs)
            results[f"rows{rows}/{name}"] = {"us_per_layer": micros, "max_abs_difference": difference}
            print(f"rows {rows:3d} {name:15s} {micros:7.1f} us/layer  max |diff| {difference:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_kernels.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
