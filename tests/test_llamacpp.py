"""engine.backend=llamacpp: our engine's decoding on llama.cpp, on tiny GGUF files the tests write.

The verifier is a tiny random llama in F32 (`write_gguf_llama`), the draft the same model
with noise on every weight (it agrees on some tokens, not all). Greedy speculative output
must equal our llama.cpp baseline, which must equal the binding's own greedy `generate`;
sampled speculation must keep llama.cpp's own warped law; rejected drafts must leave the
KV cache as if they had never been fed.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from scipy.stats import kstest

import specbench.models
from specbench import llamacpp
from specbench.config import CONFIG_PACKAGE, register_configs
from specbench.contenders import contender_metrics
from specbench.data import load_records
from specbench.engine import (
    CachedModel,
    ConstantK,
    DecodeResult,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    Proposal,
    decode_baseline,
    decode_speculative,
)
from specbench.errors import ConfigError
from specbench.llamacpp import LlamaCppModel, NativeDecoder
from specbench.metrics import BatchStats, PromptOutcome
from specbench.models import ModelCache
from specbench.runner import decode_prompts, prepare
from specbench.testing import one_torch_thread, train_tokenizer, write_gguf_llama
from specbench.validation import typed_config
from tests.test_cli import common_args, run_cli
from tests.test_sweeps import sweep_runs

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)  # as runs on llama.cpp do

needs_binding = pytest.mark.skipif(
    not llamacpp.binding_installed(), reason=f"llama-cpp-python is not installed: {llamacpp.INSTALL_HINT}"
)

VOCAB = 400  # the shared test tokenizer's
CONTEXT = 256
PROMPTS = [
    [5, 17, 42, 99, 7, 5, 17, 42, 120, 33, 8, 250, 61, 5, 17],
    [300, 12, 12, 87, 150, 3, 77, 301],
    [9, 9, 9, 9],
]
GREEDY = DecodeSettings(max_new_tokens=24)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """verifier.gguf; draft.gguf (the verifier with noise); foreign.gguf (another tokenizer); padded.gguf (the
    tokenizer with 4 tokens added: the same ids, a larger vocabulary); broken.gguf (not GGUF)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf_llama(folder / "verifier.gguf", seed=0)
    write_gguf_llama(folder / "draft.gguf", seed=0, noise=0.01)
    write_gguf_llama(folder / "foreign.gguf", seed=3, tokenizer=train_tokenizer(vocab_size=350))
    padded = train_tokenizer()
    padded.add_tokens(["<extra_0>", "<extra_1>", "<extra_2>", "<extra_3>"])
    write_gguf_llama(folder / "padded.gguf", seed=0, noise=0.01, tokenizer=padded)
    (folder / "broken.gguf").write_bytes(b"PK\x03\x04 not a GGUF file")
    return folder


def load(gguf_dir: Path, name: str = "verifier", context: int = CONTEXT) -> LlamaCppModel:
    return LlamaCppModel(gguf_dir / f"{name}.gguf", VOCAB, context, threads=1)


@pytest.fixture(scope="module")
def verifier(gguf_dir) -> LlamaCppModel:
    return load(gguf_dir)


@pytest.fixture(scope="module")
def draft(gguf_dir) -> LlamaCppModel:
    return load(gguf_dir, "draft")


def baseline_tokens(verifier: LlamaCppModel, prompt: list[int], settings: DecodeSettings = GREEDY) -> list[int]:
    (row,) = decode_baseline(verifier, [prompt], settings, [0]).rows
    return row.tokens


@needs_binding
def test_llama_cpp_computes_what_transformers_computes_from_the_same_file(gguf_dir, verifier):
    """The file, positions and logits line up: llama.cpp's logits of every prompt position match transformers'
    float32 forward of the same GGUF, and so do its logits after a cached continuation (to the rounding of
    llama.cpp's float16 KV cache; a wrong rotary layout or position is off by whole units)."""
    model = specbench.models.load_model(specbench.models.ModelSpec(str(gguf_dir), "verifier.gguf", "float32", "cpu"))
    prompt = PROMPTS[0]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    ours = verifier.prefill([prompt[:10]], logits_to_keep=10)[0]
    continued = verifier.forward(torch.tensor([prompt[10:]]), logits_to_keep=len(prompt) - 10)[0]
    logits = torch.cat([ours, continued])
    assert torch.allclose(logits, expected, atol=2e-2)  # llama.cpp caches keys and values in float16
    assert (logits - expected).abs().max() < 1e-3 * expected.abs().max() * 10
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()


@needs_binding
@pytest.mark.parametrize("prompt", PROMPTS)
def test_our_baseline_is_the_bindings_own_greedy_generate(gguf_dir, verifier, prompt):
    native = NativeDecoder(gguf_dir / "verifier.gguf", CONTEXT, threads=1)
    theirs = native.decode_one(prompt, GREEDY)
    (ours,) = decode_baseline(verifier, [prompt], GREEDY, [0]).rows
    assert ours.tokens == theirs.tokens and len(ours.tokens) == GREEDY.max_new_tokens
    assert ours.verifier_calls == theirs.verifier_calls == GREEDY.max_new_tokens  # one decode call per token
    native.close()


@needs_binding
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculation_emits_the_baseline_tokens_and_counts_what_it_kept(verifier, draft, k):
    accepted = proposed = 0
    for prompt in PROMPTS:
        drafter = ModelDrafter("draft", draft)
        (row,) = decode_speculative(verifier, [drafter], [prompt], GREEDY, ConstantK(k), [0]).rows
        assert row.tokens == baseline_tokens(verifier, prompt)
        assert sum(row.accepted_per_step) == row.accepted == row.drafters["draft"].accepted
        assert (
            sum(row.offered_per_step) == row.proposed == row.proposed_by_position[0] + sum(row.proposed_by_position[1:])
        )
        assert len(row.tokens) == 1 + row.steps + row.accepted  # the prefill's token, then one per step + kept drafts
        accepted, proposed = accepted + row.accepted, proposed + row.proposed
    assert 0 < accepted < proposed  # drafts were kept and rejected: the rollback ran


class WrongDrafter:
    """Proposes the verifier's greedy continuation with its second token changed: one kept, then a rejection."""

    name = "wrong"

    def __init__(self, continuation: list[int], prompt_length: int) -> None:
        self.continuation, self.prompt_length = continuation, prompt_length

    def reset(self, batch_size: int) -> None:
        pass

    def prefill(self, contexts) -> None:
        pass

    def propose(self, contexts, depths, choosers) -> list[Proposal]:
        (context,), (depth,) = contexts, depths
        done = len(context) - self.prompt_length
        right = self.continuation[done : done + depth]
        return [Proposal([right[0], (right[1] + 1) % VOCAB, *right[2:]][:depth] if len(right) > 1 else right)]


@needs_binding
def test_a_rejected_draft_leaves_the_cache_as_if_it_was_never_fed(verifier):
    prompt = PROMPTS[1]
    expected = baseline_tokens(verifier, prompt)
    (row,) = decode_speculative(
        verifier, [WrongDrafter(expected, len(prompt))], [prompt], GREEDY, ConstantK(4), [0]
    ).rows
    assert row.tokens == expected
    assert row.accepted_per_step[:-1] == [1] * (len(row.accepted_per_step) - 1)  # every full step: one kept
    # the same, step by step on the context: keep one of three fed tokens, then continue
    verifier.prefill([prompt])
    verifier.forward(torch.tensor([[expected[0], expected[1], (expected[2] + 1) % VOCAB]]), logits_to_keep=3)
    verifier.commit([[0, 1]])
    assert verifier.lengths == [len(prompt) + 2]
    continued = verifier.forward(torch.tensor([[expected[2]]]))[0, -1]
    fresh = load_fresh_logits(verifier, [*prompt, *expected[:3]])
    assert torch.allclose(continued, fresh, atol=1e-4)


def load_fresh_logits(model: LlamaCppModel, tokens: list[int]) -> torch.Tensor:
    return model.prefill([tokens])[0, -1]


@needs_binding
def test_prompt_lookup_speculates_on_llama_cpp_and_so_does_the_bindings_own(gguf_dir):
    """Also past the binding's batch of 512 tokens, where its own prompt lookup needs logits for every position."""
    prompt = PROMPTS[0] * 40  # 600 tokens of repeats: lookup finds matches
    verifier = load(gguf_dir, context=1024)
    expected = baseline_tokens(verifier, prompt)
    (row,) = decode_speculative(verifier, [PromptLookupDrafter("lookup", 3)], [prompt], GREEDY, ConstantK(4), [0]).rows
    assert row.tokens == expected and row.proposed > 0
    native = NativeDecoder(gguf_dir / "verifier.gguf", 1024, threads=1, lookup=(3, 4))
    theirs = native.decode_one(prompt, GREEDY)
    assert theirs.tokens == expected
    assert theirs.verifier_calls < len(expected)  # it speculated: fewer decode calls than tokens
    native.close()


# ---- sampling: the verifier's warped law, as llama.cpp computes it --------------------------------------------

# hot enough that the tiny model's peaked logits leave several tokens to draw, and the draft's law differs
TEMPERATURE, TOP_K, TOP_P = 3.0, 8, 0.9
SAMPLED = DecodeSettings(max_new_tokens=4, do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
SAMPLED_PROMPT = [5, 17, 42, 99]
DRAWS = 600


def warped_law(
    logits: torch.Tensor, temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P
) -> np.ndarray:
    """Temperature, then top-k, then top-p (the smallest most-likely set holding top_p of the mass)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    probs[order[top_k:]] = 0
    probs /= probs.sum()
    mass_before = probs[order].cumsum(0) - probs[order]
    probs[order[mass_before >= top_p]] = 0
    return (probs / probs.sum()).numpy()


def pit_p_value(outputs: list[list[int]], law) -> float:
    """KS p-value of the randomised probability integral transform of output positions 2-4 under `law(prefix)`
    (uniform exactly when every conditional law is right; see test_sampling_law)."""
    rng = np.random.default_rng(0)
    values = []
    for tokens in outputs:
        for position in (1, 2, 3):
            probs = law(tuple(tokens[:position]))
            token = tokens[position]
            if probs[token] == 0:
                return 0.0
            more_likely = (probs > probs[token]) | ((probs == probs[token]) & (np.arange(len(probs)) < token))
            values.append(probs[more_likely].sum() + rng.uniform() * probs[token])
    return kstest(values, "uniform").pvalue


@dataclass
class ExactLaws:
    """llama.cpp's next-token logits after SAMPLED_PROMPT + prefix, from a fresh prefill each (no rollback)."""

    model: LlamaCppModel
    logits: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def law(self, warp):
        def of(prefix: tuple[int, ...]) -> np.ndarray:
            if prefix not in self.logits:
                self.logits[prefix] = self.model.prefill([[*SAMPLED_PROMPT, *prefix]])[0, -1]
            return warp(self.logits[prefix])

        return of


@needs_binding
def test_sampled_speculation_keeps_llama_cpps_warped_law(gguf_dir, verifier, draft):
    outputs, first_kept, first_rejected = [], 0, 0
    drafter = ModelDrafter("draft", draft)
    for seed in range(DRAWS):
        (row,) = decode_speculative(verifier, [drafter], [SAMPLED_PROMPT], SAMPLED, ConstantK(3), [seed]).rows
        outputs.append(row.tokens)
        first_kept += row.accepted_per_step[0] > 0
        first_rejected += row.offered_per_step[0] > 0 and row.accepted_per_step[0] == 0
    assert all(len(tokens) == 4 for tokens in outputs)
    assert first_kept > DRAWS // 10 and first_rejected > DRAWS // 10  # both paths produced position 2
    laws = ExactLaws(load(gguf_dir))
    assert pit_p_value(outputs, laws.law(warped_law)) > 1e-3
    # controls: the same draws and check reject the law without the temperature, without top-k, or without top-p
    for wrong in ({"temperature": 1.0}, {"top_k": VOCAB}, {"top_p": 1.0}):
        assert pit_p_value(outputs, laws.law(lambda logits, wrong=wrong: warped_law(logits, **wrong))) < 1e-6, wrong


@needs_binding
def test_the_benchmark_script_runs_on_gguf_files(gguf_dir, tmp_path, monkeypatch):
    """benchmarks/llamacpp_cpu.py --quick on the tiny files: every contender, the curve, the model, the verdict."""
    monkeypatch.syspath_prepend(Path(__file__).resolve().parents[1] / "benchmarks")  # it imports its siblings
    llamacpp_cpu = importlib.import_module("llamacpp_cpu")
    args = ["--quick", "--verifier-path", str(gguf_dir / "verifier.gguf"), "--draft-path", str(gguf_dir / "draft.gguf")]
    llamacpp_cpu.main([*args, "--threads", "1", "--bandwidth-gib", "0.02", "--out", str(tmp_path)])
    (results,) = tmp_path.glob("llamacpp-cpu-*-quick.json")
    report = json.loads(results.read_text())
    assert set(report["contenders"]) == {
        "ours_baseline", "binding_generate", "ours_draft_k2", "ours_lookup_k2", "binding_lookup_k2"
    }  # fmt: skip
    assert all(row["identical_to_baseline"] for row in report["contenders"].values())
    assert list(report["verify_ms"]) == ["1", "2", "3"] and set(report["speedup_model"]) == {"draft_k2", "lookup_k2"}
    assert report["floor"]["bytes_read_per_token"] > 0 and len(report["verdict"]) == 2
    assert report["machine"]["device"].startswith("CPU: ") and "llama_cpp_system_info" in report["machine"]


def test_a_contenders_figures_are_ratios_of_sums_over_the_same_decodes():
    def outcome(baseline: DecodeResult, native: DecodeResult) -> PromptOutcome:
        stats = BatchStats(baseline.latency_s)
        return PromptOutcome("p", 5, False, baseline, baseline, "", "", stats, stats, contenders={"native": native})

    outcomes = [
        outcome(DecodeResult([1, 2, 3, 4], 2.0, 0.5), DecodeResult([1, 2, 3, 4], 1.0, 0.5)),
        outcome(DecodeResult([5, 6], 2.0, 0.5), DecodeResult([5, 7], 3.0, 0.5)),
    ]
    metrics = contender_metrics(outcomes)
    assert metrics == {
        "native_tokens_per_s": 6 / 4.0,
        "speedup_native": (6 / 4.0) / (6 / 4.0),
        "native_exact_match_rate": 0.5,
    }
    assert contender_metrics(outcomes[:1])["speedup_native"] == 2.0


# ---- the run: configs, bad input, the CLI ------------------------------------------------------------------


@pytest.fixture
def composer():
    """Compose the installed configs as the CLI does, with overrides."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def gguf_run(gguf_dir: Path, draft: str = "draft") -> list[str]:
    """Overrides for a run whose verifier (and model draft, unless prompt lookup) are the tiny GGUF files."""
    overrides = ["verifier.name=tiny_llama", f"verifier.name_or_path={gguf_dir}", "verifier.gguf_file=verifier.gguf"]
    if draft == "prompt_lookup":
        return [*overrides, "draft=prompt_lookup"]
    return [
        *overrides,
        "draft=distilgpt2",
        f"draft.drafters.distilgpt2.name_or_path={gguf_dir}",
        f"+draft.drafters.distilgpt2.gguf_file={draft}.gguf",
    ]


def compose_run(composer, pubmedqa_file: Path, *overrides: str):
    return typed_config(
        composer(f"dataset.path={pubmedqa_file}", "dataset.num_samples=2", "generation.max_new_tokens=12", *overrides)
    )


REFUSALS = [
    (["verifier.gguf_file=missing.gguf"], "verifier.gguf_file=missing.gguf does not exist in"),
    (["verifier.gguf_file=broken.gguf"], "broken.gguf is not a GGUF file"),
    (
        ["verifier.gguf_file=null"],
        "not a GGUF file, and engine.backend=llamacpp runs GGUF files: set verifier.gguf_file",
    ),
    (["verifier.name_or_path=Qwen/Qwen2.5-0.5B-Instruct-GGUF"], "is not a local folder, and engine.backend=llamacpp"),
    (["batch_size=2"], "batch_size=2: engine.backend=llamacpp decodes one prompt at a time"),
    (["draft=gpt2_family"], "is a set of 3 drafters, whose token tree engine.backend=llamacpp does not verify"),
    (["+draft.drafters.distilgpt2.quantize=int8_dynamic"], "quantize=int8_dynamic quantises torch layers"),
    (["engine.fuse_projections=true"], "are options of specbench's torch engine"),
    (["engine.llamacpp_threads=0"], "engine.llamacpp_threads=0 is invalid: use 1 or more"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSALS, ids=[" ".join(o) for o, _ in REFUSALS])
def test_what_llamacpp_cannot_run_is_refused_in_one_sentence(composer, gguf_dir, pubmedqa_file, overrides, message):
    with pytest.raises(ConfigError, match=message) as refusal:
        compose_run(composer, pubmedqa_file, "engine.backend=llamacpp", *gguf_run(gguf_dir), *overrides)
    assert ". " not in str(refusal.value) and str(refusal.value).endswith(".")


def test_a_hub_model_is_refused(composer, pubmedqa_file):
    with pytest.raises(ConfigError, match="verifier is EleutherAI/gpt-j-6B, not a GGUF file"):
        compose_run(composer, pubmedqa_file, "engine.backend=llamacpp")


def test_without_the_binding_the_refusal_says_how_to_install_it(composer, gguf_dir, pubmedqa_file, monkeypatch):
    monkeypatch.setattr(llamacpp, "binding_installed", lambda: False)
    with pytest.raises(ConfigError, match="needs llama-cpp-python, which is not installed: pip install"):
        compose_run(composer, pubmedqa_file, "engine.backend=llamacpp", *gguf_run(gguf_dir))


@needs_binding
@pytest.mark.parametrize(
    ("draft", "message"),
    [
        ("foreign", "draft 'distilgpt2' does not share the tokenizer of verifier 'tiny_llama'"),
        ("padded", "draft 'distilgpt2' has a vocabulary of 404 tokens in llama.cpp and the verifier 400"),
    ],
)
def test_a_draft_with_another_vocabulary_is_refused_before_decoding(composer, gguf_dir, pubmedqa_file, draft, message):
    cfg = compose_run(composer, pubmedqa_file, "engine.backend=llamacpp", *gguf_run(gguf_dir, draft))
    with pytest.raises(ConfigError, match=message):
        prepare(cfg, load_records(cfg.dataset), ModelCache())


@needs_binding
def test_the_run_loads_no_torch_model_and_decodes_the_torch_engines_tokens(
    composer, gguf_dir, pubmedqa_file, monkeypatch
):
    """Through prepare/decode_prompts: llama.cpp's outputs are our torch engine's on the same GGUF, and no torch
    model is loaded for the llama.cpp run."""
    cache = ModelCache()
    outcomes = {}
    loads = []
    real_load = specbench.models.load_model
    monkeypatch.setattr(specbench.models, "load_model", lambda spec: loads.append(spec) or real_load(spec))
    for backend in ("specbench", "llamacpp"):
        loads.clear()
        cfg = compose_run(composer, pubmedqa_file, f"engine.backend={backend}", *gguf_run(gguf_dir), "k=3")
        setup = prepare(cfg, load_records(cfg.dataset), cache)
        outcomes[backend] = list(decode_prompts(setup, cfg, progress=False))
        assert bool(loads) == (backend == "specbench")
        assert isinstance(setup.verifier, LlamaCppModel if backend == "llamacpp" else CachedModel)
    for ours, theirs in zip(outcomes["specbench"], outcomes["llamacpp"], strict=True):
        assert ours.baseline.tokens == ours.spec.tokens == theirs.baseline.tokens == theirs.spec.tokens
        assert theirs.spec.verifier_calls == theirs.spec.steps + 1


@needs_binding
def test_one_sweep_compares_all_three_engines_through_the_cli(gguf_dir, pubmedqa_file, tmp_path, monkeypatch, capsys):
    """`specbench -m engine.backend=specbench,transformers,llamacpp draft=prompt_lookup` on the tiny GGUF: the same
    outputs, the same metrics, and on llama.cpp the binding's own prompt lookup beside ours."""
    args = [
        "-m", "engine.backend=specbench,transformers,llamacpp", *gguf_run(gguf_dir, "prompt_lookup"), "k=3",
        "engine.llamacpp_threads=2", "cost_batch_grid=[1]",
        *common_args(gguf_dir, pubmedqa_file, tmp_path), "quality.embedder=none",
    ]  # fmt: skip
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    _, children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert {run.data.tags["engine.backend"] for run in children} == {"specbench", "transformers", "llamacpp"}
    assert {run.info.status for run in children} == {"FINISHED"}
    client = MlflowClient()
    outputs = {}
    for run in children:
        backend, metrics = run.data.tags["engine.backend"], run.data.metrics
        assert metrics["disagreement_rate"] == 0.0
        assert {
            "speedup",
            "acceptance_rate",
            "acceptance_rate_pos_1",
            "perplexity_baseline",
            "predicted_speedup",
        } <= set(metrics)
        path = client.download_artifacts(run.info.run_id, "generations.jsonl", str(tmp_path / run.info.run_id))
        outputs[backend] = [json.loads(line)["baseline_tokens"] for line in Path(path).read_text().splitlines()]
        if backend == "llamacpp":
            assert metrics["native_lookup_exact_match_rate"] == 1.0
            assert metrics["native_lookup_tokens_per_s"] > 0 and metrics["speedup_native_lookup"] > 0
            assert run.data.tags["device.name"].endswith("(2 threads)")  # llama.cpp's, not torch's (1 here)
            assert "F32" in run.data.tags["model.verifier"]  # llama.cpp's description of the file
        else:
            assert "native_lookup_tokens_per_s" not in metrics
    assert outputs["specbench"] == outputs["transformers"] == outputs["llamacpp"]
