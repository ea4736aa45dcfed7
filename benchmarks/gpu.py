"""GPU benchmark: the engine at real model sizes (random weights), eager and with CUDA graphs.

    python benchmarks/gpu.py --out DIR            # on a GPU machine (one call of the device tool)
    python benchmarks/gpu.py --out DIR --quick    # tiny configs on the CPU: checks the script runs

No weights can reach the device and nothing measured here depends on weight
values, so the real architectures are built from their configs with random
weights: GPT-J-6B (bfloat16) as verifier; distilgpt2, gpt2, gpt-neo-125M and
gpt2-medium as drafts. Measured, in both engine modes (eager; static KV cache +
CUDA graphs; and, for verifier-only decode, torch.compile + CUDA graphs):
1. verifier-only decode, ms/token: ours vs `generate()`, and the memory-bandwidth floor;
2. the verify-cost curve: one verifier pass over n = 1..17 new tokens, relative to n = 1;
3. the draft/verifier cost ratio c of each draft;
4. speculative decoding with the verifier as its own draft (all accepted) and with
   a random draft (almost none accepted): measured ms/token vs the prediction
   from the measured c and curve; the gap is the engine's overhead;
5. the same against `generate(assistant_model=...)` at equal k (eager only).
Every timing synchronises the GPU before reading the clock; warm-up runs first;
each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

from specbench.engine import (
    CachedModel,
    Clock,
    DecodeSettings,
    ModelDrafter,
    TokenChooser,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.costs import measure_step_costs
from specbench.hf_backend import fixed_k, generate_new_tokens

GPT2_VOCAB = 50257  # the tokenizer: the engine never produces ids above it
GPTJ_VOCAB = 50400  # GPT-J's head


def architectures(quick: bool) -> dict[str, tuple[type, object]]:
    """name -> (model class, config): the real sizes, or tiny ones for a CPU dry run.

    The drafts get GPT-J's 50400-row head (0.3% more head work than 50257) because
    transformers' assisted generation refuses a draft whose vocabulary size differs.
    """
    vocab = {"vocab_size": GPTJ_VOCAB}
    if quick:
        return {
            "gpt_j_6b": (GPTJForCausalLM, GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=2048)),
            "distilgpt2": (GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=1, n_head=2, **vocab)),
            "gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=2, n_head=2, **vocab)),
        }
    return {
        "gpt_j_6b": (GPTJForCausalLM, GPTJConfig()),  # the defaults are GPT-J-6B: 4096 wide, 28 layers, 50400 logits
        "distilgpt2": (GPT2LMHeadModel, GPT2Config(n_layer=6, **vocab)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(**vocab)),
        "gpt_neo_125m": (
            GPTNeoForCausalLM,
            GPTNeoConfig(
                hidden_size=768, num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]], **vocab
            ),
        ),
        "gpt2_medium": (GPT2LMHeadModel, GPT2Config(n_embd=1024, n_layer=24, n_head=16, **vocab)),
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


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    source = torch.randn(int(gib * 2**30 / 2), dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    clock = Clock(device)
    for _ in range(3):
        target.copy_(source)
    start = clock.now()
    for _ in range(10):
        target.copy_(source)
    seconds = (clock.now() - start) / 10
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def repeat(count: int, action) -> list:
    return [action() for _ in range(count)]


def timed_generate(model, prompt: list[int], clock: Clock, **kwargs) -> float:
    """Seconds of one greedy `generate()` call, the GPU synchronised on both sides."""
    start = clock.now()
    generate_new_tokens(model, prompt, **kwargs)
    return clock.now() - start


def run_mode(mode: str, models: dict, args, device: torch.device, prompt: list[int], report: dict) -> dict:
    """Every measurement in one engine mode: `eager` (dynamic cache) or `graphs` (static cache + CUDA graphs)."""
    graphs = mode in ("graphs", "compiled")
    max_len = len(prompt) + args.new_tokens + 2 * args.k + 24
    compiled = mode == "compiled"  # every compiled shape costs ~40 s: only n = 1 and k + 1, and the spec drafts
    curve_sizes = (1, args.k + 1) if compiled else range(1, args.curve_tokens + 1)

    def cached(name: str, sizes) -> CachedModel:
        return CachedModel(
            models[name], GPT2_VOCAB, max_len if graphs else None, sizes if graphs else (), compile=mode == "compiled"
        )

    verifier = cached("gpt_j_6b", curve_sizes)
    drafts = {name: ModelDrafter(name, cached(name, (1, 2))) for name in models if name != "gpt_j_6b"}
    drafts["self"] = ModelDrafter("self", cached("gpt_j_6b", (1, 2)))
    if compiled:
        drafts = {name: drafts[name] for name in args.spec_drafts}
    settings = DecodeSettings(max_new_tokens=args.new_tokens)
    clock = Clock(device)
    results: dict = {}

    decode_baseline(verifier, prompt, settings)  # warm-up (and graph capture)
    runs = repeat(args.repeats, lambda: decode_baseline(verifier, prompt, settings))
    baseline = runs[0]
    decode_ms = statistics.median(1000 * (r.latency_s - r.ttft_s) / (len(r.tokens) - 1) for r in runs)
    results["ours_baseline"] = {
        "ms_per_token_decode": decode_ms,
        "ms_per_token_total": statistics.median(1000 * r.latency_s / len(r.tokens) for r in runs),
        "ttft_ms": statistics.median(1000 * r.ttft_s for r in runs),
    }
    print(f"[{mode}] ours verifier-only: {decode_ms:.2f} ms/token", flush=True)

    chooser = TokenChooser(settings)
    curve_tokens = args.k + 1 if compiled else args.curve_tokens
    costs = measure_step_costs(verifier, list(drafts.values()), prompt, chooser, curve_tokens, repeats=5)
    # compiled: sizes between 1 and k + 1 ran uncompiled, so only the two captured ones are reported
    sizes = [1, args.k + 1] if compiled else range(1, curve_tokens + 1)
    verify_ms = {n: 1000 * costs.verify_s[n - 1] for n in sizes}
    results["verify_curve_ms"] = verify_ms
    results["verify_curve_ratio"] = {n: t / verify_ms[1] for n, t in verify_ms.items()}
    results["draft_step_ms"] = {name: 1000 * t for name, t in costs.draft_s.items()}
    results["cost_ratio_c"] = {name: t / costs.verify_s[0] for name, t in costs.draft_s.items()}
    print(f"[{mode}] verify curve ms: { {n: round(v, 2) for n, v in verify_ms.items()} }", flush=True)
    print(f"[{mode}] draft step ms: { {n: round(v, 2) for n, v in results['draft_step_ms'].items()} }", flush=True)

    results["speculative"] = {}
    for name in args.spec_drafts:
        drafter = drafts[name]
        decode_speculative(verifier, [drafter], prompt, settings, k=args.k)  # warm-up
        runs = repeat(args.repeats, lambda d=drafter: decode_speculative(verifier, [d], prompt, settings, k=args.k))
        result = runs[0]
        steps_ms = statistics.median(1000 * (r.latency_s - r.ttft_s - r.draft_prefill_s) for r in runs)
        per_token = steps_ms / (len(result.tokens) - 1)
        tokens_per_step = (len(result.tokens) - 1) / result.steps
        # what k draft steps plus one verifier pass over k+1 tokens cost, per emitted token
        predicted = (args.k * costs.draft_s[name] + costs.verify_s[args.k]) * 1000 / tokens_per_step
        results["speculative"][name] = {
            "ms_per_token_total": statistics.median(1000 * r.latency_s / len(r.tokens) for r in runs),
            "ms_per_token_steps": per_token,
            "predicted_ms_per_token": predicted,
            "engine_overhead_pct": 100 * (per_token / predicted - 1),
            "acceptance_rate": result.accepted / result.proposed,
            "tokens_per_step": tokens_per_step,
            "identical_to_baseline": result.tokens == baseline.tokens,
            "speedup_vs_ours_baseline": decode_ms / per_token,
            "draft_prefill_ms": 1000 * result.draft_prefill_s,
        }
        print(f"[{mode}] spec {name}: {per_token:.2f} ms/token, predicted {predicted:.2f}, "
              f"acceptance {result.accepted / result.proposed:.2f}", flush=True)  # fmt: skip

    if not graphs:
        vm = models["gpt_j_6b"]
        vm.generation_config.eos_token_id = None
        vm.generation_config.pad_token_id = 0
        kwargs = {"max_new_tokens": args.new_tokens}
        timed_generate(vm, prompt, clock, **kwargs)
        seconds = statistics.median(repeat(args.repeats, lambda: timed_generate(vm, prompt, clock, **kwargs)))
        results["hf_generate_ms_per_token_total"] = 1000 * seconds / args.new_tokens
        print(f"[{mode}] generate(): {results['hf_generate_ms_per_token_total']:.2f} ms/token (total)", flush=True)
        results["hf_assisted"] = {}
        for name in args.spec_drafts:
            assistant = vm if name == "self" else models[name]
            fixed_k(assistant, args.k)
            assistant.generation_config.eos_token_id = None
            timed_generate(vm, prompt, clock, assistant_model=assistant, **kwargs)
            seconds = statistics.median(
                repeat(args.repeats, lambda a=assistant: timed_generate(vm, prompt, clock, assistant_model=a, **kwargs))
            )
            ours = results["speculative"][name]["ms_per_token_total"]
            theirs = 1000 * seconds / args.new_tokens
            results["hf_assisted"][name] = {"ms_per_token_total": theirs, "hf_time_over_ours": theirs / ours}
            print(f"[{mode}] assisted {name}: {theirs:.2f} ms/token (total), ours {ours:.2f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU: a dry run of the script")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--curve-tokens", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["eager", "graphs"])
    parser.add_argument("--spec-drafts", nargs="+", default=["self", "distilgpt2"])
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
        report["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        report["cuda"] = torch.version.cuda
        report["copy_bandwidth_gb_s"] = copy_bandwidth(device, gib=4)
        print(f"{report['device']}: copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s", flush=True)
    start = time.perf_counter()
    models = {name: build(cls, config, device, dtype) for name, (cls, config) in architectures(args.quick).items()}
    if args.quick:
        args.spec_drafts = [d for d in args.spec_drafts if d in models or d == "self"]
    weights = models["gpt_j_6b"]
    report["verifier_weight_gb"] = sum(p.numel() * p.element_size() for p in weights.parameters()) / 1e9
    if "copy_bandwidth_gb_s" in report:
        report["floor_ms_per_token"] = 1000 * report["verifier_weight_gb"] / report["copy_bandwidth_gb_s"]
    print(f"built models in {time.perf_counter() - start:.0f} s", flush=True)
    prompt = torch.randint(0, GPT2_VOCAB, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    report["modes"] = {}
    for mode in args.modes:
        report["modes"][mode] = run_mode(mode, models, args, device, prompt, report)
        if device.type == "cuda":
            report["modes"][mode]["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_benchmark.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
