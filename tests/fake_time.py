"""Fake time for the timing tests: time moves only when a model computes, by known amounts, as on a GPU.

`install` replaces `time.perf_counter` and `torch.cuda.synchronize` for one test, and `FakeTime.time_passes`
gives a model's passes (prefills and forwards) known costs. A model given fake GPUs runs its passes as a GPU
does: each pass is queued, and its seconds count only once it is known to be done, that is after a
`torch.cuda.synchronize` of every GPU, or once tokens chosen after it reached the host (the decode's
`_start_reading`). So a clock reading that does not wait misses the passes still queued, and every figure a
decode reports can be recomputed from the passes it made. With no fake GPUs, each pass is done at once.
Passes, synchronizes, token copies and specbench's clock readings are logged in order in `events`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

import specbench.engine.decode
from specbench.engine import CachedModel

GPUS = (torch.device("cuda", 0), torch.device("cuda", 1))  # a verifier sharded over two GPUs


@dataclass
class _Pass:
    seconds: float
    unsynchronized: set[torch.device]  # the GPUs not synchronized since the pass was queued


class FakeTime:
    """Fake `time.perf_counter` and `torch.cuda.synchronize`, and passes that take known seconds."""

    def __init__(self, gpus: Sequence[torch.device] = GPUS) -> None:
        self.gpus = tuple(gpus)
        self.now = 0.0
        # in order: ("pass", model name), ("sync", device), ("copy", None), ("host", None), ("read", module)
        self.events: list[tuple[str, object]] = []
        self._queued: deque[_Pass] = deque()  # passes not known to be done, oldest first
        self._issued = self._done = 0  # passes queued so far, and how many of them are done

    def perf_counter(self) -> float:
        """The fake time; a reading by specbench's code is logged."""
        module = sys._getframe(1).f_globals.get("__name__", "")
        if module.startswith("specbench."):
            self.events.append(("read", module))
        return self.now

    def synchronize(self, device: torch.device) -> None:
        """Wait for `device`: the passes queued on it are done once every GPU they run on was synchronized."""
        self.events.append(("sync", torch.device(device)))
        for queued in self._queued:
            queued.unsynchronized.discard(torch.device(device))
        while self._queued and not self._queued[0].unsynchronized:
            self._finish(self._done + 1)

    def time_passes(
        self, model: CachedModel, seconds: float | Callable[[torch.Tensor], float], name: str
    ) -> CachedModel:
        """Give each pass of `model` a cost of `seconds` (or `seconds(input_ids)`); the model says it runs on the
        fake GPUs, so clock readings of decodes it verifies wait for them."""
        feed = model._feed

        def timed_feed(input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self.queue(seconds(input_ids) if callable(seconds) else seconds, name)
            return feed(input_ids, *args, **kwargs)

        model._feed = timed_feed
        if self.gpus:
            model.devices = self.gpus
        return model

    def queue(self, seconds: float, name: str) -> None:
        """One pass of `seconds` on every fake GPU (done at once without them)."""
        self.events.append(("pass", name))
        self._queued.append(_Pass(seconds, set(self.gpus)))
        self._issued += 1
        if not self.gpus:
            self._finish(self._issued)

    def logged_reads(self, start_reading: Callable) -> Callable:
        """The decode's `_start_reading`, logging the copy's start ("copy") and its arrival on the host ("host"),
        which finishes every pass queued before the copy began."""

        def start(tokens: torch.Tensor) -> Callable[[], list[int]]:
            self.events.append(("copy", None))
            queued_before = self._issued
            read = start_reading(tokens)

            def read_on_host() -> list[int]:
                values = read()
                self._finish(queued_before)
                self.events.append(("host", None))
                return values

            return read_on_host

        return start

    def _finish(self, passes: int) -> None:
        """Passes 1..`passes` are done: their seconds count."""
        while self._done < passes:
            self.now += self._queued.popleft().seconds
            self._done += 1


def install(monkeypatch: pytest.MonkeyPatch, gpus: Sequence[torch.device] = GPUS) -> FakeTime:
    """Fake time for the rest of a test."""
    fake = FakeTime(gpus)
    monkeypatch.setattr(time, "perf_counter", fake.perf_counter)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    monkeypatch.setattr(
        specbench.engine.decode, "_start_reading", fake.logged_reads(specbench.engine.decode._start_reading)
    )
    return fake
