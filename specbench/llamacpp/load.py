"""What a run on `engine.backend=llamacpp` decodes with: llama.cpp contexts on the run's GGUF files.

No torch model is loaded. The verifier and each model drafter become a `LlamaCppModel`
(their GGUF files as stored, quantised or not); the engine's drafters and decoders run
on them unchanged. With a prompt-lookup draft and greedy decoding, the binding's own
prompt-lookup path is a third contender.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from specbench.config import SpecBenchConfig
from specbench.drafters import PromptLookupConfig, build_drafter
from specbench.engine import BatchResult, DecodeSettings, Drafter
from specbench.errors import ConfigError
from specbench.llamacpp.model import LlamaCppModel, physical_cores
from specbench.llamacpp.native import NativeDecoder
from specbench.models import ModelSpec, generation_eos_ids, model_config

log = logging.getLogger(__name__)

NATIVE_LOOKUP = "native_lookup"  # the binding's own prompt lookup, as a mode of the run

BatchDecoder = Callable[[list[list[int]], DecodeSettings, list[int]], BatchResult]


@dataclass
class LlamaCppModels:
    """The run's llama.cpp verifier and drafters, the verifier's stop tokens, and the binding's own contender."""

    verifier: LlamaCppModel
    drafters: list[Drafter]
    eos_token_ids: frozenset[int]
    threads: int
    descriptions: dict[str, str]  # llama.cpp's name of each model (architecture, size, quantisation), by name
    contenders: dict[str, BatchDecoder] = field(default_factory=dict)


def gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file a resolved model spec names (validation made sure there is one)."""
    return Path(spec.source) / spec.gguf_file


def load_models(
    cfg: SpecBenchConfig, specs: dict[str, ModelSpec], tokenizer: PreTrainedTokenizerBase, context: int
) -> LlamaCppModels:
    """Load the verifier and model drafters into llama.cpp contexts of `context` tokens, and build the drafters.

    A model draft must have the verifier's vocabulary in llama.cpp too (same n_vocab), and the
    tokenizer's ids must fit the verifier's head.
    """
    threads = cfg.engine.llamacpp_threads or physical_cores()
    vocab_size = len(tokenizer)
    verifier = LlamaCppModel(gguf_path(specs["verifier"]), vocab_size, context, threads)
    if vocab_size > verifier.n_vocab:
        raise ConfigError(
            f"verifier {cfg.verifier.name}: its tokenizer has {vocab_size} tokens but llama.cpp reads a head of "
            f"{verifier.n_vocab} from {verifier.path.name}: use the GGUF file the tokenizer belongs to."
        )
    log.info("llama.cpp: %s (%s), %d threads", verifier.path.name, verifier.description, threads)
    descriptions = {"verifier": verifier.description}
    drafters = []
    for name, drafter in cfg.draft.drafters.items():
        model = None
        if name in specs:
            model = LlamaCppModel(gguf_path(specs[name]), vocab_size, context, threads)
            if model.n_vocab != verifier.n_vocab:
                raise ConfigError(
                    f"draft '{name}' has a vocabulary of {model.n_vocab} tokens in llama.cpp and the verifier "
                    f"{verifier.n_vocab}: choose a draft GGUF made with the verifier's tokenizer."
                )
            descriptions[name] = model.description
            log.info("llama.cpp: draft %s (%s)", model.path.name, model.description)
        drafters.append(build_drafter(name, drafter, model))
    generation = GenerationConfig.from_model_config(model_config(specs["verifier"]))
    models = LlamaCppModels(verifier, drafters, generation_eos_ids(generation, tokenizer), threads, descriptions)
    (drafter,) = cfg.draft.drafters.values()
    if isinstance(drafter, PromptLookupConfig) and not cfg.generation.do_sample:
        native = NativeDecoder(verifier.path, context, threads, lookup=(drafter.max_ngram, cfg.k))
        models.contenders[NATIVE_LOOKUP] = native.decode
    return models
