"""Repeated measurements as the benchmarks report them: median, min and max."""

from __future__ import annotations

import statistics

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
