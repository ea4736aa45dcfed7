"""What one join costs: rows joining a running batch of 64, GPT-J-6B's and distilgpt2's shapes (bf16, random
weights) on a GPU, eager against captured (`CachedModel.capture_joins`).

    python benchmarks/join_cost.py --out DIR [--quick]

For 1, 4 and 16 joining rows of 128-token prompts, 10 joins each (after 2 untimed), each between two device
synchronisations, for each model:
- `eager`: the new rows' prefill as one eager forward (every join before `capture_joins`);
- `captured`: the same rows under the graphs `capture_joins` captured (groups of up to 16 rows, prompts
  padded to a multiple of 64 columns);
beside the GPU's kernel time of one join of each kind (torch.profiler: the sum of the kernels' own times, so
the rest of a join is the host's), the largest difference between the two paths' logits, and the 64 rows'
decode step (one captured graph) for scale. `--quick`: tiny models on the CPU, a dry run of the script.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from gpu import _profile_kernels, architectures, build
from gpu_load import TOKENIZER_VOCAB
from machine import describe_machine
from repeats import spread

from specbench.engine import CachedModel
from specbench.engine.timing import Clock

RUNNING, PROMPT_LEN, JOINING = 64, 128, (1, 4, 16)
MAX_LEN = PROMPT_LEN + 64 + 32  # the load benchmark's: prompt, output, two feeds of k = 4 and room


def timed_ms(clock: Clock, work) -> float:
    """`work()`'s wall time in ms between two clock readings that wait for the device."""
    start = clock.now()
    work()
    return 1000 * (clock.now() - start)


def kernel_ms(device: torch.device, work) -> float | None:
    """The sum of the GPU kernels' own times in one `work()` (torch.profiler), in ms; None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    kernels, _ = _profile_kernels(lambda: (work(), torch.cuda.synchronize(device)))
    return sum(kernels.values())


def measure(model: torch.nn.Module, device: torch.device, captured: bool, prompts: list[list[int]]) -> dict:
    """One path's join times by joining-row count, its first joins' logits, and the running batch's step time."""
    graphs, clock = device.type == "cuda", Clock(device)
    cached = CachedModel(model, TOKENIZER_VOCAB, MAX_LEN, (1,) if graphs else ())
    cached.capture_graphs((RUNNING,), PROMPT_LEN)
    if captured:
        cached.capture_joins(max(JOINING), PROMPT_LEN)
    cached.prefill(prompts[:RUNNING])
    next_tokens = torch.ones(RUNNING, 1, dtype=torch.long, device=cached.device)
    cached.forward(next_tokens)  # the running rows hold a token past their prompts, as after a step
    result: dict = {"join_ms": {}, "join_kernel_ms": {}, "logits": {}}
    for rows in JOINING:
        slots, joining = list(range(rows)), prompts[RUNNING : RUNNING + rows]

        def join(slots=slots, joining=joining):
            return cached.admit(slots, joining)

        result["logits"][rows] = join().float().cpu()
        join()
        result["join_ms"][rows] = spread([timed_ms(clock, join) for _ in range(10)])
        result["join_kernel_ms"][rows] = kernel_ms(device, join)
    result["step_ms"] = spread([timed_ms(clock, lambda: cached.forward(next_tokens)) for _ in range(10)])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU: a dry run of the script")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, TOKENIZER_VOCAB, (RUNNING + max(JOINING), PROMPT_LEN), generator=generator).tolist()
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "host": describe_machine(),
        "dtype": str(dtype),
        "running_rows": RUNNING,
        "prompt_len": PROMPT_LEN,
    }
    for name in ("gpt_j_6b", "distilgpt2"):
        model_class, config = architectures(args.quick)[name]
        model = build(model_class, config, device, dtype)
        paths = {path: measure(model, device, path == "captured", prompts) for path in ("eager", "captured")}
        report[name] = {
            **{path: {key: value for key, value in found.items() if key != "logits"} for path, found in paths.items()},
            "max_logit_difference": {
                rows: float((paths["eager"]["logits"][rows] - paths["captured"]["logits"][rows]).abs().max())
                for rows in JOINING
            },
            "same_argmax": {
                rows: bool(
                    torch.equal(paths["eager"]["logits"][rows].argmax(-1), paths["captured"]["logits"][rows].argmax(-1))
                )
                for rows in JOINING
            },
        }
        print(name, json.dumps(report[name]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (args.out / "join_cost.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
