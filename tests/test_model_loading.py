"""Models loaded in special ways decode like plain ones: a verifier sharded with transformers' device_map (CPU
entries stand in for GPUs; a device the machine lacks is refused in one sentence), and q/k/v projections fused."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM

from specbench.config import DatasetConfig, DraftConfig, SpecBenchConfig, VerifierConfig
from specbench.drafters import ModelDrafterConfig
from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter, decode_baseline, decode_speculative
from specbench.errors import ConfigError
from specbench.models import ModelSpec, load_model
from specbench.testing import make_model
from specbench.validation import validate

VOCAB = 300
PROMPTS = [[5, 17, 42, 99, 7, 5, 17, 42, 120, 33], [8, 250, 61, 5, 17]]
SETTINGS = DecodeSettings(max_new_tokens=24)
# every module of the tiny 3-layer Llama on its own "device" entry (all CPU here, as GPUs would be on a host)
LLAMA_SHARDS = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_model("llama", VOCAB, seed=1, layers=3).save_pretrained(folder)
    return folder


def test_a_sharded_verifier_decodes_exactly_like_the_whole_model(saved_llama):
    """Loaded through specbench's device_map path, and dispatched with accelerate's hooks on every module (which
    move each module's inputs to its device, as on a multi-GPU host): the same tokens, greedy float32."""
    whole = AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.float32).eval()
    loaded = load_model(ModelSpec(str(saved_llama), None, "float32", "cpu", device_map=tuple(LLAMA_SHARDS.items())))
    hooked = AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.float32).eval()
    dispatch_model(hooked, device_map=LLAMA_SHARDS, force_hooks=True)
    assert all(hasattr(module, "_hf_hook") for module in (hooked.model.embed_tokens, hooked.lm_head))
    draft = make_model("llama", VOCAB, seed=2, layers=1)
    for batch in (PROMPTS[:1], PROMPTS):
        seeds = list(range(len(batch)))
        expected = [row.tokens for row in decode_baseline(CachedModel(whole, VOCAB), batch, SETTINGS, seeds).rows]
        for model in (loaded, hooked):
            verifier = CachedModel(model, VOCAB)
            assert [row.tokens for row in decode_baseline(verifier, batch, SETTINGS, seeds).rows] == expected
            drafter = ModelDrafter("d", CachedModel(draft, VOCAB))
            spec = decode_speculative(verifier, [drafter], batch, SETTINGS, ConstantK(3), seeds)
            assert [row.tokens for row in spec.rows] == expected


def config(device_map, **changes) -> SpecBenchConfig:
    cfg = SpecBenchConfig(
        verifier=VerifierConfig(name="v", name_or_path="some/model", device_map=device_map),
        draft=DraftConfig(name="d", drafters={"d": ModelDrafterConfig("some/draft")}),
        dataset=DatasetConfig(),
        device="cpu",
    )
    for key, value in changes.items():
        setattr(cfg.verifier, key, value)
    return cfg


def test_a_device_map_over_devices_the_machine_lacks_is_one_sentence():
    validate(config(LLAMA_SHARDS))
    validate(config("auto"))
    gpus = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"names device {gpus + 1}, which this machine does not have \({gpus} GPU"):
        validate(config({"model.embed_tokens": "cpu", "lm_head": gpus + 1}))
    with pytest.raises(ConfigError, match="names device cuda:7"):
        validate(config("auto", max_memory={"cuda:7": "10GiB"}))
    with pytest.raises(ConfigError, match="device_map=everywhere is unknown"):
        validate(config("everywhere"))
    with pytest.raises(ConfigError, match="max_memory only applies to a sharded verifier"):
        validate(config(None, max_memory={"0": "10GiB"}))


def test_a_model_loaded_with_fused_projections_decodes_the_same(saved_llama):
    plain = load_model(ModelSpec(str(saved_llama), None, "float32", "cpu"))
    fused = load_model(ModelSpec(str(saved_llama), None, "float32", "cpu", fuse_projections=True))
    assert sum(hasattr(module, "stacked_projection") for module in fused.modules()) == 3  # one per layer
    rows = [decode_baseline(CachedModel(model, VOCAB), PROMPTS, SETTINGS, [0, 1]).rows for model in (plain, fused)]
    assert [row.tokens for row in rows[0]] == [row.tokens for row in rows[1]]
