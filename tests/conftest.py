"""Shared fixtures: a tokenizer, tiny models under hub-id folders, and a PubMedQA-format file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import absl.logging
import pytest

from specbench.testing import train_tokenizer, write_models_dir, write_pubmedqa_jsonl

# Nothing in the tests may reach the HuggingFace hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# rouge-score imports absl, whose log handler closes the stream it was created with when Hydra
# reconfigures logging; under pytest that stream is pytest's capture, so point it at the real stderr.
absl.logging.get_absl_handler().python_handler.setStream(sys.__stderr__)


@pytest.fixture(scope="session", autouse=True)
def dtype_probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dtype probe's cache (`dtype=auto` on a CPU) in a folder of this session's, for subprocesses too:
    no test reads a choice the user's machine cached, or leaves one there."""
    folder = tmp_path_factory.mktemp("dtype-probe-cache")
    os.environ["SPECBENCH_DTYPE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def pubmedqa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pubmedqa_jsonl(tmp_path_factory.mktemp("data") / "pqa_labeled.jsonl")
