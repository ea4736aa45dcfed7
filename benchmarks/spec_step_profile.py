"""Where a speculative step's time goes at a full batch: GPT-J-6B shapes on a GPU, the oracle draft (alpha 0.8,
distilgpt2's cost), k = 4, 64 and 128 rows all arriving at once (one call of a GPU machine).

    python benchmarks/spec_step_profile.py --out DIR

Two measurements per batch size:
- the full-batch step: the median gap between the scheduler's steps while every row runs, in 3 serves
  after a warm-up, with nothing else timed;
- the phases of one more serve (the cost model's drafting steps, the whole drafting phase with the oracle's
  own work, verify, accept, commit, the end of the step; the cost model's cache truncation and either model's
  compaction), each wrapped in device synchronisations (so they add up to a little more than the step), and
  the cost model's and verifier's forwards that ran eagerly (no captured graph), by shape.
Beside them, the surface the load model and `k_schedule=load` use (`measure_step_costs`), so the step's host
time is the gap between the two.

    python benchmarks/spec_step_profile.py --out DIR --served 256 [--new-tokens-spread 0.5] [--quick]

instead times a saturated server: a Poisson trace at that rate (256 requests, 128-token prompts, 64 new
tokens each, or drawn as in `gpu_load.py` with a spread; 128 slots) served by the baseline and at k = 2, 3
and 4 (the oracle at alpha 0.8), each once untimed (the span and output tokens/s) and once with every phase
between two device synchronisations (totals): the steps' phases, the joins (the verifier's prefill of the
new rows, the drafters' reading of them, the whole admission), releases, compactions, and the span the
outermost phases leave unexplained; beside them the joins' count and rows. `--quick`: tiny models on the
CPU, a dry run of the script.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from gpu import architectures, build
from gpu_load import (
    FAVOURED_BIAS,
    FAVOURED_TOKEN,
    TOKENIZER_VOCAB,
    _full_step_ms,
    _requests,
    _serve,
    _setup_oracle_load,
)
from machine import describe_machine

import specbench.engine.continuous as continuous
import specbench.engine.decode as decode
from specbench.engine.cached_model import CachedModel
from specbench.engine.drafters import ModelDrafter
from specbench.engine.oracle import OracleDrafter
from specbench.engine.results import EngineRequest
from specbench.engine.timing import Clock

K, ALPHA = 4, 0.8


def full_step_ms(verifier: CachedModel, oracle: OracleDrafter, prompts: list[list[int]], rows: int) -> list[float]:
    """The median gap between full-batch steps of 3 serves (after a warm-up) of `rows` requests at t = 0."""
    requests = [EngineRequest(i, 0.0, prompts[i % len(prompts)], 64, seed=i) for i in range(rows)]
    _serve(verifier, [oracle], requests, K, 128)
    return [_full_step_ms(_serve(verifier, [oracle], requests, K, 128)) for _ in range(3)]


# readings that wait for the GPU's queued work (a --quick run's CPU has none to wait for)
CLOCK = Clock([torch.device("cuda")] if torch.cuda.is_available() else [])


def timing(phases: dict[str, list[float]], name: str, function, per_model: bool = False):
    """`function`, its every call timed between two device synchronisations into phases[name] (ms); `per_model`:
    a `CachedModel` method, timed under its model type and `name`."""

    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = CLOCK.now()
        result = function(*args, **kwargs)
        seconds = CLOCK.now() - start
        key = f"{args[0].model.config.model_type} {name}" if per_model else name
        phases.setdefault(key, []).append(1000 * seconds)
        return result

    return timed


def _phase_name(owner, name: str) -> str:
    """A wrapped function's phase: its module's or class's last name and its own."""
    return f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"


def served_phases(args: argparse.Namespace, verifier: CachedModel, oracle: OracleDrafter, prompts: list[list[int]],
                  rate: float) -> dict:  # fmt: skip
    """A saturated server's time by phase, baseline and k = 2, 3, 4 on one Poisson trace at `rate`."""
    requests = _requests(args, rate, prompts)
    _serve(verifier, [oracle], requests[:16], 2, args.max_batch)  # warm-up
    phases: dict[str, list[float]] = {}
    wrapped = (
        [(decode, name) for name in ("_draft", "_verify", "_accept", "_commit", "_end_step")]
        + [(decode.SpeculativeDecoder, name) for name in ("_catch_up", "_read_joined", "_plain_step", "release")]
        + [(decode.BaselineDecoder, "step"), (decode.BaselineDecoder, "release"), (continuous, "_admit")]
    )
    originals = {(owner, name): getattr(owner, name) for owner, name in wrapped}
    outermost = {_phase_name(owner, name) for owner, name in wrapped}
    per_model = {name: getattr(CachedModel, name) for name in ("admit", "remove_rows", "keep_rows", "_compact")}
    report: dict = {"requests": len(requests), "new_tokens_spread": args.new_tokens_spread}
    for mode, k in (("baseline", 0), ("k2", 2), ("k3", 3), ("k4", 4)):
        drafters = [oracle] if k else []
        clean = _serve(verifier, drafters, requests, k or 1, args.max_batch)
        for (owner, name), function in originals.items():
            setattr(owner, name, timing(phases, _phase_name(owner, name), function))
        for name, function in per_model.items():
            setattr(CachedModel, name, timing(phases, name, function, per_model=True))
        phases.clear()
        timed = _serve(verifier, drafters, requests, k or 1, args.max_batch)
        for (owner, name), function in originals.items():
            setattr(owner, name, function)
        for name, function in per_model.items():
            setattr(CachedModel, name, function)
        rows_per_join = Counter(request.admitted_s for request in timed.requests)  # a join admits at one time
        tokens = sum(request.num_tokens for request in clean.requests)
        report[mode] = {
            "span_ms": 1000 * clean.wall_s,
            "output_tokens_per_s": tokens / clean.wall_s,
            "full_step_ms_p50": _full_step_ms(clean),
            "steps": len(clean.steps),
            "timed_span_ms": 1000 * timed.wall_s,
            "unexplained_ms": 1000 * timed.wall_s - sum(sum(phases.get(name, [])) for name in outermost),
            "joins": len(rows_per_join),
            "rows_per_join_median": statistics.median(rows_per_join.values()),
            "phases_ms": {
                name: {"total": sum(v), "calls": len(v), "median": statistics.median(v)}
                for name, v in sorted(phases.items())
            },
        }
        print(mode, json.dumps(report[mode]), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--served", type=float, nargs="*", default=[], help="profile a served trace at these rates")
    parser.add_argument("--new-tokens-spread", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="with --served: tiny models on the CPU, a dry run")
    cli = parser.parse_args()
    out = cli.out
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(prompt_len=128, new_tokens=64, ks=[K], max_batch=128, distinct_prompts=64, repeats=3,
                              device=torch.device("cpu" if cli.quick else "cuda"), quick=cli.quick,
                              new_tokens_spread=cli.new_tokens_spread,
                              trace_seconds=1.0, min_requests=256, max_requests=256)  # fmt: skip
    if cli.quick:
        args.prompt_len, args.new_tokens, args.max_batch, args.distinct_prompts, args.repeats = 12, 10, 8, 4, 1
        args.min_requests = args.max_requests = 24
    dtype = torch.float32 if cli.quick else torch.bfloat16
    models = {name: build(cls, cfg, args.device, dtype) for name, (cls, cfg) in architectures(cli.quick).items()}
    with torch.no_grad():
        models["gpt_j_6b"].lm_head.bias[FAVOURED_TOKEN] += FAVOURED_BIAS
    verifier, cost, prompts, references, costs = _setup_oracle_load(args, models, [2, 3, K] if cli.served else [K])
    oracle = OracleDrafter("oracle", ALPHA, cost, TOKENIZER_VOCAB)
    oracle.set_references(references)
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "host": describe_machine(),
        "surface_verify_ms": {b: {n: 1000 * s for n, s in c.items()} for b, c in costs.verify_s.items()},
        "surface_draft_ms": {b: 1000 * sum(c.values()) for b, c in costs.draft_s.items()},
    }
    if cli.served:
        for rate in cli.served:
            report[f"served_rate{rate:g}"] = served_phases(args, verifier, oracle, prompts, rate)
        (out / "spec_step_profile.json").write_text(json.dumps(report, indent=1))
        return
    report["full_step_ms"] = {rows: full_step_ms(verifier, oracle, prompts, rows) for rows in (64, 128)}
    print("full-batch step (ms):", report["full_step_ms"], flush=True)

    phases: dict[str, list[float]] = {}
    eager: dict[str, int] = {}
    for name in ("_draft", "_verify", "_accept", "_commit", "_end_step"):
        setattr(decode, name, timing(phases, name, getattr(decode, name)))
    ModelDrafter.propose = timing(phases, "cost_model_propose", ModelDrafter.propose)
    for method in ("commit", "truncate", "_compact"):
        setattr(CachedModel, method, timing(phases, method, getattr(CachedModel, method), per_model=True))
    run = CachedModel._run

    def counted_run(self, input_ids, *rest, **kwargs):
        key = f"{self.model.config.model_type} {tuple(input_ids.shape)}"
        eager[key] = eager.get(key, 0) + 1
        return run(self, input_ids, *rest, **kwargs)

    CachedModel._run = counted_run
    step = decode.SpeculativeDecoder.step
    decode.SpeculativeDecoder.step = timing(phases, "step", step)
    for rows in (64, 128):
        phases.clear()
        eager.clear()
        requests = [EngineRequest(i, 0.0, prompts[i % len(prompts)], 64, seed=i) for i in range(rows)]
        _serve(verifier, [oracle], requests, K, args.max_batch)
        report[f"rows{rows}"] = {
            "phases_ms": {name: {"median": statistics.median(v), "calls": len(v)} for name, v in phases.items()},
            "eager_forwards": dict(eager),
        }
        print(rows, json.dumps(report[f"rows{rows}"]), flush=True)
    (out / "spec_step_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
