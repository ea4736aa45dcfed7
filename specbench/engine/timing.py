"""Honest clock readings, and the stopwatch that times a decode's phases apart from the algorithm."""

from __future__ import annotations

import time

import torch


class Clock:
    """Wall clock that first waits for queued GPU work, so readings are honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None

    def now(self) -> float:
        """Seconds, after all queued work on the device is done."""
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class Stopwatch:
    """Started at the start of a batch; each reading also marks the start of the next lap."""

    def __init__(self, device: torch.device) -> None:
        self.clock = Clock(device)
        self.start = self._mark = self.clock.now()

    def mark(self) -> None:
        """Start a lap now."""
        self._mark = self.clock.now()

    def lap(self) -> float:
        """Seconds since the last reading."""
        now = self.clock.now()
        seconds, self._mark = now - self._mark, now
        return seconds

    def elapsed(self) -> float:
        """Seconds since the start."""
        self._mark = self.clock.now()
        return self._mark - self.start
