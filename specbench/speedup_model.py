"""The speedup model: why speculative decoding pays what it pays (Leviathan et al. 2023).

A step drafts k tokens (k draft steps of relative cost c each) and verifies k+1
tokens in one verifier pass (relative cost v, measured: it is not 1 on CPUs or
for some GEMM shapes). If each draft token is accepted independently with
probability alpha, a step yields (1 - alpha^(k+1)) / (1 - alpha) tokens, so

    predicted speedup = (1 - alpha^(k+1)) / ((1 - alpha) (k c + v)).

alpha is fitted to the measured accepted tokens per step; c and v come from the
step costs measured after the run (`specbench.engine.costs`).

At batch size b, c and v are measured at b rows, and one more effect counts: a
batch runs until its longest row ends, finished rows riding along. Each row needs
the same verifier calls whatever its batch (greedy rows decode as if alone), so
the run's own per-prompt counts tell what a batch of b prompts drawn from the
run's prompts costs in each mode: the expected largest of b draws
(`finished_rows_factor`), which grows with b. Past EXTRAPOLATED_BEYOND times the
prompt count, most of those b rows repeat prompts and the largest is that of the
few prompts measured, so the prediction is optimistic and marked extrapolated.

The model describes one drafter at a constant k. A draft set is verified as a
tree (not a (k+1)-chain) and its drafters may run in parallel (their costs do not
add up); an adaptive k has no single k for alpha. For those runs only the
measured costs are logged, and `out_of_scope` says why there is no prediction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from specbench.catalog import EXTRAPOLATED_BEYOND
from specbench.engine.costs import StepCosts
from specbench.engine.results import DecodeResult
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


def full_step_alpha(results: Iterable[DecodeResult], k: int) -> float | None:
    """`iid_acceptance` of the steps that offered all k drafts (what the model's alpha is about), over `results`;
    None when no step did."""
    full_steps = [
        accepted
        for result in results
        for offered, accepted in zip(result.offered_per_step, result.accepted_per_step, strict=True)
        if offered == k
    ]
    return iid_acceptance(float(np.mean(full_steps)), k) if full_steps else None


def predicted_speedup(alpha: float, k: int, cost_ratio: float, verify_ratio: float) -> float:
    """Leviathan et al.'s speedup, with the measured cost of verifying k+1 tokens in place of 1.

    (1 - alpha^(k+1)) / ((1 - alpha) (k c + v)), c = draft step / verifier step,
    v = verifier pass over k+1 tokens / verifier pass over 1 token.
    """
    return tokens_per_step(alpha, k) / (k * cost_ratio + verify_ratio)


def tokens_per_step(alpha: float, k: int) -> float:
    """Leviathan et al.'s expected tokens per speculative step: (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def acceptance_to_pay(k: int, cost_ratio: float, verify_ratio: float) -> float | None:
    """The per-token acceptance alpha at which the model predicts a speedup of 1 at this k; None if none does."""
    if predicted_speedup(1.0, k, cost_ratio, verify_ratio) < 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        alpha = (low + high) / 2
        low, high = (alpha, high) if predicted_speedup(alpha, k, cost_ratio, verify_ratio) < 1 else (low, alpha)
    return (low + high) / 2


def no_k_pays(metrics: dict[str, float], costs: StepCosts, batch: int) -> str | None:
    """When the model predicts no k pays at the measured acceptance: one sentence with why (the verify curve, the
    draft's cost) and the per-token acceptance that would make some k pay (`acceptance_to_pay` in `metrics`)."""
    if "predicted_speedup_best_k" not in metrics or metrics["predicted_speedup_best_k"] >= 1:
        return None
    best, cost_ratio = int(metrics["best_k_predicted"]), _cost_ratio(costs, batch)
    needed = {
        k: acceptance_to_pay(k, cost_ratio, _verify_ratio(costs, batch, k + 1))
        for k in range(1, max(costs.verify_s[batch]))
        if k + 1 in costs.verify_s[batch]
    }
    payable = {k: alpha for k, alpha in needed.items() if alpha is not None}
    text = (
        f"No k pays at the measured acceptance (best k={best}: {metrics['predicted_speedup_best_k']:.2f}x "
        f"predicted): verifying {best + 1} tokens costs {_verify_ratio(costs, batch, best + 1):.2f}x one token and "
        f"a draft step {cost_ratio:.2f}x; "
    )
    if not payable:
        return text + "no acceptance would make any k pay on this machine."
    k = min(payable, key=payable.get)
    metrics["acceptance_to_pay"] = payable[k]
    measured = metrics["alpha_iid"]
    return text + f"it would pay at a per-token acceptance above {payable[k]:.2f}, at k={k} (measured {measured:.2f})."


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


def expected_maximum(values: Sequence[float], draws: int) -> float:
    """The expected largest of `draws` values drawn with replacement from `values`.

    The mean over every possible resample, in closed form rather than by Monte Carlo (so exact, and
    the same in every run): with x_(1) <= ... <= x_(n) sorted, the largest is x_(j) with probability
    (j/n)^draws - ((j-1)/n)^draws.
    """
    ordered = np.sort(np.asarray(values, dtype=float))
    ranks = np.arange(1, len(ordered) + 1) / len(ordered)
    return float(ordered @ (ranks**draws - (ranks - 1 / len(ordered)) ** draws))


def finished_rows_factor(outcomes: list[PromptOutcome], batch: int) -> float:
    """What batches of `batch` prompts do to the speedup by running until their longest row ends.

    A batch makes as many verifier calls as its row that needs the most. For b rows drawn from the
    run's prompts (with replacement, so any b, from the first pass), that is the expected largest of b
    per-prompt counts (`expected_maximum`) in each mode: (baseline calls / speculative steps) of the
    largest, over (baseline calls / speculative steps) of the means. 1 at batch size 1, and when every
    prompt needs the same.
    """
    first_pass = [outcome for outcome in outcomes if outcome.repeat == 0]
    baseline = [outcome.baseline.verifier_calls - 1 for outcome in first_pass]  # the prefill's call excluded
    speculative = [outcome.spec.steps for outcome in first_pass]
    if not sum(speculative) or not sum(baseline):
        return 1.0
    batched = expected_maximum(baseline, batch) / expected_maximum(speculative, batch)
    return batched / (sum(baseline) / sum(speculative))


def extrapolated(batch: int, prompts: int) -> bool:
    """Whether a prediction at `batch` rows reaches past what `prompts` measured prompts can tell."""
    return batch > EXTRAPOLATED_BEYOND * prompts


def _cost_ratio(costs: StepCosts, batch: int) -> float:
    """c at a batch size: one step of every drafter over one verifier step over one token per row."""
    return sum(costs.draft_s[batch].values()) / costs.verify_s[batch][1]


def _verify_ratio(costs: StepCosts, batch: int, tokens: int) -> float:
    """v at a batch size: a verifier pass over `tokens` tokens per row over a pass over one token per row."""
    return costs.verify_s[batch][tokens] / costs.verify_s[batch][1]


def cost_metrics(costs: StepCosts, k: int, batch: int) -> dict[str, float]:
    """The measured step costs at the run's batch size: c (drafters summed), the verifier step, v at k+1 tokens."""
    metrics = {
        "draft_verifier_cost_ratio": _cost_ratio(costs, batch),
        "verify_step_ms": 1000 * costs.verify_s[batch][1],
        f"verify_cost_ratio_{k + 1}_tokens": _verify_ratio(costs, batch, k + 1),
    }
    for name, seconds in costs.draft_s[batch].items():
        metrics[f"draft_step_ms_{name}"] = 1000 * seconds
    return metrics


def prediction_metrics(costs: StepCosts, outcomes: list[PromptOutcome], k: int, batch: int) -> dict[str, float]:
    """alpha; the predicted speedup at this k and batch size; the k the model says is best; the predicted speedup
    at every batch size measured, and the smallest batch size where it falls below 1 (one drafter, constant k)."""
    alpha = full_step_alpha((o.spec for o in outcomes), k) or 0.0
    predictions = _predictions_by_k(alpha, costs, batch, outcomes)
    best = max(predictions, key=predictions.get)
    metrics = {
        "alpha_iid": alpha,
        "predicted_speedup": _predicted(alpha, k, costs, batch, outcomes),
        "best_k_predicted": best,
        "predicted_speedup_best_k": predictions[best],
    }
    by_batch = {
        size: _predicted(alpha, k, costs, size, outcomes)
        for size in sorted(costs.verify_s)
        if k + 1 in costs.verify_s[size]
    }
    metrics |= {f"predicted_speedup_batch_{size}": value for size, value in by_batch.items()}
    prompts = sum(1 for outcome in outcomes if outcome.repeat == 0)
    metrics |= {f"predicted_speedup_batch_{size}_extrapolated": 1 for size in by_batch if extrapolated(size, prompts)}
    crossover = next((size for size, value in by_batch.items() if value < 1), None)
    if crossover is not None:
        metrics["crossover_batch_predicted"] = crossover
        if extrapolated(crossover, prompts):
            metrics["crossover_batch_predicted_extrapolated"] = 1
    return metrics


def verify_curve_table(costs: StepCosts, batch: int) -> pd.DataFrame:
    """The verify-cost curve at the run's batch size: ms and ratio to one token, for n = 1.. new tokens."""
    curve = costs.verify_s[batch]
    return pd.DataFrame(
        {
            "new_tokens": list(curve),
            "verify_ms": [1000 * seconds for seconds in curve.values()],
            "ratio_to_one_token": [_verify_ratio(costs, batch, n) for n in curve],
        }
    )


def verify_surface_table(costs: StepCosts) -> pd.DataFrame:
    """Every verifier pass measured: b rows x n new tokens, its ms, and its ratio to b rows x 1 token."""
    return pd.DataFrame(
        [
            {
                "batch_size": size,
                "new_tokens": n,
                "verify_ms": 1000 * seconds,
                "ratio_to_one_token": _verify_ratio(costs, size, n),
                "ms_per_row": 1000 * seconds / size,
            }
            for size, curve in sorted(costs.verify_s.items())
            for n, seconds in curve.items()
        ]
    )


def _predicted(alpha: float, k: int, costs: StepCosts, batch: int, outcomes: list[PromptOutcome]) -> float:
    """The model at `batch` rows: Leviathan's speedup with the costs measured there, times `finished_rows_factor`."""
    steady = predicted_speedup(alpha, k, _cost_ratio(costs, batch), _verify_ratio(costs, batch, k + 1))
    return steady * finished_rows_factor(outcomes, batch)


def _predictions_by_k(alpha: float, costs: StepCosts, batch: int, outcomes: list[PromptOutcome]) -> dict[int, float]:
    """Predicted speedup for every k the measured verify curve at `batch` rows covers."""
    curve = costs.verify_s[batch]
    return {k: _predicted(alpha, k, costs, batch, outcomes) for k in range(1, max(curve)) if k + 1 in curve}


def predicted_speedup_curve(
    metrics: dict[str, float], costs: StepCosts, batch: int, outcomes: list[PromptOutcome]
) -> pd.DataFrame:
    """Predicted speedup against k at the run's batch size (for the predicted-vs-measured plot)."""
    predictions = _predictions_by_k(metrics["alpha_iid"], costs, batch, outcomes)
    return pd.DataFrame({"k": list(predictions), "predicted_speedup": list(predictions.values())})
