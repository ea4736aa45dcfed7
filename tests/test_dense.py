"""A GGUF model's de-quantized copy: written once, loaded instead of the file while it matches it, the same model."""

from __future__ import annotations

import os

import torch
import transformers

from specbench.dense import dense_copy, dense_folder, write_dense_copy
from specbench.models import ModelCache, ModelSpec, load_model
from specbench.testing import write_gguf_llama


def test_the_dense_copy_is_the_gguf_model_and_is_dropped_when_the_file_changes(tmp_path, monkeypatch):
    gguf = write_gguf_llama(tmp_path / "tiny.gguf", seed=0)
    spec = ModelSpec(str(tmp_path), gguf.name, "float32", "cpu")
    from_gguf = load_model(spec)
    tokens_from_gguf = ModelCache().tokenizer(spec)("alpha beta gamma")["input_ids"]
    assert dense_copy(gguf) is None
    assert write_dense_copy(gguf) == dense_folder(gguf) == dense_copy(gguf)

    read_from = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(source, *args, **kwargs):
        read_from.append((str(source), kwargs.get("gguf_file")))
        return original(source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    from_copy = load_model(spec)
    assert read_from == [(str(dense_folder(gguf)), None)]  # the copy, not the GGUF file
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(from_copy(ids).logits, from_gguf(ids).logits)
    assert ModelCache().tokenizer(spec)("alpha beta gamma")["input_ids"] == tokens_from_gguf

    os.utime(gguf, ns=(0, gguf.stat().st_mtime_ns + 1))  # the file changed: its copy no longer counts
    assert dense_copy(gguf) is None
    load_model(spec)
    assert read_from[-1] == (str(tmp_path), gguf.name)
