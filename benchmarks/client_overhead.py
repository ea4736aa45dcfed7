"""The server client's own added latency per chunk (engine.backend=server), at 100 concurrent streams.

Against the scripted server (specbench.server.scripted, in a process of its own), which
streams instantly: no model, each chunk's text is the server's `time.perf_counter()` as it
wrote the chunk. The client (specbench.server.client.replay) timestamps each chunk as it
parses it, on the same clock (CLOCK_MONOTONIC, shared by the processes), so

    added latency = client's chunk time - server's stamp

per chunk: the server framework's send path (starlette, uvicorn), the loopback socket,
aiohttp's HTTP parsing and the event loop's scheduling until the client notes the read, i.e. an
upper bound on what the client adds to every TTFT and ITL it reports. `--streams`
requests each stream `--chunks` chunks `--interval-ms` apart (100 x 50 chunks/s: 5,000
chunks/s by default), in two arrangements:
- staggered: the streams start evenly spread over one interval, so their chunks do not
  coincide (independent streams): the client's own latency per chunk, target <= 0.2 ms at
  p99;
- lockstep: every stream's chunk at the same instant, as a batching server's decode step
  emits them: the client takes the reads one after the other, so this is how far apart it
  timestamps chunks that arrived together.

Each run's p50, p90, p99 and max go to benchmarks/results/ with the machine; the figures
are median [min, max] over `--repeats` runs. Timings mean something only on a quiet
machine.

    python benchmarks/client_overhead.py                       # 100 streams, 3 runs
    python benchmarks/client_overhead.py --repeats 1 --tag noisy-check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from machine import describe_machine, results_path
from repeats import show, spread

from specbench.load.trace import TraceRequest
from specbench.server.client import RequestSettings, replay
from specbench.server.managed import started_server

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_P99_MS = 0.2
LEAD_S = 0.2  # the trace starts this long after the call, so that the first stamps follow it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=100, help="chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="between a stream's chunks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="appended to the results file's name")
    return parser.parse_args(argv)


ARRANGEMENTS = ("staggered", "lockstep")


def one_run(base_url: str, args: argparse.Namespace, folder: Path, arrangement: str) -> dict[str, float]:
    """Per-chunk added latency (ms) of one run: its percentiles."""
    script = f"chunks={args.chunks} interval_ms={args.interval_ms:g} stamp=1"
    spread_s = args.interval_ms / 1000 / args.streams if arrangement == "staggered" else 0.0
    trace = [TraceRequest(index, index * spread_s, text=script) for index in range(args.streams)]
    settings = RequestSettings(model="scripted", max_tokens=args.chunks, timeout_s=600)
    start_at = time.perf_counter() + LEAD_S
    result = replay(base_url, trace, [], settings, folder / "responses.jsonl", start_at=start_at)
    latencies = []
    for line in result.requests.lines():
        if line["error"]:
            raise SystemExit(f"error: request {line['request_id']} failed: {line['error']}")
        stamps = [float(stamp) for stamp in line["text"].split()]
        latencies += [start_at + received - sent for received, sent in zip(line["chunk_times_s"], stamps, strict=True)]
    milliseconds = 1000 * np.array(latencies)
    figures = {f"p{q}": float(np.percentile(milliseconds, q)) for q in (50, 90, 99)}
    return figures | {"max": float(milliseconds.max()), "chunks": len(milliseconds)}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "target_p99_ms": TARGET_P99_MS,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        command = f"{sys.executable} -m specbench.server.scripted --port {{port}}"
        with started_server(command, "scripted", None, Path(scratch) / "server.log", 60) as server:
            warm_up = argparse.Namespace(**{**vars(args), "streams": 2, "chunks": 3})
            one_run(server.base_url, warm_up, Path(scratch), "lockstep")
            for _ in range(args.repeats):  # the arrangements alternate, so drift hits both alike
                report["runs"].append(
                    {name: one_run(server.base_url, args, Path(scratch), name) for name in ARRANGEMENTS}
                )
    report["added_latency_ms"] = {
        name: {stat: spread([run[name][stat] for run in report["runs"]]) for stat in ("p50", "p90", "p99", "max")}
        for name in ARRANGEMENTS
    }
    for name, figures in report["added_latency_ms"].items():
        for stat, figure in figures.items():
            print(
                f"{name}, added latency per chunk, {stat}: {show(figure, 3)} ms (median [min, max] of {args.repeats})"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, "client-overhead", report["machine"], report["date"], args.tag)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
