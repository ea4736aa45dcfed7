"""Choosing tokens from logits, and the speculative-sampling acceptance rule.

Greedy decoding takes the argmax. Sampling warps logits the way `generate()` does
(temperature, then top-k, then top-p, with transformers' own warpers) and draws
from the result. The same warping is applied to draft (q) and verifier (p)
logits, which is what keeps speculative sampling exact (Leviathan et al. 2023,
Chen et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class DecodeSettings:
    """What to generate: length, stop tokens and how tokens are chosen."""

    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    logprobs: bool = False  # keep the verifier's log-probability of every emitted token (perplexity)


def stream_seed(row_seed: int, role: int) -> int:
    """The seed of one random stream of a row: role 0 is the verifier's, role d + 1 drafter d's.

    numpy's SeedSequence hashes (row seed, role), so no two streams of a run share a seed (with a
    plain sum, prompt 0's drafter would draw what prompt 1's verifier draws).
    """
    return int(np.random.SeedSequence([row_seed % 2**64, role]).generate_state(1, np.uint64)[0])


class TokenChooser:
    """Turns logits into tokens (greedy or sampled) and into warped distributions.

    Random draws come from one seeded generator per device, so a seed makes a
    decode repeatable.
    """

    def __init__(self, settings: DecodeSettings, seed: int = 0) -> None:
        self.do_sample = settings.do_sample
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        warpers = LogitsProcessorList()
        if settings.do_sample:
            if settings.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                warpers.append(TopPLogitsWarper(settings.top_p))
        self._warpers = warpers

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded random generator for `device`."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped probabilities, float32, one row per row of `logits` ([n, vocab])."""
        scores = self._warpers(None, logits.float())
        return torch.softmax(scores, dim=-1)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of `logits`: argmax when greedy, a draw from the warped distribution otherwise."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        return self.sample(self.distribution(logits))

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """Draw one token per row of `probs`."""
        return torch.multinomial(probs, 1, generator=self.generator(probs.device)).view(-1)

    def uniforms(self, count: int) -> torch.Tensor:
        """`count` draws from U[0, 1), made on the host (no device work, nothing to wait for)."""
        return torch.rand(count, generator=self.generator(torch.device("cpu")))


def accepts(p_token: torch.Tensor, q_token: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The acceptance rule, elementwise: keep a draft token x with probability min(1, p(x) / q(x))."""
    return uniform * q_token < p_token


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dimension: where to sample from after the draft token was rejected.

    Where p and q agree everywhere (rejection then had probability 0) p is returned.
    """
    residual = (p - q).clamp_(min=0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), p)


def sample_by_uniforms(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [n, vocab] by inverting its CDF at `uniforms` [n] (exact; one batched op)."""
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(probs.device, probs.dtype)[:, None] * cdf[:, -1:]).contiguous()
    return torch.searchsorted(cdf, targets, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
