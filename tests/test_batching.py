"""Batches of prompts: every row decodes as if it were alone, and the padding is accounted for.

Greedy rows (float32) are compared token for token with the same prompt decoded
alone by the verifier; sampled rows are checked against the verifier's exact law
with a seeded chi-square test. Also here: the reviewer's fixes (acceptance counts
only emitted tokens, k_per_step vs depth, sliding windows under custom masks, no
graph capture inside pool threads).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import Gemma2Config, GPT2Config, LlamaConfig

from specbench.engine import (
    AdaptiveK,
    CachedModel,
    ConstantK,
    DecodeResult,
    DecodeSettings,
    Drafter,
    ModelDrafter,
    PromptLookupDrafter,
    decode_baseline,
    decode_speculative,
    needs_plain_causal_mask,
)
from specbench.engine import cached_model as cached_model_module
from specbench.engine.attention import PREFIX_ATTENTION, PREFIX_BUCKET, matmul_attention, prefix_width
from specbench.engine.tree import build_tree
from specbench.models import ModelSpec, load_model
from specbench.testing import make_model, make_windowed_model, one_torch_thread, untie_head
from tests.fake_time import install
from tests.test_sampling import PROMPTS as SMALL_PROMPTS
from tests.test_sampling import STOP, check_speculative_law, law_models
from tests.test_sampling import VOCAB as SMALL_VOCAB

single_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

VOCAB = 300
ARCHS = ("gpt2", "gptj", "llama")
_REPEATING = torch.randint(1, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
PROMPTS = [
    [5, 17, 42, 99, 7, 5, 17, 42, 120, 33, 8, 250, 61, 5, 17],
    [9, 4],
    (_REPEATING * 4)[:75],  # much longer than the others, with repeats for prompt lookup
    [61, 5, 17, 42, 99, 7],
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def verifiers():
    models = {arch: make_model(arch, VOCAB, seed=1, layers=2) for arch in ARCHS}
    models["qwen2"] = make_model("qwen2", VOCAB, seed=6, layers=2)  # varied outputs, long enough for early_stops
    untie_head(models["gpt2"], seed=5)  # varied outputs rather than one repeated token
    return models


@pytest.fixture(scope="module")
def draft():
    return make_model("gpt2", VOCAB, seed=2, layers=1)


def alone(verifier: CachedModel, prompt: list[int], settings: DecodeSettings) -> DecodeResult:
    return decode_baseline(verifier, [prompt], settings, [0]).rows[0]


def early_stops(verifier: CachedModel, prompts: list[list[int]]) -> DecodeSettings:
    """Settings where row 1 stops at its first token and row 3 at its second (inside the first step's block)."""
    free = [alone(verifier, prompt, DecodeSettings(MAX_NEW)).tokens for prompt in prompts]
    return DecodeSettings(MAX_NEW, eos_token_ids=frozenset({free[1][0], free[3][1]}))


def make_drafters(kind: str, verifier_model, draft_model, max_len: int | None) -> list[Drafter]:
    if kind == "model":
        return [ModelDrafter("draft", CachedModel(draft_model, VOCAB, max_len=max_len))]
    if kind == "self":  # the verifier as its own draft: everything is accepted
        return [ModelDrafter("self", CachedModel(verifier_model, VOCAB, max_len=max_len))]
    if kind == "lookup":
        return [PromptLookupDrafter("lookup", max_ngram=2)]
    return [  # a draft set
        *make_drafters("model", verifier_model, draft_model, max_len),
        ModelDrafter("self", CachedModel(verifier_model, VOCAB, max_len=max_len)),
        PromptLookupDrafter("lookup", max_ngram=2),
    ]


@pytest.mark.parametrize("arch", [*ARCHS, "qwen2"])
@pytest.mark.parametrize("kind", ["model", "lookup", "self", "set"])
@pytest.mark.parametrize("max_len", [None, 160], ids=["dynamic", "static"])
def test_rows_decode_as_if_alone(verifiers, draft, arch, kind, max_len):
    """Mixed prompt lengths, rows stopping at different steps (EOS inside blocks): same tokens and counts as alone."""
    verifier = CachedModel(verifiers[arch], VOCAB, max_len=max_len)
    assert verifier.max_len == max_len
    settings = early_stops(verifier, PROMPTS)
    drafters = make_drafters(kind, verifiers[arch], draft, max_len)
    schedule = AdaptiveK(2, 5)
    singles = [decode_speculative(verifier, drafters, [p], settings, schedule, [0]).rows[0] for p in PROMPTS]
    for prompt, single in zip(PROMPTS, singles, strict=True):
        assert single.tokens == alone(verifier, prompt, settings).tokens
    lengths = [len(single.tokens) for single in singles]
    assert lengths[1] == 1 and lengths[3] == 2 and min(lengths[0], lengths[2]) >= 8
    for rows in ([0, 1], [0, 2, 1], [0, 1, 2, 3], [2, 3]):
        batch = decode_speculative(verifier, drafters, [PROMPTS[r] for r in rows], settings, schedule, [0] * len(rows))
        for row, result in zip(rows, batch.rows, strict=True):
            single = singles[row]
            assert result.tokens == single.tokens, (rows, row)
            assert (result.steps, result.accepted, result.proposed) == (single.steps, single.accepted, single.proposed)
            assert result.k_per_step == single.k_per_step
            if kind == "self":
                assert result.accepted_per_step[:-1] == result.offered_per_step[:-1]


def test_the_qwen2_verifier_is_plain_qwen2(verifiers):
    """The default verifier's architecture (Qwen2.5): full attention in every layer, and biases on q, k and v that
    change the output, so the tests above would see them dropped or misplaced."""
    model = verifiers["qwen2"]
    assert set(model.config.layer_types) == {"full_attention"} and not needs_plain_causal_mask(model.config)
    unbiased = copy.deepcopy(model)
    with torch.no_grad():
        for layer in unbiased.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.zero_()
    settings = DecodeSettings(MAX_NEW)
    assert (
        alone(CachedModel(unbiased, VOCAB), PROMPTS[0], settings).tokens
        != alone(CachedModel(model, VOCAB), PROMPTS[0], settings).tokens
    )
    assert CachedModel(model, VOCAB, max_len=160).max_len == 160  # it takes the static cache


def test_an_int8_draft_is_lossless_with_a_float32_verifier(verifiers, tmp_path):
    """The default draft's setting (quantize=int8_dynamic): the verifier's own weights, saved and loaded as the run
    loads a draft, quantised to int8; its proposals differ, so some are rejected, and the output stays the
    verifier's at batch 1 and in a ragged batch."""
    model = verifiers["qwen2"]
    model.save_pretrained(tmp_path)
    spec = ModelSpec(str(tmp_path), None, "float32", "cpu", quantize="int8_dynamic")
    int8 = load_model(spec)
    assert any(isinstance(module, torch.ao.nn.quantized.dynamic.Linear) for module in int8.modules())
    assert not any(type(module) is torch.nn.Linear for module in int8.model.layers.modules())
    verifier = CachedModel(model, VOCAB)
    drafters = [ModelDrafter("int8", CachedModel(int8, VOCAB))]
    settings = early_stops(verifier, PROMPTS)
    singles = [decode_speculative(verifier, drafters, [p], settings, ConstantK(4), [0]).rows[0] for p in PROMPTS]
    assert [single.tokens for single in singles] == [alone(verifier, p, settings).tokens for p in PROMPTS]
    assert 0 < sum(single.accepted for single in singles) < sum(single.proposed for single in singles)
    batch = decode_speculative(verifier, drafters, PROMPTS, settings, ConstantK(4), [0] * len(PROMPTS))
    assert [row.tokens for row in batch.rows] == [single.tokens for single in singles]


@pytest.mark.parametrize("arch", [*ARCHS, "qwen2"])
def test_batched_baseline_equals_generate(verifiers, monkeypatch, arch):
    """Also timed under fake time: a pass costs one second per column fed (the prefill is 75 wide), so every row
    has its first token at 75 s and its 16th, after 15 more passes, at 90 s."""
    model = verifiers[arch]
    spare = list(range(VOCAB, model.config.vocab_size))  # GPT-J's head rows the tokenizer lacks
    fake = install(monkeypatch)
    for max_len in (None, 128):
        verifier = fake.time_passes(CachedModel(model, VOCAB, max_len=max_len), lambda ids: ids.shape[1], "verifier")
        start = fake.now
        batch = decode_baseline(verifier, PROMPTS, DecodeSettings(16), [0] * 4)
        assert batch.wall_s == fake.now - start == 90
        for prompt, row in zip(PROMPTS, batch.rows, strict=True):
            reference = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=16,
                eos_token_id=None,  # no stop, and no suppressed EOS either (min_new_tokens would suppress it)
                do_sample=False,
                suppress_tokens=spare or None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            assert row.tokens == reference
            assert row.verifier_calls == 16 and (row.ttft_s, row.latency_s) == (75, 90)


def test_a_finished_row_does_not_change_the_others(verifiers, draft):
    verifier = CachedModel(verifiers["llama"], VOCAB)
    drafters = make_drafters("model", verifiers["llama"], draft, None)
    free = decode_speculative(verifier, drafters, PROMPTS, DecodeSettings(MAX_NEW), AdaptiveK(2, 5), [0] * 4)
    settings = early_stops(verifier, PROMPTS)
    stopped = decode_speculative(verifier, drafters, PROMPTS, settings, AdaptiveK(2, 5), [0] * 4)
    assert len(stopped.rows[1].tokens) <= 2 < len(free.rows[1].tokens)
    for row in (0, 2):
        before, after = free.rows[row], stopped.rows[row]
        assert after.tokens == before.tokens and after.k_per_step == before.k_per_step
        assert after.accepted_per_step == before.accepted_per_step
    assert stopped.padded_positions > free.padded_positions  # the finished rows rode along as padding


@pytest.mark.parametrize("max_len", [None, 160], ids=["dynamic", "static"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_reading_ahead_rolls_back_rows_that_stop(verifiers, max_len, do_sample):
    """The GPU's default: a step is queued before the previous tokens are read; rows that stopped are rolled back."""
    verifier = CachedModel(verifiers["llama"], VOCAB, max_len=max_len)
    seeds = [0, 1, 2, 3]
    free = decode_baseline(verifier, PROMPTS, DecodeSettings(MAX_NEW, do_sample=do_sample), seeds)
    # row 1 stops at its first token (from the prefill), row 3 at its second: fed once more, then rolled back
    stops = frozenset({free.rows[1].tokens[0], free.rows[3].tokens[1]})
    settings = DecodeSettings(MAX_NEW, eos_token_ids=stops, do_sample=do_sample)
    step_by_step = decode_baseline(verifier, PROMPTS, settings, seeds, read_ahead=False)
    lengths_step_by_step = verifier.lengths
    ahead = decode_baseline(verifier, PROMPTS, settings, seeds, read_ahead=True)
    assert len(ahead.rows[1].tokens) == 1 and len(ahead.rows[3].tokens) <= 2
    assert [row.tokens for row in ahead.rows] == [row.tokens for row in step_by_step.rows]
    assert [row.verifier_calls for row in ahead.rows] == [row.verifier_calls for row in step_by_step.rows]
    assert verifier.lengths == lengths_step_by_step  # each row holds its prompt and all but its last token


def test_padding_accounting_on_a_known_case(verifiers):
    """Two rows, the verifier as its own draft at k=2 (every draft accepted), 7 tokens per row.

    Each row: first token from the prefill, then two steps of 3 tokens over 3 fed columns (1 + k).
    When row 1 stops at its second token (inside the first step's block), step 2 feeds 3 padding columns.
    """
    model = verifiers["gpt2"]
    verifier = CachedModel(model, VOCAB)
    prompts = [PROMPTS[0], PROMPTS[3]]

    def run(settings: DecodeSettings):
        drafters = [ModelDrafter("self", CachedModel(model, VOCAB))]
        return decode_speculative(verifier, drafters, prompts, settings, ConstantK(2), [0, 0])

    one = decode_speculative(
        verifier, [ModelDrafter("self", CachedModel(model, VOCAB))], prompts[:1], DecodeSettings(7), ConstantK(2), [0]
    )
    assert (one.verifier_positions, one.padded_positions, one.padded_token_share) == (6, 0, 0.0)
    free = run(DecodeSettings(7))
    assert (free.verifier_positions, free.padded_positions) == (12, 0)
    row0, row1 = free.rows[0].tokens, free.rows[1].tokens
    stop = row1[1]
    assert stop not in row0 and stop != row1[0]
    stopped = run(DecodeSettings(7, eos_token_ids=frozenset({stop})))
    assert len(stopped.rows[1].tokens) == 2 and stopped.rows[0].tokens == row0
    assert (stopped.verifier_positions, stopped.padded_positions) == (12, 3)
    assert stopped.padded_token_share == 0.25

    baseline = decode_baseline(verifier, prompts, DecodeSettings(7, eos_token_ids=frozenset({stop})), [0, 0])
    # six forwards after the prefill; row 1 rides along as padding in the last five
    assert (baseline.verifier_positions, baseline.padded_positions) == (12, 5)


def test_parallel_drafting_in_a_batch_gives_the_same_output(verifiers, draft):
    from concurrent.futures import ThreadPoolExecutor

    model = verifiers["gptj"]
    verifier = CachedModel(model, VOCAB)
    members = make_drafters("set", model, draft, None)
    sampling = DecodeSettings(16, do_sample=True)
    outputs = []
    with ThreadPoolExecutor(3) as pool:
        for settings in (DecodeSettings(16), sampling):
            for threads in (None, pool):
                batch = decode_speculative(verifier, members, PROMPTS, settings, AdaptiveK(2, 4), [1, 2, 3, 4], threads)
                outputs.append([row.tokens for row in batch.rows])
    assert outputs[0] == outputs[1] == [alone(verifier, prompt, DecodeSettings(16)).tokens for prompt in PROMPTS]
    assert outputs[2] == outputs[3]


# ---- the reviewer's fixes ----------------------------------------------------------------------------


def test_acceptance_counts_only_emitted_tokens(verifiers):
    """The verifier as its own draft accepts every draft; a stop inside the block ends what was offered.

    Draft positions after the stop token were never judged by the verifier: they count neither as
    offered nor as rejected, so a self draft keeps an acceptance of exactly 1 at every position.
    """
    model = verifiers["gpt2"]
    verifier = CachedModel(model, VOCAB)
    free = alone(verifier, PROMPTS[0], DecodeSettings(MAX_NEW)).tokens
    # the first step emits tokens 1..5 (k = 4 drafts and the verifier's own): stop at draft 3, token index 3
    assert free[3] not in free[:3]
    settings = DecodeSettings(MAX_NEW, eos_token_ids=frozenset({free[3]}))
    result = decode_speculative(
        verifier, [ModelDrafter("self", CachedModel(model, VOCAB))], PROMPTS[:1], settings, ConstantK(4), [0]
    ).rows[0]
    assert result.tokens == free[:4]
    assert (result.steps, result.proposed, result.accepted) == (1, 3, 3)
    assert result.accepted_per_step == [3] and result.offered_per_step == [3]
    assert result.proposed_by_position == [1, 1, 1, 0] and result.accepted_by_position == [1, 1, 1, 0]
    stats = result.drafters["self"]
    assert (stats.proposed, stats.accepted, stats.wins) == (3, 3, 1)


def test_positions_after_a_rejection_count_as_offered(verifiers, draft):
    """Without a stop, a step offers every drafted position, whether the verifier rejects the first or none:
    the acceptance rate is accepted over all drafted tokens (only a stop inside the accepted drafts cuts it)."""
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    result = decode_speculative(
        verifier, [ModelDrafter("draft", CachedModel(draft, VOCAB))], PROMPTS[:1], DecodeSettings(MAX_NEW),
        ConstantK(4), [0],
    ).rows[0]  # fmt: skip
    assert result.offered_per_step == result.depth_per_step
    assert result.proposed == sum(result.depth_per_step) and result.accepted < result.proposed
    assert any(accepted < offered for offered, accepted in zip(result.offered_per_step, result.accepted_per_step,
                                                                strict=True))  # fmt: skip
    assert result.proposed_by_position[3] == sum(depth >= 4 for depth in result.depth_per_step)


@pytest.mark.parametrize("stop_index", [2, 5, 8])
def test_self_draft_accepts_everything_whatever_the_stop(verifiers, stop_index):
    """Stops anywhere (inside a block, on the verifier's own token) leave a self draft at acceptance 1 everywhere,
    and a step cut by its stop offers fewer than k, so it stays out of the steps the speedup model fits alpha to."""
    model = verifiers["gpt2"]
    verifier = CachedModel(model, VOCAB)
    free = alone(verifier, PROMPTS[0], DecodeSettings(MAX_NEW)).tokens
    stop = free[stop_index]
    settings = DecodeSettings(MAX_NEW, eos_token_ids=frozenset({stop}))
    result = decode_speculative(
        verifier, [ModelDrafter("self", CachedModel(model, VOCAB))], PROMPTS[:1], settings, ConstantK(3), [0]
    ).rows[0]
    assert result.tokens == free[: free.index(stop) + 1]
    assert result.accepted == result.proposed > 0
    assert result.accepted_by_position == result.proposed_by_position
    steps = zip(result.offered_per_step, result.accepted_per_step, strict=True)
    full = [accepted for offered, accepted in steps if offered == 3]
    assert all(accepted == 3 for accepted in full)


def test_max_new_tokens_ends_a_block_and_k_is_the_schedules(verifiers):
    """The engine drafts no further than the room left, so the length limit ends a block exactly.

    7 tokens at k = 4: the prefill's token, a step of 4 drafts + 1, then a verifier-only step (depth 0).
    """
    model = verifiers["gpt2"]
    verifier = CachedModel(model, VOCAB)
    result = decode_speculative(
        verifier, [ModelDrafter("self", CachedModel(model, VOCAB))], PROMPTS[:1], DecodeSettings(7), ConstantK(4), [0]
    ).rows[0]
    assert result.tokens == alone(verifier, PROMPTS[0], DecodeSettings(7)).tokens
    assert result.k_per_step == [4, 4] and result.depth_per_step == [4, 0]
    assert result.offered_per_step == [4, 0] and result.accepted_per_step == [4, 0]
    assert (result.accepted, result.proposed) == (4, 4)
    short = decode_speculative(
        verifier, [ModelDrafter("self", CachedModel(model, VOCAB))], PROMPTS[:1], DecodeSettings(4), ConstantK(4), [0]
    ).rows[0]
    assert short.depth_per_step == [2] and short.accepted_per_step == [2] and len(short.tokens) == 4


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_verifiers_keep_their_window_in_trees_and_batches(draft, arch):
    """A window of 6 tokens, shorter than the prompts: draft sets and batches still equal the baseline."""
    model = make_windowed_model(arch, VOCAB, seed=3, window=6)
    assert not needs_plain_causal_mask(model.config)
    verifier = CachedModel(model, VOCAB)
    settings = DecodeSettings(20)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    singles = [alone(verifier, prompt, settings).tokens for prompt in prompts]
    unwindowed = CachedModel(make_windowed_model(arch, VOCAB, seed=3, window=1000), VOCAB)
    assert alone(unwindowed, prompts[0], settings).tokens != singles[0]  # the window changes the output
    members = [
        ModelDrafter("draft", CachedModel(draft, VOCAB)),
        ModelDrafter("self", CachedModel(model, VOCAB)),
        PromptLookupDrafter("lookup"),
    ]
    tree = decode_speculative(verifier, members, prompts[:1], settings, ConstantK(4), [0]).rows[0]
    assert tree.tokens == singles[0] and tree.drafters["self"].accepted == tree.accepted > 0
    batch = decode_speculative(verifier, members, prompts, settings, ConstantK(3), [0] * 3)
    assert [row.tokens for row in batch.rows] == singles
    assert [row.tokens for row in decode_baseline(verifier, prompts, settings, [0] * 3).rows] == singles


def test_models_that_need_their_own_causal_mask_are_refused(verifiers, draft):
    neo = make_model("gpt_neo", VOCAB, seed=4, layers=2)
    assert needs_plain_causal_mask(neo.config)
    assert needs_plain_causal_mask(Gemma2Config())  # sliding layers whose masks the engine does not build
    assert not needs_plain_causal_mask(GPT2Config()) and not needs_plain_causal_mask(LlamaConfig())
    settings = DecodeSettings(8)
    neo_verifier = CachedModel(neo, VOCAB)
    one_draft = [ModelDrafter("draft", CachedModel(draft, VOCAB))]
    assert decode_speculative(neo_verifier, one_draft, PROMPTS[:1], settings, ConstantK(3), [0]).rows[0].tokens
    with pytest.raises(ValueError, match="use one drafter"):
        decode_speculative(neo_verifier, [*one_draft, PromptLookupDrafter()], PROMPTS[:1], settings, ConstantK(3), [0])
    with pytest.raises(ValueError, match="batch_size=1"):
        decode_baseline(neo_verifier, PROMPTS[:2], settings, [0, 0])
    neo_draft = [ModelDrafter("neo", CachedModel(neo, VOCAB))]
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    assert decode_speculative(verifier, neo_draft, PROMPTS[:1], settings, ConstantK(3), [0]).rows[0].tokens
    with pytest.raises(ValueError, match="batch_size=1"):
        decode_speculative(verifier, neo_draft, PROMPTS[:2], settings, ConstantK(3), [0, 0])


def test_graphs_are_never_captured_in_a_pool_thread(verifiers):
    cached = CachedModel(verifiers["gpt2"], VOCAB, max_len=64)
    errors = []

    def capture() -> None:
        try:
            cached._graph(2, 3, 64)
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=capture)
    thread.start()
    thread.join()
    assert errors and "capture_graphs" in errors[0]


class KeyColumns(TorchFunctionMode):
    """Records how many key columns each scaled_dot_product_attention call reads."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen.add(args[1].shape[-2])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_static_cache_attends_over_the_columns_in_use(verifiers, arch):
    """A buffer far longer than the decode: attention reads the used columns rounded up, and the output holds."""
    settings = DecodeSettings(MAX_NEW)
    static = CachedModel(verifiers[arch], VOCAB, max_len=1000)
    with KeyColumns() as keys:
        batch = decode_baseline(static, PROMPTS, settings, [0] * len(PROMPTS))
    dynamic = decode_baseline(CachedModel(verifiers[arch], VOCAB), PROMPTS, settings, [0] * len(PROMPTS))
    assert [row.tokens for row in batch.rows] == [row.tokens for row in dynamic.rows]
    longest = max(len(prompt) for prompt in PROMPTS) + MAX_NEW  # 99 columns at most: one 128-column width
    assert keys.seen == {prefix_width(longest, 1000)} == {2 * PREFIX_BUCKET}


class TracedOps:
    """A torch.compile backend that runs each traced graph as is and records the functions it calls."""

    def __init__(self) -> None:
        self.functions: set = set()

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.functions |= {node.target for node in graph_module.graph.nodes if node.op == "call_function"}
        return graph_module.forward


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_steps_attend_with_matmuls_and_decode_the_same(verifiers, monkeypatch, arch):
    """Under torch.compile, prefix attention is two matmuls and a softmax, not SDPA: the tokens are the same."""
    settings = DecodeSettings(MAX_NEW)
    eager = decode_baseline(CachedModel(verifiers[arch], VOCAB, max_len=160), PROMPTS, settings, [0] * len(PROMPTS))
    static = CachedModel(verifiers[arch], VOCAB, max_len=160)
    traced = TracedOps()
    monkeypatch.setattr(static, "_run", torch.compile(static._run, backend=traced, dynamic=False))
    compiled = decode_baseline(static, PROMPTS, settings, [0] * len(PROMPTS))
    assert [row.tokens for row in compiled.rows] == [row.tokens for row in eager.rows]
    assert torch.matmul in traced.functions
    assert torch._C._nn.scaled_dot_product_attention not in traced.functions
    assert torch.nn.functional.scaled_dot_product_attention not in traced.functions


@pytest.mark.parametrize(("heads", "key_heads"), [(4, 4), (4, 2), (6, 1)])
def test_matmul_attention_equals_sdpa_with_shared_key_heads(heads, key_heads):
    generator = torch.Generator().manual_seed(heads * 10 + key_heads)
    rows, n, width, dim = 3, 5, 12, 8
    query = torch.randn(rows, heads, n, dim, generator=generator)
    key, value = (torch.randn(rows, key_heads, width, dim, generator=generator) for _ in range(2))
    visible = torch.rand(rows, n, width, generator=generator) < 0.7
    visible[:, :, 0] = True  # no softmax row is empty
    mask = torch.zeros(rows, 1, n, width).masked_fill_(~visible[:, None], torch.finfo(torch.float32).min)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(matmul_attention(query, key, value, mask, 0.3), expected)


def test_switching_to_prefix_attention_leaves_generate_unchanged():
    """The engine switches a model it gives a static cache to; transformers' generate() must not notice."""
    model = make_model("llama", VOCAB, seed=1, layers=2)
    ids = torch.tensor([[0, 0, *PROMPTS[3][:4]], PROMPTS[3]])
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    before = model.generate(ids, attention_mask=padding, max_new_tokens=8, do_sample=False)
    CachedModel(model, VOCAB, max_len=1000)
    assert model.config._attn_implementation == PREFIX_ATTENTION
    after = model.generate(ids, attention_mask=padding, max_new_tokens=8, do_sample=False)
    assert torch.equal(before, after)


# ---- the ragged cache --------------------------------------------------------------------------------


def assert_rows_continue_as_alone(cached: CachedModel, prompts: list[list[int]], kept: list[list[int]]) -> None:
    """Feeding two more tokens to every row gives the logits of each row's tokens fed to a fresh cache."""
    lengths = cached.lengths
    logits = cached.forward(torch.tensor([[7, 8]] * len(prompts)), logits_to_keep=2)
    for row, prompt in enumerate(prompts):
        fresh = CachedModel(cached.model, VOCAB).prefill([[*prompt, *kept[row], 7, 8]], logits_to_keep=2)
        torch.testing.assert_close(logits[row], fresh[0], rtol=1e-4, atol=1e-4, msg=f"row {row}")
    cached.truncate(lengths)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_len", [None, 64], ids=["dynamic", "static"])
def test_trees_in_a_batch_and_compaction_keep_every_row_intact(verifiers, monkeypatch, arch, max_len):
    """Rows keep different paths of their token trees; after compacting, each row continues as if alone."""
    monkeypatch.setattr(cached_model_module, "COMPACT_MIN_COLUMNS", 0)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    trees = [
        build_tree(11, [[12, 13], [14, 15]]),
        build_tree(11, [[12], [13, 14]]),
        build_tree(11, [[12, 13, 14, 15, 16, 17]]),
    ]
    width = max(tree.size for tree in trees)
    ids = torch.tensor([tree.tokens + [0] * (width - tree.size) for tree in trees])
    cached = CachedModel(verifiers[arch], VOCAB, max_len=max_len)
    cached.prefill(prompts)
    cached.forward(ids, [tree.size for tree in trees], [tree.parents for tree in trees], logits_to_keep=width)
    # row 0 keeps its root only, row 1 its second branch (moved), row 2 its whole chain
    cached.commit([[0], [0, *trees[1].branches[1]], [0, *trees[2].branches[0]]])
    assert cached.lengths == [16, 5, 13]
    assert cached.columns == 16  # compacted: row 0's 6 hole columns were more than a quarter of 22
    assert_rows_continue_as_alone(cached, prompts, [[11], [11, 13, 14], [11, 12, 13, 14, 15, 16, 17]])
    cached.truncate([16, 4, 8])
    assert_rows_continue_as_alone(cached, prompts, [[11], [11, 13], [11, 12]])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_static_cache_compacts_instead_of_overflowing(verifiers, monkeypatch, arch):
    """Three steps of 4 columns where rows keep 1, 2 and 4: 27 columns without compaction, in a buffer of 24."""
    monkeypatch.setattr(cached_model_module, "COMPACT_MIN_COLUMNS", 10_000)  # compact only when a feed would not fit
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    cached = CachedModel(verifiers[arch], VOCAB, max_len=24)
    cached.prefill(prompts)
    kept: list[list[int]] = [[], [], []]
    for step in range(3):
        fed = [20 + step, 30 + step, 40 + step, 50 + step]
        cached.forward(torch.tensor([fed] * 3), logits_to_keep=4)
        cached.commit([[0], [0, 1], [0, 1, 2, 3]])
        kept = [kept[0] + fed[:1], kept[1] + fed[:2], kept[2] + fed]
    assert cached.lengths == [18, 8, 18] and cached.columns == 21  # compacted to 17 before the third step
    assert_rows_continue_as_alone(cached, prompts, kept)


# ---- sampling ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_models():
    return law_models()


@pytest.mark.parametrize("draft_set", [False, True], ids=["one_draft", "draft_set"])
def test_each_sampled_row_follows_the_verifier_law(small_models, draft_set):
    """Batches of 4 rows (prompts of 1 to 8 tokens) on a static cache, each row its own adaptive k, outputs of up
    to 5 tokens: the joint law of (row, whole output) is the verifier's, at positions 3 to 5 too, with stops
    inside blocks."""
    _, draft_a, draft_b = small_models
    drafters: list[Drafter] = [ModelDrafter("a", CachedModel(draft_a, SMALL_VOCAB, max_len=32))]
    if draft_set:
        drafters += [ModelDrafter("b", CachedModel(draft_b, SMALL_VOCAB)), PromptLookupDrafter("lookup", max_ngram=1)]
    settings = DecodeSettings(max_new_tokens=5, do_sample=True, eos_token_ids=frozenset({STOP}))
    check_speculative_law(small_models, drafters, AdaptiveK(2, 4), settings, max_len=32, batches=300)


def test_a_sampled_row_does_not_depend_on_its_batch_mates(small_models):
    verifier_model, draft_a, _ = small_models
    verifier = CachedModel(verifier_model, SMALL_VOCAB)
    drafters = [ModelDrafter("a", CachedModel(draft_a, SMALL_VOCAB))]
    settings = DecodeSettings(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=4)
    for seed in range(5):
        seeds = [seed, seed + 100, seed + 200, seed + 300]
        batch = decode_speculative(verifier, drafters, SMALL_PROMPTS, settings, AdaptiveK(2, 4), seeds)
        for prompt, row_seed, row in zip(SMALL_PROMPTS, seeds, batch.rows, strict=True):
            single = decode_speculative(verifier, drafters, [prompt], settings, AdaptiveK(2, 4), [row_seed]).rows[0]
            assert row.tokens == single.tokens and row.accepted_per_step == single.accepted_per_step
