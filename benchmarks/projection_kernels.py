"""GPT-J-6B's projections of one layer-norm output at decode sizes on a GPU: two products or one stacked.

Per layer, q/k/v (already stacked: [3 x 4096, 4096], no bias) then the MLP's input projection
([16384, 4096] with bias), against one product over all four stacked ([28672, 4096] with a bias over
all four; the engine puts zeros where q/k/v have none, the values do not change the timing), as
`specbench.engine.fusion.fuse_projections` does for GPT-J's parallel blocks. 28 layers back to back
in one CUDA graph, each variant captured and timed three times; prints and writes microseconds per
layer, median [min, max].

    python benchmarks/projection_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from machine import describe_machine
from repeats import graph_replay_ms, show, spread
from torch.nn.functional import linear

LAYERS, HIDDEN = 28, 4096


def weights(out_features: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.randn(out_features, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5
    return weight, torch.randn(out_features, device="cuda", dtype=torch.bfloat16) if bias else None


def time_variants(rows: int, repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds per layer of each variant at `rows` rows."""
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    separate = [(weights(3 * HIDDEN, False), weights(4 * HIDDEN, True)) for _ in range(LAYERS)]
    stacked = [weights(7 * HIDDEN, True) for _ in range(LAYERS)]
    variants = {
        "qkv_then_mlp_input": lambda: [(linear(x, *qkv), linear(x, *mlp)) for qkv, mlp in separate],
        "stacked": lambda: [linear(x, *layer) for layer in stacked],
    }
    return {
        name: spread([1000 * graph_replay_ms(step)[0] / LAYERS for _ in range(repeats)])
        for name, step in variants.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "host": describe_machine(), "torch": torch.__version__}
    for rows in args.rows:
        for name, micros in time_variants(rows, args.repeats).items():
            results[f"rows{rows}/{name}"] = micros
            print(f"rows {rows:3d} {name:20s} {show(micros, 1)} us/layer", flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection_kernels.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
