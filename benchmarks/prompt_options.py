"""The benchmarks' prompts come from the CLI's datasets: a config of the `dataset` group, or a local file.

    --dataset sample_qa      the synthetic sample shipped with specbench (the default: needs nothing)
    --dataset pubmedqa       PubMedQA pqa_labeled from the HuggingFace hub
    --dataset-path FILE      a local PubMedQA-format file (JSONL or JSON), like the CLI's dataset.path=FILE

The group's YAML is read from the installed package and typed by `DatasetConfig`,
and the records are loaded by `specbench.data`, exactly as a run would.
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

from specbench.config import CONFIG_PACKAGE, DatasetConfig, register_configs
from specbench.data import Record, load_records


def dataset_names() -> list[str]:
    """The options of the CLI's `dataset` config group."""
    return sorted(entry.name.removesuffix(".yaml") for entry in files(CONFIG_PACKAGE).joinpath("dataset").iterdir()
                  if entry.name.endswith(".yaml"))  # fmt: skip


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset NAME and --dataset-path FILE."""
    parser.add_argument(
        "--dataset",
        choices=dataset_names(),
        default="sample_qa",
        help="a dataset config of the CLI (default: %(default)s, the synthetic sample shipped with specbench; "
        "pubmedqa reads PubMedQA from the HuggingFace hub)",
    )
    parser.add_argument(
        "--dataset-path", type=Path, help="a local PubMedQA-format JSONL or JSON file (the CLI's dataset.path)"
    )


def dataset_config(args: argparse.Namespace, num_samples: int) -> DatasetConfig:
    """The `DatasetConfig` a run with `dataset=NAME [dataset.path=FILE] dataset.num_samples=N` would use."""
    register_configs()  # the ${sample:...} resolver the shipped configs use
    group = OmegaConf.create(files(CONFIG_PACKAGE).joinpath("dataset", f"{args.dataset}.yaml").read_text())
    config = OmegaConf.merge(OmegaConf.structured(DatasetConfig), group)
    config.num_samples = num_samples
    if args.dataset_path is not None:
        config.path = str(args.dataset_path)
    return OmegaConf.to_object(config)


def load_prompt_records(args: argparse.Namespace, num_samples: int) -> tuple[DatasetConfig, list[Record]]:
    """The dataset's config and its first `num_samples` records (DataError names what is wrong)."""
    config = dataset_config(args, num_samples)
    return config, load_records(config)
