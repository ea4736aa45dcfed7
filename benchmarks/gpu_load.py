"""GPU benchmark under live request load: continuous batching at GPT-J-6B sizes, one call of a GPU machine.

    python benchmarks/gpu_load.py --out DIR                      # every section, on a GPU
    python benchmarks/gpu_load.py --out DIR --sections checks sampled_step
    python benchmarks/gpu_load.py --out DIR --quick              # tiny models on the CPU: a dry run

GPT-J-6B (bfloat16, random weights; its head's bias favours one token by far more than bfloat16 rounding,
so that greedy outputs do not part between modes at near-ties, which random weights otherwise do within a
few tokens; the cost of a step is unchanged) verifies under CUDA graphs, with slot buckets 1, 2, 4, ... up
to --max-batch rows. A random-weight draft is never accepted, so the draft is the oracle
(`specbench.engine.oracle`): the verifier's own greedy continuation with per-token probability alpha, at
the real cost of distilgpt2's forward passes. Every clock reading waits for the GPU. Sections (results are
written after each one):

- checks: tiny float32 models on the GPU, CUDA graphs and bucketed slots: every request served under
  continuous batching (joins, leaves, a queue) equals its lone eager decode, baseline and speculative.
- sampled_step: the sampled acceptance of one batch-64 verify step (GPT-J shapes: 5 nodes a row, its
  vocabulary), the previous walk (one host read per candidate) against the batched one (one read), and one
  whole sampled speculative step at 64 rows.
- load: for each alpha and k, the crossover search over request rates (both modes on the same Poisson
  trace at each rate), with the load model's predicted crossover, and the most requests/s each mode
  serves with p99 TPOT within twice the batch-1 step.
- saturation: every request at once (the batch full): the load-mode baseline's output tokens/s against
  a static batch of the same rows; host time per scheduler step at 64 rows against the captured step's
  device time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import math
import pstats
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from gpu import architectures, build, device_step_ms
from machine import describe_machine
from repeats import spread

from specbench.config import ArrivalKind, CrossoverMetric, SloConfig
from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter, decode_baseline
from specbench.engine.continuous import serve, slot_buckets
from specbench.engine.costs import StepCosts, measure_step_costs
from specbench.engine.decode import BaselineDecoder, SpeculativeDecoder, new_row
from specbench.engine.joins import make_join_gate
from specbench.engine.oracle import OracleDrafter
from specbench.engine.results import EngineRequest, ServeResult
from specbench.engine.sampling import TokenChooser, accepts, residual_distribution
from specbench.engine.schedule import KSchedule
from specbench.engine.timing import Clock, Stopwatch
from specbench.engine.tree import build_tree, walk_sampling_batch
from specbench.load.crossover import crossover_metrics, find_crossover, probe_from_metrics
from specbench.load.k_schedule import LoadAwareK
from specbench.load.metrics import load_metrics, mode_metrics, ratio_metrics
from specbench.load.model import served_predictions
from specbench.load.result import concatenate, request_traces
from specbench.load.trace import arrival_times
from specbench.speedup_model import full_step_alpha
from specbench.testing import ScriptedPolicy, StepClock, make_model

TOKENIZER_VOCAB = 50257
FAVOURED_TOKEN, FAVOURED_BIAS = 100, 100.0  # random logits have a spread of about 1.3: this token always wins


def section_checks(args: argparse.Namespace, device: torch.device) -> dict:
    """Continuous batching under CUDA graphs (bucketed slots) against lone eager decodes, float32."""
    vocab, results = 300, {}
    if device.type == "cuda":  # torch 2.11's cuBLASLt failed to capture a float32 matmul with a bias epilogue
        torch.backends.cuda.preferred_blas_library("cublas")
    prompts = [[5, 17, 42, 99, 7, 5, 17, 42, 120, 33, 8], [9, 4], [3, 1, 4, 1, 5, 9, 2, 6] * 6, [61, 5, 17]]
    trace = [(0, 0, 20), (0, 1, 30), (2, 2, 12), (3, 3, 25), (4, 0, 1), (5, 1, 16), (40, 2, 9)]
    requests = [EngineRequest(i, float(at), prompts[p], limit, seed=i) for i, (at, p, limit) in enumerate(trace)]
    draft = make_model("gpt2", vocab, seed=2, layers=1).to(device)
    graphs = device.type == "cuda"
    for arch in ("gpt2", "gptj", "llama"):
        model = make_model(arch, vocab, seed=1, layers=3).to(device)
        eager = CachedModel(model, vocab)
        alone = [
            decode_baseline(eager, [r.prompt_ids], DecodeSettings(r.max_new_tokens), [r.seed]).rows[0].tokens
            for r in requests
        ]
        # plain_steps: a scripted k per step (0: plain steps, which read ahead on a GPU) with the model drafting itself
        modes = (
            ("baseline", None), ("read_ahead", None), ("self_draft", model), ("random_draft", draft),
            ("plain_steps", model),
        )  # fmt: skip
        for mode, drafter_model in modes:

            def cached(weights, sizes):
                return CachedModel(weights, vocab, 160 if graphs else None, sizes if graphs else ())

            verifier = cached(model, range(1, 6))
            drafters = [ModelDrafter("draft", cached(drafter_model, (1, 2)))] if drafter_model is not None else []
            for member in [verifier, *(d.model for d in drafters)]:
                member.capture_graphs(slot_buckets(3))
                member.capture_joins(3)
            settings, watch = DecodeSettings(30), Stopwatch(verifier.devices)
            if drafters:
                policy = ScriptedPolicy([0, 0, 0, 2, 0, 0, 0, 0, 3]) if mode == "plain_steps" else None
                decoder = SpeculativeDecoder(verifier, drafters, settings, ConstantK(4), watch, step_policy=policy)
            else:
                decoder = BaselineDecoder(verifier, settings, watch, read_ahead=mode == "read_ahead")
            names = [d.name for d in drafters]

            def make_row(request, settings=settings, names=names):
                return new_row(request.prompt_ids, request.seed, settings, names, 4, 4, request.max_new_tokens)

            served = serve(decoder, requests, make_row, 3, graphs, StepClock())
            results[f"{arch}/{mode}"] = [record.tokens for record in served.requests] == alone
    results["all_equal"] = all(results.values())
    if device.type == "cuda":
        torch.backends.cuda.preferred_blas_library("default")
    return results


def sequential_walk(tree, verifier_probs, draft_probs, chooser: TokenChooser) -> tuple[list[int], int]:
    """The previous acceptance walk (until 2026-12-02), for the A/B only: one host read per candidate."""
    path, node = [], 0
    while True:
        residual, depth, accepted_child = verifier_probs[node], tree.depths[node], None
        for draft, branch in enumerate(tree.branches):
            if not (len(branch) > depth and (depth == 0 or branch[depth - 1] == node)):
                continue
            child = branch[depth]
            token, q_row = tree.tokens[child], draft_probs[draft][depth]
            uniform = torch.rand((), generator=chooser.generator(residual.device), device=residual.device)
            if bool(accepts(residual[token], q_row[token], uniform)):
                accepted_child = child
                break
            residual = residual_distribution(residual, q_row)
        if accepted_child is None:
            return path, int(chooser.sample(residual[None])[0])
        path.append(accepted_child)
        node = accepted_child


def section_sampled_step(args: argparse.Namespace, device: torch.device, models: dict) -> dict:
    """The sampled acceptance of one batch-64 verify step, before (per-candidate reads) and after (one read)."""
    rows, k, vocab = 64, 4, TOKENIZER_VOCAB
    settings = DecodeSettings(max_new_tokens=64, do_sample=True, temperature=1.0)
    generator = torch.Generator(device=device).manual_seed(0)
    verifier_probs = torch.softmax(torch.randn(rows, k + 1, vocab, device=device, generator=generator) * 3, -1)
    draft_probs = [[torch.softmax(torch.randn(k, vocab, device=device, generator=generator) * 3, -1)] for _ in
                   range(rows)]  # fmt: skip
    trees = [build_tree(0, [torch.multinomial(q[0], 1).view(-1).tolist()]) for q in draft_probs]
    clock = Clock(device)

    def time_walk(walk) -> dict:
        samples = []
        for _ in range(args.repeats + 1):
            choosers = [TokenChooser(settings, seed) for seed in range(rows)]
            start = clock.now()
            walk(choosers)
            samples.append(1000 * (clock.now() - start))
        return spread(samples[1:])

    def before(choosers):
        return [sequential_walk(t, verifier_probs[r], draft_probs[r], choosers[r]) for r, t in enumerate(trees)]

    def after(choosers):
        return walk_sampling_batch(trees, verifier_probs, draft_probs, choosers)

    results = {"acceptance_ms_before": time_walk(before), "acceptance_ms_after": time_walk(after)}
    # one whole sampled speculative step at 64 rows: the mean over a decode's steps
    verifier, drafter = _verifier(args, models, (1, k + 1)), _cost_drafter(args, models, "draft")
    for member in (verifier, drafter.model):
        member.capture_graphs((rows,))
    prompts = _prompts(args, rows)
    seeds, schedule = list(range(rows)), ConstantK(k)
    names = [drafter.name]
    samples = []
    for _ in range(args.repeats + 1):
        decoder = SpeculativeDecoder(verifier, [drafter], settings, schedule, Stopwatch(verifier.devices))
        rows_state = [new_row(p, s, settings, names, k, k, 32) for p, s in zip(prompts, seeds, strict=True)]
        decoder.admit(rows_state, list(range(rows)))
        steps, start = 0, clock.now()
        while decoder.running:
            decoder.step()
            steps += 1
        samples.append(1000 * (clock.now() - start) / steps)
    results["sampled_step_ms_64_rows"] = spread(samples[1:])
    return results


def _prompts(args: argparse.Namespace, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TOKENIZER_VOCAB, (count, args.prompt_len), generator=generator).tolist()


def _most_new_tokens(args: argparse.Namespace) -> int:
    """The longest output limit a request of the traces may have (--new-tokens-spread widens it)."""
    return round(args.new_tokens * (1 + args.new_tokens_spread))


def _max_len(args: argparse.Namespace) -> int:
    return args.prompt_len + _most_new_tokens(args) + 2 * max(args.ks) + 24


def _verifier(args: argparse.Namespace, models: dict, sizes) -> CachedModel:
    graphs = args.device.type == "cuda"
    max_len = _max_len(args)
    return CachedModel(models["gpt_j_6b"], TOKENIZER_VOCAB, max_len if graphs else None, sizes if graphs else ())


def _cost_drafter(args: argparse.Namespace, models: dict, name: str) -> ModelDrafter:
    graphs = args.device.type == "cuda"
    max_len = _max_len(args)
    model = CachedModel(models["distilgpt2"], TOKENIZER_VOCAB, max_len if graphs else None, (1, 2) if graphs else ())
    return ModelDrafter(name, model)


def _requests(args: argparse.Namespace, rate: float, prompts: list[list[int]], seed: int = 0) -> list[EngineRequest]:
    """A Poisson trace at `rate` (arrivals drawn from `seed`): enough requests to last about --trace-seconds,
    within [--min, --max] requests.

    Output limits are --new-tokens each, or with --new-tokens-spread r drawn uniformly (seeded) from
    [n (1 - r), n (1 + r)], as `vllm bench serve --random-range-ratio` does: with random weights no row stops
    early, and equal limits keep rows that joined together in lock step, which real outputs' lengths do not.
    """
    count = int(min(args.max_requests, max(args.min_requests, rate * args.trace_seconds)))
    times = arrival_times(ArrivalKind.poisson, rate, count, seed=seed)
    least = round(args.new_tokens * (1 - args.new_tokens_spread))
    limits = torch.randint(least, _most_new_tokens(args) + 1, (count,), generator=torch.Generator().manual_seed(2))
    return [
        EngineRequest(i, float(at), prompts[i % len(prompts)], int(limit), seed=i)
        for i, (at, limit) in enumerate(zip(times, limits, strict=True))
    ]


def section_load(args: argparse.Namespace, device: torch.device, models: dict) -> dict:
    """The crossover search per (alpha, k), with the model's prediction and each mode's max rate under the SLO."""
    verifier, cost, prompts, references, costs = _setup_oracle_load(args, models, args.ks)
    batch_one_step_ms = 1000 * costs.verify_s[1][1]
    slo = SloConfig(tpot_ms=2 * batch_one_step_ms, attainment=0.99)
    results: dict = {**_surface_ms(costs), "slo_tpot_ms": slo.tpot_ms}
    graphs = _graph_count(verifier, cost)
    for search, alpha, k in itertools.product(range(1, args.searches + 1), args.alphas, args.ks):
        oracle = OracleDrafter("oracle", alpha, cost, TOKENIZER_VOCAB)
        oracle.set_references(references)
        probes, measured = [], {}

        def probe(rate: float, oracle=oracle, k=k, alpha=alpha, measured=measured):
            requests = _requests(args, rate, prompts)
            served = {}
            for mode in ("baseline", "spec"):
                served[mode] = _serve(verifier, [oracle] if mode == "spec" else [], requests, k, args.max_batch,
                                      args.join_delay_factor)  # fmt: skip
            metrics = load_metrics(served, slo)
            alpha = full_step_alpha(served["spec"].results, k)
            metrics["alpha_iid"] = float("nan") if alpha is None else alpha
            if alpha is not None:  # the model as the CLI feeds it: this probe's alpha, join time per request, output
                metrics |= served_predictions(costs, alpha, k, rate, served, args.max_batch, args.rate_min,
                                              args.rate_max, CrossoverMetric.tpot_p99)  # fmt: skip
            metrics["requests"] = len(requests)
            metrics["off_path_steps"] = oracle.off_path_steps
            metrics["disagreements"] = sum(
                a.tokens != b.tokens for a, b in zip(served["baseline"].requests, served["spec"].requests,
                                                     strict=True))  # fmt: skip
            oracle.off_path_steps = 0
            measured[rate] = {key: value for key, value in metrics.items() if not key.startswith("itl")}
            print(f"[load alpha={alpha} k={k}] rate {rate:.3g}: tpot_p99_ratio {metrics.get('tpot_p99_ratio')}"
                  f" occupancy {metrics.get('occupancy_mean_spec'):.1f}", flush=True)  # fmt: skip
            return probe_from_metrics(rate, metrics, CrossoverMetric.tpot_p99)

        crossover = find_crossover(probe, CrossoverMetric.tpot_p99, args.rate_min, args.rate_max, args.probes)
        probes = crossover.probes
        fitted = [m["alpha_iid"] for m in measured.values() if math.isfinite(m["alpha_iid"])]
        predictions = [m["predicted_crossover_rate"] for m in measured.values() if "predicted_crossover_rate" in m]
        predicted = statistics.median(predictions) if predictions else None  # the CLI's parent: over the probes
        results[f"alpha{alpha}_k{k}" + (f"_search{search}" if args.searches > 1 else "")] = {
            "crossover": crossover_metrics(crossover, slo.attainment),
            "message": crossover.message,
            "predicted_crossover_rate": predicted,
            "alpha_fitted": fitted,
            "probes": {f"{p.rate:.4g}": measured[p.rate] for p in probes},
        }
        print(f"[load alpha={alpha} k={k}] {crossover.message} predicted {predicted}", flush=True)
        (args.out / "gpu_load_partial.json").write_text(json.dumps(results, indent=2, default=str))
    results["graphs_captured_while_timed"] = _graph_count(verifier, cost) - graphs
    return results


def _step_gaps(served) -> list[tuple[float, int]]:
    """(seconds since the step before, rows) of every step of a serve but its first."""
    return [(later.time_s - earlier.time_s, later.rows) for earlier, later in itertools.pairwise(served.steps)]


def _full_step_ms(served) -> float:
    """The median step time (ms) while the batch held its most rows (the steady state of a saturated server)."""
    most = max(step.rows for step in served.steps)
    gaps = [gap for gap, rows in _step_gaps(served) if rows == most]
    return 1000 * statistics.median(gaps) if gaps else float("nan")


def _longest_step_ms(served) -> float:
    """The longest gap (ms) between two steps of a serve: a pause inside the timed region shows here."""
    gaps = [gap for gap, _ in _step_gaps(served)]
    return 1000 * max(gaps) if gaps else float("nan")


class ConstantPolicy:
    """A step policy that always answers k: at 0 the speculative decoder's plain steps alone, against the
    baseline's; above 0 a fixed k served through the step policy's path, against the same k without it."""

    def __init__(self, k: int, k_max: int) -> None:
        self.k, self.first, self.max_k = k, k or k_max, k_max

    def next(self, k: int, accepted: int, offered: int) -> int:
        return k

    def k_for_step(self, state) -> int:
        return self.k

    def observe_step(self, k: int, occupancy: int, seconds: float) -> None:
        pass

    def observe_read(self, tokens: int, seconds: float) -> None:
        pass


class OccupancyOnlyK(LoadAwareK):
    """The load-aware k blind to the arrivals: a batch counts as full only once every slot is taken (the policy
    before `demand_rows`), served beside it to measure what the arrivals' demand changes."""

    def observe_arrivals(self, state) -> None:
        pass


class MeanWhileDrainingK(LoadAwareK):
    """The load-aware k that prices a draining batch by the mean below the slots (the policy before `draining`),
    served beside it to measure what pricing the drain by its p99 row changes."""

    def observe_arrivals(self, state) -> None:
        super().observe_arrivals(state)
        self.draining = False


class LimitsBlindK(LoadAwareK):
    """The load-aware k that prices a full or draining batch by its p99 row as if every row had the same output limit
    (the policy before the limits' scatter entered that price), served beside it to measure what the scatter
    changes where limits spread."""

    def priced_tokens(self, k: int, state) -> float:
        return super().priced_tokens(k, replace(state, output_tokens_std=0.0))


class MedianAtFullBatchK(LoadAwareK):
    """The load-aware k that corrects a drafting k at a full or draining batch by the median of its recent ratios, as
    below it (the policy before the upper end of that median's interval priced it there), served beside it to
    measure what the caution costs where drafting pays at a full batch."""

    cautious_at_tail = False


# the schedules that learn, by mode name: the policy, and the variants served beside it to measure one of its prices
# (`learned`: the policy after an untimed serve of another trace at the rate, `section_k_schedule`)
LEARNERS = {"load": LoadAwareK, "occupancy": OccupancyOnlyK, "meandrain": MeanWhileDrainingK,
            "limitsblind": LimitsBlindK, "medianfull": MedianAtFullBatchK, "learned": LoadAwareK}  # fmt: skip
LEARNING_SEED = 1000  # `learned` learns on the trace of arrival seed LEARNING_SEED + the measured trace's


def _serve(verifier: CachedModel, drafters: list, requests: list[EngineRequest], k: int | KSchedule, max_batch: int,
           join_delay_factor: float = 0.0, joins: str = "eager"):  # fmt: skip
    """Serve `requests` with continuous batching: the baseline without drafters, else k (or a schedule) drafted;
    `joins`: eager (or spaced by `join_delay_factor`) or coalesced (`engine.joins`)."""
    settings = DecodeSettings(max_new_tokens=max(r.max_new_tokens for r in requests))
    watch = Stopwatch(verifier.devices)
    schedule = ConstantK(k) if isinstance(k, int) else k
    if drafters:
        policy = schedule if isinstance(schedule, LoadAwareK | ConstantPolicy) else None
        decoder = SpeculativeDecoder(verifier, drafters, settings, schedule, watch, step_policy=policy)
    else:
        decoder = BaselineDecoder(verifier, settings, watch)
    names = [d.name for d in drafters]

    def make_row(request: EngineRequest):
        first, most = schedule.first, schedule.max_k
        return new_row(request.prompt_ids, request.seed, settings, names, most, first, request.max_new_tokens)

    gate = make_join_gate(join_delay_factor, joins == "coalesced")
    return serve(decoder, requests, make_row, max_batch, bool(verifier.graph_sizes), join_gate=gate)


def _setup_oracle_load(args: argparse.Namespace, models: dict, ks: list[int]):
    """The verifier and the oracle's cost model captured at every slot bucket, the prompts, each prompt's greedy
    continuation (untimed; the oracle's references) and the step costs at feeds 1 and k + 1."""
    buckets = slot_buckets(args.max_batch)
    verifier = _verifier(args, models, range(1, max(ks) + 2))
    cost = _cost_drafter(args, models, "oracle")
    for member in (verifier, cost.model):
        member.capture_graphs(buckets, args.prompt_len)
        member.capture_joins(args.max_batch, args.prompt_len)
    prompts = _prompts(args, args.distinct_prompts)
    settings = DecodeSettings(max_new_tokens=_most_new_tokens(args))
    references = {}
    for start in range(0, len(prompts), args.max_batch):
        chunk = prompts[start : start + args.max_batch]
        for prompt, row in zip(chunk, decode_baseline(verifier, chunk, settings, [0] * len(chunk)).rows, strict=True):
            references[tuple(prompt)] = row.tokens
    shapes = {size: sorted({1, *(k + 1 for k in ks)}) for size in buckets}
    costs = measure_step_costs(verifier, [cost], prompts, settings, shapes, repeats=args.repeats)
    return verifier, cost, prompts, references, costs


def _surface_ms(costs: StepCosts) -> dict:
    """The measured cost surface in ms: a verifier pass by rows and tokens, a draft step by rows, and the passes
    still dearer than a larger one after measuring them again."""
    return {
        "verify_ms": {rows: {n: 1000 * s for n, s in curve.items()} for rows, curve in costs.verify_s.items()},
        "draft_ms": {rows: 1000 * sum(steps.values()) for rows, steps in costs.draft_s.items()},
        "surface_disturbed": costs.disturbed_passes(),
    }


def section_k_schedule(args: argparse.Namespace, device: torch.device, models: dict) -> dict:
    """k_schedule=load against the baseline and every fixed k, on the same trace at rates from idle to saturated.

    At each rate, one Poisson trace per --trace-seeds is served --repeats times by every mode (the order rotated
    per repeat): replays of one trace take nearly the same path, so they measure the machine's noise, and other
    traces what the arrivals' luck adds. A LoadAwareK (k_max = the largest --ks) is built per trace, learns its
    acceptance in an untimed warm-up serve and keeps learning, as `mode=load` does. Compared on TPOT p50 and
    p99 and E2EL p99: median [min, max] of the replays; and per rate on the p99 TPOT of every serve pooled, as
    `mode=load load.traces=N repeats=R` reports it (`_verdict_pooled`).
    """
    k_max = max(args.ks)
    verifier, cost, prompts, references, costs = _setup_oracle_load(args, models, list(range(1, k_max + 1)))
    served_modes = ["baseline", *(f"k{k}" for k in range(1, k_max + 1) if k in args.ks or k == 1), "load"]
    served_modes += ["plain"] if args.plain_mode else []
    served_modes += ["occupancy"] if args.occupancy_mode else []
    served_modes += ["meandrain"] if args.mean_drain_mode else []
    served_modes += ["limitsblind"] if args.limits_blind_mode else []
    served_modes += ["medianfull"] if args.median_full_mode else []
    served_modes += ["learned"] if args.learned_mode else []
    served_modes += [f"policy{k}" for k in args.policy_ks]
    # every mode under each join gate: eager joins keep the mode's name, coalesced ones add "@coalesced"
    modes = [mode + _gate_suffix(joins) for joins in args.joins for mode in served_modes]
    keys = ("tpot_ms_p50", "tpot_ms_p99", "tpot_ms_p99_after_fill", "e2el_ms_p99", "ttft_ms_p50", "ttft_ms_p99",
            "occupancy_mean", "output_tokens_per_s", "full_step_ms_p50", "longest_step_ms",
            "joins_per_request")  # fmt: skip
    results: dict = {"modes": modes, "k_max": k_max, **_surface_ms(costs)}
    graphs = _graph_count(verifier, cost)
    for alpha in args.alphas:
        oracle = OracleDrafter("oracle", alpha, cost, TOKENIZER_VOCAB)
        oracle.set_references(references)
        serves: dict[float, dict[str, list[ServeResult]]] = {}  # rate -> mode -> its serves, trace by trace
        for rate, seed in itertools.product(args.k_rates, args.trace_seeds):
            requests = _requests(args, rate, prompts, seed)
            # one per join gate (and policy), each learning in an untimed warm-up and then over its replays
            schedules = {}  # by mode
            warm = [EngineRequest(i, 0.0, prompts[i], 8, seed=i) for i in range(min(8, len(prompts)))]
            for mode in modes:
                policy = LEARNERS.get(mode.partition("@")[0])
                if policy is not None:
                    schedules[mode] = policy(costs, k_max, args.max_batch)
                    _serve(verifier, [oracle], warm, schedules[mode], args.max_batch)
                    if mode.partition("@")[0] == "learned":  # as a server that has run at this rate would have
                        learning = _requests(args, rate, prompts, LEARNING_SEED + seed)
                        _serve(verifier, [oracle], learning, schedules[mode], args.max_batch, args.join_delay_factor,
                               _gate_of(mode))  # fmt: skip
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            chosen: dict[str, list[int]] = {mode: [] for mode in schedules}
            switches: dict[str, list[int]] = {mode: [] for mode in schedules}
            series: dict[str, list] = {}
            for repeat in range(args.repeats):
                order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
                for mode in order:
                    served_mode, joins = mode.partition("@")[0], _gate_of(mode)
                    k = schedules.get(mode) or {"plain": ConstantPolicy(0, k_max), "baseline": 1}.get(served_mode)
                    if k is None:  # kN, or policyN: N through the step policy's path
                        k = (int(served_mode[1:]) if served_mode[0] == "k"
                             else ConstantPolicy(int(served_mode.removeprefix("policy")), k_max))  # fmt: skip
                    served = _serve(verifier, [] if served_mode == "baseline" else [oracle], requests, k,
                                    args.max_batch, args.join_delay_factor, joins)  # fmt: skip
                    serves.setdefault(rate, {}).setdefault(mode, []).append(served)
                    metrics = mode_metrics(served, "x")
                    metrics["full_step_ms_p50_x"] = _full_step_ms(served)
                    metrics["longest_step_ms_x"] = _longest_step_ms(served)
                    if len(requests) > args.max_batch:  # the figures once the batch has filled up
                        after_fill = mode_metrics(served.after_first(args.max_batch), "x")
                        metrics["tpot_ms_p99_after_fill_x"] = after_fill["tpot_ms_p99_x"]
                    runs[mode].append({key: metrics.get(f"{key}_x", float("nan")) for key in keys})
                    if args.step_series and repeat == 0:
                        series[mode] = {
                            "steps": [[round(1000 * step.time_s, 3), step.rows, step.k] for step in served.steps],
                            "requests": [[round(1000 * value, 3) for value in (request.arrival_s, request.admitted_s,
                                          request.first_token_s, request.finish_s)] + [request.num_tokens]
                                         for request in served.requests],
                        }  # fmt: skip
                    if mode in schedules:
                        ks = [step.k for step in served.steps]
                        chosen[mode] += ks
                        switches[mode].append(sum(a == 0 < b for a, b in itertools.pairwise(ks)))  # plain -> drafting
            table = {mode: {key: spread([run[key] for run in runs[mode]]) for key in keys} for mode in modes}
            keys_judged = ("tpot_ms_p50", "tpot_ms_p99", "tpot_ms_p99_after_fill", "e2el_ms_p99")
            verdicts = {  # each learning schedule against the baseline and the fixed k of its gate
                learner: {key: _verdict(learner, modes, lambda mode, key=key, table=table: table[mode][key]["median"])
                          for key in keys_judged}
                for learner in schedules
            }  # fmt: skip
            share = {mode: {k: ks.count(k) / len(ks) for k in sorted(set(ks))} if ks else {}
                     for mode, ks in chosen.items()}  # fmt: skip
            alphas = {mode: schedule.alpha for mode, schedule in schedules.items()}

            def per_schedule(values: dict) -> object:  # `load` alone: the keys of earlier results files
                return values["load"] if list(values) == ["load"] else values

            name = _point_name(alpha, rate, seed)
            corrections = {mode: {f"k{k}_bucket{bucket}": r for (k, bucket), r in schedule.corrections.items()}
                           for mode, schedule in schedules.items()}  # fmt: skip
            results[name] = {
                "requests": len(requests),
                "table": table,
                "verdict": per_schedule(verdicts),
                "load_k_share": per_schedule(share),
                "load_switches_to_drafting": per_schedule(switches),
                "alpha_estimate": per_schedule(alphas),
                "load_corrections": per_schedule(corrections),
                "off_path_steps": oracle.off_path_steps,
                **({"step_series": series} if series else {}),
            }
            oracle.off_path_steps = 0
            print(f"[k_schedule {name}] {json.dumps(verdicts)} k share {share}", flush=True)
            (args.out / "gpu_load_partial.json").write_text(json.dumps(results, indent=2, default=str))
        learners = [mode for mode in modes if mode.partition("@")[0] in LEARNERS]
        for rate in args.k_rates:  # one k fixed for a rate, as a user fixes it before the trace comes
            pooled = _verdict_pooled(serves[rate], args.repeats, learners, modes)
            results[_point_name(alpha, rate, 0) + "_pooled"] = pooled
            print(f"[k_schedule {_point_name(alpha, rate, 0)} pooled] {json.dumps(pooled)}", flush=True)
    results["graphs_captured_while_timed"] = _graph_count(verifier, cost) - graphs
    return results


def _point_name(alpha: float, rate: float, seed: int) -> str:
    """The results key of one (alpha, rate, trace) of the k_schedule section (past seed 0: _traceN)."""
    return f"alpha{alpha}_rate{rate:g}" + (f"_trace{seed}" if seed else "")


def _verdict_pooled(serves: dict[str, list[ServeResult]], repeats: int, learners: list[str], modes: list[str]) -> dict:
    """Each learner's p99 TPOT at one rate as `mode=load load.traces=N repeats=R` reports it, over the requests of
    every serve pooled (`serves`: each mode's, trace by trace, `repeats` a trace): over the baseline's and over the
    one fixed k a user would fix for the rate, the one with the lowest pooled p99 (a best fixed k picked per trace
    is picked after the fact). Each ratio has the product's 95% interval (`load.metrics.ratio_metrics`: traces
    drawn, then their requests; with one trace, its requests)."""
    traces = len(serves["baseline"]) // repeats
    # in the product's order, repeat by repeat, each repeat serving every trace in turn
    in_order = {mode: [results[trace * repeats + repeat] for repeat in range(repeats) for trace in range(traces)]
                for mode, results in serves.items()}  # fmt: skip
    pooled = {mode: concatenate(results) for mode, results in in_order.items()}
    trace_of = request_traces(in_order["baseline"], traces)
    p99 = {mode: mode_metrics(result, "x")["tpot_ms_p99_x"] for mode, result in pooled.items()}
    verdicts = {}
    for learner in learners:
        verdict = {"traces": traces, "requests": len(pooled[learner].requests), **_verdict(learner, modes, p99.get)}
        references = {"baseline": "baseline" + _gate_suffix(_gate_of(learner)), "best_fixed": verdict["best_fixed"]}
        for name, reference in references.items():
            ratio = ratio_metrics(pooled[reference], pooled[learner], traces=trace_of if traces > 1 else None)
            verdict[f"load_over_{name}_interval"] = [ratio["tpot_p99_ratio_ci_low"], ratio["tpot_p99_ratio_ci_high"]]
        verdicts[learner] = verdict
    return verdicts


def _verdict(learner: str, modes: list[str], value: Callable[[str], float]) -> dict:
    """A learner's `value` (lower is better) over the baseline's and over the best fixed k's, both of its join
    gate."""
    fixed = [mode for mode in modes if mode.startswith("k") and _gate_of(mode) == _gate_of(learner)]
    best = min(fixed, key=value)
    return {
        "load_over_baseline": value(learner) / value("baseline" + _gate_suffix(_gate_of(learner))),
        "best_fixed": best,
        "load_over_best_fixed": value(learner) / value(best),
    }


def _gate_suffix(joins: str) -> str:
    """A mode's name suffix under a join gate: none for eager joins."""
    return "" if joins == "eager" else f"@{joins}"


def _gate_of(mode: str) -> str:
    """The join gate a mode was served under (its name's suffix; eager without one)."""
    return mode.partition("@")[2] or "eager"


def _graph_count(verifier: CachedModel, cost: ModelDrafter) -> int:
    """CUDA graphs held by the verifier and the oracle's cost model: it must not grow while serves are timed."""
    return verifier.graph_count + cost.model.graph_count


def section_saturation(args: argparse.Namespace, device: torch.device, models: dict) -> dict:
    """A full batch from the start: load-mode baseline tokens/s against a static batch of the same requests, and
    the host time of a 64-row scheduler step against its captured step's device time."""
    results = {}
    verifier = _verifier(args, models, (1,))
    verifier.capture_graphs(slot_buckets(args.max_batch), args.prompt_len)
    verifier.capture_joins(args.max_batch, args.prompt_len)
    settings = DecodeSettings(max_new_tokens=args.new_tokens)
    for rows in sorted({min(64, args.max_batch), args.max_batch}):
        prompts = _prompts(args, rows)
        requests = [EngineRequest(i, 0.0, p, args.new_tokens, seed=i) for i, p in enumerate(prompts)]
        load, static, steps_ms = [], [], []
        for _ in range(args.repeats + 1):
            served = _serve(verifier, [], requests, 1, args.max_batch)
            load.append(sum(r.num_tokens for r in served.requests) / served.wall_s)
            times = [step.time_s for step in served.steps if step.rows == rows]
            steps_ms.append(1000 * statistics.median(b - a for a, b in itertools.pairwise(times)))
            batch = decode_baseline(verifier, prompts, settings, list(range(rows)))
            static.append(sum(len(r.tokens) for r in batch.rows) / batch.wall_s)
        device_ms = device_step_ms(verifier, rows, args.prompt_len + args.new_tokens // 2) if device.type == "cuda" \
            else {}  # fmt: skip
        device_median = statistics.median(device_ms.values()) if device_ms else float("nan")
        scheduler = spread(steps_ms[1:])
        results[f"rows{rows}"] = {
            "load_baseline_tokens_per_s": spread(load[1:]),
            "static_baseline_tokens_per_s": spread(static[1:]),
            "load_over_static": statistics.median(load[1:]) / statistics.median(static[1:]),
            "scheduler_step_ms": scheduler,
            "device_step_ms_by_width": device_ms,
            "host_share_of_step": (scheduler["median"] - device_median) / device_median if device_ms else None,
        }
        if rows == min(64, args.max_batch):  # where the host's time goes: one serve under cProfile
            profiler = cProfile.Profile()
            profiler.runcall(_serve, verifier, [], requests, 1, args.max_batch)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            results[f"rows{rows}"]["host_profile"] = text.getvalue().splitlines()
        print(f"[saturation rows={rows}] {json.dumps(results[f'rows{rows}'], default=str)[:600]}", flush=True)
    return results


SECTIONS = ("checks", "sampled_step", "load", "k_schedule", "saturation")
# --quick: small shapes and few requests on the CPU (each can still be set explicitly)
QUICK = {
    "prompt_len": 12, "new_tokens": 10, "max_batch": 4, "probes": 3, "repeats": 1, "alphas": [0.8], "ks": [2],
    "rate_min": 2.0, "rate_max": 200.0, "min_requests": 6, "max_requests": 12, "distinct_prompts": 4,
    "trace_seconds": 1.0, "k_rates": [5.0, 500.0],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU: a dry run of the script")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--new-tokens-spread", type=float, default=0.0,
                        help="load traces: output limits uniform in [n (1 - r), n (1 + r)] (0: all n)")  # fmt: skip
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--rate-min", type=float, default=4.0)
    parser.add_argument("--rate-max", type=float, default=1024.0)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--trace-seconds", type=float, default=4.0, help="each probe's trace lasts about this long")
    parser.add_argument("--min-requests", type=int, default=24)
    parser.add_argument("--max-requests", type=int, default=384)
    parser.add_argument("--distinct-prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-mode", action="store_true", help="k_schedule: also serve with plain steps only")
    parser.add_argument("--mean-drain-mode", action="store_true",
                        help="k_schedule: also serve the drain priced by the mean (`meandrain`)")  # fmt: skip
    parser.add_argument("--limits-blind-mode", action="store_true",
                        help="k_schedule: also serve the p99 price blind to spread limits (`limitsblind`)")  # fmt: skip
    parser.add_argument("--median-full-mode", action="store_true",
                        help="k_schedule: also serve a full batch corrected at r's median (`medianfull`)")  # fmt: skip
    parser.add_argument("--learned-mode", action="store_true",
                        help="k_schedule: also serve the load-aware k after an untimed serve of another trace at the "
                        "rate (`learned`)")  # fmt: skip
    parser.add_argument("--occupancy-mode", action="store_true",
                        help="k_schedule: also serve the load-aware k blind to the arrivals (`occupancy`)")  # fmt: skip
    parser.add_argument("--policy-ks", type=int, nargs="*", default=[],
                        help="k_schedule: also serve each k through a step policy that always answers it")  # fmt: skip
    parser.add_argument("--trace-seeds", type=int, nargs="+", default=[0],
                        help="k_schedule: a Poisson trace per seed at each rate (past seed 0: _traceN)")  # fmt: skip
    parser.add_argument("--step-series", action="store_true",
                        help="k_schedule: keep the first repeat's steps per mode ([end ms, rows, k]) and requests "
                        "([arrival, admitted, first token, finish ms, tokens])")  # fmt: skip
    parser.add_argument("--searches", type=int, default=1, help="load: run each crossover search this many times")
    parser.add_argument("--join-delay-factor", type=float, default=0.0,
                        help="load, k_schedule: load.join_delay_factor of every serve (0: none)")  # fmt: skip
    parser.add_argument("--joins", nargs="+", choices=["eager", "coalesced"], default=["eager"],
                        help="k_schedule: serve every mode under each join gate (coalesced: load.coalesce_joins; "
                        "those modes are named MODE@coalesced)")  # fmt: skip
    parser.add_argument("--k-rates", type=float, nargs="+", default=[4.0, 16.0, 64.0, 256.0],
                        help="k_schedule: the request rates (idle to saturated)")  # fmt: skip
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if any(k > max(args.ks) for k in args.policy_ks):
        parser.error(f"--policy-ks must not exceed the largest of --ks ({max(args.ks)}): rows draft at most that many")
    args.device = torch.device("cpu" if args.quick else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {key: str(value) for key, value in vars(args).items() if key != "out"},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu",
        "host": describe_machine(),
        "favoured_token_bias": FAVOURED_BIAS,
    }
    start = time.perf_counter()
    models = {}
    if set(args.sections) - {"checks"}:
        dtype = torch.float32 if args.quick else torch.bfloat16
        models = {name: build(cls, cfg, args.device, dtype) for name, (cls, cfg) in architectures(args.quick).items()}
        with torch.no_grad():
            models["gpt_j_6b"].lm_head.bias[FAVOURED_TOKEN] += FAVOURED_BIAS
    report["build_s"] = time.perf_counter() - start
    for name in args.sections:
        begin = time.perf_counter()
        try:
            section = {"checks": section_checks, "sampled_step": section_sampled_step, "load": section_load,
                       "k_schedule": section_k_schedule, "saturation": section_saturation}[name]  # fmt: skip
            report[name] = section(args, args.device) if name == "checks" else section(args, args.device, models)
        except Exception as error:  # one failing section must not lose the others
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report[name + "_s"] = time.perf_counter() - begin
        (args.out / "gpu_load.json").write_text(json.dumps(report, indent=2, default=str))
        print(
            f"[{name}] done in {report[name + '_s']:.0f} s: {json.dumps(report[name], default=str)[:1200]}", flush=True
        )


if __name__ == "__main__":
    main()
