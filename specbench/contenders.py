"""Other engines timed beside ours on the same prompts (llama.cpp's own prompt lookup), in the run's units.

The runner decodes each prompt with every contender too, interleaved with our two modes
(`RunSetup.contenders`); each `PromptOutcome` keeps their results by mode name. A
contender's figures are ratios of sums like ours: its tokens over its time, over the
baseline's tokens over the baseline's time on the same decodes.
"""

from __future__ import annotations

from specbench.metrics import PromptOutcome, token_rate_ratio


def contender_metrics(outcomes: list[PromptOutcome]) -> dict[str, float]:
    """For each contender mode M: `M_tokens_per_s`, `speedup_M` (over our baseline) and `M_exact_match_rate`
    (share of decodes whose output equals our baseline's)."""
    metrics: dict[str, float] = {}
    modes = sorted({mode for outcome in outcomes for mode in outcome.contenders})
    baseline_tokens = sum(len(outcome.baseline.tokens) for outcome in outcomes)
    baseline_s = sum(outcome.baseline.latency_s for outcome in outcomes)
    for mode in modes:
        results = [(outcome.baseline, outcome.contenders[mode]) for outcome in outcomes]
        tokens = sum(len(result.tokens) for _, result in results)
        seconds = sum(result.latency_s for _, result in results)
        metrics[f"{mode}_tokens_per_s"] = tokens / seconds
        metrics[f"speedup_{mode}"] = float(token_rate_ratio(tokens, seconds, baseline_tokens, baseline_s))
        metrics[f"{mode}_exact_match_rate"] = sum(ours.tokens == theirs.tokens for ours, theirs in results) / len(
            results
        )
    return metrics
