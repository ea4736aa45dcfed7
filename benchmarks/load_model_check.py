"""The load model against a load benchmark's measurements: where its TPOT prediction goes wrong, and by how much.

    python benchmarks/load_model_check.py RESULTS.json [RESULTS.json ...] [--surface FILE] [--out FILE]

Each RESULTS.json is a `gpu_load.py` results file (or one that holds such files one key down). Two kinds of
section are read; no device is needed.

- `load` (the crossover searches' probes): for each probe and mode, the measured mean TPOT and
  occupancy, the cost surface's step at that occupancy per output token (over E = (1 - a^(k+1)) /
  (1 - a) under speculation), and the join time per request that the measured TPOT implies by the
  model's own form, TPOT = step / (E (1 - r p)) with r the measured requests/s, that is
  p = (1 - step / (E TPOT)) / r, beside the mean admission-to-first-token latency (what the CLI gave
  the model as p until session twelve) and the model's TPOT with that p.
- `k_schedule` with `--step-series` (each request's admission, first token and finish): at each rate,
  the model's mean and p99 TPOT for the baseline and each fixed k (at `--alpha`), with p taken both ways,
  the median latency and `join_seconds_per_request` (what the CLI gives it now), against the measured ones,
  and the crossover rate it predicts from that rate's p (where the p99 TPOTs cross; the mean TPOTs before
  session eighteen; searched in 1-1024 requests/s); and the
  same from a candidate model fitted to each mode's served steps (`ServedSteps`: the served step's
  ratio to the surface, and a join term per step), not yet the CLI's.

The surface is the section's own (`verify_ms`, `draft_ms`), or `--surface`'s `load` section for files
written before the k_schedule section kept one. Over every step-series table read, `p99_summary` scores the
model's p99 TPOT ratio (spec over baseline) and its mean ratio against the measured p99 ratio, by rate.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specbench.engine.costs import StepCosts
from specbench.engine.results import ServedRequest
from specbench.load.model import (
    ModeModel,
    join_seconds_per_request,
    mode_models,
    predicted_crossover_rate,
    predicted_load_metrics,
)

MODES = ("baseline", "spec")


def sections(path: Path, name: str) -> dict[str, dict]:
    """Every `name` section of a results file, at any depth, by where it is: a `load` section has a cost surface,
    a `k_schedule` section its modes (a step series' `load` mode is neither)."""
    mark = {"load": "verify_ms", "k_schedule": "modes"}[name]
    found, stack = {}, [("", json.loads(path.read_text()))]
    while stack:
        where, data = stack.pop()
        if isinstance(data.get(name), dict) and mark in data[name]:
            found[f"{where}/{name}".strip("/")] = data[name]
        stack += [(f"{where}/{key}".strip("/"), value) for key, value in data.items() if isinstance(value, dict)]
    return found


def surface(section: dict) -> StepCosts:
    """The section's cost surface (ms by batch size) as `StepCosts` in seconds."""
    return StepCosts(
        {int(rows): {int(n): ms / 1000 for n, ms in curve.items()} for rows, curve in section["verify_ms"].items()},
        {int(rows): {"draft": ms / 1000} for rows, ms in section["draft_ms"].items()},
    )


def check_probe(costs: StepCosts, alpha: float, k: int, rate: float, probe: dict, max_batch: int) -> dict:
    """One probe: measured against modelled, per mode."""
    admitted_to_first = {
        mode: (probe[f"ttft_ms_mean_{mode}"] - probe[f"queue_ms_mean_{mode}"]) / 1000 for mode in MODES
    }
    predicted = predicted_load_metrics(
        costs, alpha, k, rate, probe.get("mean_output_tokens", 64), admitted_to_first["baseline"], max_batch,
        draft_prefill_s=max(admitted_to_first["spec"] - admitted_to_first["baseline"], 0.0),
    )  # fmt: skip
    checked = {}
    surfaces = mode_models(costs, alpha, k, 0.0)
    for mode in MODES:
        occupancy = probe[f"occupancy_mean_{mode}"]
        step, tokens = surfaces[mode].step_at(occupancy), surfaces[mode].tokens_per_step
        tpot = probe[f"tpot_ms_mean_{mode}"] / 1000
        checked[mode] = {
            "occupancy": occupancy,
            "tpot_ms": 1000 * tpot,
            "surface_ms_per_token": 1000 * step / tokens,
            "implied_join_ms_per_request": 1000 * (1 - step / (tokens * tpot)) / probe[f"requests_per_s_{mode}"],
            "admitted_to_first_token_ms": 1000 * admitted_to_first[mode],
            "predicted_tpot_ms": predicted[f"predicted_tpot_ms_{mode}"],
            "predicted_occupancy": predicted[f"predicted_occupancy_{mode}"],
        }
    return checked


def check_step_series(costs: StepCosts, section: dict, alpha: float) -> dict:
    """The model's mean and p99 TPOT per rate and mode (the baseline, each fixed k) with p as a median latency and
    as the join share, against the measured ones, from the step series' per-request times."""
    checked = {}
    for name, entry in section.items():
        if not (isinstance(entry, dict) and "step_series" in entry):
            continue
        rate = float(name.rsplit("rate", 1)[1])
        timed = {
            mode: [_request(times) for times in series["requests"]] for mode, series in entry["step_series"].items()
        }
        baseline = timed["baseline"]
        output = sum(request.num_tokens for request in baseline) / len(baseline)
        for mode in timed:
            if not (mode.startswith("k") and mode[1:].isdigit()):
                continue
            k = int(mode[1:])
            if not all(k + 1 in curve for curve in costs.verify_s.values()):
                continue
            surfaces = mode_models(costs, alpha, k, 0.0)
            row = {"rate": rate, "measured_ms": {m: 1000 * _mean_tpot(timed[m]) for m in ("baseline", mode)},
                   "measured_p99_ms": {m: 1000 * _p99_tpot(timed[m]) for m in ("baseline", mode)}}  # fmt: skip
            for label, share in (("median_latency", _median_latency), ("join_share", join_seconds_per_request)):
                p = {m: share(timed[m]) for m in ("baseline", mode)}
                predicted = predicted_load_metrics(
                    costs, alpha, k, rate, output, p["baseline"], 128, draft_prefill_s=max(p[mode] - p["baseline"], 0)
                )
                crossover = predicted_crossover_rate(
                    costs, alpha, k, output, p["baseline"], 128, 1.0, 1024.0,
                    draft_prefill_s=max(p[mode] - p["baseline"], 0),
                )  # fmt: skip
                row[label] = {"p_ms": {m: 1000 * v for m, v in p.items()},
                              "predicted_ms": {"baseline": predicted["predicted_tpot_ms_baseline"],
                                               mode: predicted["predicted_tpot_ms_spec"]},
                              "predicted_p99_ms": {"baseline": predicted["predicted_tpot_ms_p99_baseline"],
                                                   mode: predicted["predicted_tpot_ms_p99_spec"]},
                              "predicted_crossover_rate": crossover}  # fmt: skip
            series = entry["step_series"]
            served = {"baseline": ServedSteps.fit(surfaces["baseline"], series["baseline"])}
            served[mode] = ServedSteps.fit(surfaces["spec"], series[mode])
            row["served_steps"] = {
                "fitted": {m: fitted.describe() for m, fitted in served.items()},
                "predicted_ms": {m: 1000 * fitted.tpot_s(rate, output) for m, fitted in served.items()},
                "predicted_crossover_rate": served_crossover(served["baseline"], served[mode], output),
            }
            checked[f"{name}_{mode}"] = row
    return checked


@dataclass(frozen=True)
class ServedSteps:
    """A candidate load model, fitted to one mode's step series: a served step costs r s(b) (the surface's step
    times the median ratio of the steps no join fell in), and a step that m requests joined during costs
    j0 + j1 m more (least squares over the steps with joins). With arrivals at rate a, a cycle of length c holds
    m = a c joins, one join group with probability 1 - exp(-a c):
    c = r s(b) + (1 - exp(-a c)) j0 + j1 a c; TPOT = c / E; Little's law b = a (j0 + j1 + n c), n = (L - 1) / E;
    above the rate that fills `max_batch` rows, the batch is full and requests are admitted at the rate that
    sustains it."""

    surface: ModeModel  # the surface's step and tokens per step in this mode
    ratio: float
    join_fixed_s: float
    join_per_request_s: float
    max_batch: int = 128

    @classmethod
    def fit(cls, surface: ModeModel, series: dict) -> ServedSteps:
        stays = [(times[1] / 1000, times[3] / 1000) for times in series["requests"]]  # admitted, finished
        admitted = sorted(start for start, _ in stays)
        gaps = []  # (seconds, rows, requests admitted during the step)
        for (before, _, _), (after, rows, _) in itertools.pairwise(series["steps"]):
            before, after = before / 1000, after / 1000
            if not any(start <= before < end for start, end in stays):
                continue  # the batch emptied: the gap holds the wait for the next arrival
            joined = bisect.bisect_right(admitted, after) - bisect.bisect_right(admitted, before)
            gaps.append((after - before, rows, joined))
        free = [seconds / surface.step_at(rows) for seconds, rows, joined in gaps if not joined]
        ratio = statistics.median(free) if free else 1.0
        joins = [(seconds - ratio * surface.step_at(rows), joined) for seconds, rows, joined in gaps if joined]
        fixed = per_request = 0.0
        if len({joined for _, joined in joins}) > 1:
            (fixed, per_request), *_ = np.linalg.lstsq(
                np.array([[1.0, joined] for _, joined in joins]), np.array([extra for extra, _ in joins]), rcond=None
            )
        return cls(surface, ratio, max(float(fixed), 0.0), max(float(per_request), 0.0))

    def cycle_s(self, rows: float, rate: float) -> float:
        cycle = step = self.ratio * self.surface.step_at(rows)
        for _ in range(50):  # a contraction while rate j1 < 1
            cycle = step + (1 - math.exp(-rate * cycle)) * self.join_fixed_s + self.join_per_request_s * rate * cycle
        return cycle

    def tpot_s(self, rate: float, output_tokens: float) -> float:
        tokens = self.surface.tokens_per_step
        steps = max(output_tokens - 1, 0) / tokens

        def in_batch_s(rows: float, admitted: float) -> float:
            return self.join_fixed_s + self.join_per_request_s + steps * self.cycle_s(rows, admitted)

        for rows in np.linspace(0.01, self.max_batch, 400):
            if rate * in_batch_s(rows, rate) <= rows:
                return self.cycle_s(rows, rate) / tokens
        low, high = 0.0, rate  # saturated: the admitted rate that keeps max_batch rows
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (
                (middle, high) if middle * in_batch_s(self.max_batch, middle) < self.max_batch else (low, middle)
            )
        return self.cycle_s(self.max_batch, low) / tokens

    def describe(self) -> dict:
        return {"ratio": self.ratio, "join_fixed_ms": 1000 * self.join_fixed_s,
                "join_per_request_ms": 1000 * self.join_per_request_s}  # fmt: skip


def served_crossover(baseline: ServedSteps, spec: ServedSteps, output_tokens: float) -> float | None:
    """The lowest rate in 1-1024 requests/s (80 log-spaced) where the candidate model's TPOTs cross."""
    rates = np.geomspace(1.0, 1024.0, 80)
    wins = [spec.tpot_s(rate, output_tokens) < baseline.tpot_s(rate, output_tokens) for rate in rates]
    return next((float(rates[i]) for i in range(1, len(rates)) if wins[i] != wins[i - 1]), None)


def _request(times: list[float]) -> ServedRequest:
    arrival, admitted, first, finish, tokens = times
    return ServedRequest(0, arrival / 1000, admitted / 1000, first / 1000, finish / 1000, int(tokens))


def _mean_tpot(requests: list[ServedRequest]) -> float:
    tpots = [(r.finish_s - r.first_token_s) / (r.num_tokens - 1) for r in requests if r.num_tokens > 1]
    return sum(tpots) / len(tpots)


def _p99_tpot(requests: list[ServedRequest]) -> float:
    """The 99th percentile TPOT of the requests with more than one token (as `load.metrics` computes it)."""
    return float(np.percentile([(r.finish_s - r.first_token_s) / (r.num_tokens - 1) for r in requests
                                if r.num_tokens > 1], 99))  # fmt: skip


def _median_latency(requests: list[ServedRequest]) -> float:
    latencies = sorted(r.first_token_s - r.admitted_s for r in requests)
    return latencies[len(latencies) // 2]


def p99_summary(rows: dict[str, dict]) -> dict[str, dict[str, float]]:
    """How well the model's p99 TPOT ratio (spec over baseline, p as the join share) and its mean ratio predict the
    measured p99 ratio of the step series' tables, by rate: n, the median and 90th percentile of |log(predicted /
    measured)|, and in how many tables the prediction has the measured sign (speculation winning or losing)."""
    by_rate: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows.values():
        mode = next(m for m in row["measured_p99_ms"] if m != "baseline")
        measured = row["measured_p99_ms"][mode] / row["measured_p99_ms"]["baseline"]
        share = row["join_share"]
        p99 = share["predicted_p99_ms"][mode] / share["predicted_p99_ms"]["baseline"]
        mean = share["predicted_ms"][mode] / share["predicted_ms"]["baseline"]
        for key in (f"rate {row['rate']:g}", "all"):
            by_rate.setdefault(key, []).append((measured, p99, mean))
    summary = {}
    for key, ratios in by_rate.items():
        entry: dict = {"tables": len(ratios)}
        for index, label in ((1, "p99"), (2, "mean")):
            errors = np.abs(np.log([r[index] / r[0] for r in ratios]))
            entry[f"{label}_abs_log_error_median"] = float(np.median(errors))
            entry[f"{label}_abs_log_error_p90"] = float(np.percentile(errors, 90))
            entry[f"{label}_sign_agrees"] = sum((r[index] < 1) == (r[0] < 1) for r in ratios)
        summary[key] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--surface", type=Path, help="a results file whose load section has the cost surface")
    parser.add_argument("--alpha", type=float, default=0.8, help="the oracle's acceptance in the k_schedule section")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    fallback = next(iter(sections(args.surface, "load").values())) if args.surface else None
    report: dict = {}
    tables: dict[str, dict] = {}
    for results in args.results:
        prefix = f"{results.stem}/" if len(args.results) > 1 else ""
        for where, section in sections(results, "load").items():
            costs = surface(section)
            for name, search in section.items():
                if not (isinstance(search, dict) and "probes" in search):
                    continue
                alpha, k = (float(part[5:]) if part.startswith("alpha") else int(part[1:])
                            for part in name.split("_")[:2])  # fmt: skip
                for rate, probe in sorted(search["probes"].items(), key=lambda item: float(item[0])):
                    checked = check_probe(costs, alpha, k, float(rate), probe, max_batch=128)
                    report[f"{prefix}{where}/{name}_rate{rate}"] = checked
                    print(f"{prefix}{where}/{name} rate {float(rate):g}: " + "; ".join(
                        f"{mode} TPOT {c['tpot_ms']:.1f} ms, predicted {c['predicted_tpot_ms']:.1f}; p implied "
                        f"{c['implied_join_ms_per_request']:.1f} ms, latency {c['admitted_to_first_token_ms']:.1f}"
                        for mode, c in checked.items()
                    ))  # fmt: skip
        for where, section in sections(results, "k_schedule").items():
            owner = section if "verify_ms" in section else fallback
            if owner is None:
                print(f"{prefix}{where}: no cost surface (give --surface)")
                continue
            for name, row in check_step_series(surface(owner), section, args.alpha).items():
                tables[f"{prefix}{where}/{name}"] = report[f"{prefix}{where}/{name}"] = row
                print(
                    f"{prefix}{where}/{name}: measured {row['measured_ms']}, predicted with the median latency "
                    f"{row['median_latency']['predicted_ms']}, with the join share {row['join_share']['predicted_ms']}"
                )
    if tables:
        report["p99_summary"] = p99_summary(tables)
        print(json.dumps(report["p99_summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
