"""transformers' own decoding, set up the way the benchmarks compare against it."""

from __future__ import annotations

import torch


def fixed_k(draft_model, k: int) -> None:
    """transformers' fixed-k assisted generation: constant schedule, no confidence early exit."""
    config = draft_model.generation_config
    config.num_assistant_tokens = k
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0


def generate_new_tokens(model, prompt: list[int], **kwargs) -> list[int]:
    """Greedy `model.generate()` (plain, assisted or prompt lookup); the tokens after the prompt."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[0, len(prompt) :].tolist()
