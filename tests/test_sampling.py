"""Sampling: speculative sampling keeps the verifier's distribution exactly, for one draft and for draft sets.

Each distribution test draws seeded samples, so its outcome is fixed; the
threshold (p > 0.001) is far from where a correct sampler lands, and a control
test shows the same check rejects a wrong sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from scipy.stats import chi2, chisquare

from specbench.engine import (
    AdaptiveK,
    BatchResult,
    CachedModel,
    ConstantK,
    DecodeResult,
    DecodeSettings,
    Drafter,
    KSchedule,
    ModelDrafter,
    PromptLookupDrafter,
    TokenChooser,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.sampling import accepts, residual_distribution
from specbench.engine.tree import build_tree, walk_sampling
from specbench.testing import make_model, one_torch_thread, untie_head

single_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

SAMPLING = DecodeSettings(max_new_tokens=5, do_sample=True)


def pooled_cells(counts: dict, probs: dict, draws: int) -> tuple[list[float], list[float]]:
    """Observed and expected counts of the cells expected at least 5 times, and of one cell pooling the rest."""
    total = sum(probs.values())
    expected = {key: draws * p / total for key, p in probs.items()}
    big = [key for key in expected if expected[key] >= 5]
    observed = [counts.get(key, 0) for key in big] + [draws - sum(counts.get(key, 0) for key in big)]
    wanted = [expected[key] for key in big] + [draws - sum(expected[key] for key in big)]
    if wanted[-1] < 1e-9:
        observed, wanted = observed[:-1], wanted[:-1]
    return observed, wanted


def chi_square_p(counts: dict, probs: dict, draws: int) -> float:
    """Goodness of fit of observed counts to exact probabilities (cells with tiny expectation pooled)."""
    return chisquare(*pooled_cells(counts, probs, draws)).pvalue


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
# Batches of four prompts of 1 to 8 tokens, and a stop token in the vocabulary: half the outputs stop before their
# 4th token, often on an accepted draft token inside a block; the others reach positions 3 and 4.
PROMPTS = [[1, 2, 3, 4], [5], [2, 2, 4, 1, 3, 5, 0, 1], [3, 1]]
STOP = 3
WHOLE = DecodeSettings(max_new_tokens=4, do_sample=True, eos_token_ids=frozenset({STOP}))


def law_models() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """A verifier and two drafts: a tiny GPT-2 with its own random output head (tied ones mostly repeat the last
    token), so that its law changes with the context, and two copies with noise added to the head, whose drafts
    are accepted about 60% of the time."""

    def model(noise_seed: int | None) -> torch.nn.Module:
        tiny = untie_head(make_model("gpt2", VOCAB, seed=0, layers=1, context=64), seed=10)
        with torch.no_grad():
            tiny.lm_head.weight.mul_(0.5)
            if noise_seed is not None:
                noise = torch.randn(tiny.lm_head.weight.shape, generator=torch.Generator().manual_seed(noise_seed))
                tiny.lm_head.weight.add_(0.2 * noise)
        return tiny

    return model(None), model(101), model(102)


@pytest.fixture(scope="module")
def small_models():
    return law_models()


def next_token_law(model: torch.nn.Module, context: list[int]) -> list[float]:
    """The model's law of the token after `context` (float64)."""
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([context])).logits[0, -1].double(), -1).tolist()


def output_law(
    model: torch.nn.Module, prompt: list[int], length: int, stops: frozenset[int] = frozenset()
) -> dict[tuple[int, ...], float]:
    """P(an output's first `length` tokens are t) under the model's own law, by enumerating every prefix (one
    forward per position); an output that ends on a stop token sooner is its shorter tuple."""
    law: dict[tuple[int, ...], float] = {}
    open_prefixes = {(): 1.0}  # prefixes without a stop, and their probability
    for position in range(length):
        with torch.no_grad():
            logits = model(torch.tensor([[*prompt, *prefix] for prefix in open_prefixes])).logits[:, -1]
        longer = {}
        for (prefix, mass), probs in zip(
            open_prefixes.items(), torch.softmax(logits.double(), -1).tolist(), strict=True
        ):
            for token, p in enumerate(probs):
                ends = token in stops or position == length - 1
                (law if ends else longer)[(*prefix, token)] = mass * p
        open_prefixes = longer
    return law


def batch_law(model: torch.nn.Module, prompts: list[list[int]], settings: DecodeSettings) -> dict[tuple, float]:
    """The law of (row, whole output) over batches of `prompts`: each row carries 1 / len(prompts) of the mass."""
    return {
        (row, *output): p / len(prompts)
        for row, prompt in enumerate(prompts)
        for output, p in output_law(model, prompt, settings.max_new_tokens, settings.eos_token_ids).items()
    }


def position_chi_square_p(
    counts: dict[tuple, int], model: torch.nn.Module, prompts: list[list[int]], first: int
) -> float:
    """Goodness of fit of every output token at position `first` (1-based) or later to the model's law given its
    row's prompt and the tokens before it: one chi-square summed over those contexts (a product of multinomials),
    each context's cells pooled as in chi_square_p. Deep positions keep their power here, where the law of whole
    outputs pools their rare sequences."""
    next_counts: dict[tuple, dict[int, int]] = {}
    for (row, *output), count in counts.items():
        for position in range(first - 1, len(output)):
            tokens = next_counts.setdefault((row, *output[:position]), {})
            tokens[output[position]] = tokens.get(output[position], 0) + count
    statistic = degrees = 0.0
    for (row, *prefix), tokens in next_counts.items():
        law = dict(enumerate(next_token_law(model, [*prompts[row], *prefix])))
        observed, expected = pooled_cells(tokens, law, sum(tokens.values()))
        if len(observed) > 1:
            statistic += chisquare(observed, expected).statistic
            degrees += len(observed) - 1
    return chi2.sf(statistic, degrees)


def sample_outputs(
    decode: Callable[[list[int]], BatchResult], prompts: list[list[int]], batches: int
) -> tuple[dict[tuple, int], list[DecodeResult]]:
    """Counts of (row, whole output) over `batches` batches of `prompts`, every row its own seed; every row's result."""
    counts: dict[tuple, int] = {}
    results = []
    for batch in range(batches):
        for row, result in enumerate(decode([len(prompts) * batch + row for row in range(len(prompts))]).rows):
            counts[(row, *result.tokens)] = counts.get((row, *result.tokens), 0) + 1
            results.append(result)
    return counts, results


def stops_inside_blocks(results: list[DecodeResult]) -> int:
    """Steps that ended on an accepted draft token: a step emits the verifier's own token unless a stop cut it."""
    return sum(result.steps - (len(result.tokens) - 1 - result.accepted) for result in results)


def law_p_values(
    counts: dict[tuple, int], model: torch.nn.Module, prompts: list[list[int]], settings: DecodeSettings
) -> tuple[float, float]:
    """Chi-square p-values of sampled whole outputs under `model`'s law: of whole outputs, and of positions >= 3."""
    whole = chi_square_p(counts, batch_law(model, prompts, settings), sum(counts.values()))
    return whole, position_chi_square_p(counts, model, prompts, 3)


def check_speculative_law(
    models: tuple[torch.nn.Module, ...],
    drafters: list[Drafter],
    schedule: KSchedule,
    settings: DecodeSettings,
    max_len: int | None,
    batches: int,
) -> None:
    """Sample batches of PROMPTS speculatively: whole outputs and positions >= 3 follow the verifier's law, both
    fail under a draft's law (the check has power), and acceptance, rejection and stops inside blocks all happen."""
    verifier_model, draft_model, _ = models
    verifier = CachedModel(verifier_model, VOCAB, max_len=max_len)

    def decode(seeds: list[int]) -> BatchResult:
        return decode_speculative(verifier, drafters, PROMPTS, settings, schedule, seeds)

    counts, results = sample_outputs(decode, PROMPTS, batches)
    accepted, proposed = sum(result.accepted for result in results), sum(result.proposed for result in results)
    assert 0 < accepted < proposed  # both acceptance and rejection paths were exercised
    assert stops_inside_blocks(results) > len(results) // 10
    assert sum(len(result.tokens) >= 4 for result in results) > len(results) // 4  # positions 3 and 4, often
    assert min(law_p_values(counts, verifier_model, PROMPTS, settings)) > 1e-3
    assert max(law_p_values(counts, draft_model, PROMPTS, settings)) < 1e-6  # control: the same samples, a wrong law


BATCHES = 300  # 1200 outputs


@pytest.mark.parametrize("draft_set", ["one", "two_models_and_lookup"])
def test_speculative_sampling_matches_the_verifier_distribution(small_models, draft_set):
    """Whole outputs (positions 1 to 4), batches of 4 rows, stops inside blocks: the verifier's law exactly."""
    _, draft_a, draft_b = small_models
    drafters: list[Drafter] = [ModelDrafter("a", CachedModel(draft_a, VOCAB))]
    if draft_set != "one":
        drafters += [ModelDrafter("b", CachedModel(draft_b, VOCAB)), PromptLookupDrafter("lookup", max_ngram=1)]
    check_speculative_law(small_models, drafters, ConstantK(3), WHOLE, None, BATCHES)


@pytest.mark.parametrize("model", ["verifier", "draft"])
def test_verifier_only_sampling_matches_the_exact_distribution(small_models, model):
    """The baseline samples the verifier's law; the control, sampling the draft's law, fails the same check."""
    verifier_model, draft_model, _ = small_models
    cached = CachedModel(verifier_model if model == "verifier" else draft_model, VOCAB)
    counts, _ = sample_outputs(lambda seeds: decode_baseline(cached, PROMPTS, WHOLE, seeds), PROMPTS, BATCHES)
    p_values = law_p_values(counts, verifier_model, PROMPTS, WHOLE)
    assert min(p_values) > 1e-3 if model == "verifier" else max(p_values) < 1e-6


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
    exact = output_law(verifier, PROMPT, 3)
    draws = 3000
    counts: dict[tuple[int, ...], int] = {}
    for start in range(0, draws, 50):  # 50 rows per batch, each its own seed: rows are independent
        batch = decode_speculative(cached, drafters, [PROMPT] * 50, SAMPLING, AdaptiveK(2, 4), range(start, start + 50))
        for row in batch.rows:
            counts[tuple(row.tokens[:3])] = counts.get(tuple(row.tokens[:3]), 0) + 1
    assert chi_square_p(counts, exact, draws) > 1e-3
