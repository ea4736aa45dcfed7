"""GPU benchmark: the engine at real model sizes (random weights), one call of a GPU machine.

    python benchmarks/gpu.py --out DIR                         # every section, on a GPU
    python benchmarks/gpu.py --out DIR --sections eager batch  # some of them
    python benchmarks/gpu.py --out DIR --quick                 # tiny models on the CPU: a dry run of the script

No weights can reach the device and nothing timed here depends on weight values,
so GPT-J-6B (bfloat16) is built from its config with random weights, with
GPT-2-family drafts (given GPT-J's 50400-row head so transformers' assisted
generation takes them). Every figure is the median, with min and max, of
--repeats runs after a warm-up; baseline and speculative runs alternate; every
clock reading waits for the GPU. Sections (results are written after each one):

- checks: tiny float32 models on the GPU. CUDA-graph decoding (static cache) equals eager decoding token for
  token at batch sizes 1 and 3: baseline, the verifier as its own draft, a random draft, a draft set's tree,
  and drafters proposing in parallel threads; at batch size 3, compiled steps too (baseline and self draft).
- eager: verifier-only decode, ours against `generate()`; speculative (GPT-J as its own draft) against
  `generate(assistant_model=...)`, batch size 1.
- batch: CUDA graphs, batch sizes 1 .. 128: verifier-only throughput against eager batched `generate()`;
  speculative throughput (self draft, distilgpt2) and its speedup over our baseline at the same batch size,
  beside the speedup the model predicts from step costs measured at that batch size.
- trees: CUDA graphs, batch size 1, k = 4: a two-draft set (distilgpt2 + gpt2) against each draft alone,
  with the engine's overhead against the separately timed draft and verify steps.
- compiled: torch.compile + CUDA graphs, verifier-only, batch sizes 1 and 64: as loaded, with GPT-J's q/k/v
  and MLP input projections stacked into one matrix product (`fuse_projections`), then with inductor's
  autotuning; against the device time of the captured step alone and the memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from repeats import copy_bandwidth, spread
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

from specbench.engine import (
    BatchResult,
    CachedModel,
    ConstantK,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.attention import PREFIX_ATTENTION, prefix_attention, prefix_sdpa
from specbench.engine.cached_model import PAD_TOKEN
from specbench.engine.costs import measure_step_costs
from specbench.engine.fusion import fuse_projections
from specbench.engine.timing import Clock
from specbench.hf_backend import fixed_k
from specbench.speedup_model import iid_acceptance, predicted_speedup
from specbench.testing import make_model

TOKENIZER_VOCAB = 50257  # GPT-2's tokenizer: the engine never produces ids above it
HEAD_ROWS = 50400  # GPT-J's head


def architectures(quick: bool) -> dict[str, tuple[type, object]]:
    """name -> (model class, config): the real sizes, or tiny ones for a CPU dry run."""
    head = {"vocab_size": HEAD_ROWS}
    if quick:
        return {
            "gpt_j_6b": (GPTJForCausalLM, GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **head)),
            "distilgpt2": (GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=1, n_head=2, **head)),
            "gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=2, n_head=2, **head)),
        }
    return {
        "gpt_j_6b": (GPTJForCausalLM, GPTJConfig()),  # the defaults are GPT-J-6B: 4096 wide, 28 layers
        "distilgpt2": (GPT2LMHeadModel, GPT2Config(n_layer=6, **head)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(**head)),
    }


def build(model_class: type, config, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)


class Bench:
    """The models, prompts and settings every section shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.quick else "cuda")
        self.graphs = self.device.type == "cuda"
        dtype = torch.float32 if args.quick else torch.bfloat16
        self.models = {
            name: build(cls, cfg, self.device, dtype) for name, (cls, cfg) in architectures(args.quick).items()
        }
        generator = torch.Generator().manual_seed(1)
        self.prompts = torch.randint(0, TOKENIZER_VOCAB, (max(args.batch_sizes), args.prompt_len), generator=generator)
        self.settings = DecodeSettings(max_new_tokens=args.new_tokens)
        self.max_len = args.prompt_len + args.new_tokens + 3 * args.k + 24

    def cached(self, name: str, sizes, graphs: bool | None = None, compile: bool = False) -> CachedModel:
        graphs = self.graphs if graphs is None else graphs
        return CachedModel(
            self.models[name], TOKENIZER_VOCAB, self.max_len if graphs else None, sizes if graphs else (), compile
        )

    def batch(self, size: int) -> tuple[list[list[int]], list[int]]:
        return self.prompts[:size].tolist(), list(range(size))

    def alternate(self, contenders: dict[str, Callable[[], float]], repeats: int | None = None) -> dict[str, dict]:
        """Each contender once as a warm-up, then `repeats` (--repeats) rounds in alternating order; seconds per run."""
        for run in contenders.values():
            run()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for round_ in range(repeats or self.args.repeats):
            for name in names if round_ % 2 == 0 else reversed(names):
                samples[name].append(contenders[name]())
        return {name: spread(values) for name, values in samples.items()}


def section_checks(bench: Bench) -> dict:
    """CUDA graphs (static cache) against eager (dynamic cache), tiny float32 models, batch sizes 1 and 3."""
    vocab, settings = 300, DecodeSettings(max_new_tokens=40)
    prompts = [[5, 17, 42, 99, 7, 5, 17, 42, 120, 33, 8, 250, 61, 5, 17], [3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9]]
    draft = make_model("gpt2", vocab, seed=2, layers=1).to(bench.device)
    graphs, results = bench.graphs, {}
    if graphs:  # torch 2.11's cuBLASLt failed to capture a float32 matmul with a bias epilogue (see NOTES.md)
        torch.backends.cuda.preferred_blas_library("cublas")
    for arch in ("gpt2", "gptj", "llama"):
        model = make_model(arch, vocab, seed=1, layers=3).to(bench.device)
        for rows in (1, 3):
            batch, seeds = prompts[:rows], list(range(rows))
            eager = [r.tokens for r in decode_baseline(CachedModel(model, vocab), batch, settings, seeds).rows]
            verifier = CachedModel(model, vocab, 128 if graphs else None, range(1, 14) if graphs else ())

            def drafter(weights, name: str) -> ModelDrafter:
                return ModelDrafter(
                    name, CachedModel(weights, vocab, 128 if graphs else None, (1, 2) if graphs else ())
                )

            runs = {
                "self_draft": [drafter(model, "self")],
                "random_draft": [drafter(draft, "random")],
                "tree": [drafter(draft, "random"), drafter(model, "self"), PromptLookupDrafter("lookup")],
            }
            members = [verifier, *(d.model for ds in runs.values() for d in ds if isinstance(d, ModelDrafter))]
            for cached in members:
                cached.capture_graphs((rows,))
            key = f"{arch}/batch{rows}"
            results[f"{key}/baseline"] = [
                r.tokens for r in decode_baseline(verifier, batch, settings, seeds).rows
            ] == eager
            # the last row stops at its third token: the step read ahead (the GPU default) is rolled back
            stops = replace(settings, eos_token_ids=frozenset({eager[-1][2]}))
            ahead, step_by_step = (
                [r.tokens for r in decode_baseline(verifier, batch, stops, seeds, read_ahead=ahead).rows]
                for ahead in (True, False)
            )
            results[f"{key}/read_ahead_with_stops"] = ahead == step_by_step and len(ahead[-1]) <= 3
            for name, drafters in runs.items():
                out = decode_speculative(verifier, drafters, batch, settings, ConstantK(4), seeds)
                results[f"{key}/{name}"] = [r.tokens for r in out.rows] == eager
            with ThreadPoolExecutor(3) as pool:
                out = decode_speculative(verifier, runs["tree"], batch, settings, ConstantK(4), seeds, pool)
            results[f"{key}/tree_parallel_drafts"] = [r.tokens for r in out.rows] == eager
            if graphs:
                results[f"{key}/graphs_captured"] = bool(verifier._graphs)
            if graphs and rows > 1:  # compiled steps attend with matmuls (engine.attention), ragged rows included
                compiled = CachedModel(model, vocab, 128, (1, 5), compile=True)
                compiled.capture_graphs((rows,))
                out = decode_baseline(compiled, batch, settings, seeds)
                results[f"{key}/compiled_baseline"] = [r.tokens for r in out.rows] == eager
                out = decode_speculative(compiled, runs["self_draft"], batch, settings, ConstantK(4), seeds)
                results[f"{key}/compiled_self_draft"] = [r.tokens for r in out.rows] == eager
    results["all_equal"] = all(results.values())
    if graphs:
        torch.backends.cuda.preferred_blas_library("default")
        results |= _real_size_graphs_check(bench)
    return results


def _real_size_graphs_check(bench: Bench) -> dict:
    """GPT-J-6B in bfloat16: where graphs (static cache, masked attention) and eager (dynamic cache) decodes part.

    bfloat16 outputs depend on which attention kernel runs: the static cache always passes a mask, the
    dynamic one only when it must, so scaled_dot_product_attention may pick different kernels. The
    same decodes with its math kernel forced show whether the kernels alone explain a difference.
    Each figure is, per row, the index of the first token where the two outputs differ (None: equal).
    """
    settings = replace(bench.settings, max_new_tokens=32)
    results = {}
    for kernels in ("default", "math"):
        for rows in (1, 4):
            prompts, seeds = bench.batch(rows)
            verifier = bench.cached("gpt_j_6b", range(1, 6))
            drafter = ModelDrafter("self", bench.cached("gpt_j_6b", (1, 2)))
            with sdpa_kernel([SDPBackend.MATH]) if kernels == "math" else contextlib.nullcontext():
                eager = decode_baseline(bench.cached("gpt_j_6b", (), graphs=False), prompts, settings, seeds)
                for cached in (verifier, drafter.model):
                    cached.capture_graphs((rows,))
                graphs = decode_baseline(verifier, prompts, settings, seeds)
                spec = decode_speculative(verifier, [drafter], prompts, settings, ConstantK(4), seeds)
            key = f"gpt_j_bf16/{kernels}_attention/batch{rows}"
            results[f"{key}/graphs_vs_eager"] = first_differences(graphs, eager)
            results[f"{key}/graphs_self_draft_vs_graphs"] = first_differences(spec, graphs)
            for cached in (verifier, drafter.model):
                cached.release(rows)
    return results


def first_differences(result: BatchResult, reference: BatchResult) -> list[int | None]:
    """Per row, the index of the first token where two decodes differ; None where they are equal."""
    differences = []
    for row, expected in zip(result.rows, reference.rows, strict=True):
        pairs = list(zip(row.tokens, expected.tokens, strict=False))
        index = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if index is None and len(row.tokens) != len(expected.tokens):
            index = len(pairs)
        differences.append(index)
    return differences


def section_eager(bench: Bench) -> dict:
    """Eager mode at batch size 1: ours against generate(), and against assisted generation (self draft)."""
    args, verifier_model = bench.args, bench.models["gpt_j_6b"]
    prompt, seeds = bench.batch(1)
    verifier = bench.cached("gpt_j_6b", (), graphs=False)
    self_draft = ModelDrafter("self", bench.cached("gpt_j_6b", (), graphs=False))
    clock = Clock(bench.device)
    config = transformers.GenerationConfig(
        max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
        eos_token_id=None, suppress_tokens=list(range(TOKENIZER_VOCAB, HEAD_ROWS)),
    )  # fmt: skip
    fixed_k(verifier_model, args.k)
    ids = torch.tensor(prompt, device=bench.device)

    def generate(**extra) -> float:
        start = clock.now()
        with torch.inference_mode():
            verifier_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, **extra)
        return clock.now() - start

    def ours_baseline() -> float:
        return decode_baseline(verifier, prompt, bench.settings, seeds).wall_s

    def ours_spec() -> float:
        return decode_speculative(verifier, [self_draft], prompt, bench.settings, ConstantK(args.k), seeds).wall_s

    per_token = 1000 / args.new_tokens
    verifier_only = bench.alternate({"ours": ours_baseline, "generate": generate}, args.eager_repeats)
    speculative = bench.alternate(
        {"ours_self_draft": ours_spec, "assisted_self_draft": lambda: generate(assistant_model=verifier_model)},
        args.eager_repeats,
    )
    results = {
        name: {key: value * per_token if key != "runs" else value for key, value in figures.items()}
        for name, figures in (verifier_only | speculative).items()
    }  # ms per token
    results["ours_over_generate"] = verifier_only["ours"]["median"] / verifier_only["generate"]["median"]
    results["ours_spec_over_assisted"] = (
        speculative["ours_self_draft"]["median"] / speculative["assisted_self_draft"]["median"]
    )
    results["unit"] = "ms per generated token (whole request, prefill included)"
    results["profile_top_cpu_ops"] = {"ours": _profile(ours_baseline), "generate": _profile(generate)}
    return results


def _profile(decode: Callable[[], object], rows: int = 12) -> list[dict]:
    """The ops that take the most CPU time (self) over one whole decode: where the host's time per step goes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        decode()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000} for e in events[:rows]]


def section_batch(bench: Bench) -> dict:
    """Throughput against batch size: verifier-only (ours with graphs; eager generate()) and speculative."""
    verifier = bench.cached("gpt_j_6b", range(1, bench.args.k + 2))
    drafters = {
        "self": ModelDrafter("self", bench.cached("gpt_j_6b", (1, 2))),
        "distilgpt2": ModelDrafter("distilgpt2", bench.cached("distilgpt2", (1, 2))),
    }
    results = {}
    for size in bench.args.batch_sizes:
        start = time.perf_counter()
        try:
            row = _batch_row(bench, size, verifier, drafters)
        except torch.OutOfMemoryError as error:
            row = {"out_of_memory": str(error).splitlines()[0]}
            torch.cuda.empty_cache()
        for cached in [verifier, *(d.model for d in drafters.values())]:
            cached.release(size)
        row["section_s"] = time.perf_counter() - start
        results[str(size)] = row
        print(f"[batch {size}] {json.dumps(row, default=str)[:600]}", flush=True)
        if "out_of_memory" in row:
            break
    return results


def _batch_row(bench: Bench, size: int, verifier: CachedModel, drafters: dict[str, ModelDrafter]) -> dict:
    args = bench.args
    prompts, seeds = bench.batch(size)
    for cached in [verifier, *(d.model for d in drafters.values())]:
        cached.capture_graphs((size,))
    ids = torch.tensor(prompts, device=bench.device)
    clock = Clock(bench.device)
    config = transformers.GenerationConfig(
        max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
        eos_token_id=None, suppress_tokens=list(range(TOKENIZER_VOCAB, HEAD_ROWS)),
    )  # fmt: skip

    def generate() -> float:
        begin = clock.now()
        with torch.inference_mode():
            bench.models["gpt_j_6b"].generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return clock.now() - begin

    def speculative(drafter: ModelDrafter):
        return decode_speculative(verifier, [drafter], prompts, bench.settings, ConstantK(args.k), seeds)

    contenders = {"ours_baseline": lambda: decode_baseline(verifier, prompts, bench.settings, seeds).wall_s}
    for name, drafter in drafters.items():
        contenders[f"ours_spec_{name}"] = lambda d=drafter: speculative(d).wall_s
    if size <= args.generate_max_batch:
        contenders["generate"] = generate
    tokens = size * args.new_tokens
    row: dict = {}
    for name, figures in bench.alternate(contenders).items():  # seconds -> tokens/s (the fastest run: the max)
        row[name] = {
            "median": tokens / figures["median"],
            "min": tokens / figures["max"],
            "max": tokens / figures["min"],
        }
    row["ms_per_step_baseline"] = 1000 * tokens / row["ours_baseline"]["median"] / args.new_tokens / size
    costs = measure_step_costs(
        verifier, list(drafters.values()), [prompts[0]], bench.settings, {size: (1, args.k + 1)}, repeats=5
    )
    verify = costs.verify_s[size]
    row["verify_cost_ratio_k_plus_1"] = verify[args.k + 1] / verify[1]
    baseline = row["ours_baseline"]
    for name, drafter in drafters.items():
        result = speculative(drafter)
        offered_accepted = [
            pair for r in result.rows for pair in zip(r.offered_per_step, r.accepted_per_step, strict=True)
        ]
        full = [accepted for offered, accepted in offered_accepted if offered == args.k]
        alpha = iid_acceptance(statistics.mean(full), args.k) if full else 0.0
        spec = row[f"ours_spec_{name}"]
        row[f"speedup_{name}"] = {
            "median": spec["median"] / baseline["median"],
            "min": spec["min"] / baseline["max"],
            "max": spec["max"] / baseline["min"],
        }
        c = costs.draft_s[size][name] / verify[1]
        row[f"predicted_speedup_{name}"] = predicted_speedup(alpha, args.k, c, row["verify_cost_ratio_k_plus_1"])
        row[f"acceptance_{name}"] = sum(r.accepted for r in result.rows) / max(sum(r.proposed for r in result.rows), 1)
        row[f"padded_token_share_{name}"] = result.padded_token_share
    if "generate" in row:
        row["ours_over_generate_throughput"] = baseline["median"] / row["generate"]["median"]
    return row


def section_trees(bench: Bench) -> dict:
    """A two-draft set against each draft alone, batch size 1, k = 4, with graphs (trees are captured too)."""
    args = bench.args
    verifier = bench.cached("gpt_j_6b", range(1, 2 * args.k + 2))
    drafters = {name: ModelDrafter(name, bench.cached(name, (1, 2))) for name in ("distilgpt2", "gpt2")}
    for cached in [verifier, *(d.model for d in drafters.values())]:
        cached.capture_graphs((1,))
    prompts, seeds = bench.batch(1)
    sets = {"distilgpt2": [drafters["distilgpt2"]], "gpt2": [drafters["gpt2"]], "set": list(drafters.values())}
    timings = bench.alternate(
        {
            name: lambda ds=members: (
                decode_speculative(verifier, ds, prompts, bench.settings, ConstantK(args.k), seeds).wall_s
            )
            for name, members in sets.items()
        }
    )
    costs = measure_step_costs(
        verifier, list(drafters.values()), [prompts[0]], bench.settings, {1: range(1, 2 * args.k + 2)}, repeats=5
    )
    results = {}
    for name, members in sets.items():
        (row,) = decode_speculative(verifier, members, prompts, bench.settings, ConstantK(args.k), seeds).rows
        tree_nodes = 1 + len(members) * args.k  # the widest tree: no shared prefixes
        draft_s = sum(costs.draft_s[1][d.name] for d in members)
        predicted_s = row.steps * (args.k * draft_s + costs.verify_s[1][tree_nodes])
        steps_s = row.latency_s - row.ttft_s - row.draft_prefill_s
        results[name] = {
            "ms_per_token": {k: 1000 * v / args.new_tokens if k != "runs" else v for k, v in timings[name].items()},
            "acceptance": row.accepted / max(row.proposed, 1),
            "tokens_per_step": (len(row.tokens) - 1) / row.steps,
            "engine_overhead_pct": 100 * (steps_s / predicted_s - 1),
        }
    results["graphs_captured_tree_sizes"] = sorted({n for rows, n, _ in verifier._graphs if rows == 1})
    return results


# torch.compile variants, each on top of the previous one's model; the options are inductor's (the
# "max-autotune-no-cudagraphs" mode sets both: matrix-product templates and kernel launch parameters tuned).
# "_sdpa_attention": compiled steps keep SDPA rather than the engine's matmul attention (see `attention`).
COMPILE_VARIANTS = {
    "as_loaded": {},
    "fused_projections": {},
    "fused_projections_sdpa_attention": {},
    "fused_projections_max_autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
}


@contextlib.contextmanager
def sdpa_in_compiled_steps():
    """Prefix attention that stays SDPA when torch.compile traces it, as compiled steps ran before matmul attention."""
    AttentionInterface.register(PREFIX_ATTENTION, prefix_sdpa)
    try:
        yield
    finally:
        AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)


def section_compiled(bench: Bench) -> dict:
    """torch.compile + CUDA graphs, verifier-only: as loaded, projections stacked, then with inductor's autotuning.

    Batch size 1 (and the first batch size above 1 of --compiled-batch-sizes): decode ms/token against the
    device time of the captured step alone (replayed back to back, per attention width) and the bandwidth floor.
    """
    args, results = bench.args, {}
    weights_gb = sum(p.numel() * p.element_size() for p in bench.models["gpt_j_6b"].parameters()) / 1e9
    for variant, options in COMPILE_VARIANTS.items():
        if variant not in args.compile_variants:
            continue
        if variant.startswith("fused_projections") and "fused_layers" not in results:
            results["fused_layers"] = fuse_projections(bench.models["gpt_j_6b"])
        results[variant] = {}
        for size in args.compiled_batch_sizes:
            torch._dynamo.reset()  # each variant compiles afresh under its own options
            prompts, seeds = bench.batch(size)
            start = time.perf_counter()
            verifier = bench.cached("gpt_j_6b", (1,), compile=bench.graphs)
            sdpa = variant.endswith("_sdpa_attention")
            with torch._inductor.config.patch(options), sdpa_in_compiled_steps() if sdpa else contextlib.nullcontext():
                verifier.capture_graphs((size,))
            compile_s = time.perf_counter() - start
            runs = []
            for _ in range(args.repeats + 1):  # the first is a warm-up
                runs.append(decode_baseline(verifier, prompts, bench.settings, seeds))
            per_token = [1000 * (r.wall_s - r.rows[0].ttft_s) / (args.new_tokens - 1) for r in runs[1:]]
            results[variant][f"batch{size}"] = {
                "ms_per_step_decode": spread(per_token),
                "device_ms_per_step_by_width": device_step_ms(verifier, size, args.prompt_len) if bench.graphs else {},
                "compile_and_capture_s": compile_s,
            }
            print(f"[compiled {variant} batch {size}] {json.dumps(results[variant][f'batch{size}'])}", flush=True)
            del verifier
            gc.collect()  # the compiled step refers back to its model: a cycle
            if bench.graphs:
                torch.cuda.empty_cache()
    if bench.graphs:
        bandwidth = copy_bandwidth(bench.device)
        results["copy_bandwidth_gb_s"] = bandwidth
        results["floor_ms_per_token"] = 1000 * weights_gb / bandwidth
    results["verifier_weight_gb"] = weights_gb
    return results


@torch.inference_mode()  # the static cache and graph inputs are inference tensors
def device_step_ms(verifier: CachedModel, rows: int, columns: int, replays: int = 20) -> dict[int, float]:
    """Device time of one captured verifier-only step per attention width: replays back to back, no host work.

    Set against the decode's ms/step, the difference is what the host adds (mask building, copies, reading the
    tokens back). The cache is rewound to `columns` before each width, so the replays write where a decode would.
    """
    times = {}
    verifier.prefill([[PAD_TOKEN] * columns] * rows)
    ids = torch.zeros(rows, 1, dtype=torch.long, device=verifier.device)
    positions = torch.full((rows, 1), columns, dtype=torch.long, device=verifier.device)
    for (graph_rows, n, width), replay in sorted(verifier._graphs.items()):
        if graph_rows != rows or n != 1 or width <= columns:
            continue
        mask = torch.zeros(rows, 1, 1, width, dtype=verifier.model.dtype, device=verifier.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _round in ("warm-up", "timed"):  # the events keep the last round
            verifier._set_columns(columns)
            begin.record()
            for _ in range(replays):
                replay(ids, positions, mask)
            end.record()
        end.synchronize()
        times[width] = begin.elapsed_time(end) / replays
    verifier.reset(rows)
    return times


def section_profile(bench: Bench) -> dict:
    """Where a batched verifier-only step spends its time with CUDA graphs: GPU kernels and host ops, batch 64."""
    size = min(64, max(bench.args.batch_sizes))
    verifier = bench.cached("gpt_j_6b", (1,))
    verifier.capture_graphs((size,))
    prompts, seeds = bench.batch(size)
    decode_baseline(verifier, prompts, bench.settings, seeds)  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bench.graphs:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        result = decode_baseline(verifier, prompts, bench.settings, seeds)
    events = profiler.key_averages()
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    by_gpu = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:15]
    return {
        "batch_size": size,
        "ms_per_step": 1000 * result.wall_s / bench.args.new_tokens,
        "top_cpu_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000} for e in by_cpu],
        "top_gpu_ops": [
            {"op": e.key, "calls": e.count, "self_gpu_ms": getattr(e, "self_device_time_total", 0) / 1000}
            for e in by_gpu
        ],
    }


SECTIONS = {
    "checks": section_checks,
    "profile": section_profile,
    "eager": section_eager,
    "batch": section_batch,
    "trees": section_trees,
    "compiled": section_compiled,  # last: it stacks the verifier's projections in place
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU: a dry run of the script")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-repeats", type=int, default=5, help="rounds of the eager comparisons")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    parser.add_argument("--generate-max-batch", type=int, default=128)
    parser.add_argument("--compiled-batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument(
        "--compile-variants", nargs="+", default=["as_loaded", "fused_projections"], choices=list(COMPILE_VARIANTS)
    )
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.batch_sizes, args.repeats, args.eager_repeats = 12, [1, 2], 1, 1
        args.compiled_batch_sizes = [1, 2]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu",
    }
    start = time.perf_counter()
    bench = Bench(args)
    report["build_s"] = time.perf_counter() - start
    # GPT-J runs scaled_dot_product_attention from transformers 5.2x on; older 5.x releases use an eager
    # attention that upcasts every cached key to float32 at each step
    report["attention"] = {name: model.config._attn_implementation for name, model in bench.models.items()}
    print(f"{report['device']}: models built in {report['build_s']:.0f} s", flush=True)
    for name in args.sections:
        begin = time.perf_counter()
        try:
            report[name] = SECTIONS[name](bench)
        except Exception as error:  # one failing section must not lose the others
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report[name + "_s"] = time.perf_counter() - begin
        if bench.device.type == "cuda":
            report[name + "_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        (args.out / "gpu_benchmark.json").write_text(json.dumps(report, indent=2, default=str))
        print(
            f"[{name}] done in {report[name + '_s']:.0f} s: {json.dumps(report[name], default=str)[:1500]}", flush=True
        )


if __name__ == "__main__":
    main()
