"""Speculative sampling keeps the verifier's *warped* law beyond the first token.

Temperature, top-k and top-p act together. For output positions 2 to 4 (what drafts,
acceptance, rejection and the residual produce; position 1 is the verifier's own
prefill sample) every draw is compared with the exact conditional law of the
verifier, computed here from the raw model and the warpers' definitions, not with
the engine's code. The comparison is the randomised probability integral transform:
given the tokens before it, a token x drawn from law p maps to P(more likely than x)
+ V p(x), V ~ U(0, 1), which is U(0, 1) exactly; the values of all positions and
draws together are independent uniforms when every conditional law is right. A
Kolmogorov-Smirnov test checks that, and controls show the same check rejects a law
without the temperature, without top-k, without top-p, or without any warping.
Everything is seeded, so the outcome is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from specbench.engine import (
    CachedModel,
    ConstantK,
    DecodeSettings,
    ModelDrafter,
    PromptLookupDrafter,
    decode_speculative,
)
from specbench.testing import make_model

VOCAB = 8
PROMPT = [1, 2, 3, 4]
TEMPERATURE, TOP_K, TOP_P = 0.8, 5, 0.85
SETTINGS = DecodeSettings(max_new_tokens=4, do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
POSITIONS = (1, 2, 3)  # 0-based: output positions 2, 3 and 4
DRAWS = 1000


def tiny_model(seed: int) -> torch.nn.Module:
    model = make_model("gpt2", VOCAB, seed=seed, layers=1, context=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # peaked enough that top-k and top-p cut, flat enough to sample
    return model


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a thread pool costs more than it saves on models this small
    yield tiny_model(0), tiny_model(1)
    torch.set_num_threads(threads)


def warped_law(logits: torch.Tensor, temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P):
    """Temperature, then top-k, then top-p (the smallest most-likely set holding top_p of the mass)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    probs[order[top_k:]] = 0
    probs /= probs.sum()
    mass_before = probs[order].cumsum(0) - probs[order]
    probs[order[mass_before >= top_p]] = 0
    return probs / probs.sum()


class ExactLaw:
    """The verifier's conditional law of the next token after PROMPT + prefix, from full (uncached) forwards."""

    def __init__(self, verifier: torch.nn.Module, warp) -> None:
        self.verifier, self.warp, self.cache = verifier, warp, {}

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self.cache:
            with torch.no_grad():
                logits = self.verifier(torch.tensor([[*PROMPT, *prefix]])).logits[0, -1]
            self.cache[prefix] = self.warp(logits)
        return self.cache[prefix]


@dataclass
class Draws:
    outputs: list[list[int]] = field(default_factory=list)
    first_step_accepted: int = 0  # draws whose position 2 is an accepted draft token
    first_step_rejected: int = 0  # draws whose position 2 was drawn after every draft token was rejected
    lookup_proposed: int = 0
    lookup_accepted: int = 0


def sample(verifier, drafters) -> Draws:
    cached = CachedModel(verifier, VOCAB)
    draws = Draws()
    for seed in range(DRAWS):
        (result,) = decode_speculative(cached, drafters, [PROMPT], SETTINGS, ConstantK(3), [seed]).rows
        draws.outputs.append(result.tokens)
        offered, accepted = result.offered_per_step[0], result.accepted_per_step[0]
        draws.first_step_accepted += accepted > 0
        draws.first_step_rejected += offered > 0 and accepted == 0
        if "lookup" in result.drafters:
            draws.lookup_proposed += result.drafters["lookup"].proposed
            draws.lookup_accepted += result.drafters["lookup"].accepted
    return draws


def pit_p_value(outputs: list[list[int]], law: ExactLaw) -> float:
    """KS p-value of the randomised PIT values of positions 2-4 under `law`; 0 if a token lies outside its support."""
    rng = np.random.default_rng(0)
    values = []
    for tokens in outputs:
        for position in POSITIONS:
            probs = law(tuple(tokens[:position])).numpy()
            token = tokens[position]
            if probs[token] == 0:
                return 0.0
            # tokens ordered from most to least likely: a law with too long a tail leaves the top of [0, 1] empty
            more_likely = (probs > probs[token]) | ((probs == probs[token]) & (np.arange(VOCAB) < token))
            values.append(probs[more_likely].sum() + rng.uniform() * probs[token])
    return kstest(values, "uniform").pvalue


# wrong laws: each leaves out one warper, or all of them
WRONG_LAWS = {
    "no temperature": lambda logits: warped_law(logits, temperature=1.0),
    "no top-k": lambda logits: warped_law(logits, top_k=VOCAB),
    "no top-p": lambda logits: warped_law(logits, top_p=1.0),
    "unwarped": lambda logits: warped_law(logits, temperature=1.0, top_k=VOCAB, top_p=1.0),
}


def check_law(verifier, draws: Draws) -> None:
    assert all(len(tokens) == 4 for tokens in draws.outputs)
    assert pit_p_value(draws.outputs, ExactLaw(verifier, warped_law)) > 1e-3
    # controls: the same draws and the same check reject a law without any one of the warpers
    for name, wrong in WRONG_LAWS.items():
        assert pit_p_value(draws.outputs, ExactLaw(verifier, wrong)) < 1e-6, name
    # both paths produced position 2, often: an accepted draft token, and a draw after rejection
    assert draws.first_step_accepted > DRAWS // 10 and draws.first_step_rejected > DRAWS // 10


def test_one_model_draft_keeps_the_warped_law_at_positions_2_to_4(models):
    verifier, draft = models
    draws = sample(verifier, [ModelDrafter("draft", CachedModel(draft, VOCAB))])
    check_law(verifier, draws)


def test_a_draft_set_with_prompt_lookup_keeps_the_warped_law_at_positions_2_to_4(models):
    verifier, draft = models
    drafters = [PromptLookupDrafter("lookup", max_ngram=2), ModelDrafter("draft", CachedModel(draft, VOCAB))]
    draws = sample(verifier, drafters)
    check_law(verifier, draws)
    assert 0 < draws.lookup_accepted < draws.lookup_proposed  # the one-hot draft was accepted and rejected too
