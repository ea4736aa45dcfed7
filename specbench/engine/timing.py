"""Honest clock readings, and the stopwatch that times a decode's phases apart from the algorithm."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch


def model_devices(model: torch.nn.Module) -> tuple[torch.device, ...]:
    """Every device a model's weights sit on (several for a model sharded with transformers' device_map)."""
    return tuple(sorted({parameter.device for parameter in model.parameters()}, key=str))


class Clock:
    """Wall clock that first waits for queued GPU work, so readings are honest."""

    def __init__(self, devices: torch.device | Sequence[torch.device]) -> None:
        devices = [devices] if isinstance(devices, torch.device) else list(devices)
        self.devices = [device for device in devices if device.type == "cuda"]  # a sharded model uses several

    def now(self, wait: bool = True) -> float:
        """Seconds, after all queued work on the devices is done (unless `wait` is false: a reading taken
        just after a result reached the host, while later work is still queued)."""
        for device in self.devices if wait else ():
            torch.cuda.synchronize(device)
        return time.perf_counter()


class Stopwatch:
    """Started at the start of a batch; each reading also marks the start of the next lap."""

    def __init__(self, devices: torch.device | Sequence[torch.device]) -> None:
        self.clock = Clock(devices)
        self.start = self._mark = self.clock.now()

    def mark(self, wait: bool = True) -> None:
        """Start a lap now (see `Clock.now` for `wait`)."""
        self._mark = self.clock.now(wait)

    def lap(self, wait: bool = True) -> float:
        """Seconds since the last reading (see `Clock.now` for `wait`)."""
        now = self.clock.now(wait)
        seconds, self._mark = now - self._mark, now
        return seconds

    def elapsed(self, wait: bool = True) -> float:
        """Seconds since the start (see `Clock.now` for `wait`)."""
        self._mark = self.clock.now(wait)
        return self._mark - self.start
