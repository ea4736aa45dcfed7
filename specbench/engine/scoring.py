"""How likely the verifier finds a text: the basis of perplexity and of the sampling-quality check."""

from __future__ import annotations

import torch

from specbench.engine.cached_model import CachedModel


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
