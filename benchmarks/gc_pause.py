"""What one full garbage collection costs in a specbench process, with the heap open and frozen.

A decode that a full collection falls into stalls for as long as the collection takes, so the
engine freezes the heap while it times a decode (`specbench.engine.timing.frozen_heap`). This
script loads what a load run loads (the CLI's modules, a tiny GPT-2 on the CPU, one served trace)
and times `gc.collect()` with every object the collector may walk, then inside `frozen_heap`:

    python benchmarks/gc_pause.py                 # 5 collections each way
    python benchmarks/gc_pause.py --repeats 9

The result (median [min, max] in ms, the objects tracked, the machine) goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from machine import describe_machine, results_path
from repeats import show, spread

import specbench.cli  # noqa: F401  (what a run imports: Hydra, MLflow, transformers, torch)
from specbench.engine import CachedModel, DecodeSettings
from specbench.engine.continuous import serve
from specbench.engine.decode import BaselineDecoder, new_row
from specbench.engine.results import EngineRequest
from specbench.engine.timing import Stopwatch, frozen_heap
from specbench.testing import StepClock, make_model

VOCAB = 64


def collection_ms(repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` full collections."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    verifier = CachedModel(make_model("gpt2", VOCAB, seed=0), VOCAB)
    settings = DecodeSettings(16)
    trace = [EngineRequest(number, 0.0, [1 + number, 2, 3, 4], 16, seed=number) for number in range(4)]

    def make_row(request: EngineRequest):
        return new_row(request.prompt_ids, request.seed, settings, [], 1, 1, request.max_new_tokens)

    serve(BaselineDecoder(verifier, settings, Stopwatch(verifier.devices)), trace, make_row, 4, False, StepClock())
    tracked = len(gc.get_objects())
    open_heap = collection_ms(args.repeats)
    with frozen_heap():
        frozen = collection_ms(args.repeats)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "objects_tracked": tracked,
        "full_collection_ms": {"open": spread(open_heap), "frozen": spread(frozen)},
    }
    print(f"{tracked} objects tracked; a full collection, median [min, max] of {args.repeats}:")
    for name, figure in report["full_collection_ms"].items():
        print(f"  heap {name}: {show(figure, 3)} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, "gc-pause", report["machine"], report["date"])
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
