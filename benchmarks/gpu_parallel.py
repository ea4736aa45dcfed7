"""A parallel sweep on a host with several GPUs, into one MLflow tracking server (one device call).

    python benchmarks/gpu_parallel.py --out DIR

Starts `mlflow server` on loopback, runs a 2x2 multirun with Hydra's joblib
launcher (as many workers as GPUs, `device=auto`), and checks that every run
FINISHED and that runs which overlapped in time ran on different GPUs.
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

from specbench.testing import write_models_dir, write_pubmedqa_jsonl

ROOT = Path(__file__).resolve().parents[1]
PORT = 5057


def start_server(work: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(PORT),
         "--backend-store-uri", f"sqlite:///{work}/server.db", "--artifacts-destination", str(work / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in server.stdout:
        print("server:", line.rstrip(), flush=True)
        if "Uvicorn running on" in line or "Listening at" in line:
            return server
    raise RuntimeError("mlflow server exited before it was ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    models, data = write_models_dir(work / "models"), write_pubmedqa_jsonl(work / "data.jsonl", count=8)
    gpus = torch.cuda.device_count()
    server = start_server(work)
    uri = f"http://127.0.0.1:{PORT}"
    try:
        sweep = subprocess.run(
            [sys.executable, "-m", "specbench", "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={gpus}",
             "draft=distilgpt2,gpt2", "k=2,4", "device=auto", "dtype=bfloat16", f"models_dir={models}",
             f"dataset.path={data}", "dataset.num_samples=8", "generation.max_new_tokens=48", f"tracking.uri={uri}",
             "quality.embedder=none", f"hydra.sweep.dir={work}/sweep"],
            cwd=ROOT, capture_output=True, text=True, timeout=500,
        )  # fmt: skip
        import mlflow

        mlflow.set_tracking_uri(uri)
        runs = [
            r for r in mlflow.search_runs(experiment_names=["specbench"], output_format="list") if "k" in r.data.params
        ]
    finally:
        server.terminate()
    spans = [(r.info.start_time, r.info.end_time, r.data.tags.get("device"), r.info.run_name) for r in runs]
    overlapping_pairs = [
        (a[3], b[3], a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1 :] if a[0] < b[1] and b[0] < a[1]
    ]
    report = {
        "gpus": gpus,
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "host": describe_machine(),
        "returncode": sweep.returncode,
        "runs": [{"name": s[3], "device": s[2], "start_ms": s[0], "end_ms": s[1]} for s in sorted(spans)],
        "statuses": sorted(r.info.status for r in runs),
        "overlapping_pairs": overlapping_pairs,
        "overlaps_on_distinct_gpus": all(pair[2] != pair[3] for pair in overlapping_pairs),
        "stderr_tail": sweep.stderr[-2000:] if sweep.returncode else "",
    }
    (args.out / "gpu_parallel.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
