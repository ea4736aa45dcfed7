"""The offline verifier behind llama.cpp's OpenAI-compatible server, plain against prompt lookup, under load.

specbench starts each server itself (engine.backend=server with server.baseline_cmd and
server.spec_cmd: `python -m llama_cpp.server` on the offline Qwen2.5-Coder-1.5B GGUF, the
second with `--draft_model prompt-lookup-decoding`), replays the same Poisson trace to
each at a probe's rate, and searches the rate where speculation stops paying
(load.find_crossover=true). Both servers run with `--interrupt_requests false`: by
default llama-cpp-python's server ends a streaming answer when another request arrives.

llama-cpp-python's server answers one request at a time, so the rate changes only the
queue: a request's TPOT is its decode alone, whatever the rate, and the crossover is
searched on end-to-end latency (`--metric e2el_p99`), where the queue shows.

    python benchmarks/server_llamacpp.py --check   # compose and validate the run, print the command
    python benchmarks/server_llamacpp.py           # run it (hours on 2 cores), then collect its runs

The run goes to MLflow (experiment `server-llamacpp`); this script then writes the parent
run's metrics and each probe's to benchmarks/results/ with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from machine import describe_machine, results_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VERIFIER = "qwen2.5-coder-1.5b-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compose and validate the run, print it, run nothing")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads per server")
    parser.add_argument("--lookup-tokens", type=int, default=4, help="prompt-lookup draft tokens per step")
    parser.add_argument("--rate-min", type=float, default=0.05)
    parser.add_argument("--rate-max", type=float, default=0.4)
    parser.add_argument("--max-probes", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=12, help="requests per probe and mode")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--metric", default="e2el_p99", choices=("e2el_p99", "tpot_p99", "goodput"))
    parser.add_argument("--experiment", default="server-llamacpp", help="MLflow experiment")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def server_command(gguf: Path, threads: int) -> str:
    """llama-cpp-python's server on `gguf`, on the port specbench gives it, finishing every stream it starts."""
    return (
        f"{shlex.quote(sys.executable)} -m llama_cpp.server --model {shlex.quote(str(gguf))} --port {{port}} "
        f"--n_ctx 4096 --n_threads {threads} --interrupt_requests false"
    )


def overrides(args: argparse.Namespace, gguf: Path) -> list[str]:
    """The CLI's overrides for the run."""
    plain = server_command(gguf, args.threads)
    lookup = f"{plain} --draft_model prompt-lookup-decoding --draft_model_num_pred_tokens {args.lookup_tokens}"
    return [
        "experiment=offline",
        "mode=load",
        "engine.backend=server",
        f"server.baseline_cmd='{plain}'",
        f"server.spec_cmd='{lookup}'",
        "load.find_crossover=true",
        f"load.rate_min={args.rate_min}",
        f"load.rate_max={args.rate_max}",
        f"load.max_probes={args.max_probes}",
        f"load.num_requests={args.num_requests}",
        f"load.crossover_metric={args.metric}",
        f"generation.max_new_tokens={args.max_new_tokens}",
        f"tracking.experiment={args.experiment}",
    ]


def validate(arguments: list[str]):
    """The run's config, composed as the CLI composes it and validated (ConfigError on a bad setting)."""
    from hydra import compose, initialize_config_module

    from specbench.config import CONFIG_PACKAGE, register_configs
    from specbench.validation import typed_config

    register_configs()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        return typed_config(compose("config", overrides=arguments))


def collect(cfg, started: float) -> dict:
    """The metrics of the runs this benchmark made: each parent run (the crossover search) and its probes."""
    import mlflow

    uri = cfg.tracking.uri  # the run wrote it from the repository's root: a relative SQLite path is relative to it
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{ROOT / uri.removeprefix('sqlite:///')}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"attributes.start_time >= {int(started)}",
                              output_format="list")  # fmt: skip
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    return {
        "runs": [
            {
                "run_id": parent.info.run_id,
                "status": parent.info.status,
                "metrics": parent.data.metrics,
                "probes": [
                    {"run_id": child.info.run_id, "params": child.data.params, "metrics": child.data.metrics}
                    for child in runs
                    if child.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                ],
            }
            for parent in parents
        ]
    }


def main(argv: list[str] | None = None) -> None:
    from specbench.fetch import fetch_model, is_cached, model_path

    args = parse_args(argv)
    gguf = model_path(VERIFIER)
    arguments = overrides(args, gguf)
    cfg = validate(arguments)
    print("specbench " + " ".join(shlex.quote(argument) for argument in arguments), flush=True)
    if args.check:
        return
    if not is_cached(VERIFIER):
        fetch_model(VERIFIER)
    started = datetime.now(timezone.utc).timestamp() * 1000
    completed = subprocess.run([sys.executable, "-m", "specbench", *arguments], cwd=ROOT, check=False)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "command": arguments,
        "exit_code": completed.returncode,
    } | collect(cfg, started)
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, "server-llamacpp", report["machine"], report["date"])
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
