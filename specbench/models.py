"""Loading models and tokenizers (hub id, local folder, GGUF), once per process.

A sweep runs many jobs in one process; jobs that use the same model (source,
dtype, device, quantisation) share it, and models the next job does not need
are released (GPU memory too) before it loads others.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file, extract_commit_hash

from specbench.config import Dtype, ModelConfig, Quantize
from specbench.dense import dense_copy
from specbench.engine.fusion import fuse_projections
from specbench.errors import ConfigError, FetchError, ModelLoadError, first_line

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers' advice, when a GGUF is loaded in another dtype than float32, to load it in float32
GGUF_DTYPE_ADVICE = "Loading a GGUF checkpoint with its weights packed is fastest in float32"


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies a loaded model."""

    source: str  # local folder or hub id
    gguf_file: str | None
    dtype: str
    device: str
    quantize: str = "none"
    revision: str | None = None  # hub branch, tag or commit; None is the main branch
    # sharded over several devices (transformers' device_map): a strategy name, or (module, device) pairs
    device_map: str | tuple[tuple[str, str], ...] | None = None
    max_memory: tuple[tuple[str, str], ...] | None = None
    fuse_projections: bool = False  # projections of one input stacked into one matrix product after loading (fusion)

    @property
    def label(self) -> str:
        """Human-readable name for messages."""
        name = f"{self.source}/{self.gguf_file}" if self.gguf_file else self.source
        where = (
            f"device_map={self.device_map if isinstance(self.device_map, str) else 'custom'}"
            if self.device_map
            else self.device
        )
        return f"{name} ({self.dtype}, {where}{', int8' if self.quantize != 'none' else ''})"


def resolve_device(device: str) -> torch.device:
    """`auto` means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def gpu_lease(device: str, sharded: bool = False) -> Iterator[str]:
    """On a host with several GPUs, give `auto`/`cuda` a GPU that no other specbench job holds.

    Parallel sweep workers (joblib, submitit_local) each lock one GPU for the
    whole job through a lock file per GPU, so two jobs never share a card by
    accident. An explicit `cuda:N`, the CPU, a single GPU, or a `sharded` verifier (it
    uses the GPUs its device_map names) pass through.
    """
    count = torch.cuda.device_count() if device in ("auto", "cuda") and not sharded else 0
    if count < 2:
        yield device
        return
    lock_dir = Path(tempfile.gettempdir()) / "specbench-gpu-locks"
    lock_dir.mkdir(exist_ok=True)
    order = [*range(count), os.getpid() % count]  # every GPU without waiting, then wait for one
    for attempt, index in enumerate(order):
        handle = (lock_dir / f"gpu{index}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if attempt == count else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            continue
        try:
            log.info("this job holds GPU %d", index)
            yield f"cuda:{index}"
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return


def resolve_dtype(dtype: Dtype, device: torch.device) -> str:
    """`auto` means bfloat16 on GPUs that support it, else float16, and float32 on CPU (where a run measures
    its choice instead: `specbench.dtype_probe`)."""
    if dtype is not Dtype.auto:
        return dtype.value
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def model_spec(
    cfg: ModelConfig, run_dtype: Dtype, device: torch.device, models_dir: str | None, fuse: bool = False
) -> ModelSpec:
    """Resolve where a configured model comes from (fetching offline models) and how it is loaded."""
    source, gguf_file = cfg.name_or_path, cfg.gguf_file
    if cfg.fetch is not None:
        from specbench.fetch import fetch_model

        try:
            path = fetch_model(cfg.fetch)
        except FetchError as error:
            raise ModelLoadError(str(error)) from error
        source, gguf_file = str(path.parent), path.name
    elif models_dir is not None and (Path(models_dir) / source).is_dir():
        source = str(Path(models_dir) / source)
    if cfg.revision is not None and Path(source).exists():
        raise ConfigError(
            f"revision={cfg.revision} names a hub commit, branch or tag, but {source} is a local copy: "
            "drop revision, or load the hub id (without models_dir) to get that revision."
        )
    dtype = resolve_dtype(cfg.dtype or run_dtype, device)
    if cfg.quantize is Quantize.int8_dynamic:
        dtype = "float32"  # dynamic int8 kernels take float32 activations (validation kept it to the CPU)
    device_map = getattr(cfg, "device_map", None)  # verifiers only
    if device_map is not None and not isinstance(device_map, str):
        device_map = tuple((str(module), str(where)) for module, where in dict(device_map).items())
    max_memory = getattr(cfg, "max_memory", None)
    max_memory = tuple((str(where), str(size)) for where, size in max_memory.items()) if max_memory else None
    return ModelSpec(
        source, gguf_file, dtype, str(device), cfg.quantize.value, cfg.revision, device_map, max_memory, fuse
    )


def model_revision(spec: ModelSpec) -> str:
    """What identifies the weights: the hub commit loaded, or a local copy's file count, bytes and latest change.

    Cheap: a hub model's commit comes from the local cache (or one metadata request); local files are not read.
    """
    path = Path(spec.source)
    if path.exists():
        files = [path / spec.gguf_file] if spec.gguf_file else [item for item in path.rglob("*") if item.is_file()]
        stats = [item.stat() for item in files]
        newest = datetime.fromtimestamp(max(stat.st_mtime for stat in stats), timezone.utc)
        changed = newest.isoformat(timespec="seconds")
        return f"local: {len(stats)} files, {sum(stat.st_size for stat in stats)} bytes, last changed {changed}"
    try:
        resolved = cached_file(spec.source, spec.gguf_file or "config.json", revision=spec.revision)
    except (OSError, ValueError) as error:
        raise _loading_error(spec, "revision", error) from error
    return extract_commit_hash(resolved, None) or "unknown"


def _loading_error(spec: ModelSpec, what: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load the {what} of '{spec.source}' ({first_line(error)}); check the name, or point name_or_path "
        "(or models_dir) at a local copy."
    )


class ModelCache:
    """Models and tokenizers loaded in this process, shared by the jobs of a sweep."""

    def __init__(self) -> None:
        self._models: dict[ModelSpec, PreTrainedModel] = {}
        self._tokenizers: dict[tuple[str, str | None, str | None], PreTrainedTokenizerBase] = {}

    def tokenizer(self, spec: ModelSpec) -> PreTrainedTokenizerBase:
        """The tokenizer of a model (cheap next to the model itself)."""
        key = (spec.source, spec.gguf_file, spec.revision)
        if key not in self._tokenizers:
            source, gguf_file = _weights_source(spec)
            try:
                self._tokenizers[key] = AutoTokenizer.from_pretrained(
                    source, gguf_file=gguf_file, revision=spec.revision
                )
            except (OSError, ValueError) as error:
                raise _loading_error(spec, "tokenizer", error) from error
        return self._tokenizers[key]

    def keep_only(self, specs: set[ModelSpec]) -> None:
        """Release every cached model not in `specs`, and the GPU memory it held."""
        for spec in [spec for spec in self._models if spec not in specs]:
            log.info("releasing %s", spec.label)
            del self._models[spec]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def model(self, spec: ModelSpec, load: Callable[[ModelSpec], PreTrainedModel] | None = None) -> PreTrainedModel:
        """The model for `spec`, loaded on first use (by `load_model`, or `load` when given)."""
        if spec not in self._models:
            self._models[spec] = (load or load_model)(spec)
        return self._models[spec]


def load_model(spec: ModelSpec) -> PreTrainedModel:
    """Load a causal LM in eval mode on its device and dtype, int8-quantised if asked."""
    log.info("loading %s", spec.label)
    source, gguf_file = _weights_source(spec)
    try:
        with _chosen_gguf_dtype(spec):
            model = AutoModelForCausalLM.from_pretrained(
                source,
                gguf_file=gguf_file,
                dtype=_DTYPES[spec.dtype],
                revision=spec.revision,
                **_sharding(spec),
            )
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError) as error:
        raise _loading_error(spec, "weights", error) from error
    model = (model if spec.device_map else model.to(spec.device)).eval()
    if spec.fuse_projections and spec.quantize != "none":  # int8 quantises nn.Linear layers, which fusion replaces
        log.info("engine.fuse_projections leaves %s as it is: its %s layers are quantised", spec.label, spec.quantize)
    elif spec.fuse_projections:
        fuse_projections(model)
    if spec.quantize == "int8_dynamic":
        model = _quantize_int8(model, spec)
    return model


def _weights_source(spec: ModelSpec) -> tuple[str, str | None]:
    """Where to read a model from: a local GGUF file's de-quantized copy when it has one (`specbench.dense`, the
    same weights read in seconds), else its own source and GGUF file."""
    if spec.gguf_file is not None and (folder := dense_copy(Path(spec.source) / spec.gguf_file)) is not None:
        return str(folder), None
    return spec.source, spec.gguf_file


def _sharding(spec: ModelSpec) -> dict:
    """from_pretrained's device_map and max_memory for a sharded model (GPU indices as ints, as accelerate wants)."""
    if spec.device_map is None:
        return {}

    def device(name: str) -> int | str:
        return int(name) if name.isdigit() else name

    device_map = spec.device_map if isinstance(spec.device_map, str) else {m: device(d) for m, d in spec.device_map}
    max_memory = {device(where): size for where, size in spec.max_memory} if spec.max_memory else None
    return {"device_map": device_map, "max_memory": max_memory}


class _DropGgufDtypeAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(GGUF_DTYPE_ADVICE)


@contextmanager
def _chosen_gguf_dtype(spec: ModelSpec) -> Iterator[None]:
    """Silence transformers' advice to load a GGUF in float32 when the config chose another dtype on purpose.

    The advice is for transformers' packed GGUF kernels (from the `kernels` hub package);
    without them the weights are dequantised on load, and bfloat16 can run faster (`dtype=auto` measures it).
    """
    if spec.gguf_file is None or spec.dtype == "float32":
        yield
        return
    log.debug(
        "%s: %s chosen on purpose (see README, 'Choosing the CPU dtype'); transformers' advice to load GGUF "
        "weights in float32 is for its packed kernels and is silenced",
        spec.gguf_file,
        spec.dtype,
    )
    advice_filter = _DropGgufDtypeAdvice()
    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    logger.addFilter(advice_filter)
    try:
        yield
    finally:
        logger.removeFilter(advice_filter)


def _quantize_int8(model: PreTrainedModel, spec: ModelSpec) -> PreTrainedModel:
    if not any(isinstance(module, torch.nn.Linear) for module in model.modules()):
        raise ConfigError(
            f"quantize=int8_dynamic found no nn.Linear layers in {spec.source} (GPT-2 style models use Conv1D): "
            "use quantize=none for it."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated but still the only CPU int8 path
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def model_config(spec: ModelSpec) -> PretrainedConfig:
    """The model's config (cheap: no weights are read)."""
    try:
        return AutoConfig.from_pretrained(spec.source, gguf_file=spec.gguf_file, revision=spec.revision)
    except (OSError, ValueError) as error:
        raise _loading_error(spec, "config", error) from error


def context_length(spec: ModelSpec) -> int:
    """The longest sequence (prompt + output) the model takes."""
    config = model_config(spec)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ModelLoadError(f"cannot tell the context length of {spec.source}: its config has no max_position_embeddings.")


def check_same_vocabulary(
    verifier: PreTrainedTokenizerBase, draft: PreTrainedTokenizerBase, draft_name: str, verifier_name: str
) -> None:
    """Refuse a draft whose tokenizer maps ids to different tokens than the verifier's.

    Only the ids both tokenizers have are compared, so a verifier with a few extra
    added tokens (GPT-J) still pairs with GPT-2 drafts.
    """
    if draft is verifier:
        return
    shared = min(len(verifier), len(draft))
    verifier_tokens = verifier.convert_ids_to_tokens(list(range(shared)))
    draft_tokens = draft.convert_ids_to_tokens(list(range(shared)))
    if verifier_tokens == draft_tokens and shared >= 0.99 * len(verifier):
        return
    first = next((i for i in range(shared) if verifier_tokens[i] != draft_tokens[i]), shared)
    raise ConfigError(
        f"draft '{draft_name}' does not share the tokenizer of verifier '{verifier_name}' (vocabulary sizes "
        f"{len(draft)} vs {len(verifier)}, first differing id {first}): choose a draft trained with the "
        "verifier's tokenizer."
    )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The stop tokens `generate()` would use: the generation config's, plus the tokenizer's."""
    return generation_eos_ids(model.generation_config, tokenizer)


def generation_eos_ids(generation: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The stop tokens of a generation config, plus the tokenizer's (a model's, or one made from its config)."""
    ids = generation.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)
