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
  and drafters proposing in parallel threads; compiled steps too (every decode but the threads). The decode
  kernel against `matmul_attention` on random masks (float32 and bfloat16). GPT-J-6B in bfloat16: graphs
  against eager, batch sizes 1 and 4.
- profile: graphs without compile, batch 64, with the decode kernel and without it (SDPA): ms/step, the
  captured step alone against the matrix products alone, and the GPU kernels of a step with attention's share.
- eager: verifier-only decode, ours against `generate()`; speculative (GPT-J as its own draft) against
  `generate(assistant_model=...)`, batch size 1.
- batch: CUDA graphs, batch sizes 1 .. 128: verifier-only throughput against eager batched `generate()`;
  speculative throughput (self draft, distilgpt2) and its speedup over our baseline at the same batch size,
  beside the speedup the model predicts from step costs measured at that batch size; the crossover of each.
- trees: CUDA graphs, batch size 1, k = 4: a two-draft set (distilgpt2 + gpt2) against each draft alone,
  with the engine's overhead against the separately timed draft and verify steps.
- compiled: torch.compile + CUDA graphs, verifier-only, --compiled-batch-sizes: the --compile-variants (as
  loaded; GPT-J's q/k/v and MLP input projections stacked into one matrix product, `fuse_projections`;
  the same without the decode kernel, or with SDPA, in compiled steps; inductor's autotuning); against the
  device time of the captured step alone, the memory-bandwidth floor, and cuBLAS's matrix products of a
  step alone (`products_ms`, measured in the same call).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from machine import describe_machine
from repeats import copy_bandwidth, graph_replay_ms, spread
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import linear
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
from specbench.engine.attention import (
    PREFIX_ATTENTION,
    additive,
    matmul_attention,
    prefix_attention,
    prefix_attention_without_kernel,
    prefix_sdpa,
)
from specbench.engine.cached_model import PAD_TOKEN
from specbench.engine.costs import measure_step_costs
from specbench.engine.decode_attention import block_sizes, decode_attention, launch
from specbench.engine.fusion import fuse_projections
from specbench.engine.timing import Clock
from specbench.hf_backend import fixed_k
from specbench.speedup_model import full_step_alpha, predicted_speedup
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


def products_ms(rows: int, repeats: int = 3) -> dict[str, float]:
    """cuBLAS's matrix products of one GPT-J-6B step alone, in one CUDA graph: ms, median [min, max] of `repeats`.

    Per layer the stacked q/k/v and MLP input projection (as `fuse_projections` leaves them), the attention
    output and the MLP output projection; then the head. Random bfloat16 weights, `rows` input rows.
    """
    config, options = GPTJConfig(), {"device": "cuda", "dtype": torch.bfloat16}
    hidden, inner = config.n_embd, 4 * config.n_embd

    def weights(out_features: int, in_features: int, bias: bool) -> tuple:
        weight = torch.randn(out_features, in_features, **options) / in_features**0.5
        return weight, torch.randn(out_features, **options) if bias else None

    layers = [
        (weights(3 * hidden + inner, hidden, True), weights(hidden, hidden, False), weights(hidden, inner, True))
        for _ in range(config.n_layer)
    ]
    head = weights(HEAD_ROWS, hidden, True)
    x, y = torch.randn(rows, hidden, **options), torch.randn(rows, inner, **options)

    def step() -> list[torch.Tensor]:
        outputs = [linear(x if i != 2 else y, *w) for layer in layers for i, w in enumerate(layer)]
        return [*outputs, linear(x, *head)]

    return spread([graph_replay_ms(step)[0] for _ in range(repeats)])


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
        self._products: dict[int, dict[str, float]] = {}

    def products(self, rows: int) -> dict[str, float]:
        """`products_ms` at `rows` rows, measured once per call."""
        if rows not in self._products:
            self._products[rows] = products_ms(rows)
            torch.cuda.empty_cache()  # the products' weights
        return self._products[rows]

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
            if graphs:  # compiled steps of feed lengths 1 and 5 (a tree's other widths run uncompiled), ragged rows
                compiled = CachedModel(model, vocab, 128, (1, 5), compile=True)
                compiled.capture_graphs((rows,))
                out = decode_baseline(compiled, batch, settings, seeds)
                results[f"{key}/compiled_baseline"] = [r.tokens for r in out.rows] == eager
                for name, drafters in runs.items():
                    out = decode_speculative(compiled, drafters, batch, settings, ConstantK(4), seeds)
                    results[f"{key}/compiled_{name}"] = [r.tokens for r in out.rows] == eager
    if graphs:
        results |= _decode_kernel_check(bench.device)
    results["all_equal"] = all(value is True for value in results.values())
    if graphs:
        torch.backends.cuda.preferred_blas_library("default")
        results |= _real_size_graphs_check(bench)
    return results


def _decode_kernel_check(device: torch.device) -> dict:
    """The decode kernel against `matmul_attention` in float64, random masks: per case, whether it passed.

    Every query sees its own column and a random share of the others (row 0: its own only); keys and
    values of columns no query of a row sees are NaN, so reading one fails the check. Relative error
    ||out - ref|| / ||ref|| under 1e-5 in float32 and 2e-2 in bfloat16; with the automatic split, one
    split and one tile a split, and through the custom op.
    """
    generator = torch.Generator().manual_seed(0)
    shapes = {  # rows, heads, key heads, new tokens, head size, width
        "gptj_1row": (1, 16, 16, 1, 256, 192),
        "gptj_64rows_verify": (64, 16, 16, 5, 256, 256),
        "grouped_tree": (3, 32, 8, 9, 128, 320),
        "tiny_grouped": (5, 4, 2, 13, 8, 64),
        "odd_head_size": (7, 2, 2, 3, 24, 100),
    }
    results = {}
    for name, (rows, heads, key_heads, n, dim, width) in shapes.items():
        visible = torch.rand(rows, n, width, generator=generator) < 0.6
        visible[:, :, width - n - 30 : width - n] = False  # a hole in every row: never read
        visible[0] = False
        visible[:, torch.arange(n), width - n + torch.arange(n)] = True
        query = torch.randn(rows, heads, n, dim, generator=generator)
        key, value = (torch.randn(rows, key_heads, width + 11, dim, generator=generator) for _ in range(2))
        reference = matmul_attention(query.double(), key[:, :, :width].double(), value[:, :, :width].double(),
                                     additive(visible, torch.float64), dim**-0.5)  # fmt: skip
        hidden = ~visible.any(1)  # [rows, width]: no query of the row sees the column
        for states in (key, value):
            states[:, :, :width][hidden[:, None].expand(-1, key_heads, -1)] = torch.nan
            states[:, :, width:] = torch.nan
        _, block_n, _ = block_sizes(heads // key_heads * n, dim)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            inputs = [t.to(device, dtype) for t in (query, key, value)] + [additive(visible, dtype).to(device)]
            outputs = {f"split{columns}": launch(*inputs, dim**-0.5, columns) for columns in (width, block_n)}
            outputs["automatic_op"] = decode_attention(*inputs, dim**-0.5)
            for variant, output in outputs.items():
                error = ((output.double().cpu() - reference).norm() / reference.norm()).item()
                results[f"decode_kernel/{name}/{str(dtype)[6:]}/{variant}"] = error < tolerance
                if not error < tolerance:
                    print(f"decode kernel {name} {dtype} {variant}: relative error {error}", flush=True)
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
    results["profile_top_cpu_ops"] = {
        "ours": _profile_kernels(ours_baseline)[1],
        "generate": _profile_kernels(generate)[1],
    }
    return results


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
    results["crossover"] = {name: crossover(results, name) for name in drafters}
    return results


def crossover(rows: dict[str, dict], drafter: str) -> dict[str, int | None]:
    """The smallest batch size at which speculation stops paying (speedup below 1), measured and predicted.

    None: it pays at every batch size run. The first batch size run means it never paid.
    """
    sizes = sorted(int(size) for size, row in rows.items() if f"speedup_{drafter}" in row)
    measured = [size for size in sizes if rows[str(size)][f"speedup_{drafter}"]["median"] < 1]
    predicted = [size for size in sizes if rows[str(size)][f"predicted_speedup_{drafter}"] < 1]
    return {"measured": min(measured, default=None), "predicted": min(predicted, default=None)}


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
        alpha = full_step_alpha(result.rows, args.k) or 0.0
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
    results["graphs_captured_tree_sizes"] = sorted({n for rows, n, *_ in verifier._graphs if rows == 1})
    return results


# torch.compile variants, each on top of the previous one's model; the options are inductor's (the
# "max-autotune-no-cudagraphs" mode sets both: matrix-product templates and kernel launch parameters tuned).
# Attention is the engine's (`decode_attention` on CUDA) unless the name says otherwise:
# "_without_decode_kernel": matmul attention in compiled steps, as before the decode kernel (see `attention`);
# "_sdpa_attention": compiled steps keep SDPA, as before matmul attention.
COMPILE_VARIANTS = {
    "as_loaded": {},
    "fused_projections": {},
    "fused_projections_without_decode_kernel": {},
    "fused_projections_sdpa_attention": {},
    "fused_projections_max_autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
}
ATTENTION_BY_SUFFIX = {"_without_decode_kernel": prefix_attention_without_kernel, "_sdpa_attention": prefix_sdpa}
# the kernels of attention in a profile: the decode kernel's, SDPA's (cuDNN, efficient, flash)
ATTENTION_KERNEL_NAMES = re.compile(r"split_attention|combine_splits|sdpa|fmha|flash|attention", re.IGNORECASE)


@contextlib.contextmanager
def attention_function(function: Callable):
    """Prefix attention replaced by `function` (one of `engine.attention`'s), as an earlier engine ran it."""
    AttentionInterface.register(PREFIX_ATTENTION, function)
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
            attention = next((f for end, f in ATTENTION_BY_SUFFIX.items() if variant.endswith(end)), prefix_attention)
            with torch._inductor.config.patch(options), attention_function(attention):
                verifier.capture_graphs((size,))
            compile_s = time.perf_counter() - start
            runs = []
            for _ in range(args.repeats + 1):  # the first is a warm-up
                runs.append(decode_baseline(verifier, prompts, bench.settings, seeds))
            per_token = [1000 * (r.wall_s - r.rows[0].ttft_s) / (args.new_tokens - 1) for r in runs[1:]]
            results[variant][f"batch{size}"] = row = {
                "ms_per_step_decode": spread(per_token),
                "device_ms_per_step_by_width": device_step_ms(verifier, size, args.prompt_len) if bench.graphs else {},
                "compile_and_capture_s": compile_s,
            }
            if bench.graphs:
                row |= over_products(row, bench.products(size))
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
    for (graph_rows, n, width, _logits), replay in sorted(verifier._graphs.items()):
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


def over_products(row: dict, products: dict[str, float]) -> dict:
    """A step's decode and device times over the matrix products alone (`products_ms`), measured in the same call."""
    device = row["device_ms_per_step_by_width"]
    return {
        "products_ms": products,
        "decode_over_products": row["ms_per_step_decode"]["median"] / products["median"],
        "device_over_products_by_width": {width: ms / products["median"] for width, ms in device.items()},
    }


def section_profile(bench: Bench) -> dict:
    """Where a batched verifier-only step spends its time with CUDA graphs (not compiled), batch 64.

    With the decode kernel and without it (SDPA, as before), in the same call: decode ms/step, the captured
    step alone by width against the matrix products alone, and the GPU kernels of the steps (the profile of
    the decode less that of its prefill), with attention's share.
    """
    size = min(64, max(bench.args.batch_sizes))
    results: dict = {"batch_size": size}
    for name, attention in (
        ("decode_kernel", prefix_attention),
        ("without_decode_kernel", prefix_attention_without_kernel),
    ):
        with attention_function(attention):
            results[name] = _profile_row(bench, size)
        print(f"[profile {name}] {json.dumps(results[name], default=str)[:800]}", flush=True)
        gc.collect()
    return results


def _profile_row(bench: Bench, size: int) -> dict:
    prompts, seeds = bench.batch(size)
    steps = bench.args.new_tokens - 1
    verifier = bench.cached("gpt_j_6b", (1,))
    verifier.capture_graphs((size,))
    decode_baseline(verifier, prompts, bench.settings, seeds)  # warm-up
    runs = [decode_baseline(verifier, prompts, bench.settings, seeds) for _ in range(bench.args.repeats)]
    row = {"ms_per_step_decode": spread([1000 * (r.wall_s - r.rows[0].ttft_s) / steps for r in runs])}
    if bench.graphs:
        row["device_ms_per_step_by_width"] = device_step_ms(verifier, size, bench.args.prompt_len)
        row |= over_products(row, bench.products(size))
    decode_kernels, row["top_cpu_ops"] = _profile_kernels(
        lambda: decode_baseline(verifier, prompts, bench.settings, seeds)
    )
    prefill_kernels, _ = _profile_kernels(lambda: verifier.prefill(prompts))
    step_kernels = {op: (ms - prefill_kernels.get(op, 0.0)) / steps for op, ms in decode_kernels.items()}
    attention_ms = sum(ms for op, ms in step_kernels.items() if ATTENTION_KERNEL_NAMES.search(op))
    row["gpu_ms_per_step"] = sum(step_kernels.values())
    row["attention_gpu_ms_per_step"] = attention_ms
    row["attention_share"] = attention_ms / row["gpu_ms_per_step"] if row["gpu_ms_per_step"] else None
    top = sorted(step_kernels.items(), key=lambda item: item[1], reverse=True)[:15]
    row["top_gpu_kernels_ms_per_step"] = [{"kernel": op, "ms": ms} for op, ms in top]
    return row


def _profile_kernels(run: Callable[[], object], rows: int = 12) -> tuple[dict[str, float], list[dict]]:
    """GPU ms by kernel over one `run`, and the host ops that take the most CPU time (self)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
    events = profiler.key_averages()
    kernels = {
        e.key: e.self_device_time_total / 1000 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
    }
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return kernels, [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000} for e in by_cpu]


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
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.quick else "cpu",
        "host": describe_machine(),
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
