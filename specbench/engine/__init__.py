"""The decoding engine: verifier-only and speculative decoding of batches of prompts over cached models.

It knows nothing of Hydra or MLflow: it takes models and token ids, and returns
tokens, timings and acceptance counts. Everything is batch-first; a batch of one
prompt decodes exactly as a single sequence would (same forwards, no masks).

    decode_baseline(verifier, prompts, settings, seeds, read_ahead=None) -> BatchResult
    decode_speculative(verifier, drafters, prompts, settings, schedule, seeds, pool=None) -> BatchResult

- `verifier`: a `CachedModel` (the model, its vocabulary size, optionally a static
  cache `max_len` with CUDA `graph_sizes`); `drafters`: `ModelDrafter`s and
  `PromptLookupDrafter`s. Several drafters form a draft set, verified as one
  token tree per row (at any batch size).
- `prompts`: one list of token ids per row, any lengths; `seeds`: one per row. A
  row's output depends only on its prompt and seed, not on its batch mates.
- `schedule`: `ConstantK(k)` or `AdaptiveK(k, k_max)` (any `KSchedule`); each row keeps its own k.
- `BatchResult.rows[i]` is prompt i's `DecodeResult`; `padded_token_share` =
  padded_positions / verifier_positions is the share of the verifier's work spent on padding.

Before timing anything on a GPU, call `model.capture_graphs(batch_sizes)` on the
verifier and on each model drafter's `CachedModel`, on the main thread (and, where
rows join a running batch, `model.capture_joins(max_batch_size, shortest_prompt)`).
`needs_plain_causal_mask(config)` tells, before loading a model, that it cannot
verify draft sets nor run at batch size > 1 (the decoders raise ValueError if asked).
The module docstring of `cached_model` describes the ragged cache layout and its cost.
"""

from specbench.engine.attention import needs_plain_causal_mask
from specbench.engine.cached_model import CachedModel
from specbench.engine.decode import decode_baseline, decode_speculative
from specbench.engine.drafters import Drafter, ModelDrafter, PromptLookupDrafter, Proposal
from specbench.engine.results import BatchResult, DecodeResult, DrafterStats
from specbench.engine.sampling import DecodeSettings, TokenChooser
from specbench.engine.schedule import AdaptiveK, ConstantK, KSchedule
from specbench.engine.timing import Clock

__all__ = [
    "AdaptiveK",
    "BatchResult",
    "CachedModel",
    "Clock",
    "ConstantK",
    "DecodeResult",
    "DecodeSettings",
    "Drafter",
    "DrafterStats",
    "KSchedule",
    "ModelDrafter",
    "PromptLookupDrafter",
    "Proposal",
    "TokenChooser",
    "decode_baseline",
    "decode_speculative",
    "needs_plain_causal_mask",
]
