"""The timing protocol, checked with a fake clock and a log of decode calls (never with wall time).

The engine's `Clock` is replaced by a clock that only moves when a model runs a
forward pass, by a fixed amount per pass, so every timing a decode reports can be
recomputed from the passes it made:
- the runner warms up outside the measurement (`warmup_prompts` of them, 0 included),
  then alternates which mode decodes a prompt first, from prompt to prompt and from
  repeat to repeat, with the same seed for a prompt in both modes and every repeat;
- the engine counts the drafters' prefill in the speculative latency, not in the
  time to first token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import specbench.engine.timing
import specbench.runner
from specbench.config import (
    DatasetConfig,
    DraftConfig,
    Dtype,
    GenerationConfig,
    QualityConfig,
    SpecBenchConfig,
    VerifierConfig,
)
from specbench.data import load_records
from specbench.drafters import ModelDrafterConfig
from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter, decode_baseline, decode_speculative
from specbench.models import ModelCache
from specbench.pipeline import run_benchmark
from specbench.runner import prepare
from specbench.testing import make_model

VERIFY_TICK = 1.0  # seconds of fake time per verifier forward
DRAFT_TICK = 0.25  # per drafter forward (binary fractions: sums stay exact)


@dataclass
class FakeClock:
    """Fake time, moved only by `tick`; it stands in for the engine's Clock (`Clock(device).now()`)."""

    time: float = 0.0

    def __call__(self, device: torch.device) -> FakeClock:
        return self

    def now(self, wait: bool = True) -> float:
        return self.time

    def tick(self, seconds: float) -> None:
        self.time += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(specbench.engine.timing, "Clock", fake)
    return fake


def ticking(model: CachedModel, clock: FakeClock, seconds: float, counts: dict[str, int], name: str) -> CachedModel:
    """Make each pass of `model` (prefill or forward) advance the clock by `seconds` and count it under `name`."""
    feed = model._feed

    def timed_feed(*args, **kwargs):
        clock.tick(seconds)
        counts[name] = counts.get(name, 0) + 1
        return feed(*args, **kwargs)

    model._feed = timed_feed
    return model


# --- the engine: what each timing of a decode contains ---------------------------------------------------------


def test_drafter_prefill_counts_in_speculative_latency_but_not_in_time_to_first_token(clock):
    vocab, prompt = 40, [3, 1, 4, 1, 5, 9, 2, 6]
    counts: dict[str, int] = {}
    verifier = ticking(CachedModel(make_model("gpt2", vocab, seed=0), vocab), clock, VERIFY_TICK, counts, "verifier")
    draft = ticking(CachedModel(make_model("gpt2", vocab, seed=1, layers=1), vocab), clock, DRAFT_TICK, counts, "d")
    settings = DecodeSettings(max_new_tokens=12)

    (result,) = decode_speculative(verifier, [ModelDrafter("d", draft)], [prompt], settings, ConstantK(3), [0]).rows
    assert result.ttft_s == VERIFY_TICK  # the verifier's prefill alone
    assert result.drafters["d"].prefill_s == DRAFT_TICK  # the draft read the prompt in one forward ...
    assert result.draft_prefill_s == DRAFT_TICK
    total = counts["verifier"] * VERIFY_TICK + counts["d"] * DRAFT_TICK
    assert result.latency_s == clock.time == total  # ... and the latency holds it, with every other pass
    # every tick of the decode belongs to exactly one phase
    assert result.draft_time_s == (counts["d"] - 1) * DRAFT_TICK
    assert result.verify_time_s == (counts["verifier"] - 1) * VERIFY_TICK
    assert result.ttft_s + result.draft_prefill_s + result.draft_time_s + result.verify_time_s == result.latency_s

    counts.clear()
    start = clock.time
    (baseline,) = decode_baseline(verifier, [prompt], settings, [0]).rows
    assert baseline.ttft_s == VERIFY_TICK
    assert baseline.latency_s == clock.time - start == counts["verifier"] * VERIFY_TICK == len(baseline.tokens)


# --- the runner: warm-up outside the measurement, alternating order ------------------------------------------


@dataclass
class Call:
    mode: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    seed: int
    start: float
    end: float = 0.0
    tokens: list[int] = field(default_factory=list)


@pytest.fixture
def calls(monkeypatch, clock) -> list[Call]:
    """Every decode the runner makes (batches of one prompt), in order, with its fake-time window; every model
    pass ticks once."""
    log: list[Call] = []
    feed = CachedModel._feed

    def ticking_feed(self, *args, **kwargs):
        clock.tick(VERIFY_TICK)
        return feed(self, *args, **kwargs)

    monkeypatch.setattr(CachedModel, "_feed", ticking_feed)

    def recorded(mode, decode):
        def run(verifier, *args, **kwargs):
            prompts, settings = (args[1], args[2]) if mode == "spec" else (args[0], args[1])
            seeds = args[4] if mode == "spec" else args[2]
            (prompt,), (seed,) = prompts, seeds
            call = Call(mode, tuple(prompt), settings.max_new_tokens, seed, clock.time)
            result = decode(verifier, *args, **kwargs)
            call.end, call.tokens = clock.time, result.rows[0].tokens
            log.append(call)
            return result

        return run

    monkeypatch.setattr(specbench.runner, "decode_baseline", recorded("baseline", decode_baseline))
    monkeypatch.setattr(specbench.runner, "decode_speculative", recorded("spec", decode_speculative))
    return log


def tiny_config(models_dir, pubmedqa_file, **overrides) -> SpecBenchConfig:
    cfg = SpecBenchConfig(
        verifier=VerifierConfig(name="gpt_j", name_or_path="EleutherAI/gpt-j-6B"),
        draft=DraftConfig(name="distilgpt2", drafters={"distilgpt2": ModelDrafterConfig("distilbert/distilgpt2")}),
        dataset=DatasetConfig(path=str(pubmedqa_file), num_samples=2),
        generation=GenerationConfig(max_new_tokens=6, stop_at_eos=False),
        quality=QualityConfig(embedder="none", perplexity=False),
        models_dir=str(models_dir),
        device="cpu",
        dtype=Dtype.float32,  # `auto` would probe the CPU first, whose passes this test would count
        k=2,
        warmup_tokens=2,
        cost_curve=False,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize("warmup_prompts", [0, 2])
def test_warm_up_is_outside_the_measurement_and_the_mode_order_alternates(
    warmup_prompts, calls, clock, models_dir, pubmedqa_file
):
    cfg = tiny_config(models_dir, pubmedqa_file, warmup_prompts=warmup_prompts, repeats=2)
    setup = prepare(cfg, load_records(cfg.dataset), ModelCache())
    result = run_benchmark(cfg, setup)
    prompts = [tuple(prompt.input_ids) for prompt in setup.prompts]

    # warm-up: exactly `warmup_prompts` prompts, both modes, short outputs, before anything is timed
    warm, timed = calls[: 2 * warmup_prompts], calls[2 * warmup_prompts :]
    assert [(c.prompt, c.max_new_tokens) for c in warm] == [
        (prompt, 2) for prompt in prompts[:warmup_prompts] for _ in range(2)
    ]
    assert len(timed) == 2 * len(prompts) * 2 and all(c.max_new_tokens == 6 for c in timed)
    warm_up_time = sum(c.end - c.start for c in warm)
    assert (warm_up_time > 0) == (warmup_prompts > 0)

    # each prompt's latency is its own decode's passes and nothing else: warm-up time is in no figure
    table = result.per_prompt
    for row, (first, second) in zip(table.itertuples(), zip(timed[::2], timed[1::2], strict=True), strict=True):
        by_mode = {first.mode: first, second.mode: second}
        assert {first.prompt, second.prompt} == {prompts[row.Index % len(prompts)]}
        assert row.baseline_latency_s == by_mode["baseline"].end - by_mode["baseline"].start
        assert row.spec_latency_s == by_mode["spec"].end - by_mode["spec"].start
    assert table["baseline_latency_s"].sum() + table["spec_latency_s"].sum() == clock.time - warm_up_time

    # the first mode alternates from prompt to prompt, and each prompt swaps it between repeats
    firsts = [c.mode for c in timed[::2]]
    assert firsts == ["baseline", "spec", "spec", "baseline"]  # (prompt 0, 1) in repeat 0, then in repeat 1
    assert [c.seed for c in timed] == [cfg.seed + i for _ in range(2) for i in range(2) for _ in range(2)]
    assert list(table["repeat"]) == [0, 0, 1, 1]
    # the same seed gives the same outputs in both repeats: only the timing is measured again
    assert [c.tokens for c in timed[:4]] == [c.tokens for c in timed[4:]]
