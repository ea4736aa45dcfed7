"""A GGUF model in a llama.cpp context, behind the engine's `CachedModel` interface (one row).

The engine's decoders (`decode_baseline`, `decode_speculative`), its drafters, its
step-cost measurement and its log-likelihood scoring only ask a model for what
`CachedModel` offers: `prefill`, `forward` (new tokens after the cache; logits for the
last `logits_to_keep` of them), `commit` and `truncate` (roll the cache back), `lengths`,
`reset`. `LlamaCppModel` offers the same over llama.cpp's low-level C API
(`llama_cpp.llama_cpp`): one `llama_decode` per forward, with a batch whose positions
request logits as asked (every position of a verify pass), `llama_get_logits` read back
as a torch tensor, and `llama_memory_seq_rm` to drop rejected positions from the KV
cache. It holds one sequence: batch size 1, and chains only (a draft set's token tree
would need one llama.cpp sequence per branch).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from specbench.errors import ModelLoadError

INSTALL_HINT = 'pip install "specbench[llamacpp]" (make install does; it builds llama.cpp from source in minutes)'
GGUF_MAGIC = b"GGUF"
BATCH_TOKENS = 512  # tokens per llama_decode call: longer prefills are fed in slices of this many


def binding_installed() -> bool:
    """True when llama-cpp-python can be imported (without importing it: that loads llama.cpp)."""
    return importlib.util.find_spec("llama_cpp") is not None


def physical_cores() -> int:
    """The CPU's physical cores: llama.cpp's default thread count (hyper-threads only contend for the same units)."""
    import psutil  # the llamacpp extra's

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def is_gguf(path: Path) -> bool:
    """True when the file starts with GGUF's magic bytes."""
    with path.open("rb") as file:
        return file.read(len(GGUF_MAGIC)) == GGUF_MAGIC


@contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """torch on one thread while llama.cpp decodes, its previous thread count restored afterwards.

    The engine's torch work beside llama.cpp is small (argmax, softmax over a few rows), but torch's OpenMP
    threads keep spinning after each parallel op, on the cores llama.cpp's own threads need: on the 2-core
    machine a tiny model's decode step plus one softmax took 4.1 ms with 2 torch threads and 0.15 ms with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def binding():
    """The low-level binding, llama.cpp's own log lines silenced below errors (they would flood every run)."""
    from llama_cpp import llama_cpp  # optional dependency: imported when this backend runs

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the binding's log callback reads this level
    return llama_cpp


class LlamaCppModel:
    """One GGUF model, its llama.cpp context and the KV cache of one sequence.

    Logits are cut (or padded with -inf) to `vocab_size`, the verifier tokenizer's size, as
    `CachedModel` does, and copied out of llama.cpp's buffer (valid until the next forward).
    """

    plain_mask_only = False  # llama.cpp applies the model's own attention (windows included)
    graph_sizes: frozenset[int] = frozenset()  # no CUDA graphs to capture
    device = torch.device("cpu")
    devices = (torch.device("cpu"),)

    def __init__(self, path: Path, vocab_size: int, context: int, threads: int) -> None:
        self.path = path
        self.vocab_size = vocab_size
        api = self._api = binding()
        api.llama_backend_init()
        model = api.llama_model_load_from_file(str(path).encode(), api.llama_model_default_params())
        if not model:
            raise ModelLoadError(f"llama.cpp cannot load {path}: check that it is a complete GGUF model file.")
        params = api.llama_context_default_params()
        params.n_ctx = context
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = api.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the binding's `Llama` runs by default
        context_pointer = api.llama_init_from_model(model, params)
        if not context_pointer:
            api.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp cannot make a context of {context} tokens for {path}.")
        batch = api.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._model, self._context, self._batch = model, context_pointer, batch
        self._memory = api.llama_get_memory(context_pointer)
        self.n_vocab = api.llama_vocab_n_tokens(api.llama_model_get_vocab(model))
        self.n_ctx = api.llama_n_ctx(context_pointer)
        self.threads = threads
        self._free = weakref.finalize(self, _free, api, model, context_pointer, batch)
        self._length = 0
        self._last_feed: tuple[int, int] | None = None  # (cached tokens before the last forward, tokens fed)
        self.fed_positions = 0  # tokens fed by `forward` since the last prefill
        self.padded_positions = 0  # always 0: one row, no padding

    @property
    def compute_dtype(self) -> torch.dtype:
        """float16: llama.cpp keeps its KV cache and much of its activations in it (the dot products of quantized
        weights round activations coarser still), so near-ties judged at float16's unit are a lower bound."""
        return torch.float16

    @property
    def description(self) -> str:
        """llama.cpp's name for the model: architecture, size and quantisation (e.g. qwen2 1.5B Q4_K - Medium)."""
        buffer = ctypes.create_string_buffer(128)
        self._api.llama_model_desc(self._model, buffer, len(buffer))
        return buffer.value.decode()

    def close(self) -> None:
        """Free the context and the model now (otherwise when this object is collected)."""
        self._free()

    # ---- the CachedModel interface -----------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Number of rows: always one."""
        return 1

    @property
    def lengths(self) -> list[int]:
        """Cached tokens of the one row."""
        return [self._length]

    def reset(self, batch_size: int = 1) -> None:
        """Forget every cached token."""
        if batch_size != 1:
            raise ValueError(f"llama.cpp contexts decode one prompt at a time, not {batch_size}: use batch_size=1.")
        self._api.llama_memory_clear(self._memory, False)  # forget the cells; their contents are overwritten
        self._length = 0
        self._last_feed = None
        self.fed_positions = self.padded_positions = 0

    @property
    def held_batch_sizes(self) -> frozenset[int]:
        """None held per batch size: the context's buffers serve every step."""
        return frozenset()

    def release(self, batch_size: int) -> None:
        """Nothing to release: the context's buffers serve every step."""

    def capture_graphs(self, batch_sizes: Sequence[int] = (1,), shortest_prompt: int = 1) -> int:
        """No graphs on llama.cpp's CPU backend; returns 0."""
        return 0

    def prefill(self, prompts: Sequence[Sequence[int]], logits_to_keep: int = 1) -> torch.Tensor:
        """Start over with one prompt; return its last `logits_to_keep` logits, [1, keep, vocab]."""
        if len(prompts) != 1 or not prompts[0]:
            raise ValueError(f"llama.cpp contexts prefill one non-empty prompt, not {len(prompts)}")
        self.reset()
        tokens = list(prompts[0])
        first_kept = len(tokens) - logits_to_keep
        logits = []
        for start in range(0, len(tokens), BATCH_TOKENS):
            piece = tokens[start : start + BATCH_TOKENS]
            logits.append(self._decode(piece, max(first_kept - start, 0)))
        return torch.cat(logits, dim=0)[None]

    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], logits_to_keep: int = 1) -> torch.Tensor:
        """A static batch's start: the one prompt into slot 0 (rows never join a running context here)."""
        if list(slots) != [0] or self._length:
            raise ValueError("llama.cpp contexts hold one sequence: no row can join a running one (mode=batch only).")
        return self.prefill(prompts, logits_to_keep)

    def forward(
        self,
        input_ids: torch.Tensor,
        feed_lengths: Sequence[int] | None = None,
        tree_parents: Sequence[Sequence[int]] | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Feed `input_ids` [1, n] after the cached tokens; return the last `logits_to_keep` logits [1, keep, vocab]."""
        rows, count = input_ids.shape
        if tree_parents is not None:
            raise ValueError("llama.cpp contexts verify chains, not token trees: use a draft with one drafter.")
        if rows != 1 or count == 0 or (feed_lengths is not None and list(feed_lengths) != [count]):
            raise ValueError(f"fed ids of shape {tuple(input_ids.shape)} to one llama.cpp sequence")
        if count > BATCH_TOKENS:
            raise ValueError(f"a forward feeds at most {BATCH_TOKENS} tokens, not {count}")
        self._last_feed = (self._length, count)
        self.fed_positions += count
        return self._decode(input_ids[0].tolist(), count - (logits_to_keep or 1))[None]

    def commit(self, kept: Sequence[Sequence[int]]) -> None:
        """After a forward, keep the fed slots `kept[0]`: a prefix of the feed (an accepted chain)."""
        if self._last_feed is None:
            raise RuntimeError("commit follows a forward")
        (slots,) = kept
        before, count = self._last_feed
        if list(slots) != list(range(len(slots))) or len(slots) > count:
            raise ValueError(f"llama.cpp contexts keep a prefix of what they were fed, not slots {list(slots)}")
        self.truncate([before + len(slots)])

    def truncate(self, lengths: Sequence[int]) -> None:
        """Keep only the first `lengths[0]` cached tokens (a longer length changes nothing)."""
        self._last_feed = None
        (length,) = lengths
        if length < self._length:
            if not self._api.llama_memory_seq_rm(self._memory, 0, length, -1):
                raise RuntimeError(f"llama.cpp cannot remove positions {length}.. from {self.path.name}'s cache")
            self._length = length

    # ---- llama.cpp ---------------------------------------------------------------------------------

    def _decode(self, tokens: list[int], first_logits: int) -> torch.Tensor:
        """One llama_decode of `tokens` after the cache; the logits of tokens[first_logits:], [n, vocab]."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = self._length + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = index >= first_logits
        status = self._api.llama_decode(self._context, batch)
        if status != 0:
            raise RuntimeError(
                f"llama_decode returned {status} for {len(tokens)} tokens after {self._length} in {self.path.name} "
                f"(context of {self.n_ctx} tokens)"
            )
        self._length += len(tokens)
        rows = len(tokens) - min(first_logits, len(tokens))
        if rows == 0:  # a prefill slice before the logits asked for
            return torch.empty(0, self.vocab_size)
        buffer = np.ctypeslib.as_array(self._api.llama_get_logits(self._context), shape=(rows, self.n_vocab))
        logits = torch.from_numpy(buffer[:, : self.vocab_size].copy())
        if logits.shape[-1] < self.vocab_size:  # a model head smaller than the verifier's vocabulary
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=-torch.inf)
        return logits


def _free(api, model, context, batch) -> None:
    api.llama_batch_free(batch)
    api.llama_free(context)
    api.llama_model_free(model)
