"""One Hydra job, one benchmark run: the typed config, the run's models and prompts, the pipeline, and MLflow.

`specbench.cli` hands each job here; importing this module brings in torch, MLflow and the engine,
so the command line imports it only when a job runs (`--help`, `--cfg` and the subcommands do not).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import mlflow
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from specbench import console, llamacpp, objective, tracking
from specbench.config import Backend, BenchmarkMode, SpecBenchConfig
from specbench.data import load_records
from specbench.errors import GpuMemoryError, UserError, interrupt
from specbench.load.job import run_load_job
from specbench.models import ModelCache, gpu_lease
from specbench.pipeline import run_benchmark
from specbench.runner import prepare
from specbench.sweep import JOB_STATUS_FILE, parent_run_id
from specbench.validation import typed_config

log = logging.getLogger("specbench")


# Jobs of one process (Hydra's basic launcher) share loaded models.
MODEL_CACHE = ModelCache()


def run_job(cfg: DictConfig) -> float:
    """Run one job and return its objective metric; a failure becomes one sentence on stderr (and a FAILED
    run), not a traceback, and returns the objective's worst value so that a search goes on."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)  # also in launcher worker processes, which skip main()
    status: dict[str, str] = {"name": _run_name(cfg)}
    try:
        status |= _run(cfg, multirun)
    except KeyboardInterrupt:
        status |= {"status": "KILLED", "error": "interrupted"}
        _write_status(status)
        raise
    except Exception as error:
        if isinstance(error, UserError):
            message = str(error)
        else:
            message = f"unexpected {type(error).__name__}: {error} (set debug=true for the traceback)"
        status |= {"status": "FAILED", "error": message}
        _write_status(status)
        print(f"error: {message}", file=sys.stderr)
        if cfg.debug:
            raise
        if not multirun:
            sys.exit(1)
        return objective.failed_value(cfg.objective)
    _write_status(status)
    return objective.run_value(status["run_id"], cfg.objective)


def _run_name(cfg: DictConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.verifier.name}-{cfg.draft.name}-k{cfg.k}"


def _write_status(status: dict[str, str]) -> None:
    """Leave the job's outcome in its output folder, where the sweep callback collects it."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / JOB_STATUS_FILE).write_text(json.dumps(status))


def _run(cfg: DictConfig, multirun: bool) -> dict[str, str]:
    typed: SpecBenchConfig = typed_config(cfg)
    records = load_records(typed.dataset)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config_hash = tracking.config_hash(resolved)
    experiment_id = tracking.connect(typed.tracking.uri, typed.tracking.experiment, typed.tracking.artifact_location)
    if typed.resume and (existing := tracking.finished_run(experiment_id, config_hash)):
        log.info("resume: run %s already holds this configuration; skipping", existing)
        return {"status": "SKIPPED", "run_id": existing, "config_hash": config_hash}
    tags = {tracking.CONFIG_HASH_TAG: config_hash, "verifier": typed.verifier.name, "draft": typed.draft.name}
    tags["engine.backend"] = typed.engine.backend.value
    parent = parent_run_id() if multirun else None
    system_metrics = typed.tracking.system_metrics
    with (
        gpu_lease(typed.device, sharded=typed.verifier.device_map is not None) as device,
        tracking.tracked_run(experiment_id, _run_name(cfg), tags, parent, system_metrics) as run_id,
    ):
        tracking.log_params(tracking.flatten(resolved))
        mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        tracking.log_dataset(typed.dataset, records)
        typed.device = device
        try:
            served_elsewhere = typed.engine.backend is Backend.server  # the servers hold the models
            setup = None if served_elsewhere else prepare(typed, records, MODEL_CACHE)
            if setup is not None:
                tracking.log_setup(setup)
            if typed.mode is BenchmarkMode.load or served_elsewhere:
                params = tracking.flatten(resolved)
                title, metrics, conclusion = run_load_job(
                    typed, setup, records, experiment_id, run_id, _run_name(cfg), params, tags
                )
            else:
                llamacpp_run = typed.engine.backend is Backend.llamacpp
                with llamacpp.torch_on_one_thread() if llamacpp_run else contextlib.nullcontext():
                    result = run_benchmark(typed, setup, keep_partial=tracking.log_partial)
                tracking.log_result(result)
        except torch.OutOfMemoryError as error:  # becomes the run's error tag and the one-line message
            raise GpuMemoryError(
                f"out of GPU memory with verifier {typed.verifier.name} and draft {typed.draft.name} "
                f"(dtype={typed.dtype.value}, batch_size={typed.batch_size}): use a lower batch_size, "
                "dtype=bfloat16, a smaller model or draft set, or a lower generation.max_new_tokens."
            ) from error
    links = console.where_to_look(typed.tracking.uri, experiment_id, run_id)
    if typed.mode is BenchmarkMode.load or typed.engine.backend is Backend.server:
        print(console.load_summary(title, metrics, links, conclusion), flush=True)
    else:
        summary = console.run_summary(result.title, result.metrics, links, result.notes, result.sampled, result.dtype)
        print(summary, flush=True)
    return {"status": "FINISHED", "run_id": run_id, "config_hash": config_hash}
