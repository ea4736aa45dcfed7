"""A verifier larger than one GPU, sharded with a device_map over two H200s (one call of nvidia-h200-x2).

    python benchmarks/gpu_sharded.py --out DIR            # on a machine with 2 GPUs
    python benchmarks/gpu_sharded.py --out DIR --quick    # tiny float32 models, "cpu" shards: a dry run

The verifier has Llama-3-70B's layer shape with 100 layers instead of 80 (bfloat16,
about 175 GB: more than one H200 holds), built on the meta device and given random
weights directly on the GPU that its device_map names: layers 0-49 (and the
embeddings) on cuda:0, layers 50-99 (and the head) on cuda:1, dispatched with
accelerate's hooks as `from_pretrained(device_map=...)` dispatches a checkpoint.
The draft has Llama-3.2-1B's shape, on cuda:0. A device_map split runs the two
cards one after the other, so the floor of a decode step is the time to stream
each card's share of the weights, added up. Measured (median, min and max of
--repeats runs after a warm-up, every clock reading waiting for both GPUs):
verifier-only decode with our engine and with `generate()`; speculative decoding
at k = 4 with the 1B draft, against the prediction from the step costs measured
on the same models (random weights: the draft is almost never accepted, so this
measures the engine's cost on a sharded verifier, not a useful speedup).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from accelerate import dispatch_model
from accelerate.utils import set_module_tensor_to_device
from machine import describe_machine
from repeats import copy_bandwidth, spread
from transformers import LlamaConfig, LlamaForCausalLM

from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter, decode_baseline, decode_speculative
from specbench.engine.costs import measure_step_costs
from specbench.engine.timing import Clock, model_devices
from specbench.speedup_model import full_step_alpha, predicted_speedup

VOCAB = 128256


def configs(quick: bool) -> tuple[LlamaConfig, LlamaConfig]:
    """(verifier, draft): Llama-3-70B's layer with 100 layers, and Llama-3.2-1B; tiny ones for a dry run."""
    if quick:
        small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
        return LlamaConfig(vocab_size=VOCAB, num_hidden_layers=4, **small), LlamaConfig(
            vocab_size=VOCAB, num_hidden_layers=1, **small
        )
    verifier = LlamaConfig(
        vocab_size=VOCAB, hidden_size=8192, intermediate_size=28672, num_hidden_layers=100, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
    )  # fmt: skip
    draft = LlamaConfig(
        vocab_size=VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
    )  # fmt: skip
    return verifier, draft


def split(config: LlamaConfig, devices: list[str]) -> dict[str, str]:
    """The device_map: the first half of the layers (and the embeddings) on the first device, the rest on the second."""
    half = config.num_hidden_layers // 2
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    device_map |= {f"model.layers.{i}": devices[0 if i < half else 1] for i in range(config.num_hidden_layers)}
    return device_map | {"model.norm": devices[1], "lm_head": devices[1]}


def sharded_model(config: LlamaConfig, device_map: dict[str, str], dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights placed straight on their devices (nothing larger than one tensor is ever built)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    for seed, (name, parameter) in enumerate(list(model.named_parameters())):
        module = next(prefix for prefix in sorted(device_map, key=len, reverse=True) if name.startswith(prefix + "."))
        device = device_map[module]
        value = torch.empty(parameter.shape, dtype=dtype, device=device)
        torch.manual_seed(seed)
        value.normal_(0.0, 0.02) if parameter.dim() > 1 else value.fill_(1.0)  # norms' weights are ones
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)  # not the meta model's float32
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device_map["model.rotary_emb"])
    return dispatch_model(model, device_map=device_map, force_hooks=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    devices = ["cpu", "cpu"] if args.quick else ["cuda:0", "cuda:1"]
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "devices": [torch.cuda.get_device_name(d) for d in devices] if not args.quick else devices,
        "host": describe_machine(),
    }

    def save(stage: str) -> None:
        (args.out / "gpu_sharded.json").write_text(json.dumps(report, indent=2, default=str))
        print(
            f"[{stage}] {json.dumps({k: v for k, v in report.items() if k == stage}, default=str)[:1200]}", flush=True
        )

    start = time.perf_counter()
    verifier_config, draft_config = configs(args.quick)
    device_map = split(verifier_config, devices)
    # float32 in the dry run, where speculative output must equal the baseline's (bfloat16 rounds a k+1-token
    # verify differently from a 1-token step, and random weights' near-flat logits turn that into other tokens)
    dtype = torch.float32 if args.quick else torch.bfloat16
    verifier_model = sharded_model(verifier_config, device_map, dtype)
    torch.manual_seed(1)
    with torch.device(devices[0]):
        draft_model = LlamaForCausalLM(draft_config).to(dtype).eval()
    bytes_by_device: dict[str, float] = {}
    for parameter in verifier_model.parameters():
        key = str(parameter.device)
        bytes_by_device[key] = bytes_by_device.get(key, 0.0) + parameter.numel() * parameter.element_size()
    report["build"] = {
        "seconds": time.perf_counter() - start,
        "verifier_gb_by_device": {key: value / 1e9 for key, value in bytes_by_device.items()},
        "verifier_devices": [str(d) for d in model_devices(verifier_model)],
        "draft_gb": sum(p.numel() * p.element_size() for p in draft_model.parameters()) / 1e9,
    }
    if not args.quick:
        bandwidth = {device: copy_bandwidth(torch.device(device)) for device in devices}
        report["build"]["copy_bandwidth_gb_s"] = bandwidth
        # the cards run one after the other: each streams its share, and the times add up
        report["build"]["floor_ms_per_token"] = sum(1000 * bytes_by_device[d] / 1e9 / bandwidth[d] for d in devices)
        report["build"]["memory_allocated_gb"] = {d: torch.cuda.memory_allocated(d) / 1e9 for d in devices}
    save("build")

    settings = DecodeSettings(max_new_tokens=args.new_tokens)
    prompt = torch.randint(0, VOCAB, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    verifier = CachedModel(verifier_model, VOCAB)
    graphs = not args.quick
    draft = ModelDrafter("llama_1b", CachedModel(draft_model, VOCAB, 512 if graphs else None, (1, 2) if graphs else ()))
    draft.model.capture_graphs((1,))
    clock = Clock(model_devices(verifier_model))
    ids = torch.tensor([prompt], device=verifier.device)
    config = transformers.GenerationConfig(
        max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
    )

    def generate() -> float:
        begin = clock.now()
        with torch.inference_mode():
            verifier_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return clock.now() - begin

    def ours():
        return decode_baseline(verifier, [prompt], settings, [0])

    def speculative():
        return decode_speculative(verifier, [draft], [prompt], settings, ConstantK(args.k), [0])

    contenders = {"ours": lambda: ours().wall_s, "generate": generate, "speculative": lambda: speculative().wall_s}
    for run in contenders.values():  # warm-up
        run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.repeats):
        for name in list(contenders) if round_ % 2 == 0 else reversed(contenders):
            samples[name].append(1000 * contenders[name]() / args.new_tokens)
    report["ms_per_token"] = {name: spread(values) for name, values in samples.items()}
    save("ms_per_token")

    costs = measure_step_costs(verifier, [draft], [prompt], settings, {1: (1, args.k + 1)}, repeats=3)
    baseline, spec = ours().rows[0], speculative().rows[0]
    alpha = full_step_alpha([spec], args.k) or 0.0
    verify = costs.verify_s[1]
    c = costs.draft_s[1]["llama_1b"] / verify[1]
    v = verify[args.k + 1] / verify[1]
    steps_ms = 1000 * (spec.latency_s - spec.ttft_s - spec.draft_prefill_s)
    predicted_step_ms = 1000 * (args.k * costs.draft_s[1]["llama_1b"] + verify[args.k + 1])
    report["speculative"] = {
        "verify_ms_1_token": 1000 * verify[1],
        "verify_cost_ratio_k_plus_1": v,
        "draft_step_ms": 1000 * costs.draft_s[1]["llama_1b"],
        "cost_ratio_c": c,
        "acceptance": spec.accepted / max(spec.proposed, 1),
        "alpha_iid": alpha,
        "predicted_speedup": predicted_speedup(alpha, args.k, c, v),
        "measured_speedup": samples["ours"]
        and statistics.median(samples["ours"]) / statistics.median(samples["speculative"]),
        "steps_ms_measured": steps_ms,
        "steps_ms_predicted": predicted_step_ms * spec.steps,
        "engine_overhead_pct": 100 * (steps_ms / (predicted_step_ms * spec.steps) - 1),
        "identical_to_baseline": spec.tokens == baseline.tokens,
    }
    save("speculative")


if __name__ == "__main__":
    main()
