"""transformers' own `generate()` as a second engine (`engine.backend=transformers`).

The runner times these decoders exactly as it times ours (same prompts, warm-up,
clock, interleaving and seeds), and they return the engine's `DecodeResult`, so
metrics, tracking and reports work unchanged:
- baseline: `verifier.generate()`;
- speculative: `verifier.generate(assistant_model=draft)` at a fixed k (the assistant's
  `num_assistant_tokens=k`, constant schedule, confidence early exit off), or
  `generate(prompt_lookup_num_tokens=k)` for the prompt-lookup draft.

transformers exposes no acceptance counts. A forward pre-hook on the verifier records,
for each of its calls, how many tokens it was fed and how many its KV cache already
held (two integers per call, no device sync). Assisted generation has no separate
prefill: call 1 feeds the prompt and the first drafts; every later call feeds the last
committed token and the drafts; after each call the cache is cropped to every committed
token but the last. With C calls, a p-token prompt and n generated tokens:

    offered_i  = fed_i - (p at call 1, else 1)
    committed_i = p at call 1, else cached_i + 1     (committed_{C+1} = p + n)
    accepted_i = committed_{i+1} - committed_i - 1   (the verifier's own token is the +1)

so acceptance by position follows as in our engine. A forward hook reads the clock
once, when the verifier's first call returns (time to first token).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, GenerationConfig, PreTrainedModel

from specbench.engine import BatchResult, Clock, DecodeResult, DecodeSettings, DrafterStats
from specbench.engine.timing import frozen_heap, model_devices
from specbench.errors import ConfigError

if TYPE_CHECKING:  # the GPU benchmarks import this module on machines without Hydra
    from specbench.models import ModelSpec

Decoder = Callable[[list[int], DecodeSettings, int], DecodeResult]
BatchDecoder = Callable[[list[list[int]], DecodeSettings, list[int]], BatchResult]


def check_assistant(verifier: ModelSpec, name: str, draft: ModelSpec) -> None:
    """Refuse, before loading, a draft whose head size differs from the verifier's (GPT-2 drafts for GPT-J-6B).

    generate() then insists on universal assisted decoding, which re-tokenises the draft's
    text at every step: another algorithm than the shared-vocabulary one both engines compare.
    """
    verifier_size, draft_size = (
        AutoConfig.from_pretrained(spec.source, gguf_file=spec.gguf_file).get_text_config().vocab_size
        for spec in (verifier, draft)
    )
    if verifier_size != draft_size:
        raise ConfigError(
            f"draft '{name}' has a head of {draft_size} tokens and the verifier {verifier_size}, for which "
            "transformers' generate() runs universal assisted decoding (it re-tokenises text every step): use "
            "engine.backend=specbench, or a draft with the verifier's head size."
        )


def fixed_k(draft_model: PreTrainedModel, k: int) -> None:
    """transformers' fixed-k assisted generation: constant schedule, no confidence early exit.

    transformers reads the draft length from the assistant's generation config; its default
    threshold (0.4, re-tuned on the fly when scikit-learn is installed) would stop drafts early.
    """
    config = draft_model.generation_config
    config.num_assistant_tokens = k
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0


def generate_new_tokens(model: PreTrainedModel, prompt: list[int], **kwargs: Any) -> list[int]:
    """Greedy `model.generate()` (plain, assisted or prompt lookup) on one prompt; the tokens after the prompt."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[0, len(prompt) :].tolist()


def generation_config(
    model: PreTrainedModel, settings: DecodeSettings, vocab_size: int, **speculation: Any
) -> GenerationConfig:
    """The settings of one decode, and nothing from the checkpoint's generation_config.json.

    Every parameter transformers has a default for is set explicitly (a checkpoint's
    repetition_penalty or top_k would otherwise apply, which our engine does not do);
    logits past the tokenizer's vocabulary are suppressed, as our engine cuts them.
    """
    eos = sorted(settings.eos_token_ids)
    pad = model.generation_config.pad_token_id
    head = model.get_output_embeddings().weight.shape[0]
    defaults = GenerationConfig._get_default_generation_params()
    del defaults["max_length"]  # max_new_tokens sets the length
    config = defaults | {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "eos_token_id": eos,  # an empty list: no stop token (None would fall back to the checkpoint's)
        "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
        "suppress_tokens": list(range(vocab_size, head)) or None,
        **speculation,
    }
    if settings.do_sample:
        config |= {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    return GenerationConfig(**config)


class VerifierCalls:
    """What the verifier's forward calls reveal: (tokens fed, tokens already cached) per call, first return time."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[int, int]] = []
        self.first_returned_at: float | None = None

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: record the call's width and the cache length (shapes only, no sync)."""
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.calls.append((ids.shape[-1], cache.get_seq_length() if cache is not None else 0))

    def after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Forward hook: the first call's logits choose the first token; read the clock then, once."""
        if self.first_returned_at is None:
            self.first_returned_at = self.clock.now()


@contextmanager
def counting_calls(model: PreTrainedModel, clock: Clock) -> Iterator[VerifierCalls]:
    """Hook the model's forward calls for the duration of one decode."""
    calls = VerifierCalls(clock)
    handles = [
        model.register_forward_pre_hook(calls.before, with_kwargs=True),
        model.register_forward_hook(calls.after),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def step_counts(calls: list[tuple[int, int]], prompt_tokens: int, generated: int) -> tuple[list[int], list[int]]:
    """Draft tokens offered and accepted at each verifier call of transformers' assisted loop (module docstring)."""
    committed = [prompt_tokens] + [cached + 1 for _, cached in calls[1:]] + [prompt_tokens + generated]
    offered = [fed - (committed[i] - cached) for i, (fed, cached) in enumerate(calls)]
    accepted = [committed[i + 1] - committed[i] - 1 for i in range(len(calls))]
    if not all(0 <= kept <= drafts for kept, drafts in zip(accepted, offered, strict=True)):
        raise RuntimeError(
            f"the verifier's calls (fed, cached) = {calls} do not fit transformers' assisted loop as specbench "
            f"reads it (prompt {prompt_tokens}, {generated} generated): has this transformers version changed it?"
        )
    return offered, accepted


def _speculative_result(
    tokens: list[int],
    latency: float,
    ttft: float,
    calls: list[tuple[int, int]],
    prompt_tokens: int,
    settings: DecodeSettings,
    k: int,
    name: str,
) -> DecodeResult:
    offered, accepted = step_counts(calls, prompt_tokens, len(tokens))
    depth = max([k, *offered])
    emitted_before = [0]
    for kept in accepted[:-1]:
        emitted_before.append(emitted_before[-1] + kept + 1)
    unknown = math.nan  # transformers does not time drafting, verifying or the draft's prefill apart
    return DecodeResult(
        tokens=tokens,
        latency_s=latency,
        ttft_s=ttft,
        verifier_calls=len(calls),
        steps=len(calls),  # every call verifies drafts: none is a plain prefill
        proposed=sum(offered),
        accepted=sum(accepted),
        proposed_by_position=[sum(o >= p for o in offered) for p in range(1, depth + 1)],
        accepted_by_position=[sum(a >= p for a in accepted) for p in range(1, depth + 1)],
        k_per_step=[k] * len(calls),
        # k cut to what the length limit leaves (as our engine records it)
        depth_per_step=[max(min(k, settings.max_new_tokens - before - 1), 0) for before in emitted_before],
        offered_per_step=offered,
        accepted_per_step=accepted,
        draft_time_s=unknown,
        verify_time_s=unknown,
        drafters={
            name: DrafterStats(
                proposed=sum(offered),
                accepted=sum(accepted),
                wins=sum(1 for kept in accepted if kept),
                draft_time_s=unknown,
                prefill_s=unknown,
            )
        },
    )


class TransformersDecoders:
    """transformers' baseline and speculative decoding of one run, timed like our engine.

    Speculation uses `assistant` (a draft model) at a fixed k, or, without one, prompt
    lookup of k tokens matching n-grams of up to `lookup_ngram` tokens.
    """

    def __init__(
        self,
        verifier: PreTrainedModel,
        vocab_size: int,
        k: int,
        drafter_name: str,
        assistant: PreTrainedModel | None = None,
        lookup_ngram: int | None = None,
    ) -> None:
        self.verifier = verifier
        self.vocab_size = vocab_size
        self.k = k
        self.drafter_name = drafter_name
        self.assistant = assistant
        if assistant is not None:
            fixed_k(assistant, k)
            self.speculation: dict[str, Any] = {}
        else:
            self.speculation = {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": lookup_ngram}

    def baseline(self, prompt_ids: list[int], settings: DecodeSettings, seed: int) -> DecodeResult:
        """`verifier.generate()`; one verifier call per token."""
        tokens, latency, ttft, calls = self._generate(
            prompt_ids, settings, seed, generation_config(self.verifier, settings, self.vocab_size), {}
        )
        return DecodeResult(tokens=tokens, latency_s=latency, ttft_s=ttft, verifier_calls=len(calls))

    def spec(self, prompt_ids: list[int], settings: DecodeSettings, seed: int) -> DecodeResult:
        """Assisted generation or prompt lookup at a fixed k, with the counts the verifier's calls reveal."""
        config = generation_config(self.verifier, settings, self.vocab_size, **self.speculation)
        extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
        tokens, latency, ttft, calls = self._generate(prompt_ids, settings, seed, config, extra)
        return _speculative_result(tokens, latency, ttft, calls, len(prompt_ids), settings, self.k, self.drafter_name)

    def _generate(
        self, prompt_ids: list[int], settings: DecodeSettings, seed: int, config: GenerationConfig, extra: dict
    ) -> tuple[list[int], float, float, list[tuple[int, int]]]:
        """One timed `generate()` call: new tokens, latency, time to first token, the verifier's calls."""
        ids = torch.tensor([prompt_ids], device=self.verifier.device)
        mask = torch.ones_like(ids)
        if settings.do_sample:
            torch.manual_seed(seed)  # generate() samples from torch's global generators (every device's)
        clock = Clock(model_devices(self.verifier))
        with counting_calls(self.verifier, clock) as calls, torch.inference_mode(), frozen_heap():
            start = clock.now()
            output = self.verifier.generate(ids, attention_mask=mask, generation_config=config, **extra)
            latency = clock.now() - start
        return output[0, len(prompt_ids) :].tolist(), latency, calls.first_returned_at - start, calls.calls

    def as_dict(self) -> dict[str, BatchDecoder]:
        """The two contenders by mode, as the runner takes them: batches of one prompt (validation keeps
        `engine.backend=transformers` at batch size 1, which is all assisted generation takes)."""
        return {"baseline": _one_prompt_batches(self.baseline), "spec": _one_prompt_batches(self.spec)}


def _one_prompt_batches(decode: Decoder) -> BatchDecoder:
    def decode_batch(prompts: list[list[int]], settings: DecodeSettings, seeds: list[int]) -> BatchResult:
        (prompt,), (seed,) = prompts, seeds
        row = decode(prompt, settings, seed)
        return BatchResult([row], row.latency_s, verifier_positions=0, padded_positions=0)

    return decode_batch
