"""How the verifier sees a text: its likelihood (perplexity, the sampling-quality check), and how close its
choice of one token was (the near-tie behind a greedy disagreement in bfloat16)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specbench.engine.cached_model import CachedModel

# A near-tie: the top two logits within this many rounding units of the verifier's dtype (see `TopTwoGap`).
NEAR_TIE_UNITS = 4


@torch.inference_mode()
def output_log_likelihood(model: CachedModel, prompt_ids: list[int], output_ids: list[int]) -> float:
    """Sum of log p(output token | prompt, previous output) under the model's raw (unwarped) distribution."""
    if not output_ids:
        return 0.0
    logits = model.prefill([[*prompt_ids, *output_ids]], logits_to_keep=len(output_ids) + 1)[0, :-1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(output_ids, device=model.device)
    total = log_probs.gather(-1, targets[:, None]).sum().item()
    model.reset()
    return total


def rounding_unit(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s numbers at |value|: machine epsilon times the power of two at or below |value|.

    bfloat16 (eps 2^-7) at a logit of 20 spaces its numbers 0.125 apart; float32 (eps 2^-23) 2^16 times closer.
    """
    info = torch.finfo(dtype)
    return info.eps * 2.0 ** math.floor(math.log2(max(abs(value), info.tiny)))


@dataclass(frozen=True)
class TopTwoGap:
    """The verifier's top-1 minus top-2 logit at one position (in float32), and its dtype's rounding unit there.

    The near-tie rule: a gap of at most NEAR_TIE_UNITS units of the dtype at the top logit's magnitude.
    Two computations of the same logits that group their sums differently (verifying k+1 tokens at once
    or one) round apart by about that much, so such a gap can flip which token is greedy; a wider one
    cannot come from rounding alone.
    """

    gap: float
    top_logit: float
    rounding_unit: float

    @property
    def near_tie(self) -> bool:
        """Whether the gap is within NEAR_TIE_UNITS rounding units."""
        return self.gap <= NEAR_TIE_UNITS * self.rounding_unit


@torch.inference_mode()
def top_two_gap(model: CachedModel, prompt_ids: list[int], output_prefix: list[int]) -> TopTwoGap:
    """The model's top-two logit gap for the token after `prompt_ids` + `output_prefix`: one teacher-forced forward,
    the logits upcast to float32; the rounding unit is that of the dtype the model computed them in."""
    logits = model.prefill([[*prompt_ids, *output_prefix]])[0, -1]
    first, second = torch.topk(logits.float(), 2).values.tolist()
    model.reset()
    return TopTwoGap(first - second, first, rounding_unit(first, model.compute_dtype))
