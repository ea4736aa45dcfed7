"""How much of a saturated trace's p99 TPOT is the batch filling up: the p99 over every request against the
p99 over the requests that arrived after the first `--skip` (the slots of the batch), from the step series
that `gpu_load.py --step-series` keeps (the first replay of each trace), or from a load run's
`requests.jsonl` artifacts (its first serve of each trace: `load.exclude_first` does not change them).

    python benchmarks/fill_up_tail.py benchmarks/results/gpu-h200-2026-12-05-served-at-capacity.json
    python benchmarks/fill_up_tail.py benchmarks/results/gpu-h200-*.json --rate 256 --skip 128 --summary
    python benchmarks/fill_up_tail.py RUN/requests.jsonl RUN/requests_trace1.jsonl --skip 4

The same requests are left out in every mode (by arrival order, which the replayed trace fixes), so each
mode's ratio over the baseline compares the same requests. Prints one line per trace: each mode's p99 TPOT
over the baseline's, over all requests -> over the later ones; `--summary` then pools them by output lengths (equal
or spread: whether every baseline request emitted as many tokens, as with random weights and equal limits; with
real models a stop token spreads them).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Iterator
from pathlib import Path

from specbench.engine.results import ServedRequest, ServeResult
from specbench.load.metrics import mode_metrics


def step_series(node: object, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every (path, step series by mode) in a results file, where the series keep their requests."""
    if not isinstance(node, dict):
        return
    series = node.get("step_series")
    if isinstance(series, dict) and "requests" in series.get("baseline", {}):
        yield path, series
        return
    for key, child in node.items():
        yield from step_series(child, f"{path}/{key}")


def run_series(path: Path) -> dict:
    """A load run's `requests.jsonl` as a step series: each mode's requests as gpu_load.py stores them."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {
        mode: {
            "requests": [
                [1000 * line["arrival_s"], *(1000 * line[mode][key] for key in ("admitted_s", "first_token_s",
                                                                               "finish_s")), line[mode]["num_tokens"],
                 line[mode].get("error")]
                for line in lines
            ]
        }
        for mode in ("baseline", "spec")
    }  # fmt: skip


def served(rows: list[list]) -> ServeResult:
    """A serve rebuilt from its stored requests ([arrival, admitted, first token, finish] in ms, output tokens, and
    from a `requests.jsonl` any error; in arrival order, as gpu_load.py writes them)."""
    requests = [ServedRequest(number, *(ms / 1000 for ms in row[:4]), num_tokens=int(row[4]),
                              error=row[5] if len(row) > 5 else None)
                for number, row in enumerate(rows)]  # fmt: skip
    return ServeResult(requests, [], max(request.finish_s for request in requests))


def tpot_p99_ms(rows: list[list[float]], skip: int) -> float:
    """The p99 TPOT (ms) of the stored requests after the first `skip` to arrive (the library's own figures)."""
    return mode_metrics(served(rows).after_first(skip), "x")["tpot_ms_p99_x"]


def summary(ratios: list[tuple[str, bool, float, float]]) -> None:
    """Per output lengths (equal or spread), each mode's p99 ratios over all requests -> over the later ones,
    median [min, max]; for the fixed k's pooled, the share of their excess over the baseline that the cut
    removed (series whose ratio over all requests is above 1), median [quartiles]."""
    for equal in (True, False):
        group = [(mode, every, later) for mode, is_equal, every, later in ratios if is_equal == equal]
        if not group:
            continue
        print(f"{'equal' if equal else 'spread'} output lengths:")
        fixed = [(every, later) for mode, every, later in group if mode.startswith("k")]
        modes = {mode: [(every, later) for name, every, later in group if name == mode] for mode, _, _ in group}
        for name, pairs in (({"fixed k": fixed} if fixed else {}) | modes).items():
            every, later = (sorted(pair[side] for pair in pairs) for side in (0, 1))
            print(f"  {name} ({len(pairs)} series): {spread(every)} -> {spread(later)}, "
                  f"lower in {sum(b < a for a, b in pairs)}")  # fmt: skip
        removed = [1 - (later - 1) / (every - 1) for every, later in fixed if every > 1]
        if len(removed) > 1:
            low, median, high = statistics.quantiles(removed, n=4)
            print(f"  fixed k, excess removed ({len(removed)} series over 1): {median:.0%} [{low:.0%}, {high:.0%}]")


def spread(values: list[float]) -> str:
    """median [min, max] of sorted values, as ratios."""
    return f"{statistics.median(values):.2f}x [{values[0]:.2f}x, {values[-1]:.2f}x]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--rate", default="256", help="only the traces served at this rate (requests/s)")
    parser.add_argument("--skip", type=int, default=128, help="requests left out: the batch's slots")
    parser.add_argument("--summary", action="store_true", help="then the ratios pooled over the series")
    args = parser.parse_args(argv)
    ratios = []  # (mode, equal output lengths, p99 ratio over all requests, over the later ones)
    for file in args.results:
        found = ([("", run_series(file))] if file.suffix == ".jsonl"
                 else step_series(json.loads(file.read_text())))  # fmt: skip
        for path, series in found:
            if file.suffix != ".jsonl" and not re.search(rf"rate{re.escape(args.rate)}(_|$)", path.rsplit("/", 1)[-1]):
                continue
            baseline = series["baseline"]["requests"]
            if len(baseline) <= args.skip:
                continue
            equal = len({row[4] for row in baseline}) == 1
            every, later = tpot_p99_ms(baseline, 0), tpot_p99_ms(baseline, args.skip)
            here = [(mode, equal, tpot_p99_ms(rows["requests"], 0) / every,
                     tpot_p99_ms(rows["requests"], args.skip) / later)
                    for mode, rows in series.items() if mode != "baseline"]  # fmt: skip
            print(f"{file.name}{path}: " + ", ".join(f"{mode} {a:.2f} -> {b:.2f}" for mode, _, a, b in here))
            ratios += here
    if args.summary:
        summary(ratios)


if __name__ == "__main__":
    main()
