"""Continuous batching: requests join and leave a running batch, and each decodes exactly as if alone.

A step clock (one unit per reading) makes every join deterministic: which requests join which
step is fixed by their arrival times, so each scenario the issue names happens for sure: joins
while other rows are mid-way, a row finishing in the step another joins, a full batch with a
queue, a prompt longer than the columns in use (the layout widens), rows finishing at their first
token, and the batch growing and shrinking (re-formed, with CUDA-graph-style bucketed slots too).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter, PromptLookupDrafter
from specbench.engine.continuous import serve, slot_buckets
from specbench.engine.decode import BaselineDecoder, SpeculativeDecoder, decode_baseline, new_row
from specbench.engine.joins import make_join_gate
from specbench.engine.results import EngineRequest
from specbench.engine.timing import Stopwatch
from specbench.testing import StepClock, make_model, one_torch_thread, untie_head
from tests.test_sampling_law import PROMPT as LAW_PROMPT
from tests.test_sampling_law import SETTINGS as SAMPLING
from tests.test_sampling_law import WRONG_LAWS, ExactLaw, pit_p_value, tiny_model, warped_law

single_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

VOCAB = 300
ARCHS = ("gpt2", "gptj", "llama")
_REPEATING = torch.randint(1, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
PROMPTS = [
    [5, 17, 42, 99, 7, 5, 17, 42, 120, 33, 8, 250, 61, 5, 17],
    [9, 4],
    (_REPEATING * 4)[:75],  # longer than every other row's columns when it joins: the layout widens
    [61, 5, 17, 42, 99, 7],
    [3, 3, 3, 8],
]


# (arrival, prompt, max_new_tokens): 7 requests, at most 3 running; requests 4-6 queue behind a full batch
TRACE = [(0, 0, 12), (0, 1, 20), (2, 3, 6), (3, 2, 9), (4, 4, 1), (5, 0, 7), (40, 1, 5)]


def requests() -> list[EngineRequest]:
    return [
        EngineRequest(number, float(arrival), PROMPTS[prompt], limit, seed=number)
        for number, (arrival, prompt, limit) in enumerate(TRACE)
    ]


@pytest.fixture(scope="module")
def verifiers():
    models = {arch: make_model(arch, VOCAB, seed=1, layers=2) for arch in ARCHS}
    untie_head(models["gpt2"], seed=5)
    return models


@pytest.fixture(scope="module")
def draft():
    return make_model("gpt2", VOCAB, seed=2, layers=1)


def served(decoder, settings: DecodeSettings, names: list[str], bucketed: bool, max_batch_size: int = 3, trace=None):
    """Serve `trace` (default: `requests()`) on a step clock, rows of k 4."""

    def make_row(request: EngineRequest):
        return new_row(request.prompt_ids, request.seed, settings, names, 4, 4, request.max_new_tokens)

    return serve(decoder, trace or requests(), make_row, max_batch_size, bucketed, StepClock())


def alone(verifier: CachedModel, request: EngineRequest, settings: DecodeSettings) -> list[int]:
    limited = DecodeSettings(request.max_new_tokens, settings.eos_token_ids)
    return decode_baseline(verifier, [request.prompt_ids], limited, [request.seed]).rows[0].tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["baseline", "read_ahead", "model", "self", "lookup"])
@pytest.mark.parametrize(("max_len", "join_rows"), [(None, 0), (160, 0), (160, 2)], ids=["dynamic", "static", "joins"])
def test_every_request_decodes_as_if_alone(verifiers, draft, arch, mode, max_len, join_rows):
    """`joins`: rows join on buffers of their own (`capture_joins`), two at a time, prompts padded to 64 or 128."""
    verifier = CachedModel(verifiers[arch], VOCAB, max_len=max_len)
    free = alone(verifier, requests()[1], DecodeSettings(20))
    settings = DecodeSettings(20, eos_token_ids=frozenset({free[9]}))  # request 1 stops inside a block
    watch = Stopwatch(verifier.devices)
    if mode in ("baseline", "read_ahead"):  # read_ahead: rows join, leave and re-form while a forward is queued
        decoder, names = BaselineDecoder(verifier, settings, watch, read_ahead=mode == "read_ahead"), []
    else:
        drafter = {
            "model": lambda: ModelDrafter("draft", CachedModel(draft, VOCAB, max_len=max_len)),
            "self": lambda: ModelDrafter("self", CachedModel(verifiers[arch], VOCAB, max_len=max_len)),
            "lookup": lambda: PromptLookupDrafter("lookup", max_ngram=2),
        }[mode]()
        decoder, names = SpeculativeDecoder(verifier, [drafter], settings, ConstantK(4), watch), [drafter.name]
    if join_rows:
        for model in [verifier, *([drafter.model] if mode in ("model", "self") else [])]:
            model.capture_joins(join_rows)
    result = served(decoder, settings, names, bucketed=max_len is not None)
    reference = CachedModel(verifiers[arch], VOCAB)
    for request, record in zip(requests(), result.requests, strict=True):
        assert record.tokens == alone(reference, request, settings), request.request_id
        assert record.num_tokens == len(record.tokens) == sum(record.chunk_sizes)
    records = result.requests
    assert records[1].tokens[-1] == free[9] and len(records[1].tokens) == 10
    assert records[4].num_tokens == 1 and records[4].chunk_sizes == [1]  # finished at its first token
    # three rows at most, so requests 3.. waited in the queue until a row left
    assert max(step.rows for step in result.steps) == 3
    assert records[5].admitted_s > records[5].arrival_s
    assert all(record.admitted_s >= record.arrival_s for record in records)
    if mode != "read_ahead":  # (reading ahead, rows that join emit their second token a reading later: still busy)
        assert records[6].admitted_s == records[6].arrival_s + 1  # an idle server waits for it, then admits it at once
    if mode == "self":
        assert all(step.accepted == step.proposed for step in result.steps)
    if max_len is not None:  # bucketed slots (1, 2, 3): every step computed a bucket size
        assert {step.computed_rows for step in result.steps} <= set(slot_buckets(3))
    if mode == "baseline":  # one column a step: the padding is exactly the empty slots computed
        assert result.padded_positions == sum(step.computed_rows - step.rows for step in result.steps)


def test_bucketed_slots_pad_to_powers_of_two(verifiers):
    """Up to 4 rows under buckets (1, 2, 4): three running rows are computed as four, and the empty slot is counted."""
    verifier = CachedModel(verifiers["gptj"], VOCAB, max_len=160)
    settings = DecodeSettings(20)
    decoder = BaselineDecoder(verifier, settings, Stopwatch(verifier.devices), read_ahead=False)
    result = served(decoder, settings, [], bucketed=True, max_batch_size=4)
    assert slot_buckets(4) == [1, 2, 4] and slot_buckets(6) == [1, 2, 4, 6]
    assert {step.computed_rows for step in result.steps} <= {1, 2, 4}
    assert any(step.rows == 3 and step.computed_rows == 4 for step in result.steps)
    assert result.padded_positions == sum(step.computed_rows - step.rows for step in result.steps) > 0
    reference = CachedModel(verifiers["gptj"], VOCAB)
    for request, record in zip(requests(), result.requests, strict=True):
        assert record.tokens == alone(reference, request, settings)


def test_a_freed_slot_is_taken_at_the_next_step_and_running_rows_wait_for_the_join(verifiers):
    """Two rows at most: request 2 (arrived long before) joins at the reading right after request 0's last token.

    With the step clock, each loop reads the clock once before admitting, once after an admission's
    prefill and once after the step: a running row's chunks are 2 readings apart, and 3 across a join
    (the running rows wait for the joining row's prefill).
    """
    verifier = CachedModel(verifiers["llama"], VOCAB)
    settings = DecodeSettings(20)
    decoder = BaselineDecoder(verifier, settings, Stopwatch(verifier.devices), read_ahead=False)
    result = served(decoder, settings, [], bucketed=False, max_batch_size=2)
    first, second, joined = result.requests[:3]
    assert first.chunk_sizes == [1] * 12 and second.chunk_sizes == [1] * 20
    assert (first.first_token_s, first.finish_s) == (first.chunk_times_s[0], first.chunk_times_s[-1])
    assert joined.arrival_s < first.finish_s and joined.admitted_s == first.finish_s + 1
    gaps = torch.tensor(second.chunk_times_s).diff().tolist()
    joins = {r.admitted_s for r in result.requests if second.first_token_s < r.admitted_s < second.finish_s}
    assert joined.admitted_s in joins
    assert gaps[0] == 1  # its first step follows its own admission at once
    assert sorted(gaps[1:]) == [2.0] * (len(gaps) - 1 - len(joins)) + [3.0] * len(joins)


def test_sampled_requests_keep_the_verifier_law_while_rows_join_and_leave():
    """Output positions 2-4 of a request served among others that join and leave follow the verifier's exact
    warped law (randomised PIT + Kolmogorov-Smirnov, as tests/test_sampling_law.py does for a lone prompt); the
    same check rejects the unwarped law."""
    verifier_model, draft_model = tiny_model(0), tiny_model(1)
    settings = SAMPLING
    outputs = []
    for seed in range(400):
        trace = [
            EngineRequest(0, 0.0, [5, 6, 7, 1, 2], 6, seed=10_000 + seed),  # running when request 1 joins
            EngineRequest(1, 2.0, LAW_PROMPT, 4, seed=seed),
            EngineRequest(2, 3.0, [3, 2], 2, seed=20_000 + seed),  # joins mid-way and leaves first
        ]
        verifier = CachedModel(verifier_model, 8)
        drafter = ModelDrafter("draft", CachedModel(draft_model, 8))
        decoder = SpeculativeDecoder(verifier, [drafter], settings, ConstantK(3), Stopwatch(verifier.devices))

        def make_row(request: EngineRequest):
            return new_row(request.prompt_ids, request.seed, settings, ["draft"], 3, 3, request.max_new_tokens)

        outputs.append(serve(decoder, trace, make_row, 3, False, StepClock()).requests[1].tokens)
    assert all(len(tokens) == 4 for tokens in outputs)
    assert pit_p_value(outputs, ExactLaw(verifier_model, warped_law)) > 1e-3
    unwarped = WRONG_LAWS["unwarped"]
    assert pit_p_value(outputs, ExactLaw(verifier_model, unwarped)) < 1e-6


def served_through_gate(verifier: CachedModel, draft, mode: str, settings: DecodeSettings, trace, gate):
    """Serve `trace` into 4 slots on a step clock through `gate`: the baseline, or (`mode` "model") k = 3 drafted."""
    watch = Stopwatch(verifier.devices)
    if mode == "baseline":
        decoder, names = BaselineDecoder(verifier, settings, watch, read_ahead=False), []
    else:
        drafter = ModelDrafter("draft", CachedModel(draft, VOCAB))
        decoder, names = SpeculativeDecoder(verifier, [drafter], settings, ConstantK(3), watch), ["draft"]

    def make_row(request: EngineRequest):
        return new_row(request.prompt_ids, request.seed, settings, names, 3, 3, request.max_new_tokens)

    return serve(decoder, trace, make_row, 4, False, StepClock(), join_gate=gate)


@pytest.mark.parametrize("mode", ["baseline", "model"])
def test_a_join_delay_gathers_joins_and_every_request_still_decodes_as_if_alone(verifiers, draft, mode):
    """Eight requests a reading apart into 4 slots: with a delay of 6 prefills, rows join a running batch in fewer,
    larger groups, never while the last join is recent, and an empty batch takes them at once."""
    verifier = CachedModel(verifiers["gptj"], VOCAB)
    settings = DecodeSettings(12)
    trace = [EngineRequest(i, float(i), PROMPTS[i % len(PROMPTS)], 6 + i % 5, seed=i) for i in range(8)]
    trace.append(EngineRequest(8, 400.0, PROMPTS[0], 4, seed=8))  # arrives after everything has finished

    eager, delayed = (
        served_through_gate(verifier, draft, mode, settings, trace, make_join_gate(factor)) for factor in (0.0, 6.0)
    )
    joins = [sorted({record.admitted_s for record in result.requests}) for result in (eager, delayed)]
    assert len(joins[1]) < len(joins[0])
    # every join but the last (request 8, into an empty batch) after the first joined a running batch: each came
    # at least 6 prefills after the one before (under the step clock a prefill takes one reading)
    assert min(later - earlier for earlier, later in itertools.pairwise(joins[1][:-1])) >= 6
    assert min(later - earlier for earlier, later in itertools.pairwise(joins[0][:-1])) < 6
    assert delayed.requests[8].admitted_s == delayed.requests[8].arrival_s + 1  # an empty batch takes it at once
    reference = CachedModel(verifiers["gptj"], VOCAB)
    for request, record in zip(trace, delayed.requests, strict=True):
        assert record.tokens == alone(reference, request, settings), request.request_id


@pytest.mark.parametrize("mode", ["baseline", "model"])
def test_coalesced_joins_gather_a_queue_into_fewer_joins_and_every_request_still_decodes_as_if_alone(
    verifiers, draft, mode
):
    """Sixteen requests at once into 4 slots, a queue for most of the trace: rows leave a few at a time, and with
    coalesced joins the waiting requests join in fewer, larger groups (the gate's rule itself: tests/test_joins.py),
    every request still decoding as if alone."""
    verifier = CachedModel(verifiers["gptj"], VOCAB)
    settings = DecodeSettings(12)
    trace = [EngineRequest(i, 0.0, PROMPTS[i % len(PROMPTS)], 4 + i % 7, seed=i) for i in range(16)]

    eager, coalesced = (
        served_through_gate(verifier, draft, mode, settings, trace, make_join_gate(coalesce=coalesce))
        for coalesce in (False, True)
    )
    joins = [sorted({record.admitted_s for record in result.requests}) for result in (eager, coalesced)]
    assert len(joins[1]) < len(joins[0])
    sizes = [[sum(r.admitted_s == t for r in result.requests) for t in times] for result, times in zip(
        (eager, coalesced), joins, strict=True)]  # fmt: skip
    assert max(sizes[1][1:]) > max(sizes[0][1:])  # past the first join, into an empty batch
    reference = CachedModel(verifiers["gptj"], VOCAB)
    for request, record in zip(trace, coalesced.requests, strict=True):
        assert record.tokens == alone(reference, request, settings), request.request_id


class RecordingGate:
    """A join gate that lets every join through and keeps what the scheduler told it."""

    timed = False

    def __init__(self) -> None:
        self.asked: list[tuple[float, int, list[float]]] = []
        self.joins: list[tuple[float, float, int, bool]] = []

    def ready(self, now: float, running: int, joinable_since) -> bool:
        self.asked.append((now, running, list(joinable_since)))
        return True

    def joined(self, now: float, prefill_s: float, tokens: int, into_running: bool) -> None:
        self.joins.append((now, prefill_s, tokens, into_running))


def test_the_scheduler_tells_a_join_gate_since_when_each_request_could_have_joined(verifiers):
    """A request queued behind a full batch could join only once a place came free (when a row finished), not from its
    arrival; every join reports its prompt tokens, and whether rows were running."""
    verifier = CachedModel(verifiers["gptj"], VOCAB)
    settings = DecodeSettings(20)
    gate = RecordingGate()
    decoder = BaselineDecoder(verifier, settings, Stopwatch(verifier.devices), read_ahead=False)

    def make_row(request: EngineRequest):
        return new_row(request.prompt_ids, request.seed, settings, [], 0, 0, request.max_new_tokens)

    result = serve(decoder, requests(), make_row, 3, False, StepClock(), join_gate=gate)
    arrivals = {record.request_id: record.arrival_s for record in result.requests}
    # a place comes free at the end of a step a row finished in, or at a join whose row ended at its first token
    freed = {step.time_s for step in result.steps} | {record.first_token_s for record in result.requests}
    for now, _, since in gate.asked:
        assert all(moment <= now for moment in since)
    waited_for_a_place = 0
    for record in result.requests:  # the ask that admitted it
        now, running, since = next(ask for ask in gate.asked if ask[0] == record.admitted_s)
        admitted_together = sorted(r.request_id for r in result.requests if r.admitted_s == record.admitted_s)
        moment = since[admitted_together.index(record.request_id)]
        if moment > arrivals[record.request_id]:  # queued behind a full batch until a row finished
            waited_for_a_place += 1
            assert running > 0 and moment in freed
        else:
            assert moment == arrivals[record.request_id]
    assert waited_for_a_place >= 2  # requests 4-6 queue behind a full batch
    into_running = [join[3] for join in gate.joins]
    assert into_running[0] is False and any(into_running)  # the first join started the batch
    joined_tokens = sorted(tokens for _, _, tokens, _ in gate.joins)
    groups = {}
    for record, request in zip(result.requests, requests(), strict=True):
        groups[record.admitted_s] = groups.get(record.admitted_s, 0) + len(request.prompt_ids)
    assert joined_tokens == sorted(groups.values())
