"""A compaction of GPT-J-6B's cache on a GPU: the engine's gather against advanced indexing.

`CachedModel._compact` moves each row's valid columns to the front of a fresh layout, for every
layer's keys and values ([rows, 16 heads, columns, 256] bf16, 28 layers: 56 tensors), and copies them
back into the static buffers. Timed here on such tensors, each row keeping 3 in 4 of 256 columns
(at random, in order):
- `gather`: the engine's way, `states.gather(2, index expanded over heads and dims)`, then a copy back;
- `indexing`: `states[rows, :, columns]` (a head vector per row and column), then a transposed copy back;
beside `copy`, one copy of the bytes kept (each read and written once: what a compaction cannot go
under), and whether both ways give the same tensors. Wall time between two device synchronisations,
5 times after 2 untimed; ms for all 56 tensors, median [min, max].

    python benchmarks/compaction_kernels.py --out DIR [--rows 128 64] [--quick]

`--quick`: small tensors on the CPU, a dry run of the script.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from machine import describe_machine
from repeats import show, spread

from specbench.engine.timing import Clock

LAYERS, HEADS, HEAD_DIM, COLUMNS = 28, 16, 256, 256


def kept_columns(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """[rows, 3/4 of columns]: each row's kept columns, a seeded random choice, in order."""
    generator = torch.Generator().manual_seed(0)
    kept = [torch.randperm(columns, generator=generator)[: 3 * columns // 4].sort().values for _ in range(rows)]
    return torch.stack(kept).to(device)


def by_gather(states: list[torch.Tensor], index: torch.Tensor) -> None:
    for tensor in states:
        moved = tensor.gather(2, index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3]))
        tensor[:, :, : index.shape[1]] = moved


def by_indexing(states: list[torch.Tensor], index: torch.Tensor) -> None:
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    for tensor in states:
        moved = tensor[rows, :, index]  # [rows, kept, heads, dim]
        tensor[:, :, : index.shape[1]] = moved.transpose(1, 2)


def timed_ms(work: Callable[[], None], device: torch.device) -> list[float]:
    """`work()`'s wall time in ms, 5 times after 2 untimed, each between two readings that wait for the device."""
    clock = Clock(device)
    for _ in range(2):
        work()
    times = []
    for _ in range(5):
        start = clock.now()
        work()
        times.append(1000 * (clock.now() - start))
    return times


def measure(rows: int, layers: int, heads: int, head_dim: int, columns: int, device: torch.device) -> dict:
    """Each way's time at `rows` rows, the copy's, and whether both ways agree."""
    index = kept_columns(rows, columns, device)
    states = [
        torch.randn(rows, heads, columns, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2 * layers)
    ]
    gathered, indexed = [states[0].clone()], [states[0].clone()]
    by_gather(gathered, index)
    by_indexing(indexed, index)
    kept = torch.empty(rows, heads, index.shape[1], head_dim, device=device, dtype=torch.bfloat16)
    return {
        "gather": spread(timed_ms(lambda: by_gather(states, index), device)),
        "indexing": spread(timed_ms(lambda: by_indexing(states, index), device)),
        "copy": spread(timed_ms(lambda: [kept.copy_(tensor[:, :, : index.shape[1]]) for tensor in states], device)),
        "same_result": bool(torch.equal(gathered[0], indexed[0])),
        "gib_kept": 2 * layers * kept.numel() * kept.element_size() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick else "cuda")
    shape = (2, 2, 8, 16) if args.quick else (LAYERS, HEADS, HEAD_DIM, COLUMNS)
    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "host": describe_machine(),
        "torch": torch.__version__,
        "layers_heads_head_dim_columns": shape,
    }
    for rows in [4] if args.quick else args.rows:
        figures = report[f"rows{rows}"] = measure(rows, *shape, device)
        shown = {name: show(value, 2) if isinstance(value, dict) else value for name, value in figures.items()}
        print(rows, "rows:", shown, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compaction_kernels.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
