"""Honest clock readings, the stopwatch that times a decode's phases apart from the algorithm, and a heap
the garbage collector leaves alone while a decode is timed."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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


_open_heap_regions = 0  # `frozen_heap` regions open now: only the outermost freezes and unfreezes
_open_heap_regions_lock = threading.Lock()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep Python's cyclic garbage collector to the objects made inside a timed region.

    A full collection walks every object the interpreter tracks: about 400,000 once the CLI's modules are
    imported, 0.17 s on a 2-core AMD EPYC (`benchmarks/gc_pause.py`). One that falls inside a timed decode
    stalls the step of whichever mode is running, and its rows' TPOT with it. `gc.freeze` takes the objects that
    exist on entry out of the collector's reach (a full collection then walks only what the region made: 1-2 ms
    in a served trace, `benchmarks/gc_in_run.py`), as vLLM does after its warm-up. Garbage made inside the
    region is still collected; on leaving, every object is the collector's again, including any that were frozen
    before the region (by the caller or a library): `gc` cannot hand back only the objects one freeze took. A
    heap with some objects frozen already is frozen all the same: the GPU hosts' Python starts with 375 frozen,
    and with them the engine once left the other 486,000 to the collector (230 ms a full collection, inside the
    timed serves). A region inside another one (a decode inside a served trace) leaves the heap as the outer one
    froze it.
    """
    global _open_heap_regions
    with _open_heap_regions_lock:
        _open_heap_regions += 1
        if _open_heap_regions == 1:
            gc.freeze()
    try:
        yield
    finally:
        with _open_heap_regions_lock:
            _open_heap_regions -= 1
            if _open_heap_regions == 0:
                gc.unfreeze()
