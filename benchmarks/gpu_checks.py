"""GPU checks of the whole CLI, for one call of a GPU machine (CI has none); the engine's own GPU checks
(CUDA graphs against eager decoding) are `benchmarks/gpu.py --sections checks`.

    python benchmarks/gpu_checks.py --out DIR    # specbench installed there (benchmarks/NOTES.md: how)

1. The whole CLI runs on the GPU: a 2x2 multirun in bfloat16 with CUDA graphs
   into a local SQLite store; every run FINISHED and tagged with the GPU.
2. A sweep that changes models releases the old ones: GPU memory in use before
   each job loads its models (`gpu_mem_before_load_gb`) stays near zero.
3. Out of memory ends that run FAILED with a message naming model and dtype, and
   the sweep goes on (memory capped with torch.cuda.set_per_process_memory_fraction).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from machine import describe_machine
from transformers import GPT2Config, GPT2LMHeadModel

from specbench.testing import train_tokenizer, write_models_dir, write_pubmedqa_jsonl

ROOT = Path(__file__).resolve().parents[1]


def specbench(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (optionally after some Python, e.g. a GPU memory cap)."""
    run = "import runpy, sys\nsys.argv = ['specbench', *ARGS]\nrunpy.run_module('specbench', run_name='__main__')"
    code = f"{prelude}\n{run.replace('ARGS', repr(args))}"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=480)


def runs_of(store: str, experiment: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(store)
    return [r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list") if "k" in r.data.params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(), "host": describe_machine()}
    print(json.dumps(report, indent=2), flush=True)

    work = Path(tempfile.mkdtemp())
    models, data = write_models_dir(work / "models"), write_pubmedqa_jsonl(work / "data.jsonl")
    tokenizer = train_tokenizer()
    for name in ("big_a", "big_b"):  # ~100M parameters each: plainly visible in GPU memory
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=1024, n_layer=8, n_head=16, bos_token_id=0, eos_token_id=0
        )
        GPT2LMHeadModel(config).save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    store = f"sqlite:///{args.out}/mlruns/mlflow.db"
    common = [f"models_dir={models}", f"dataset.path={data}", "dataset.num_samples=3", "generation.max_new_tokens=16",
              f"tracking.uri={store}", "quality.embedder=none", "device=cuda", "dtype=bfloat16"]  # fmt: skip

    sweep = specbench(["-m", "draft=distilgpt2,gpt2", "k=2,4", "engine.cuda_graphs=true",
                       f"hydra.sweep.dir={work}/sweep1", "tracking.experiment=gpu_cli", *common])  # fmt: skip
    runs = runs_of(store, "gpu_cli")
    report["cli"] = {
        "returncode": sweep.returncode,
        "runs": len(runs),
        "statuses": sorted(r.info.status for r in runs),
        "device_tags": sorted({r.data.tags.get("device.name", "") for r in runs}),
        "disagreement_rates": sorted(r.data.metrics.get("disagreement_rate", -1) for r in runs),
        "speedups": sorted(r.data.metrics.get("speedup", -1) for r in runs),
        "peak_gpu_mem_gb_spec": sorted(r.data.metrics.get("peak_gpu_mem_gb_spec", -1) for r in runs),
        "stderr_tail": sweep.stderr[-1500:] if sweep.returncode else "",
    }
    print(json.dumps(report["cli"], indent=2), flush=True)

    release = specbench(["-m", f"verifier.name_or_path={work / 'big_a'},{work / 'big_b'}", "k=2",
                         f"hydra.sweep.dir={work}/sweep2", "tracking.experiment=gpu_release", *common])  # fmt: skip
    runs = sorted(runs_of(store, "gpu_release"), key=lambda r: r.info.start_time)
    report["release"] = {
        "returncode": release.returncode,
        "gpu_mem_before_load_gb": [r.data.metrics.get("gpu_mem_before_load_gb") for r in runs],
        "peak_gpu_mem_gb_baseline": [r.data.metrics.get("peak_gpu_mem_gb_baseline") for r in runs],
        "stderr_tail": release.stderr[-1500:] if release.returncode else "",
    }
    print(json.dumps(report["release"], indent=2), flush=True)

    total = torch.cuda.get_device_properties(0).total_memory
    cap = f"import torch\ntorch.cuda.set_per_process_memory_fraction({150e6 / total!r})"  # 150 MB of GPU memory
    oom = specbench(["-m", f"verifier.name_or_path={work / 'big_a'},{models / 'EleutherAI' / 'gpt-j-6B'}", "k=2",
                     "dtype=float32", f"hydra.sweep.dir={work}/sweep3", "tracking.experiment=gpu_oom", *common[:-1]],
                    prelude=cap)  # fmt: skip
    runs = runs_of(store, "gpu_oom")
    report["oom"] = {
        "returncode": oom.returncode,
        "statuses": sorted(r.info.status for r in runs),
        "errors": [r.data.tags.get("error", "") for r in runs if r.info.status == "FAILED"],
        "summary": [line for line in oom.stderr.splitlines() if line.startswith("error:")],
    }
    print(json.dumps(report["oom"], indent=2), flush=True)
    (args.out / "gpu_checks.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
