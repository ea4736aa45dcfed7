"""The timing protocol, checked with fake time and a log of decode calls (never with wall time).

Time moves only when a model computes, by known amounts, as on a GPU (tests/fake_time.py): a
clock reading that does not wait for the GPUs misses the passes still queued. So every timing a
decode reports can be recomputed from the passes it made, and each clock reading is checked:
- every reading follows a synchronize of every GPU the verifier runs on (the README's claim),
  except where the baseline reads ahead: there a reading right after a step's tokens reached the
  host need not wait for the next step, already queued;
- the engine counts the drafters' prefill in the speculative latency, not in the time to first
  token, and each row's latency is the time its last token was read;
- every pass of a timed decode, static or served, runs with the heap that existed before it frozen, out of
  the garbage collector's reach (a full collection would stall the step it fell in), and only then;
- the runner warms up outside the measurement (`warmup_prompts` of them, 0 included), then
  alternates which mode decodes a prompt first, from prompt to prompt and from repeat to repeat,
  with the same seed for a prompt in both modes and every repeat.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

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
from specbench.engine import (
    BatchResult,
    CachedModel,
    ConstantK,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.continuous import serve
from specbench.engine.decode import BaselineDecoder, new_row
from specbench.engine.results import EngineRequest
from specbench.engine.timing import Stopwatch, frozen_heap
from specbench.models import ModelCache
from specbench.pipeline import run_benchmark
from specbench.runner import prepare
from specbench.testing import StepClock, make_model
from tests.fake_time import GPUS, FakeTime, install

VERIFY_TICK = 1.0  # seconds of fake time per verifier pass, per fed column (binary fractions: sums stay exact)
DRAFT_TICK = 0.25  # per drafter pass
VOCAB = 40
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [2, 7, 1, 8, 2, 8]]  # ragged: the prefill is 8 columns wide
MAX_NEW = 12


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    """Fake time on a verifier sharded over two fake GPUs."""
    return install(monkeypatch)


def verifier_pass_s(input_ids: torch.Tensor) -> float:
    """A verifier pass costs VERIFY_TICK per column fed: the prefill costs more than a step."""
    return VERIFY_TICK * input_ids.shape[1]


def passes(fake: FakeTime, name: str) -> int:
    return sum(event == ("pass", name) for event in fake.events)


def stopping_at(verifier: CachedModel, positions: Sequence[int | None]) -> DecodeSettings:
    """Greedy settings whose stop tokens are row r's free token at `positions[r]` (None: no stop for that row)."""
    free = decode_baseline(verifier, PROMPTS, DecodeSettings(MAX_NEW), [0] * len(PROMPTS)).rows
    stops = {row.tokens[position] for row, position in zip(free, positions, strict=True) if position is not None}
    return DecodeSettings(MAX_NEW, eos_token_ids=frozenset(stops))


def check_readings(events: list[tuple[str, object]]) -> tuple[int, int]:
    """Replay the log and check each clock reading: it follows a synchronize of every GPU (it waited), or it did
    not wait where the engine need not: right after a step's tokens reached the host, with no pass queued since
    and at most one (the step read ahead) queued after their copy began. Return (waited, not waited) counts."""
    waited = unwaited = 0
    synchronized: set[torch.device] = set()
    passes_since_copy = 0
    tokens_on_host = False  # a step's tokens reached the host after the last pass was queued
    for kind, what in events:
        if kind == "sync":
            synchronized.add(what)
            continue
        if kind == "read" and synchronized >= set(GPUS):
            waited += 1
        elif kind == "read":
            assert tokens_on_host and passes_since_copy <= 1, f"clock reading {waited + unwaited} did not wait"
            unwaited += 1
        elif kind == "pass":
            passes_since_copy, tokens_on_host = passes_since_copy + 1, False
        elif kind == "copy":
            passes_since_copy = 0
        elif kind == "host":
            tokens_on_host = True
        synchronized = set()  # a reading needs a synchronize of its own: other work is queued between passes
    return waited, unwaited


def assert_baseline_timings(batch: BatchResult) -> None:
    """Each row's first token comes from the prefill (8 columns), each later one from a step of one column;
    a row's latency is the time its last token was read."""
    width = max(len(prompt) for prompt in PROMPTS) * VERIFY_TICK
    for row in batch.rows:
        assert row.ttft_s == width
        assert row.latency_s == width + (len(row.tokens) - 1) * VERIFY_TICK


# --- the engine: what each timing of a decode contains, and when the clock is read ---------------------------


def test_drafter_prefill_counts_in_speculative_latency_but_not_in_time_to_first_token(fake_time):
    prompt = PROMPTS[0]
    verifier = fake_time.time_passes(CachedModel(make_model("gpt2", VOCAB, seed=0), VOCAB), VERIFY_TICK, "verifier")
    draft = fake_time.time_passes(CachedModel(make_model("gpt2", VOCAB, seed=1, layers=1), VOCAB), DRAFT_TICK, "d")
    settings = DecodeSettings(max_new_tokens=12)

    (result,) = decode_speculative(verifier, [ModelDrafter("d", draft)], [prompt], settings, ConstantK(3), [0]).rows
    assert result.ttft_s == VERIFY_TICK  # the verifier's prefill alone
    assert result.drafters["d"].prefill_s == DRAFT_TICK  # the draft read the prompt in one forward ...
    assert result.draft_prefill_s == DRAFT_TICK
    total = passes(fake_time, "verifier") * VERIFY_TICK + passes(fake_time, "d") * DRAFT_TICK
    assert result.latency_s == fake_time.now == total  # ... and the latency holds it, with every other pass
    # every tick of the decode belongs to exactly one phase
    assert result.draft_time_s == (passes(fake_time, "d") - 1) * DRAFT_TICK
    assert result.verify_time_s == (passes(fake_time, "verifier") - 1) * VERIFY_TICK
    assert result.ttft_s + result.draft_prefill_s + result.draft_time_s + result.verify_time_s == result.latency_s

    fake_time.events.clear()
    start = fake_time.now
    (baseline,) = decode_baseline(verifier, [prompt], settings, [0]).rows
    assert baseline.ttft_s == VERIFY_TICK
    assert baseline.latency_s == fake_time.now - start == passes(fake_time, "verifier") * VERIFY_TICK
    assert baseline.latency_s == len(baseline.tokens) * VERIFY_TICK


@pytest.mark.parametrize("mode", ["baseline", "speculative"])
def test_every_clock_reading_follows_a_synchronize_of_every_gpu(fake_time, mode):
    """Rows of a batch finish at different steps: each reading waits, and each row's figures add up."""
    verifier = fake_time.time_passes(CachedModel(make_model("llama", VOCAB, seed=0), VOCAB), verifier_pass_s, "v")
    settings = stopping_at(verifier, [1, 3, None])
    fake_time.events.clear()
    start = fake_time.now
    if mode == "baseline":
        batch = decode_baseline(verifier, PROMPTS, settings, [0] * 3)
        assert_baseline_timings(batch)
    else:
        draft = fake_time.time_passes(CachedModel(make_model("llama", VOCAB, seed=1, layers=1), VOCAB), DRAFT_TICK, "d")
        drafters = [ModelDrafter("d", draft), PromptLookupDrafter("lookup")]
        batch = decode_speculative(verifier, drafters, PROMPTS, settings, ConstantK(3), [0] * 3)
        for row in batch.rows:
            assert row.ttft_s == max(len(prompt) for prompt in PROMPTS) * VERIFY_TICK
            assert row.ttft_s + row.draft_prefill_s + row.draft_time_s + row.verify_time_s == row.latency_s
    assert len({len(row.tokens) for row in batch.rows}) == 3  # three rows, three different last steps
    assert batch.wall_s == max(row.latency_s for row in batch.rows) == fake_time.now - start
    waited, unwaited = check_readings(fake_time.events)
    assert unwaited == 0 and waited >= 4  # the start, the first token, and each row's last token at least


def test_the_heap_is_frozen_while_a_decode_is_timed_and_only_then():
    """Each verifier pass of a timed decode (static batch, either mode, or served with joins and leaves) sees
    the objects made before it frozen; outside a decode the collector has the whole heap again."""
    verifier = CachedModel(make_model("gpt2", VOCAB, seed=0), VOCAB)
    draft = CachedModel(make_model("gpt2", VOCAB, seed=1, layers=1), VOCAB)
    frozen_during_passes: list[int] = []
    verifier.model.register_forward_pre_hook(lambda module, args: frozen_during_passes.append(gc.get_freeze_count()))
    settings = DecodeSettings(MAX_NEW)
    assert gc.get_freeze_count() == 0

    decode_baseline(verifier, PROMPTS, settings, [0] * 3)
    decode_speculative(verifier, [ModelDrafter("d", draft)], PROMPTS, settings, ConstantK(3), [0] * 3)
    trace = [EngineRequest(number, float(2 * number), prompt, MAX_NEW, seed=0) for number, prompt in enumerate(PROMPTS)]

    def make_row(request: EngineRequest):
        return new_row(request.prompt_ids, request.seed, settings, [], 1, 1, request.max_new_tokens)

    baseline = BaselineDecoder(verifier, settings, Stopwatch(verifier.devices))
    assert len(serve(baseline, trace, make_row, 2, False, StepClock()).requests) == 3
    assert len(frozen_during_passes) > 3 * MAX_NEW
    assert min(frozen_during_passes) > 0
    assert gc.get_freeze_count() == 0
    verifier.model(torch.tensor([PROMPTS[0]]))  # a pass outside a decode: nothing frozen
    assert frozen_during_passes[-1] == 0


def test_a_frozen_heap_still_collects_what_is_made_inside_and_an_inner_region_keeps_the_outer_ones_freeze():
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    def collectable(thing: object) -> bool:
        return any(tracked is thing for tracked in gc.get_objects())

    before = Cycle()
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        assert not collectable(before)
        Cycle()  # garbage only the collector can free
        assert gc.collect() >= 1
        made_in_outer = Cycle()
        with frozen_heap():  # a region inside another leaves the heap as the outer one froze it
            assert collectable(made_in_outer) and not collectable(before)
        assert gc.get_freeze_count() > 0 and not collectable(before) and collectable(made_in_outer)
    assert gc.get_freeze_count() == 0
    assert collectable(before)


def test_a_heap_with_a_few_objects_frozen_already_is_frozen_whole_while_timed():
    """A library (or the caller) froze a few objects before the region: the region still freezes the rest, as
    a full collection would otherwise walk them all. On leaving, every object is the collector's again."""
    made_before_the_libraries_freeze = [object()]
    gc.freeze()
    made_after_it = [object()]
    try:
        with frozen_heap():
            tracked = {id(thing) for thing in gc.get_objects()}
            assert id(made_after_it) not in tracked and id(made_before_the_libraries_freeze) not in tracked
    finally:
        frozen_left = gc.get_freeze_count()
        gc.unfreeze()
    assert frozen_left == 0


def test_reading_ahead_reads_the_clock_without_waiting_only_once_a_step_reached_the_host(fake_time):
    """The GPU's default for the baseline: step t+1 is queued before step t's tokens are read, and a row that
    finishes at step t is timed when they arrive, without waiting for step t+1. Outputs and timings are those of
    decoding step by step."""
    verifier = fake_time.time_passes(CachedModel(make_model("llama", VOCAB, seed=0), VOCAB), verifier_pass_s, "v")
    settings = stopping_at(verifier, [0, 3, None])  # row 0 stops at its first token, from the prefill
    fake_time.events.clear()
    step_by_step = decode_baseline(verifier, PROMPTS, settings, [0] * 3, read_ahead=False)
    assert check_readings(fake_time.events)[1] == 0
    fake_time.events.clear()
    ahead = decode_baseline(verifier, PROMPTS, settings, [0] * 3, read_ahead=True)
    unwaited = check_readings(fake_time.events)[1]
    lengths = [len(row.tokens) for row in ahead.rows]
    assert lengths[0] == 1 and len(set(lengths)) == 3
    assert unwaited == 2  # rows 1 and 2 finish at two later steps, each timed as its tokens arrive
    assert [row.tokens for row in ahead.rows] == [row.tokens for row in step_by_step.rows]
    assert [row.verifier_calls for row in ahead.rows] == [row.verifier_calls for row in step_by_step.rows]
    assert_baseline_timings(step_by_step)
    assert_baseline_timings(ahead)


@pytest.mark.parametrize(
    ("end", "read_ahead"),
    [
        ("length", False),
        ("length", True),
        ("stop", False),
        ("stop", True),
    ],
)
def test_the_batch_wall_time_ends_at_its_last_token(fake_time, read_ahead, end):
    """When the last row ends on a stop token, reading ahead computed one step that is thrown away: not decode time."""
    verifier = fake_time.time_passes(CachedModel(make_model("llama", VOCAB, seed=0), VOCAB), verifier_pass_s, "v")
    settings = stopping_at(verifier, [1, 3, 2] if end == "stop" else [1, 3, None])
    start = fake_time.now
    batch = decode_baseline(verifier, PROMPTS, settings, [0] * 3, read_ahead=read_ahead)
    last = max(batch.rows, key=lambda row: len(row.tokens))
    assert (last.tokens[-1] in settings.eos_token_ids) == (end == "stop")
    assert_baseline_timings(batch)
    assert batch.wall_s == last.latency_s
    if end == "length":
        assert fake_time.now - start == last.latency_s  # nothing was computed past the last token


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
def cpu_time(monkeypatch) -> FakeTime:
    """Fake time on the CPU: every pass is done at once."""
    return install(monkeypatch, gpus=())


@pytest.fixture
def calls(monkeypatch, cpu_time) -> list[Call]:
    """Every decode the runner makes (batches of one prompt), in order, with its fake-time window; every model
    pass takes VERIFY_TICK."""
    log: list[Call] = []
    feed = CachedModel._feed

    def ticking_feed(self, *args, **kwargs):
        cpu_time.queue(VERIFY_TICK, "model")
        return feed(self, *args, **kwargs)

    monkeypatch.setattr(CachedModel, "_feed", ticking_feed)

    def recorded(mode, decode):
        def run(verifier, *args, **kwargs):
            prompts, settings = (args[1], args[2]) if mode == "spec" else (args[0], args[1])
            seeds = args[4] if mode == "spec" else args[2]
            (prompt,), (seed,) = prompts, seeds
            call = Call(mode, tuple(prompt), settings.max_new_tokens, seed, cpu_time.now)
            result = decode(verifier, *args, **kwargs)
            call.end, call.tokens = cpu_time.now, result.rows[0].tokens
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
    warmup_prompts, calls, cpu_time, models_dir, pubmedqa_file
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
    assert table["baseline_latency_s"].sum() + table["spec_latency_s"].sum() == cpu_time.now - warm_up_time

    # the first mode alternates from prompt to prompt, and each prompt swaps it between repeats
    firsts = [c.mode for c in timed[::2]]
    assert firsts == ["baseline", "spec", "spec", "baseline"]  # (prompt 0, 1) in repeat 0, then in repeat 1
    assert [c.seed for c in timed] == [cfg.seed + i for _ in range(2) for i in range(2) for _ in range(2)]
    assert list(table["repeat"]) == [0, 0, 1, 1]
    # the same seed gives the same outputs in both repeats: only the timing is measured again
    assert [c.tokens for c in timed[:4]] == [c.tokens for c in timed[4:]]
