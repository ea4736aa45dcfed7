"""`engine.backend=llamacpp`: our engine's decoding on llama.cpp (through llama-cpp-python), on GGUF files as stored.

    models = load_models(cfg, specs, tokenizer, context)   # load.py: contexts, drafters, contender
    decode_speculative(models.verifier, models.drafters, ...)  # the engine's own decoders, unchanged

- `model.LlamaCppModel`: a GGUF model in a llama.cpp context behind the engine's
  `CachedModel` interface (one sequence): `llama_decode` with logits for every position
  asked, `llama_memory_seq_rm` to roll rejected drafts back. The engine's baseline,
  speculative decoding (greedy and sampled acceptance, its counts), drafters, step-cost
  measurement and scoring run on it as they run on torch models.
- `native.NativeDecoder`: the binding's own `Llama.generate` (greedy), plain or with its
  prompt-lookup draft model: the reference and a third contender.
- `load.load_models`: what a run decodes with; the runner calls it instead of loading torch models.

The binding is an optional dependency (`pip install "specbench[llamacpp]"`); nothing here
imports it until a model is loaded.
"""

from specbench.llamacpp.load import NATIVE_LOOKUP, LlamaCppModels, gguf_path, load_models
from specbench.llamacpp.model import (
    INSTALL_HINT,
    LlamaCppModel,
    binding_installed,
    is_gguf,
    physical_cores,
    torch_on_one_thread,
)
from specbench.llamacpp.native import NativeDecoder

__all__ = [
    "INSTALL_HINT",
    "NATIVE_LOOKUP",
    "LlamaCppModel",
    "LlamaCppModels",
    "NativeDecoder",
    "binding_installed",
    "gguf_path",
    "is_gguf",
    "load_models",
    "physical_cores",
    "torch_on_one_thread",
]
