"""The speedup model: why speculative decoding pays what it pays (Leviathan et al. 2023).

A step drafts k tokens (k draft steps of relative cost c each) and verifies k+1
tokens in one verifier pass (relative cost v, measured: it is not 1 on CPUs or
for some GEMM shapes). If each draft token is accepted independently with
probability alpha, a step yields (1 - alpha^(k+1)) / (1 - alpha) tokens, so

    predicted speedup = (1 - alpha^(k+1)) / ((1 - alpha) (k c + v)).

alpha is fitted to the measured accepted tokens per step; c and v come from the
step costs measured after the run (`specbench.engine.costs`).

The model describes one drafter at a constant k. A draft set is verified as a
tree (not a (k+1)-chain) and its drafters may run in parallel (their costs do not
add up); an adaptive k has no single k for alpha. For those runs only the
measured costs are logged, and `out_of_scope` says why there is no prediction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from specbench.engine.costs import StepCosts
from specbench.metrics import PromptOutcome


def iid_acceptance(mean_accepted: float, k: int) -> float:
    """The per-token acceptance probability alpha that yields `mean_accepted` drafts per k-token step.

    Leviathan et al. assume each draft token is accepted independently with
    probability alpha, so a step keeps alpha (1 - alpha^k) / (1 - alpha) drafts on
    average. The overall acceptance rate is not alpha; this inverts the formula.
    """
    target = min(max(mean_accepted, 0.0), float(k))
    low, high = 0.0, 1.0
    for _ in range(60):
        alpha = (low + high) / 2
        if sum(alpha**i for i in range(1, k + 1)) < target:
            low = alpha
        else:
            high = alpha
    return (low + high) / 2


def predicted_speedup(alpha: float, k: int, cost_ratio: float, verify_ratio: float) -> float:
    """Leviathan et al.'s speedup, with the measured cost of verifying k+1 tokens in place of 1.

    (1 - alpha^(k+1)) / ((1 - alpha) (k c + v)), c = draft step / verifier step,
    v = verifier pass over k+1 tokens / verifier pass over 1 token.
    """
    expected_tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return expected_tokens / (k * cost_ratio + verify_ratio)


def out_of_scope(drafters: int, adaptive_k: bool) -> str | None:
    """Why the model does not describe a run with `drafters` drafters (and an adaptive k); None when it does."""
    reasons = []
    if drafters > 1:
        reasons.append(
            f"its {drafters} drafters are verified as a tree, not a chain of k+1 tokens, and may draft in parallel"
        )
    if adaptive_k:
        reasons.append("k_schedule=heuristic changes k from step to step")
    if not reasons:
        return None
    return (
        "No predicted speedup: Leviathan et al.'s model describes one drafter at a constant k, "
        f"and in this run {' and '.join(reasons)}."
    )


def cost_metrics(costs: StepCosts, k: int) -> dict[str, float]:
    """The measured step costs: cost ratio c (drafters summed), the verifier step and v at k+1 tokens."""
    verify_one = costs.verify_s[0]
    metrics = {
        "draft_verifier_cost_ratio": sum(costs.draft_s.values()) / verify_one,
        "verify_step_ms": 1000 * verify_one,
        f"verify_cost_ratio_{k + 1}_tokens": costs.verify_s[k] / verify_one,
    }
    for name, seconds in costs.draft_s.items():
        metrics[f"draft_step_ms_{name}"] = 1000 * seconds
    return metrics


def prediction_metrics(costs: StepCosts, outcomes: list[PromptOutcome], k: int) -> dict[str, float]:
    """alpha, the predicted speedup at this k, and the k the model says is best (one drafter, constant k)."""
    verify_one = costs.verify_s[0]
    cost_ratio = sum(costs.draft_s.values()) / verify_one
    # steps that offered all k tokens: what the model's alpha is about
    full_steps = [
        accepted
        for o in outcomes
        for offered, accepted in zip(o.spec.offered_per_step, o.spec.accepted_per_step, strict=True)
        if offered == k
    ]
    alpha = iid_acceptance(float(np.mean(full_steps)), k) if full_steps else 0.0
    predictions = _predictions_by_k(alpha, cost_ratio, costs)
    best = max(predictions, key=predictions.get)
    return {
        "alpha_iid": alpha,
        "predicted_speedup": predicted_speedup(alpha, k, cost_ratio, costs.verify_s[k] / verify_one),
        "best_k_predicted": best,
        "predicted_speedup_best_k": predictions[best],
    }


def verify_curve_table(costs: StepCosts) -> pd.DataFrame:
    """The verify-cost curve: ms and ratio to one token, for n = 1.. new tokens."""
    base = costs.verify_s[0]
    return pd.DataFrame(
        {
            "new_tokens": range(1, len(costs.verify_s) + 1),
            "verify_ms": [1000 * t for t in costs.verify_s],
            "ratio_to_one_token": [t / base for t in costs.verify_s],
        }
    )


def _predictions_by_k(alpha: float, cost_ratio: float, costs: StepCosts) -> dict[int, float]:
    """Predicted speedup for every k the measured verify curve covers."""
    verify_one = costs.verify_s[0]
    return {
        k: predicted_speedup(alpha, k, cost_ratio, costs.verify_s[k] / verify_one)
        for k in range(1, len(costs.verify_s))
    }


def predicted_speedup_curve(metrics: dict[str, float], costs: StepCosts) -> pd.DataFrame:
    """Predicted speedup against k (for the predicted-vs-measured plot)."""
    predictions = _predictions_by_k(metrics["alpha_iid"], metrics["draft_verifier_cost_ratio"], costs)
    return pd.DataFrame({"k": list(predictions), "predicted_speedup": list(predictions.values())})
