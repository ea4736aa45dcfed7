"""Greedy decoding at batch size 1: the baseline equals generate(), and speculative output equals the baseline exactly.

Batches of several prompts are tested in test_batching.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
)
from specbench.engine.costs import measure_step_costs
from specbench.engine.fusion import fuse_projections
from specbench.engine.scoring import output_log_likelihood
from specbench.engine.tree import build_tree, walk_greedy
from specbench.testing import GPTJ_SPARE_ROWS, make_model, one_torch_thread
from tests.fake_time import install

single_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

VOCAB = 300
PROMPT = [5, 17, 42, 99, 7, 5, 17, 42, 120, 33, 8, 250, 61, 5, 17]
SETTINGS = DecodeSettings(max_new_tokens=40, eos_token_ids=frozenset())


@pytest.fixture(scope="module")
def verifiers():
    return {arch: make_model(arch, VOCAB, seed=1, layers=3) for arch in ("gpt2", "gptj", "llama")}


@pytest.fixture(scope="module")
def drafts():
    return {arch: make_model(arch, VOCAB, seed=2, layers=1) for arch in ("gpt2", "gpt_neo")}


def drafter(model, name="draft"):
    return ModelDrafter(name, CachedModel(model, VOCAB))


def baseline(verifier: CachedModel, prompt: list[int] = PROMPT, settings: DecodeSettings = SETTINGS) -> DecodeResult:
    """The verifier-only decode of one prompt (a batch of one)."""
    return decode_baseline(verifier, [prompt], settings, [0]).rows[0]


def speculative(
    verifier: CachedModel, drafters: list[Drafter], k: int, settings: DecodeSettings = SETTINGS, **options
) -> DecodeResult:
    """The speculative decode of PROMPT alone, at a constant k unless a schedule is given."""
    schedule = options.pop("schedule", ConstantK(k))
    return decode_speculative(
        verifier, drafters, [PROMPT], settings, schedule, [options.pop("seed", 0)], **options
    ).rows[0]


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_baseline_equals_generate(verifiers, arch):
    model = verifiers[arch]
    ours = baseline(CachedModel(model, VOCAB)).tokens
    spare = list(range(VOCAB, model.config.vocab_size))  # GPT-J's head rows the tokenizer lacks
    reference = model.generate(
        torch.tensor([PROMPT]),
        max_new_tokens=40,
        min_new_tokens=40,
        do_sample=False,
        suppress_tokens=spare or None,
        pad_token_id=0,
    )[0, len(PROMPT) :].tolist()
    assert ours == reference


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
@pytest.mark.parametrize("draft_arch", ["gpt2", "gpt_neo"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_random_draft_is_lossless(verifiers, drafts, arch, draft_arch, k):
    verifier = CachedModel(verifiers[arch], VOCAB)
    spec = speculative(verifier, [drafter(drafts[draft_arch])], k)
    assert spec.tokens == baseline(verifier).tokens
    assert spec.accepted < spec.proposed  # a random draft is mostly wrong, so rollback was exercised
    assert spec.verifier_calls == spec.steps + 1


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
@pytest.mark.parametrize("k", [1, 4])
def test_verifier_as_its_own_draft_accepts_everything(verifiers, arch, k):
    verifier = CachedModel(verifiers[arch], VOCAB)
    spec = speculative(verifier, [drafter(verifiers[arch])], k)
    assert spec.tokens == baseline(verifier).tokens
    assert spec.accepted == spec.proposed > 0
    assert spec.accepted_by_position == spec.proposed_by_position
    # 39 tokens after the first, k + 1 per step
    assert spec.steps == -(-39 // (k + 1))


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_draft_set_verified_as_a_tree_is_lossless(verifiers, drafts, arch):
    verifier = CachedModel(verifiers[arch], VOCAB)
    members = [
        drafter(drafts["gpt2"], "random_gpt2"),
        drafter(verifiers[arch], "self"),
        drafter(drafts["gpt_neo"], "random_neo"),
        PromptLookupDrafter("lookup", max_ngram=2),
    ]
    spec = speculative(verifier, members, 4)
    assert spec.tokens == baseline(verifier).tokens
    assert spec.drafters["self"].accepted == spec.accepted  # the perfect draft covers every accepted path
    assert spec.drafters["self"].wins == sum(1 for a in spec.accepted_per_step if a)
    assert spec.drafters["random_gpt2"].accepted < spec.drafters["random_gpt2"].proposed


def test_tree_pass_matches_separate_chain_passes(verifiers):
    """Each branch's logits from one tree-masked pass equal those of running that branch alone."""
    for arch, model in verifiers.items():
        branches = [[11, 12, 13], [11, 14], [21, 22, 23, 24], [11, 12, 15]]
        tree = build_tree(PROMPT[-1], branches)
        assert not tree.is_chain and tree.size == 1 + 9
        cached = CachedModel(model, VOCAB)
        cached.prefill([PROMPT[:-1]])
        tree_logits = cached.forward(torch.tensor([tree.tokens]), None, [tree.parents], logits_to_keep=tree.size)[0]
        for branch_tokens, branch_nodes in zip(branches, tree.branches, strict=True):
            chain = CachedModel(model, VOCAB)
            chain_logits = chain.prefill([PROMPT + branch_tokens], logits_to_keep=len(branch_tokens) + 1)[0]
            rows = [0, *branch_nodes]
            torch.testing.assert_close(tree_logits[rows], chain_logits, rtol=1e-4, atol=1e-4, msg=arch)


@pytest.mark.parametrize("max_len", [None, 64])
def test_cache_compaction_keeps_only_the_accepted_branch(verifiers, max_len):
    model = verifiers["llama"]
    tree = build_tree(PROMPT[-1], [[11, 12], [21, 22, 23]])
    cached = CachedModel(model, VOCAB, max_len=max_len)
    cached.prefill([PROMPT[:-1]])
    cached.forward(torch.tensor([tree.tokens]), None, [tree.parents], logits_to_keep=tree.size)
    cached.commit([[0, *tree.branches[1][:2]]])  # keep root, 21, 22
    assert cached.lengths == [len(PROMPT) + 2] and cached.columns == len(PROMPT) + 2
    after = cached.forward(torch.tensor([[5]]))
    fresh = CachedModel(model, VOCAB).prefill([[*PROMPT, 21, 22, 5]])
    torch.testing.assert_close(after, fresh, rtol=1e-4, atol=1e-4)


def test_walk_greedy_follows_the_argmax():
    tree = build_tree(0, [[1, 2, 3], [1, 4], [5]])
    # node order: 0 root, 1 "1", 2 "2", 3 "3", 4 "4", 5 "5"; verifier argmax after each node:
    argmax = [1, 4, 9, 9, 7, 9]
    path, nxt = walk_greedy(tree, argmax)
    assert [tree.tokens[n] for n in path] == [1, 4] and nxt == 7
    path, nxt = walk_greedy(tree, [8, 0, 0, 0, 0, 0])
    assert path == [] and nxt == 8


def test_eos_stops_both_modes_at_the_same_token(verifiers, drafts):
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    free = baseline(verifier).tokens
    eos = free[9]  # the 10th token becomes the stop token
    settings = DecodeSettings(max_new_tokens=40, eos_token_ids=frozenset({eos}))
    stopped = baseline(verifier, settings=settings)
    assert stopped.tokens == free[: free.index(eos) + 1]
    for k in (1, 4, 8):
        for members in ([drafter(drafts["gpt2"])], [drafter(verifiers["gpt2"])]):
            assert speculative(verifier, members, k, settings).tokens == stopped.tokens


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
def test_max_new_tokens_is_exact(verifiers, max_new_tokens):
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    settings = DecodeSettings(max_new_tokens=max_new_tokens)
    alone = baseline(verifier, settings=settings)
    assert len(alone.tokens) == max_new_tokens
    spec = speculative(verifier, [drafter(verifiers["gpt2"])], 5, settings)
    assert spec.tokens == alone.tokens
    assert max(spec.depth_per_step, default=0) <= max_new_tokens - 1  # never drafts past the budget
    assert set(spec.k_per_step) <= {5}  # the schedule's k, whatever the depth


def test_gptj_spare_logits_are_never_produced(verifiers, drafts):
    model = verifiers["gptj"]
    assert model.config.vocab_size == VOCAB + GPTJ_SPARE_ROWS
    cached = CachedModel(model, VOCAB)
    assert cached.prefill([PROMPT]).shape[-1] == VOCAB
    # Push the spare rows' bias up so they would win the argmax if they were not cut.
    with torch.no_grad():
        model.lm_head.bias[VOCAB:] += 100.0
    try:
        alone = baseline(cached)
        spec = speculative(cached, [drafter(drafts["gpt2"])], 3)
        unrestricted = model.generate(torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        with torch.no_grad():
            model.lm_head.bias[VOCAB:] -= 100.0
    assert max(alone.tokens) < VOCAB and spec.tokens == alone.tokens
    assert max(unrestricted[0, len(PROMPT) :].tolist()) >= VOCAB  # the head really prefers the spare ids


def test_adaptive_k_changes_k_and_stays_lossless(verifiers, drafts):
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    spec = speculative(verifier, [drafter(drafts["gpt2"])], 3, schedule=AdaptiveK(3, 8))
    assert spec.tokens == baseline(verifier).tokens
    assert len(set(spec.k_per_step)) > 1 and len(spec.proposed_by_position) == 8


def test_k_schedules():
    adaptive = AdaptiveK(3, 8)
    assert (adaptive.first, adaptive.max_k) == (3, 8)
    assert adaptive.next(4, 4, 4) == 6 and adaptive.next(7, 7, 7) == 8
    assert adaptive.next(4, 2, 4) == 3 and adaptive.next(1, 0, 1) == 1
    assert adaptive.next(4, 0, 0) == 4  # nothing offered (no prompt-lookup match): keep k
    assert adaptive.next(4, 2, 2) == 6  # a short proposal, fully accepted
    constant = ConstantK(4)
    assert (constant.first, constant.max_k, constant.next(4, 0, 4), constant.next(4, 4, 4)) == (4, 4, 4, 4)
    with pytest.raises(ValueError, match="k_max"):
        AdaptiveK(5, 4)


def test_prompt_lookup_copies_what_followed_the_latest_match():
    lookup = PromptLookupDrafter(max_ngram=3)
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3]
    assert lookup.lookup(tokens, 3) == [7, 8, 6]  # the latest earlier "1 2 3"
    assert lookup.lookup([1, 2, 3, 4], 2) == []
    assert lookup.lookup([4, 5, 6, 4], 5) == [5, 6, 4]  # falls back to the unigram "4"
    proposals = lookup.propose([tokens, [4, 5, 6, 4], tokens], [3, 5, 0], [])
    assert [proposal.tokens for proposal in proposals] == [[7, 8, 6], [5, 6, 4], []]


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_static_cache_gives_the_same_tokens(verifiers, drafts, arch):
    """The preallocated cache that CUDA graphs need: same outputs, rollback and tree compaction included."""
    dynamic = baseline(CachedModel(verifiers[arch], VOCAB)).tokens
    static_verifier = CachedModel(verifiers[arch], VOCAB, max_len=128)
    assert static_verifier.max_len == 128
    assert baseline(static_verifier).tokens == dynamic
    static_draft = ModelDrafter("draft", CachedModel(drafts["gpt2"], VOCAB, max_len=128))
    members = [static_draft, drafter(verifiers[arch], "self"), PromptLookupDrafter("lookup")]
    single = speculative(static_verifier, [static_draft], 4)
    assert single.tokens == dynamic and single.accepted < single.proposed  # rollbacks happened
    tree = speculative(static_verifier, members, 4)
    assert tree.tokens == dynamic and tree.drafters["draft"].wins < tree.steps  # candidates diverged


def test_static_cache_is_refused_where_attention_would_be_wrong(drafts):
    """GPT-Neo's local attention assumes the keys end at the query: it keeps the dynamic cache."""
    assert CachedModel(drafts["gpt_neo"], VOCAB, max_len=128).max_len is None


def test_static_cache_overflow_is_an_error(verifiers):
    cached = CachedModel(verifiers["gpt2"], VOCAB, max_len=len(PROMPT) + 2)
    with pytest.raises(ValueError, match="static cache holds"):
        baseline(cached)


def test_sliding_window_models_keep_the_dynamic_cache():
    """Their static layers keep host-side counters that crops cannot rewind."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)  # fmt: skip
    model = MistralForCausalLM(config).eval()
    cached = CachedModel(model, VOCAB, max_len=128)
    assert cached.max_len is None
    assert baseline(cached).tokens == baseline(CachedModel(model, VOCAB)).tokens


def test_no_draft_prefill_when_the_first_token_ends_decoding(verifiers, drafts):
    settings = DecodeSettings(max_new_tokens=1)
    spec = speculative(CachedModel(verifiers["gpt2"], VOCAB), [drafter(drafts["gpt2"])], 3, settings)
    assert len(spec.tokens) == 1 and spec.draft_prefill_s == 0.0 and spec.steps == 0


def test_parallel_drafting_gives_the_same_output(verifiers, drafts):
    from concurrent.futures import ThreadPoolExecutor

    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    members = [drafter(drafts["gpt2"], "a"), drafter(drafts["gpt_neo"], "b"), PromptLookupDrafter("lookup")]
    sequential = speculative(verifier, members, 3)
    with ThreadPoolExecutor(3) as pool:
        parallel = speculative(verifier, members, 3, pool=pool)
        sampling = DecodeSettings(max_new_tokens=20, do_sample=True)
        sampled = [speculative(verifier, members, 3, sampling, seed=4, pool=p).tokens for p in (None, pool)]
    assert parallel.tokens == sequential.tokens == baseline(verifier).tokens
    assert sampled[0] == sampled[1]  # each drafter has its own seeded generator: threads change nothing


RUN_FACTORS = (16, 1, 4, 2)  # a shape's first run (the warm-up) is slow; the median of the next three is 2


def test_step_costs_by_batch_size(verifiers, drafts, monkeypatch):
    """Under fake time, a pass of b rows x n tokens costs b n / 8 s (the draft's b n / 16 s) times RUN_FACTORS for
    the shape's successive runs: each cost must be exactly twice that, the median of the timed runs alone."""
    fake = install(monkeypatch)
    runs: dict[tuple, int] = {}

    def pass_s(name: str, seconds_per_token: float):
        def seconds(input_ids: torch.Tensor) -> float:
            shape = (name, *input_ids.shape)
            runs[shape] = runs.get(shape, 0) + 1
            return seconds_per_token * input_ids.numel() * RUN_FACTORS[(runs[shape] - 1) % len(RUN_FACTORS)]

        return seconds

    verifier = fake.time_passes(CachedModel(verifiers["llama"], VOCAB, max_len=64), pass_s("verifier", 1 / 8), "v")
    draft = fake.time_passes(CachedModel(drafts["gpt2"], VOCAB), pass_s("draft", 1 / 16), "draft")
    members = [ModelDrafter("draft", draft), PromptLookupDrafter("lookup")]
    shapes = {1: (1, 2, 3), 2: (1, 3), 4: (1, 3)}
    costs = measure_step_costs(verifier, members, [PROMPT], SETTINGS, shapes, repeats=3)
    assert costs.verify_s == {size: {n: 2 * size * n / 8 for n in counts} for size, counts in shapes.items()}
    assert costs.draft_s == {size: {"draft": 2 * size / 16, "lookup": 0.0} for size in shapes}  # one token per row
    assert verifier.lengths == [0]  # left reset for whatever runs next
    # a budget the first batch size already spends stops the grid there
    slow = measure_step_costs(verifier, members, [PROMPT], SETTINGS, shapes, repeats=1, budget_s=1e-9)
    assert set(slow.verify_s) == {1}


def test_a_pass_measured_dearer_than_a_larger_one_is_measured_again(verifiers, monkeypatch, caplog):
    """Under fake time a pass of b rows x n tokens costs b n / 8 s times RUN_FACTORS (a median of twice that). Two
    rows of one token are slowed 5x in their first measurement only, one row of two tokens in every one: the first
    is measured again and keeps its undisturbed cost, the second stays dear after two more measurements and is
    reported."""
    fake = install(monkeypatch)
    runs: dict[tuple, int] = {}

    def seconds(input_ids: torch.Tensor) -> float:
        shape = tuple(input_ids.shape)
        runs[shape] = runs.get(shape, 0) + 1
        slowed = shape == (1, 2) or (shape == (2, 1) and runs[shape] <= len(RUN_FACTORS))
        return input_ids.numel() / 8 * RUN_FACTORS[(runs[shape] - 1) % len(RUN_FACTORS)] * (5 if slowed else 1)

    verifier = fake.time_passes(CachedModel(verifiers["llama"], VOCAB, max_len=64), seconds, "v")
    costs = measure_step_costs(verifier, [], [PROMPT], SETTINGS, {1: (1, 2, 3), 2: (1, 3), 4: (1,)}, repeats=3)
    assert costs.verify_s == {1: {1: 0.25, 2: 2.5, 3: 0.75}, 2: {1: 0.5, 3: 1.5}, 4: {1: 1.0}}
    assert runs[(2, 1)] == 2 * len(RUN_FACTORS) and runs[(1, 2)] == 3 * len(RUN_FACTORS)
    assert costs.dearer_than_larger() == {(1, 2): (1, 3)}
    assert costs.disturbed_passes() == [
        "a verifier pass over 2 tokens at 1 rows measured 2500.0 ms, more than over 3 tokens at 1 rows (750.0 ms)"
    ]
    assert [record.getMessage().split(", and so again")[0] for record in caplog.records] == [
        "cost surface: " + costs.disturbed_passes()[0]
    ]  # named in a warning, once


def test_log_likelihood_is_the_sum_of_token_log_probabilities(verifiers):
    model = verifiers["gptj"]
    output = [3, 250, 7]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + output])).logits[0, len(PROMPT) - 1 : -1, :VOCAB]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(output)[:, None]).sum().item()
    assert output_log_likelihood(CachedModel(model, VOCAB), PROMPT, output) == pytest.approx(expected, abs=1e-4)


def test_step_costs_keep_the_buffers_a_decode_set_up_before_and_free_their_own(verifiers):
    """Graphs captured before the costs are measured replay the buffers of their batch size: those must survive."""
    verifier = CachedModel(verifiers["llama"], VOCAB, max_len=64)
    verifier.reset(4)  # a decode's batch size, set up (on a GPU: graphs captured) before the costs are measured
    buffers = verifier.cache
    measure_step_costs(verifier, [], [PROMPT], SETTINGS, {2: (1,), 4: (1, 2)}, repeats=1)
    assert verifier.held_batch_sizes == {1, 4}  # batch size 2 was the measurement's own
    verifier.reset(4)
    assert verifier.cache is buffers


class LookupWithoutMemoryFrom(PromptLookupDrafter):
    """Prompt lookup that runs out of memory from a given batch size on, as a large model would on a GPU."""

    def __init__(self, batch_size: int) -> None:
        super().__init__("lookup")
        self.too_large = batch_size

    def reset(self, batch_size: int) -> None:
        if batch_size >= self.too_large:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test drafter)")


def test_step_costs_stop_at_the_first_batch_size_out_of_memory(verifiers):
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    shapes = {size: (1, 2) for size in (1, 2, 4, 8)}
    costs = measure_step_costs(verifier, [LookupWithoutMemoryFrom(4)], [PROMPT], SETTINGS, shapes, repeats=1)
    assert set(costs.verify_s) == set(costs.draft_s) == {1, 2}


@pytest.mark.parametrize(("arch", "stacked_outputs"), [("gptj", 4), ("llama", 3)])
def test_fused_projections_keep_the_outputs(arch, stacked_outputs):
    """q/k/v, and in GPT-J's parallel blocks the MLP's input projection too, in one product: same outputs."""
    fused, plain = make_model(arch, VOCAB, seed=4, layers=2), make_model(arch, VOCAB, seed=4, layers=2)
    assert fuse_projections(fused) == 2  # one per layer
    stacks = [module.stacked_projection for module in fused.modules() if hasattr(module, "stacked_projection")]
    assert [len(stack.sizes) for stack in stacks] == [stacked_outputs] * 2
    weights = [sum(p.numel() for p in model.parameters() if p.dim() > 1) for model in (fused, plain)]
    assert weights[0] == weights[1]  # each matrix once (a stacked bias has zeros for layers without one)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(stack.last is None for stack in stacks)  # no product outlives its forward
    settings = DecodeSettings(max_new_tokens=20)
    fused_tokens = baseline(CachedModel(fused, VOCAB), settings=settings).tokens
    assert fused_tokens == baseline(CachedModel(plain, VOCAB), settings=settings).tokens


class Projections(nn.Module):
    """q/k/v of one input, with a bias on some of them only."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4, bias=False), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def test_stacked_projections_keep_each_bias_and_answer_any_input():
    torch.manual_seed(0)
    fused = nn.Sequential(Projections())
    plain = Projections().requires_grad_(False)
    plain.load_state_dict(fused[0].state_dict())
    assert fuse_projections(fused) == 1
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        for got, expected in zip(fused[0](x), plain(x), strict=True):
            torch.testing.assert_close(got, expected)
        fused[0].q_proj(x)  # leaves the product of x for k and v
        torch.testing.assert_close(fused[0].k_proj(y), plain.k_proj(y))  # another input: its own product


def test_compiled_stacked_projections_run_one_product_per_layer():
    """Under torch.compile (the engine's compiled steps) each layer runs the stacked product once."""
    fused, plain = make_model("gptj", VOCAB, seed=4, layers=2), make_model("gptj", VOCAB, seed=4, layers=2)
    fuse_projections(fused)
    traced = []

    def record(graph_module: torch.fx.GraphModule, example_inputs: list):
        traced.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = torch.compile(fused, backend=record, fullgraph=True)(ids).logits
        torch.testing.assert_close(logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    # per layer: the stacked product, the attention's output and the MLP's output; then the head
    assert traced.count(torch._C._nn.linear) == 2 * 3 + 1
