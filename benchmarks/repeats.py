"""Repeated measurements as the benchmarks report them: median, min and max."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from specbench.engine.timing import Clock


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements, and how many there were."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def show(figure: dict[str, float], digits: int, scale: float = 1.0) -> str:
    """A spread as `median [min, max]`, each value multiplied by `scale`."""
    median, low, high = (scale * figure[key] for key in ("median", "min", "max"))
    return f"{median:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def copy_bandwidth(device: torch.device, gib: float = 4) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    source = torch.randn(int(gib * 2**30 / 2), dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    clock = Clock(device)
    for _ in range(3):
        target.copy_(source)
    start = clock.now()
    for _ in range(10):
        target.copy_(source)
    return 2 * source.numel() * source.element_size() * 10 / (clock.now() - start) / 1e9


def graph_replay_ms(step: Callable[[], list[torch.Tensor]], replays: int = 50) -> tuple[float, list[torch.Tensor]]:
    """Milliseconds per replay of `step` captured in one CUDA graph (no launch gaps), and its outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (and torch.compile's compilation)
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
    return start.elapsed_time(end) / replays, outputs
