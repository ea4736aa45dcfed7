"""Sampling: speculative sampling keeps the verifier's distribution exactly, for one draft and for draft sets.

Each distribution test draws seeded samples, so its outcome is fixed; the
threshold (p > 0.001) is far from where a correct sampler lands, and a control
test shows the same check rejects a wrong sampler.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from specbench.engine import (
    AdaptiveK,
    CachedModel,
    ConstantK,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    TokenChooser,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.sampling import accepts, residual_distribution
from specbench.engine.tree import build_tree, walk_sampling
from specbench.testing import make_model, one_torch_thread

single_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

SAMPLING = DecodeSettings(max_new_tokens=5, do_sample=True)


def chi_square_p(counts: dict, probs: dict, draws: int) -> float:
    """Goodness of fit of observed counts to exact probabilities (cells with tiny expectation pooled)."""
    total = sum(probs.values())
    expected = {key: draws * p / total for key, p in probs.items()}
    big = [key for key in expected if expected[key] >= 5]
    observed = [counts.get(key, 0) for key in big] + [draws - sum(counts.get(key, 0) for key in big)]
    wanted = [expected[key] for key in big] + [draws - sum(expected[key] for key in big)]
    if wanted[-1] < 1e-9:
        observed, wanted = observed[:-1], wanted[:-1]
    return chisquare(observed, wanted).pvalue


def test_acceptance_rule_on_hand_made_distributions():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.25, 0.5, 0.0, 0.25])
    # p(x) >= q(x): always accepted; p(x) < q(x): accepted with probability p/q
    assert accepts(p[0], q[0], torch.tensor(0.999))
    assert accepts(p[1], q[1], torch.tensor(0.59)) and not accepts(p[1], q[1], torch.tensor(0.61))
    assert not accepts(p[3], q[3], torch.tensor(0.0))
    residual = residual_distribution(p, q)
    torch.testing.assert_close(residual, torch.tensor([0.25, 0.0, 0.2, 0.0]) / 0.45)
    # P(out = x) = q(x) min(1, p(x)/q(x)) + P(reject) residual(x) = p(x), exactly
    kept = q * torch.clamp(p / q.clamp_min(1e-12), max=1.0)
    torch.testing.assert_close(kept + (1 - kept.sum()) * residual, p)
    assert torch.equal(residual_distribution(p, p), p)  # nothing to correct


@pytest.mark.parametrize("num_drafts", [1, 2, 3])
def test_tree_walk_keeps_the_verifier_distribution(num_drafts):
    """Multi-step speculative sampling over hand-made p and q: the first token is distributed as p."""
    generator = torch.Generator().manual_seed(num_drafts)
    vocab = 6
    p = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, -1)
    qs = [torch.softmax(torch.randn(vocab, generator=generator) * 1.5, -1) for _ in range(num_drafts)]
    chooser = TokenChooser(SAMPLING, seed=7)
    counts: dict[int, int] = {}
    draws = 20000
    for _ in range(draws):
        proposals = [[int(chooser.sample(q[None])[0])] for q in qs]
        tree = build_tree(0, proposals)
        verifier_probs = p.expand(tree.size, vocab)
        path, next_token = walk_sampling(tree, verifier_probs, [q[None] for q in qs], chooser)
        first = tree.tokens[path[0]] if path else next_token
        counts[first] = counts.get(first, 0) + 1
    assert chi_square_p(counts, dict(enumerate(p.tolist())), draws) > 1e-3


VOCAB = 6
PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def small_models():
    # Larger init spread gives peaked, different distributions: partial acceptance.
    def model(seed):
        torch.manual_seed(seed)
        m = make_model("gpt2", VOCAB, seed=seed, layers=1, context=64)
        with torch.no_grad():
            m.lm_head.weight.mul_(8)
        return m

    return model(0), model(1), model(2)


def exact_two_token_distribution(model) -> dict[tuple[int, int], float]:
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1], -1)
        probs = {}
        for a in range(VOCAB):
            second = torch.softmax(model(torch.tensor([[*PROMPT, a]])).logits[0, -1], -1)
            for b in range(VOCAB):
                probs[(a, b)] = float(first[a] * second[b])
    return probs


def sample_pairs(decode, draws: int) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for seed in range(draws):
        pair = tuple(decode(seed)[:2])
        counts[pair] = counts.get(pair, 0) + 1
    return counts


DRAWS = 2500


def test_verifier_only_sampling_matches_the_exact_distribution(small_models):
    verifier = small_models[0]
    cached = CachedModel(verifier, VOCAB)
    counts = sample_pairs(lambda seed: decode_baseline(cached, [PROMPT], SAMPLING, [seed]).rows[0].tokens, DRAWS)
    assert chi_square_p(counts, exact_two_token_distribution(verifier), DRAWS) > 1e-3


@pytest.mark.parametrize("draft_set", ["one", "two_models_and_lookup"])
def test_speculative_sampling_matches_the_verifier_distribution(small_models, draft_set):
    verifier, draft_a, draft_b = small_models
    cached = CachedModel(verifier, VOCAB)
    drafters = [ModelDrafter("a", CachedModel(draft_a, VOCAB))]
    if draft_set != "one":
        drafters += [ModelDrafter("b", CachedModel(draft_b, VOCAB)), PromptLookupDrafter("lookup", max_ngram=1)]
    accepted = proposed = 0

    def decode(seed):
        nonlocal accepted, proposed
        result = decode_speculative(cached, drafters, [PROMPT], SAMPLING, ConstantK(3), [seed]).rows[0]
        accepted, proposed = accepted + result.accepted, proposed + result.proposed
        return result.tokens

    counts = sample_pairs(decode, DRAWS)
    assert 0 < accepted < proposed  # both acceptance and rejection paths were exercised
    assert chi_square_p(counts, exact_two_token_distribution(verifier), DRAWS) > 1e-3


def test_the_check_rejects_a_sampler_with_the_wrong_distribution(small_models):
    """Control: sampling from the draft alone fails the same test, so the test has power."""
    verifier, draft, _ = small_models
    cached = CachedModel(draft, VOCAB)
    counts: dict[tuple[int, ...], int] = {}
    for start in range(0, DRAWS, 50):  # 50 rows per batch, each its own seed
        batch = decode_baseline(cached, [PROMPT] * 50, SAMPLING, list(range(start, start + 50)))
        for row in batch.rows:
            counts[tuple(row.tokens[:2])] = counts.get(tuple(row.tokens[:2]), 0) + 1
    assert chi_square_p(counts, exact_two_token_distribution(verifier), DRAWS) < 1e-6


def test_a_seed_repeats_a_sampled_decode(small_models):
    """The warped law itself is checked position by position in test_sampling_law.py."""
    verifier, draft, _ = small_models
    settings = DecodeSettings(max_new_tokens=12, do_sample=True, temperature=2.0, top_p=0.95, top_k=4)
    cached = CachedModel(verifier, VOCAB)
    drafters = [ModelDrafter("a", CachedModel(draft, VOCAB))]

    def decode(seed: int) -> list[int]:
        return decode_speculative(cached, drafters, [PROMPT], settings, ConstantK(3), [seed]).rows[0].tokens

    assert decode(5) == decode(5)
    assert len({tuple(decode(seed)) for seed in range(20)}) > 1  # other seeds draw other outputs


def test_sampled_continuations_of_three_tokens(small_models):
    """The joint law of three tokens (216 cells) under a draft set with adaptive k, in batches of 50 rows."""
    verifier, draft_a, draft_b = small_models
    cached = CachedModel(verifier, VOCAB)
    drafters = [ModelDrafter("a", CachedModel(draft_a, VOCAB)), ModelDrafter("b", CachedModel(draft_b, VOCAB))]
    with torch.no_grad():
        exact = {}
        for a, b in itertools.product(range(VOCAB), repeat=2):
            logits = verifier(torch.tensor([[*PROMPT, a, b]])).logits[0]
            probs = torch.softmax(logits, -1)
            first = torch.softmax(verifier(torch.tensor([PROMPT])).logits[0, -1], -1)[a]
            for c in range(VOCAB):
                exact[(a, b, c)] = float(first * probs[-2, b] * probs[-1, c])
    draws = 3000
    counts: dict[tuple[int, ...], int] = {}
    for start in range(0, draws, 50):  # 50 rows per batch, each its own seed: rows are independent
        batch = decode_speculative(cached, drafters, [PROMPT] * 50, SAMPLING, AdaptiveK(2, 4), range(start, start + 50))
        for row in batch.rows:
            counts[tuple(row.tokens[:3])] = counts.get(tuple(row.tokens[:3]), 0) + 1
    assert chi_square_p(counts, exact, draws) > 1e-3
