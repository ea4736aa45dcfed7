"""llama-cpp-python's own decoding (`Llama.generate`, greedy), timed like our decoders.

- without a draft model: the binding's plain greedy loop, the reference our llama.cpp
  baseline must match token for token and in speed (tests, benchmarks);
- with `LlamaPromptLookupDecoding` as its `draft_model`: the binding's own speculative
  path (prompt lookup; the first match of the longest n-gram, k tokens), a third
  contender beside our baseline and speculation on the same prompts.

`generate` samples each token with llama.cpp's sampler chain; at temperature 0 that is
the greedy sampler alone (the repetition penalty of 1 changes nothing). The binding
exposes no acceptance counts; the verifier calls are its `eval` calls.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specbench.engine import BatchResult, DecodeResult, DecodeSettings
from specbench.engine.timing import Stopwatch, frozen_heap
from specbench.llamacpp.model import BATCH_TOKENS, binding


class NativeDecoder:
    """The binding's `Llama` on a GGUF file, greedy, optionally with its prompt-lookup draft model."""

    def __init__(self, path: Path, context: int, threads: int, lookup: tuple[int, int] | None = None) -> None:
        """`lookup`: (longest n-gram, k) for the binding's `LlamaPromptLookupDecoding`; None decodes plainly."""
        binding()  # silences llama.cpp's log lines
        from llama_cpp import Llama  # optional dependency
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = None
        if lookup is not None:
            max_ngram, k = lookup
            draft = LlamaPromptLookupDecoding(max_ngram_size=max_ngram, num_pred_tokens=k)
        self.llama = Llama(
            str(path),
            n_ctx=context,
            n_batch=BATCH_TOKENS,
            n_ubatch=BATCH_TOKENS,
            n_threads=threads,
            n_threads_batch=threads,
            draft_model=draft,
            # with a draft model the binding keeps every position's logits, but sizes their buffer by this flag
            # (n_batch rows without it): a context past n_batch tokens would overflow it
            logits_all=draft is not None,
            verbose=False,
        )
        self.evals = 0
        evaluate = self.llama.eval

        def counted_eval(tokens):  # generate() calls self.eval: one llama_decode per n_batch tokens
            self.evals += 1
            evaluate(tokens)

        self.llama.eval = counted_eval

    def decode_one(self, prompt_ids: list[int], settings: DecodeSettings) -> DecodeResult:
        """Greedy `generate` from a fresh cache until a stop token or the length limit."""
        if settings.do_sample:
            raise ValueError("the binding's own decoding is compared greedy only (its sampler chain is not ours)")
        self.llama.reset()  # otherwise generate() reuses the cached prefix of the previous prompt
        self.evals = 0
        tokens: list[int] = []
        ttft = None
        with frozen_heap():
            watch = Stopwatch(torch.device("cpu"))
            for token in self.llama.generate(prompt_ids, temp=0.0, repeat_penalty=1.0):
                if ttft is None:
                    ttft = watch.elapsed()
                tokens.append(token)
                if token in settings.eos_token_ids or len(tokens) >= settings.max_new_tokens:
                    break
            latency = watch.elapsed()
        return DecodeResult(tokens=tokens, latency_s=latency, ttft_s=ttft, verifier_calls=self.evals)

    def decode(self, prompts: list[list[int]], settings: DecodeSettings, seeds: list[int]) -> BatchResult:
        """The runner's decoder signature: a batch of one prompt (the seed is unused: greedy)."""
        (prompt,) = prompts
        row = self.decode_one(prompt, settings)
        return BatchResult([row], row.latency_s, verifier_positions=0, padded_positions=0)

    def close(self) -> None:
        """Free the binding's model and context now."""
        self.llama.close()
