"""How often requests join a running batch, baseline against speculation: a structural count, not a timing.

    python benchmarks/join_events.py --out DIR [--alpha 0.8 --k 4]

Under continuous batching a request joins at the first step after a slot frees, and every join is
a prefill that the running rows wait for. Baseline rows emit one token a step, so rows that joined
together leave together and are replaced together; speculating rows emit 1 to k + 1 tokens a step,
finish at different steps, and free their slots a few at a time. This script serves the same
traces both ways on tiny float32 models (GPT-J-shaped verifier, the oracle draft at `--alpha` with a
tiny GPT-2's cost) under `StepClock`, so that which requests join at which step depends on the
arrival times and the decoding alone, never on the machine's speed, and counts the join events,
the rows per join and the steps. Traces: 256 requests, 32 slots, 8-token prompts, 32 new tokens;
all at once, and one request every 0.5 and 2 clock units (a step reads the clock 2-3 times, a prefill
once). `--join-delay-factor` serves them with `load.join_delay_factor`, `--coalesce-joins` with
`load.coalesce_joins` (under the step clock every join takes one reading: its fixed part).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter, decode_baseline
from specbench.engine.continuous import serve
from specbench.engine.decode import BaselineDecoder, SpeculativeDecoder, new_row
from specbench.engine.joins import JoinGate, make_join_gate
from specbench.engine.oracle import OracleDrafter
from specbench.engine.results import EngineRequest
from specbench.engine.timing import Stopwatch
from specbench.testing import StepClock, make_model

VOCAB, PROMPT_TOKENS, NEW_TOKENS, SLOTS, REQUESTS, DISTINCT_PROMPTS = 101, 8, 32, 32, 256, 64


def join_counts(
    verifier: CachedModel, drafter: OracleDrafter | None, k: int, requests: list[EngineRequest], gate: JoinGate
) -> dict:
    """Serve `requests` (the baseline when `drafter` is None) through a fresh `gate` and count its steps and
    join events."""
    settings = DecodeSettings(max_new_tokens=NEW_TOKENS)
    watch = Stopwatch(verifier.devices)
    if drafter is None:
        decoder, names, k = BaselineDecoder(verifier, settings, watch, read_ahead=False), [], 0
    else:
        decoder, names = SpeculativeDecoder(verifier, [drafter], settings, ConstantK(k), watch), [drafter.name]

    def make_row(request: EngineRequest):
        return new_row(request.prompt_ids, request.seed, settings, names, k, k, request.max_new_tokens)

    served = serve(decoder, requests, make_row, SLOTS, bucketed=False, clock=StepClock(), join_gate=gate)
    joins = sorted({request.admitted_s for request in served.requests})
    sizes = [sum(request.admitted_s == time for request in served.requests) for time in joins]
    return {
        "steps": len(served.steps),
        "join_events": len(joins),
        "join_events_per_step": len(joins) / len(served.steps),
        "rows_per_join_median": statistics.median(sizes),
        "steps_at_full_batch": sum(step.rows == SLOTS for step in served.steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--join-delay-factor", type=float, default=0.0, help="load.join_delay_factor (0: none)")
    parser.add_argument("--coalesce-joins", action="store_true", help="load.coalesce_joins")
    args = parser.parse_args()
    verifier = CachedModel(make_model("gptj", VOCAB, seed=0), VOCAB)
    cost = ModelDrafter("cost", CachedModel(make_model("gpt2", VOCAB, seed=1), VOCAB))
    prompts = torch.randint(1, VOCAB, (DISTINCT_PROMPTS, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    prompts = prompts.tolist()
    references = decode_baseline(verifier, prompts, DecodeSettings(max_new_tokens=NEW_TOKENS), [0] * len(prompts))
    oracle = OracleDrafter("oracle", args.alpha, cost, VOCAB)
    oracle.set_references({tuple(prompt): row.tokens for prompt, row in zip(prompts, references.rows, strict=True)})
    report: dict = {"alpha": args.alpha, "k": args.k, "join_delay_factor": args.join_delay_factor,
                    "coalesce_joins": args.coalesce_joins, "slots": SLOTS, "requests": REQUESTS,
                    "traces": {}}  # fmt: skip

    def gate() -> JoinGate:
        return make_join_gate(args.join_delay_factor, args.coalesce_joins)

    for gap in (0.0, 0.5, 2.0):  # clock units between arrivals; 0: every request at once
        requests = [EngineRequest(i, i * gap, prompts[i % len(prompts)], NEW_TOKENS, seed=i) for i in range(REQUESTS)]
        report["traces"][f"gap_{gap:g}"] = {
            "baseline": join_counts(verifier, None, args.k, requests, gate()),
            f"k{args.k}": join_counts(verifier, oracle, args.k, requests, gate()),
        }
        print(f"gap {gap:g}:", json.dumps(report["traces"][f"gap_{gap:g}"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = (
        f"join-events-alpha{args.alpha:g}-k{args.k}"
        + (f"-delay{args.join_delay_factor:g}" if args.join_delay_factor else "")
        + ("-coalesced" if args.coalesce_joins else "")
    )
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
