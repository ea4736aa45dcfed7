"""Micro-measurements behind the speedup model: one draft step, and one verifier pass over n tokens.

Speculative decoding pays when k draft steps plus one verifier pass over k+1
tokens cost less than the tokens they yield. On a GPU the verifier pass costs
about the same for 1 or 17 tokens; on a CPU it does not, so the curve is
measured rather than assumed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from specbench.engine.cached_model import CachedModel
from specbench.engine.decode import Clock
from specbench.engine.drafters import Drafter
from specbench.engine.sampling import TokenChooser


@dataclass
class StepCosts:
    """Median seconds of the steps that make up speculative decoding."""

    verify_s: list[float]  # verify_s[n - 1]: one verifier forward over n new tokens
    draft_s: dict[str, float]  # one drafting step (one token) per drafter


def measure_step_costs(
    verifier: CachedModel,
    drafters: list[Drafter],
    prompt_ids: list[int],
    chooser: TokenChooser,
    max_tokens: int,
    repeats: int = 3,
) -> StepCosts:
    """Time verifier passes over 1..max_tokens tokens and one step of each drafter, after `prompt_ids`."""
    clock = Clock(verifier.device)
    verifier.reset()
    verifier.forward(torch.tensor(prompt_ids[:-1], device=verifier.device))
    prefix = verifier.cache_len
    new_ids = torch.tensor((prompt_ids * max_tokens)[:max_tokens], device=verifier.device)

    def time_once(action) -> float:
        start = clock.now()
        action()
        return clock.now() - start

    verify_s = []
    for n in range(1, max_tokens + 1):
        samples = []
        for _ in range(repeats + 1):  # the first pass at each size is a warm-up
            samples.append(time_once(lambda n=n: verifier.forward(new_ids[:n], logits_to_keep=n)))
            verifier.crop(prefix)
        verify_s.append(statistics.median(samples[1:]))

    draft_s = {}
    for drafter in drafters:
        drafter.reset()
        drafter.propose(prompt_ids, 1, chooser)  # fills the drafter's cache up to the last prompt token
        samples = [time_once(lambda d=drafter: d.propose(prompt_ids, 1, chooser)) for _ in range(repeats + 1)]
        draft_s[drafter.name] = statistics.median(samples[1:])
    return StepCosts(verify_s, draft_s)
