"""Micro-measurements behind the speedup model, by batch size: one draft step, one verifier pass over n tokens.

Speculative decoding pays when k draft steps plus one verifier pass over k+1
tokens per row cost less than the tokens they yield. On a GPU the verifier pass
costs about the same for 1 or 17 tokens at batch size 1, less so as the batch
grows; on a CPU it does not, so the curves are measured rather than assumed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from specbench.engine.cached_model import CachedModel
from specbench.engine.drafters import Drafter, ModelDrafter
from specbench.engine.sampling import DecodeSettings, TokenChooser
from specbench.engine.timing import Clock


@dataclass
class StepCosts:
    """Median seconds of the steps that make up speculative decoding, by batch size.

    A batch size that ran out of memory or was over the time budget, and every larger one,
    is missing from both dicts.
    """

    verify_s: dict[int, dict[int, float]]  # verify_s[b][n]: one verifier forward of b rows x n new tokens
    draft_s: dict[int, dict[str, float]]  # draft_s[b][name]: one drafting step (one token per row) of b rows


def measure_step_costs(
    verifier: CachedModel,
    drafters: list[Drafter],
    prompt_ids: list[int],
    settings: DecodeSettings,
    shapes: Mapping[int, Sequence[int]],
    repeats: int = 3,
    budget_s: float | None = None,
) -> StepCosts:
    """Time, for each batch size b of `shapes` (ascending), verifier passes of b rows x n tokens for each n of
    `shapes[b]`, and one step of each drafter at b rows.

    Every row reads `prompt_ids` first. Each shape runs once as a warm-up, then `repeats` times. The
    smallest batch size is always measured; a larger one is skipped, with every one after it, once the
    time spent so far (prefills included) plus its estimate (the last one's time, scaled by rows) would
    pass `budget_s`, or once a batch size ran out of memory.
    """
    clock = Clock(verifier.devices)

    def median_seconds(action: Callable[[], object], undo: Callable[[], None]) -> float:
        samples = []
        for _ in range(repeats + 1):  # the first pass of each shape is a warm-up
            start = clock.now()
            action()
            samples.append(clock.now() - start)
            undo()
        return statistics.median(samples[1:])

    costs = StepCosts({}, {})
    models = [verifier, *(drafter.model for drafter in drafters if isinstance(drafter, ModelDrafter))]
    start, last = clock.now(), None  # last: (batch size, seconds its measurement took)
    for batch in sorted(shapes):
        if budget_s is not None and last is not None and clock.now() - start + last[1] * batch / last[0] > budget_s:
            break
        began = clock.now()
        try:
            verify_s = _verify_passes(verifier, prompt_ids, batch, shapes[batch], median_seconds)
            draft_s = {
                drafter.name: _draft_step(drafter, prompt_ids, batch, settings, median_seconds) for drafter in drafters
            }
        except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError in newer releases
            verify_s = None
        for model in models:  # the static buffers of every size measured would add up
            model.release(batch)
        if verify_s is None:
            if verifier.device.type == "cuda":
                torch.cuda.empty_cache()
            break
        costs.verify_s[batch] = verify_s
        costs.draft_s[batch] = draft_s
        last = (batch, clock.now() - began)
    verifier.reset()
    for drafter in drafters:
        drafter.reset(1)
    return costs


def _verify_passes(
    verifier: CachedModel, prompt_ids: list[int], batch: int, token_counts: Sequence[int], median_seconds
) -> dict[int, float]:
    verifier.prefill([prompt_ids[:-1]] * batch)
    prefix = verifier.lengths
    longest = max(token_counts)
    new_ids = torch.tensor((prompt_ids * longest)[:longest], device=verifier.device).expand(batch, -1)
    return {
        n: median_seconds(
            lambda n=n: verifier.forward(new_ids[:, :n], logits_to_keep=n), lambda: verifier.truncate(prefix)
        )
        for n in token_counts
    }


def _draft_step(drafter: Drafter, prompt_ids: list[int], batch: int, settings: DecodeSettings, median_seconds):
    contexts, depths = [prompt_ids] * batch, [1] * batch
    choosers = [TokenChooser(settings, seed) for seed in range(batch)]
    drafter.reset(batch)
    drafter.prefill(contexts)
    # each proposal rolls the drafter back to the prompt less its last token, then drafts one token
    return median_seconds(lambda: drafter.propose(contexts, depths, choosers), lambda: None)
