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
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from gpu import architectures, build
from gpu_load import FAVOURED_BIAS, FAVOURED_TOKEN, TOKENIZER_VOCAB, _full_step_ms, _serve, _setup_oracle_load

import specbench.engine.decode as decode
from specbench.engine.cached_model import CachedModel
from specbench.engine.drafters import ModelDrafter
from specbench.engine.oracle import OracleDrafter
from specbench.engine.results import EngineRequest

K, ALPHA = 4, 0.8


def full_step_ms(verifier: CachedModel, oracle: OracleDrafter, prompts: list[list[int]], rows: int) -> list[float]:
    """The median gap between full-batch steps of 3 serves (after a warm-up) of `rows` requests at t = 0."""
    requests = [EngineRequest(i, 0.0, prompts[i % len(prompts)], 64, seed=i) for i in range(rows)]
    _serve(verifier, [oracle], requests, K, 128)
    return [_full_step_ms(_serve(verifier, [oracle], requests, K, 128)) for _ in range(3)]


def timing(phases: dict[str, list[float]], name: str, function, per_model: bool = False):
    """`function`, its every call timed between two device synchronisations into phases[name] (ms); `per_model`:
    a `CachedModel` method, timed under its model type and `name`."""

    @functools.wraps(function)
    def timed(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        torch.cuda.synchronize()
        key = f"{args[0].model.config.model_type} {name}" if per_model else name
        phases.setdefault(key, []).append(1000 * (time.perf_counter() - start))
        return result

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(prompt_len=128, new_tokens=64, ks=[K], max_batch=128, distinct_prompts=64, repeats=3,
                              device=torch.device("cuda"), quick=False)  # fmt: skip
    models = {name: build(cls, cfg, args.device, torch.bfloat16) for name, (cls, cfg) in architectures(False).items()}
    with torch.no_grad():
        models["gpt_j_6b"].lm_head.bias[FAVOURED_TOKEN] += FAVOURED_BIAS
    verifier, cost, prompts, references, costs = _setup_oracle_load(args, models, [K])
    oracle = OracleDrafter("oracle", ALPHA, cost, TOKENIZER_VOCAB)
    oracle.set_references(references)
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(),
        "surface_verify_ms": {b: {n: 1000 * s for n, s in c.items()} for b, c in costs.verify_s.items()},
        "surface_draft_ms": {b: 1000 * sum(c.values()) for b, c in costs.draft_s.items()},
        "full_step_ms": {rows: full_step_ms(verifier, oracle, prompts, rows) for rows in (64, 128)},
    }
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
