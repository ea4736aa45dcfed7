"""transformers as a second engine: the same tokens as ours, and counts read off the verifier's calls that are right."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

import specbench.models
from specbench.config import CONFIG_PACKAGE, register_configs
from specbench.data import load_records
from specbench.engine import CachedModel, DecodeSettings, decode_baseline
from specbench.errors import ConfigError
from specbench.hf_backend import TransformersDecoders
from specbench.metrics import step_tokens
from specbench.models import ModelCache
from specbench.runner import decode_prompts, prepare
from specbench.testing import make_model
from specbench.validation import typed_config
from tests.test_cli import common_args, run_cli
from tests.test_sweeps import sweep_runs

VOCAB = 300
PROMPT = [5, 17, 42, 99, 7, 5, 17, 42, 120, 33, 8, 250, 61, 5, 17]


@pytest.fixture
def composer():
    """Compose the installed configs as the CLI does, with overrides."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def verifier():
    return make_model("gptj", VOCAB, seed=1, layers=3)  # a head wider than the vocabulary, like GPT-J-6B


@pytest.fixture(scope="module")
def verifier_copy():
    return make_model("gptj", VOCAB, seed=1, layers=3)  # the same weights: a draft that agrees on every token


@pytest.fixture(scope="module")
def draft():
    """The verifier with noise on every weight: it agrees on some tokens, not all (and has the verifier's head
    size, which generate() wants of an assistant)."""
    model = make_model("gptj", VOCAB, seed=1, layers=3)
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.005 * torch.randn(weight.shape, generator=noise))
    return model


def greedy(max_new_tokens: int, eos: frozenset[int] = frozenset()) -> DecodeSettings:
    return DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=eos)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 7, 12])
def test_verifier_calls_counted_with_the_verifier_as_its_own_draft(verifier, verifier_copy, k, n):
    """Every draft is accepted, so call i starts after (k+1) i tokens and offers min(k, n - (k+1) i - 1) drafts."""
    decoders = TransformersDecoders(verifier, VOCAB, k, "self", assistant=verifier_copy)
    baseline = decoders.baseline(PROMPT, greedy(n), 0)
    assert len(baseline.tokens) == n and baseline.verifier_calls == n  # prefill + one call per further token
    spec = decoders.spec(PROMPT, greedy(n), 0)
    calls = math.ceil(n / (k + 1))
    assert spec.tokens == baseline.tokens
    assert spec.verifier_calls == spec.steps == calls
    offered = [min(k, n - (k + 1) * i - 1) for i in range(calls)]
    assert spec.offered_per_step == spec.accepted_per_step == offered
    assert spec.k_per_step == [k] * calls  # the schedule's k ...
    assert spec.depth_per_step == offered  # ... and what the length limit left of it
    assert spec.proposed == spec.accepted == sum(offered)
    assert step_tokens(spec) == n  # no plain prefill: mean_accepted_tokens = n / calls
    assert (
        spec.proposed_by_position
        == spec.accepted_by_position
        == [sum(o >= p for o in offered) for p in range(1, k + 1)]
    )


def draft_proposal(model, context: list[int], count: int) -> list[int]:
    """The draft's greedy continuation, computed without a cache (independently of generate())."""
    tokens = list(context)
    with torch.inference_mode():
        for _ in range(count):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1, :VOCAB].argmax()))  # spare rows cut
    return tokens[len(context) :]


@pytest.mark.parametrize("k", [2, 5])
def test_acceptance_read_off_the_calls_matches_a_replay(verifier, draft, k):
    """Replay each step: the draft's greedy proposal against the verifier's greedy output gives accepted drafts."""
    n = 24
    decoders = TransformersDecoders(verifier, VOCAB, k, "draft", assistant=draft)
    output = decoders.baseline(PROMPT, greedy(n), 0).tokens
    spec = decoders.spec(PROMPT, greedy(n), 0)
    assert spec.tokens == output
    committed = 0
    for offered, accepted in zip(spec.offered_per_step, spec.accepted_per_step, strict=True):
        assert offered == min(k, n - committed - 1)
        proposal = draft_proposal(draft, PROMPT + output[:committed], offered)
        matched = 0
        while matched < offered and proposal[matched] == output[committed + matched]:
            matched += 1
        assert accepted == matched
        committed += accepted + 1
    assert committed == n
    assert 0 < spec.accepted < spec.proposed  # a real mix of accepted and rejected drafts


def test_same_tokens_as_our_engine_with_eos_spare_logits_and_prompt_lookup(verifier, draft):
    cached = CachedModel(verifier, VOCAB)
    free = decode_baseline(cached, [PROMPT], greedy(40), [0]).rows[0].tokens
    eos = frozenset({free[9]})  # the 10th token becomes the stop token
    ours = decode_baseline(cached, [PROMPT], greedy(40, eos), [0]).rows[0].tokens
    assert len(ours) < 40
    for decoders in (
        TransformersDecoders(verifier, VOCAB, 3, "draft", assistant=draft),
        TransformersDecoders(verifier, VOCAB, 3, "prompt_lookup", lookup_ngram=3),
    ):
        for settings, expected in ((greedy(40), free), (greedy(40, eos), ours)):
            assert decoders.baseline(PROMPT, settings, 0).tokens == expected
            assert decoders.spec(PROMPT, settings, 0).tokens == expected
    assert max(free) < VOCAB  # the 243 spare rows of the head are suppressed, as our engine cuts them


def test_generate_is_timed_with_the_heap_frozen(verifier, draft):
    """As our engine's decodes are (tests/test_timing_protocol.py): no full garbage collection in a timed call."""
    frozen_during_calls: list[int] = []
    hook = verifier.register_forward_pre_hook(lambda module, args: frozen_during_calls.append(gc.get_freeze_count()))
    try:
        decoders = TransformersDecoders(verifier, VOCAB, 3, "draft", assistant=draft)
        decoders.baseline(PROMPT, greedy(6), 0)
        decoders.spec(PROMPT, greedy(6), 0)
    finally:
        hook.remove()
    assert len(frozen_during_calls) >= 8 and min(frozen_during_calls) > 0
    assert gc.get_freeze_count() == 0


def test_sampling_is_seeded_per_call(verifier, draft):
    settings = DecodeSettings(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    decoders = TransformersDecoders(verifier, VOCAB, 3, "draft", assistant=draft)
    for decode in (decoders.baseline, decoders.spec):
        first, again, other = (decode(PROMPT, settings, seed).tokens for seed in (7, 7, 8))
        assert first == again and first != other


def compose_run(composer, models_dir: Path, data: Path, *overrides: str):
    return typed_config(
        composer(
            f"models_dir={models_dir}",
            f"dataset.path={data}",
            "dataset.num_samples=3",
            "generation.max_new_tokens=16",
            "device=cpu",
            "dtype=float32",
            "verifier=gpt2_large",  # the tiny GPT-J's head is wider than the drafts': see the refusal test
            *overrides,
        )
    )


@pytest.mark.parametrize("draft_name", ["distilgpt2", "prompt_lookup"])
def test_both_backends_decode_the_same_tokens_through_the_runner(composer, models_dir, pubmedqa_file, draft_name):
    """Greedy float32 through prepare/decode_prompts: four identical outputs per prompt; a checkpoint's
    generation_config (here a repetition penalty) does not leak into transformers' decoding."""
    cache = ModelCache()
    outcomes = {}
    for backend in ("specbench", "transformers"):
        cfg = compose_run(
            composer, models_dir, pubmedqa_file, f"engine.backend={backend}", f"draft={draft_name}", "k=3"
        )
        setup = prepare(cfg, load_records(cfg.dataset), cache)
        setup.models["verifier"].generation_config.repetition_penalty = 1.5
        try:
            outcomes[backend] = list(decode_prompts(setup, cfg, progress=False))
        finally:
            setup.models["verifier"].generation_config.repetition_penalty = None
    for ours, theirs in zip(outcomes["specbench"], outcomes["transformers"], strict=True):
        assert ours.baseline.tokens == ours.spec.tokens == theirs.baseline.tokens == theirs.spec.tokens
        assert theirs.baseline.verifier_calls == len(theirs.baseline.tokens)
        assert ours.spec.verifier_calls == ours.spec.steps + 1 and theirs.spec.verifier_calls == theirs.spec.steps


def test_what_transformers_cannot_run_is_refused_before_loading(composer, models_dir, pubmedqa_file):
    cases = [
        (["draft=gpt2_family"], "is a set of 3 drafters, which transformers' generate"),
        (["k_schedule=heuristic"], "drop k_schedule=heuristic"),
        (["draft.drafters.distilgpt2.name_or_path=openai-community/gpt2-large"], "is the verifier itself"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            compose_run(composer, models_dir, pubmedqa_file, "engine.backend=transformers", *overrides)
    compose_run(composer, models_dir, pubmedqa_file, "engine.backend=specbench", *cases[0][0])  # our engine runs it


@pytest.mark.parametrize(
    ("draft_name", "message"),
    [
        ("gpt2_family", "which transformers' generate() cannot verify together: use engine.backend=specbench"),
        # GPT-J-6B's head has 50400 rows, GPT-2's 50257 (and so do the tiny copies: 543 and 400)
        ("distilgpt2", "has a head of 400 tokens and the verifier 543, for which transformers' generate() runs"),
    ],
)
def test_a_refusal_is_one_sentence_and_loads_nothing(
    models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys, draft_name, message
):
    loads = []
    monkeypatch.setattr(specbench.models, "load_model", lambda spec: loads.append(spec))
    args = [*common_args(models_dir, pubmedqa_file, tmp_path), "engine.backend=transformers", f"draft={draft_name}"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 1 and loads == []
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert message in line


def test_one_sweep_compares_both_engines(models_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    """`specbench -m engine.backend=specbench,transformers draft=... k=...`: same outputs, counts, side by side."""
    args = [
        "-m", "engine.backend=specbench,transformers", "draft=distilgpt2,prompt_lookup", "k=2",
        *common_args(models_dir, pubmedqa_file, tmp_path), "verifier=gpt2_large", "quality.embedder=none",
    ]  # fmt: skip
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    (parent,), children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    client = MlflowClient()
    outputs = {}
    for run in children:
        backend, name = run.data.tags["engine.backend"], run.data.params["draft.name"]
        assert run.data.params["engine.backend"] == backend
        metrics = run.data.metrics
        assert metrics["disagreement_rate"] == 0.0
        assert {
            "acceptance_rate",
            "mean_accepted_tokens",
            "acceptance_rate_pos_1",
            "speedup",
            "spec_ttft_p50_s",
        } <= set(metrics)
        assert {"best_k_predicted", "predicted_speedup_best_k"} <= set(metrics)
        if backend == "transformers":  # not measurable through generate(): not logged
            assert not {f"draft_time_s_{name}", "draft_prefill_s_mean"} & set(metrics)
        path = client.download_artifacts(run.info.run_id, "generations.jsonl", str(tmp_path / run.info.run_id))
        lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
        outputs[backend, name] = [(line["baseline_tokens"], line["spec_tokens"]) for line in lines]
    for name in ("distilgpt2", "prompt_lookup"):
        assert outputs["specbench", name] == outputs["transformers", name]
    report = Path(client.download_artifacts(parent.info.run_id, "report/summary.csv", str(tmp_path)))
    table = pd.read_csv(report)
    assert list(table[["draft", "backend"]].itertuples(index=False, name=None)) == [
        (draft, backend) for draft in ("distilgpt2", "prompt_lookup") for backend in ("specbench", "transformers")
    ]
