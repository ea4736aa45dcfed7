"""A GGUF model kept de-quantized beside its file, so that runs of the torch engine load it in seconds.

transformers reads a GGUF file by parsing its metadata (the whole vocabulary, for the
config and again for the weights) and de-quantizing every tensor in numpy: about a
minute for the offline 1.5B on 2 cores, and 12 s more for its tokenizer, at every run.
`write_dense_copy` does that once (`specbench models fetch --dense`, which `make fetch`
runs) and saves the model (float32 safetensors) and the tokenizer in `<file>.dense/`;
`dense_copy` returns that folder while it still matches the file (its size and
modification time), and the model loader reads from it: the same weights, the same
tokenizer, read in seconds. llama.cpp reads the GGUF file itself and needs no copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STAMP = "source.json"


def dense_folder(gguf: Path) -> Path:
    """Where the de-quantized copy of `gguf` lives."""
    return gguf.with_name(gguf.name + ".dense")


def _stamp(gguf: Path) -> dict[str, int]:
    status = gguf.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns}


def dense_copy(gguf: Path) -> Path | None:
    """The de-quantized copy of `gguf`, when one was written from this very file; None otherwise."""
    folder = dense_folder(gguf)
    try:
        return folder if json.loads((folder / STAMP).read_text()) == _stamp(gguf) else None
    except (OSError, ValueError):
        return None


def write_dense_copy(gguf: Path) -> Path:
    """De-quantize `gguf` once (float32) and save the model and its tokenizer beside it; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when a copy is written

    if (folder := dense_copy(gguf)) is not None:
        return folder
    folder = dense_folder(gguf)
    shutil.rmtree(folder, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # once de-quantized the weights are plain float32 tensors: drop the GGUF quantizer, which refuses to save
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    (folder / STAMP).write_text(json.dumps(_stamp(gguf)))  # last: a copy cut short is never used
    return folder
