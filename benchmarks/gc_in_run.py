"""Run one specbench command, or a benchmark script, with every full garbage collection logged: when it came,
what it took, and whether it fell inside a timed region (a decode or a served trace, where the engine freezes
the heap).

`gc_pause.py` says what one full collection would cost a step; this says whether a real run has any
inside what it times. `--open-heap` is the A/B: the timed regions are still marked, but the heap is
left open in them, as before `engine.timing.frozen_heap`:

    python benchmarks/gc_in_run.py -- experiment=offline mode=load load.rate=0.2 load.num_requests=8
    python benchmarks/gc_in_run.py --open-heap -- experiment=offline mode=load load.rate=0.2 load.num_requests=8
    python benchmarks/gc_in_run.py --open-heap --script benchmarks/gpu_load.py -- --quick --out /tmp/x \
        --sections k_schedule --max-batch 128 --k-rates 256 --min-requests 256 --max-requests 256 --new-tokens 64

The log (each full collection's start in seconds from the script's start, its ms and this thread's CPU ms in
it, timed or not, how many objects it could walk and their five commonest types, how many were frozen out of
it, how many it freed, and the innermost frames of the code it interrupted or that called `gc.collect()`), the
command, the count of timed regions entered and the machine go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import runpy
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from machine import describe_machine, results_path

import specbench.cli
from specbench.engine import timing

# every module that times with `frozen_heap`, by the name it imported it under
TIMING_MODULES = ("specbench.engine.continuous", "specbench.engine.decode", "specbench.hf_backend",
                  "specbench.llamacpp.native", "specbench.server.client")  # fmt: skip


class CollectionLog:
    """Full collections as they happen, and the timed regions the engine enters."""

    def __init__(self, open_heap: bool) -> None:
        self.open_heap = open_heap
        self.start = time.perf_counter()
        self.depth = 0  # timed regions now open (they nest)
        self.regions = 0  # timed regions entered
        self.collections: list[dict] = []
        self._began = 0.0
        self._began_cpu = 0.0
        self._walkable = 0
        self._commonest: list[tuple[str, int]] = []

    def on_gc(self, phase: str, info: dict) -> None:
        """`gc.callbacks` entry: time each full (generation 2) collection, and say what it could not walk (the
        frozen objects), what it freed and the code it interrupted (or that asked for it)."""
        if phase == "start":
            # what a full collection can walk: every tracked object but the frozen ones (listing them costs a few
            # ms in a heap that is frozen, tens in one that is not: a diagnostic's price, paid before `ms` starts)
            walkable = gc.get_objects() if info["generation"] == 2 else []
            self._walkable = len(walkable)
            self._commonest = Counter(type(thing).__name__ for thing in walkable).most_common(5)
            del walkable
            self._began = time.perf_counter()
            self._began_cpu = time.thread_time()
        elif info["generation"] == 2:
            ms = round(1000 * (time.perf_counter() - self._began), 3)
            self.collections.append({
                "at_s": round(self._began - self.start, 3),
                "ms": ms,
                # this thread's CPU time in the collection: near `ms` when it walked or freed, far below when it waited
                "cpu_ms": round(1000 * (time.thread_time() - self._began_cpu), 3),
                "timed": self.depth > 0,
                "walkable_objects": self._walkable,
                "commonest_walkable_types": dict(self._commonest),
                "frozen_objects": gc.get_freeze_count(),
                "collected": info["collected"],
                "where": [f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
                          for frame in traceback.extract_stack(limit=5)[:-1]],
            })  # fmt: skip

    def marked(self, frozen_heap: Callable) -> Callable:
        """`frozen_heap` that also counts the region; with `open_heap`, one that leaves the heap open."""

        @contextlib.contextmanager
        def region() -> Iterator[None]:
            self.depth += 1
            self.regions += 1
            try:
                with contextlib.nullcontext() if self.open_heap else frozen_heap():
                    yield
            finally:
                self.depth -= 1

        return region


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--open-heap", action="store_true", help="mark the timed regions but leave the heap open")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--script", type=Path, help="run this Python script with the arguments, not the CLI")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the specbench (or script) arguments, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    log = CollectionLog(args.open_heap)
    region = log.marked(timing.frozen_heap)
    for name in TIMING_MODULES:
        importlib.import_module(name).frozen_heap = region
    gc.callbacks.append(log.on_gc)
    code = 0
    try:
        if args.script:
            sys.argv = [str(args.script), *command]
            sys.path.insert(0, str(args.script.resolve().parent))  # the script's sibling modules, as when run
            runpy.run_path(str(args.script), run_name="__main__")
        else:
            specbench.cli.main(command)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        gc.callbacks.remove(log.on_gc)
    timed = [entry["ms"] for entry in log.collections if entry["timed"]]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "command": [str(args.script) if args.script else "specbench", *command],
        "exit_code": code,
        "heap_in_timed_regions": "open" if args.open_heap else "frozen",
        "timed_regions": log.regions,
        "full_collections": {"timed": len(timed), "untimed": len(log.collections) - len(timed)},
        "timed_collection_ms": timed,
        "log": log.collections,
    }
    print(f"{log.regions} timed regions; full collections: {len(timed)} inside them ({timed} ms), "
          f"{len(log.collections) - len(timed)} outside")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "open-heap" if args.open_heap else "frozen-heap"
    path = results_path(args.out, "gc-in-run", report["machine"], report["date"], tag)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(path)
    sys.exit(code)


if __name__ == "__main__":
    main()
