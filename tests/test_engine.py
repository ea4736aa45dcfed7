"""Greedy decoding: the baseline equals generate(), and speculative output equals the baseline exactly."""

from __future__ import annotations

import pytest
import torch

from specbench.engine import (
    CachedModel,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    TokenChooser,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.decode import next_k
from specbench.engine.tree import build_tree, tree_attention_mask, walk_greedy
from specbench.testing import GPTJ_SPARE_ROWS, make_model

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


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_baseline_equals_generate(verifiers, arch):
    model = verifiers[arch]
    ours = decode_baseline(CachedModel(model, VOCAB), PROMPT, SETTINGS).tokens
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
    baseline = decode_baseline(verifier, PROMPT, SETTINGS)
    spec = decode_speculative(verifier, [drafter(drafts[draft_arch])], PROMPT, SETTINGS, k=k)
    assert spec.tokens == baseline.tokens
    assert spec.accepted < spec.proposed  # a random draft is mostly wrong, so rollback was exercised
    assert spec.verifier_calls == spec.steps + 1


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
@pytest.mark.parametrize("k", [1, 4])
def test_verifier_as_its_own_draft_accepts_everything(verifiers, arch, k):
    verifier = CachedModel(verifiers[arch], VOCAB)
    baseline = decode_baseline(verifier, PROMPT, SETTINGS)
    spec = decode_speculative(verifier, [drafter(verifiers[arch])], PROMPT, SETTINGS, k=k)
    assert spec.tokens == baseline.tokens
    assert spec.accepted == spec.proposed > 0
    assert spec.accepted_by_position == spec.proposed_by_position
    # 39 tokens after the first, k + 1 per step
    assert spec.steps == -(-39 // (k + 1))


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_draft_set_verified_as_a_tree_is_lossless(verifiers, drafts, arch):
    verifier = CachedModel(verifiers[arch], VOCAB)
    baseline = decode_baseline(verifier, PROMPT, SETTINGS)
    members = [
        drafter(drafts["gpt2"], "random_gpt2"),
        drafter(verifiers[arch], "self"),
        drafter(drafts["gpt_neo"], "random_neo"),
        PromptLookupDrafter("lookup", max_ngram=2),
    ]
    spec = decode_speculative(verifier, members, PROMPT, SETTINGS, k=4)
    assert spec.tokens == baseline.tokens
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
        cached.forward(torch.tensor(PROMPT[:-1]))
        mask = tree_attention_mask(tree, cached.cache_len, cached.mask_width(tree.size), model.dtype, cached.device)
        positions = torch.tensor(tree.depths)[None] + cached.cache_len
        tree_logits = cached.forward(torch.tensor(tree.tokens), tree.size, positions, mask)
        for branch_tokens, branch_nodes in zip(branches, tree.branches, strict=True):
            chain = CachedModel(model, VOCAB)
            chain_logits = chain.forward(torch.tensor(PROMPT + branch_tokens), logits_to_keep=len(branch_tokens) + 1)
            rows = [0, *branch_nodes]
            torch.testing.assert_close(tree_logits[rows], chain_logits, rtol=1e-4, atol=1e-4, msg=arch)


def test_cache_compaction_keeps_only_the_accepted_branch(verifiers):
    model = verifiers["llama"]
    tree = build_tree(PROMPT[-1], [[11, 12], [21, 22, 23]])
    cached = CachedModel(model, VOCAB)
    cached.forward(torch.tensor(PROMPT[:-1]))
    start = cached.cache_len
    mask = tree_attention_mask(tree, start, cached.mask_width(tree.size), model.dtype, cached.device)
    cached.forward(torch.tensor(tree.tokens), tree.size, torch.tensor(tree.depths)[None] + start, mask)
    cached.keep_rows(start, [0, *tree.branches[1][:2]])  # keep root, 21, 22
    after = cached.forward(torch.tensor([5]))
    fresh = CachedModel(model, VOCAB).forward(torch.tensor([*PROMPT, 21, 22, 5]))
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
    free = decode_baseline(verifier, PROMPT, SETTINGS).tokens
    eos = free[9]  # the 10th token becomes the stop token
    settings = DecodeSettings(max_new_tokens=40, eos_token_ids=frozenset({eos}))
    baseline = decode_baseline(verifier, PROMPT, settings)
    assert baseline.tokens == free[: free.index(eos) + 1]
    for k in (1, 4, 8):
        for members in ([drafter(drafts["gpt2"])], [drafter(verifiers["gpt2"])]):
            assert decode_speculative(verifier, members, PROMPT, settings, k=k).tokens == baseline.tokens


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
def test_max_new_tokens_is_exact(verifiers, max_new_tokens):
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    settings = DecodeSettings(max_new_tokens=max_new_tokens)
    baseline = decode_baseline(verifier, PROMPT, settings)
    assert len(baseline.tokens) == max_new_tokens
    spec = decode_speculative(verifier, [drafter(verifiers["gpt2"])], PROMPT, settings, k=5)
    assert spec.tokens == baseline.tokens
    assert max(spec.k_per_step, default=0) <= max_new_tokens - 1  # never drafts past the budget


def test_gptj_spare_logits_are_never_produced(verifiers, drafts):
    model = verifiers["gptj"]
    assert model.config.vocab_size == VOCAB + GPTJ_SPARE_ROWS
    cached = CachedModel(model, VOCAB)
    assert cached.forward(torch.tensor(PROMPT)).shape[-1] == VOCAB
    # Push the spare rows' bias up so they would win the argmax if they were not cut.
    with torch.no_grad():
        model.lm_head.bias[VOCAB:] += 100.0
    try:
        baseline = decode_baseline(cached, PROMPT, SETTINGS)
        spec = decode_speculative(cached, [drafter(drafts["gpt2"])], PROMPT, SETTINGS, k=3)
        unrestricted = model.generate(torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        with torch.no_grad():
            model.lm_head.bias[VOCAB:] -= 100.0
    assert max(baseline.tokens) < VOCAB and spec.tokens == baseline.tokens
    assert max(unrestricted[0, len(PROMPT) :].tolist()) >= VOCAB  # the head really prefers the spare ids


def test_adaptive_k_changes_k_and_stays_lossless(verifiers, drafts):
    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    baseline = decode_baseline(verifier, PROMPT, SETTINGS)
    spec = decode_speculative(
        verifier, [drafter(drafts["gpt2"])], PROMPT, SETTINGS, k=3, k_schedule="heuristic", k_max=8
    )
    assert spec.tokens == baseline.tokens
    assert len(set(spec.k_per_step)) > 1
    assert next_k(4, 4, 4, "heuristic", 8) == 6 and next_k(7, 7, 7, "heuristic", 8) == 8
    assert next_k(4, 2, 4, "heuristic", 8) == 3 and next_k(1, 0, 1, "heuristic", 8) == 1
    assert next_k(4, 0, 4, "constant", 8) == 4
    assert next_k(4, 0, 0, "heuristic", 8) == 4  # nothing offered (no prompt-lookup match): keep k
    assert next_k(4, 2, 2, "heuristic", 8) == 6  # a short proposal, fully accepted


def test_prompt_lookup_copies_what_followed_the_latest_match():
    chooser = TokenChooser(SETTINGS)
    lookup = PromptLookupDrafter(max_ngram=3)
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3]
    assert lookup.propose(tokens, 3, chooser).tokens == [7, 8, 6]  # the latest earlier "1 2 3"
    assert lookup.propose([1, 2, 3, 4], 2, chooser).tokens == []
    assert lookup.propose([4, 5, 6, 4], 5, chooser).tokens == [5, 6, 4]  # falls back to the unigram "4"


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_static_cache_gives_the_same_tokens(verifiers, drafts, arch):
    """The preallocated cache that CUDA graphs need: same outputs, rollback and tree compaction included."""
    dynamic = decode_baseline(CachedModel(verifiers[arch], VOCAB), PROMPT, SETTINGS).tokens
    static_verifier = CachedModel(verifiers[arch], VOCAB, max_len=128)
    assert static_verifier.max_len == 128
    assert decode_baseline(static_verifier, PROMPT, SETTINGS).tokens == dynamic
    static_draft = ModelDrafter("draft", CachedModel(drafts["gpt2"], VOCAB, max_len=128))
    members = [static_draft, drafter(verifiers[arch], "self"), PromptLookupDrafter("lookup")]
    single = decode_speculative(static_verifier, [static_draft], PROMPT, SETTINGS, k=4)
    assert single.tokens == dynamic and single.accepted < single.proposed  # rollbacks happened
    tree = decode_speculative(static_verifier, members, PROMPT, SETTINGS, k=4)
    assert tree.tokens == dynamic and tree.drafters["draft"].wins < tree.steps  # candidates diverged


def test_static_cache_is_refused_where_attention_would_be_wrong(drafts):
    """GPT-Neo's local attention assumes the keys end at the query: it keeps the dynamic cache."""
    assert CachedModel(drafts["gpt_neo"], VOCAB, max_len=128).max_len is None


def test_static_cache_overflow_is_an_error(verifiers):
    cached = CachedModel(verifiers["gpt2"], VOCAB, max_len=len(PROMPT) + 2)
    with pytest.raises(ValueError, match="static cache holds"):
        decode_baseline(cached, PROMPT, SETTINGS)


def test_sliding_window_models_keep_the_dynamic_cache():
    """Their static layers keep host-side counters that crops cannot rewind."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)  # fmt: skip
    model = MistralForCausalLM(config).eval()
    cached = CachedModel(model, VOCAB, max_len=128)
    assert cached.max_len is None
    assert (
        decode_baseline(cached, PROMPT, SETTINGS).tokens
        == decode_baseline(CachedModel(model, VOCAB), PROMPT, SETTINGS).tokens
    )


def test_no_draft_prefill_when_the_first_token_ends_decoding(verifiers, drafts):
    settings = DecodeSettings(max_new_tokens=1)
    spec = decode_speculative(CachedModel(verifiers["gpt2"], VOCAB), [drafter(drafts["gpt2"])], PROMPT, settings, k=3)
    assert len(spec.tokens) == 1 and spec.draft_prefill_s == 0.0 and spec.steps == 0


def test_parallel_drafting_gives_the_same_output(verifiers, drafts):
    from concurrent.futures import ThreadPoolExecutor

    verifier = CachedModel(verifiers["gpt2"], VOCAB)
    members = [drafter(drafts["gpt2"], "a"), drafter(drafts["gpt_neo"], "b"), PromptLookupDrafter("lookup")]
    sequential = decode_speculative(verifier, members, PROMPT, SETTINGS, k=3)
    with ThreadPoolExecutor(3) as pool:
        parallel = decode_speculative(verifier, members, PROMPT, SETTINGS, k=3, pool=pool)
        sampling = DecodeSettings(max_new_tokens=20, do_sample=True)
        sampled = [
            decode_speculative(verifier, members, PROMPT, sampling, k=3, seed=4, pool=p).tokens for p in (None, pool)
        ]
    assert parallel.tokens == sequential.tokens == decode_baseline(verifier, PROMPT, SETTINGS).tokens
    assert sampled[0] == sampled[1]  # each drafter has its own seeded generator: threads change nothing
