"""The decoding engine: verifier-only and speculative decoding over cached models.

It knows nothing of Hydra or MLflow: it takes models and token ids, and returns
tokens, timings and acceptance counts.
"""

from specbench.engine.cached_model import CachedModel
from specbench.engine.decode import Clock, DecodeResult, DrafterStats, decode_baseline, decode_speculative
from specbench.engine.drafters import Drafter, ModelDrafter, PromptLookupDrafter, Proposal
from specbench.engine.sampling import DecodeSettings, TokenChooser

__all__ = [
    "CachedModel",
    "Clock",
    "DecodeResult",
    "DecodeSettings",
    "Drafter",
    "DrafterStats",
    "ModelDrafter",
    "PromptLookupDrafter",
    "Proposal",
    "TokenChooser",
    "decode_baseline",
    "decode_speculative",
]
