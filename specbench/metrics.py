"""From per-prompt decodes to the figures users compare: latency, throughput, acceptance, cost, quality.

Metric names are stable MLflow keys, so runs compare across versions. Ratios
over a run are ratios of sums (total baseline time / total speculative time),
not means of per-prompt ratios. Confidence intervals bootstrap over prompts.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from specbench.engine import DecodeResult

log = logging.getLogger(__name__)

BOOTSTRAP_SAMPLES = 1000


@dataclass
class PromptOutcome:
    """Both decodes of one prompt, and the verifier's log-likelihood of each output."""

    pubid: str
    prompt_tokens: int
    truncated: bool
    baseline: DecodeResult
    spec: DecodeResult
    baseline_text: str
    spec_text: str
    baseline_logprob: float | None = None
    spec_logprob: float | None = None
    baseline_peak_gpu_gb: float | None = None
    spec_peak_gpu_gb: float | None = None


def per_prompt_table(outcomes: list[PromptOutcome]) -> pd.DataFrame:
    """One row per prompt with both modes' timings and the speculative counts."""
    rows = []
    for outcome in outcomes:
        row: dict[str, object] = {
            "pubid": outcome.pubid,
            "prompt_tokens": outcome.prompt_tokens,
            "truncated": outcome.truncated,
        }
        for mode, result in (("baseline", outcome.baseline), ("spec", outcome.spec)):
            row[f"{mode}_tokens"] = len(result.tokens)
            row[f"{mode}_latency_s"] = result.latency_s
            row[f"{mode}_ttft_s"] = result.ttft_s
            row[f"{mode}_ms_per_token"] = 1000 * result.latency_s / len(result.tokens)
            row[f"{mode}_tokens_per_s"] = len(result.tokens) / result.latency_s
            row[f"{mode}_verifier_calls"] = result.verifier_calls
            row[f"{mode}_peak_gpu_gb"] = getattr(outcome, f"{mode}_peak_gpu_gb")
        spec = outcome.spec
        row |= {
            "speedup": outcome.baseline.latency_s / spec.latency_s,
            "steps": spec.steps,
            "proposed": spec.proposed,
            "accepted": spec.accepted,
            "acceptance_rate": spec.accepted / spec.proposed if spec.proposed else math.nan,
            "mean_accepted_tokens": step_tokens(spec) / spec.steps if spec.steps else math.nan,
            "mean_k": float(np.mean(spec.k_per_step)) if spec.k_per_step else math.nan,
            "draft_time_s": spec.draft_time_s,
            "draft_prefill_s": spec.draft_prefill_s,
            "verify_time_s": spec.verify_time_s,
            "identical": outcome.baseline.tokens == spec.tokens,
            "first_difference": _first_difference(outcome.baseline.tokens, spec.tokens),
            "baseline_logprob": outcome.baseline_logprob,
            "spec_logprob": outcome.spec_logprob,
        }
        for name, stats in spec.drafters.items():
            row[f"{name}_proposed"] = stats.proposed
            row[f"{name}_accepted"] = stats.accepted
            row[f"{name}_wins"] = stats.wins
            row[f"{name}_draft_time_s"] = stats.draft_time_s
        rows.append(row)
    return pd.DataFrame(rows)


def step_tokens(result: DecodeResult) -> int:
    """Tokens emitted by speculative steps: all but one per verifier call that verified no drafts (a prefill).

    Our engine's prefill chooses the first token on its own; transformers' first call also verifies drafts.
    """
    return len(result.tokens) - (result.verifier_calls - result.steps)


def _first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token, -1 when the sequences are equal."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return -1 if len(a) == len(b) else min(len(a), len(b))


def _percentile(values: np.ndarray, q: float) -> np.ndarray:
    return np.percentile(values, q, axis=-1)


def timing_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Latency percentiles, time to first token, throughput and speedup, both modes."""
    metrics: dict[str, float] = {}
    for mode in ("baseline", "spec"):
        latency = table[f"{mode}_latency_s"].to_numpy()
        per_token = table[f"{mode}_ms_per_token"].to_numpy()
        metrics[f"{mode}_latency_p50_s"] = float(_percentile(latency, 50))
        metrics[f"{mode}_latency_p95_s"] = float(_percentile(latency, 95))
        metrics[f"{mode}_ms_per_token_p50"] = float(_percentile(per_token, 50))
        metrics[f"{mode}_ms_per_token_p95"] = float(_percentile(per_token, 95))
        metrics[f"{mode}_ttft_p50_s"] = float(_percentile(table[f"{mode}_ttft_s"].to_numpy(), 50))
        metrics[f"{mode}_tokens_per_s"] = table[f"{mode}_tokens"].sum() / latency.sum()
        metrics[f"{mode}_total_s"] = float(latency.sum())
        peak = table[f"{mode}_peak_gpu_gb"]
        if peak.notna().any():
            metrics[f"peak_gpu_mem_gb_{mode}"] = float(peak.max())
    metrics["speedup"] = metrics["baseline_total_s"] / metrics["spec_total_s"]
    decode_baseline = (table["baseline_latency_s"] - table["baseline_ttft_s"]).sum()
    decode_spec = (table["spec_latency_s"] - table["spec_ttft_s"]).sum()
    metrics["decode_speedup"] = decode_baseline / decode_spec if decode_spec > 0 else math.nan
    # what Leviathan et al.'s model describes: decoding steps only, without the drafts reading the prompt
    steady_spec = decode_spec - table["draft_prefill_s"].sum()
    metrics["steady_state_speedup"] = decode_baseline / steady_spec if steady_spec > 0 else math.nan
    metrics["draft_prefill_s_mean"] = float(table["draft_prefill_s"].mean())
    return metrics


def acceptance_metrics(table: pd.DataFrame, outcomes: list[PromptOutcome]) -> dict[str, float]:
    """Acceptance overall, by draft position and per drafter; disagreement with the baseline."""
    proposed = table["proposed"].sum()
    steps = table["steps"].sum()
    metrics: dict[str, float] = {
        "acceptance_rate": table["accepted"].sum() / proposed if proposed else math.nan,
        "mean_accepted_tokens": sum(step_tokens(o.spec) for o in outcomes) / steps if steps else math.nan,
        "mean_k": float(np.mean([k for o in outcomes for k in o.spec.k_per_step])) if steps else math.nan,
        "disagreement_rate": 1.0 - table["identical"].mean(),
        "exact_match_rate": float(table["identical"].mean()),
        "num_prompts": len(table),
        "truncated_prompts": int(table["truncated"].sum()),
    }
    by_position_proposed = np.sum([o.spec.proposed_by_position for o in outcomes], axis=0)
    by_position_accepted = np.sum([o.spec.accepted_by_position for o in outcomes], axis=0)
    for position, (offered, kept) in enumerate(zip(by_position_proposed, by_position_accepted, strict=True), 1):
        if offered:
            metrics[f"acceptance_rate_pos_{position}"] = kept / offered
    steps_with_acceptance = sum(sum(1 for a in o.spec.accepted_per_step if a) for o in outcomes)
    for name in outcomes[0].spec.drafters:
        drafted = table[f"{name}_proposed"].sum()
        metrics[f"acceptance_rate_{name}"] = table[f"{name}_accepted"].sum() / drafted if drafted else math.nan
        metrics[f"win_rate_{name}"] = (
            table[f"{name}_wins"].sum() / steps_with_acceptance if steps_with_acceptance else math.nan
        )
        metrics[f"draft_time_s_{name}"] = float(table[f"{name}_draft_time_s"].sum(min_count=1))  # NaN: not timed
    return metrics


def likelihood_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Verifier perplexity and mean log-likelihood per token of each mode's outputs."""
    metrics: dict[str, float] = {}
    for mode in ("baseline", "spec"):
        logprob = table[f"{mode}_logprob"]
        if logprob.isna().any():
            continue
        mean = logprob.sum() / table[f"{mode}_tokens"].sum()
        metrics[f"mean_logprob_{mode}"] = float(mean)
        metrics[f"perplexity_{mode}"] = float(math.exp(-mean))
    return metrics


def bootstrap_intervals(table: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """95% bootstrap intervals over prompts for speedup, acceptance and latency percentiles."""
    rng = np.random.default_rng(seed)
    n = len(table)
    if n < 2:
        return {}
    samples = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    numeric = table.select_dtypes("number")
    columns = {name: numeric[name].to_numpy(dtype=float)[samples] for name in numeric.columns}
    estimates = {
        "speedup": columns["baseline_latency_s"].sum(axis=1) / columns["spec_latency_s"].sum(axis=1),
    }
    if table["proposed"].sum():
        estimates["acceptance_rate"] = columns["accepted"].sum(axis=1) / np.maximum(columns["proposed"].sum(axis=1), 1)
    for mode in ("baseline", "spec"):
        for q in (50, 95):
            estimates[f"{mode}_latency_p{q}_s"] = _percentile(columns[f"{mode}_latency_s"], q)
    intervals = {}
    for name, values in estimates.items():
        intervals[f"{name}_ci_low"] = float(np.percentile(values, 2.5))
        intervals[f"{name}_ci_high"] = float(np.percentile(values, 97.5))
    return intervals


def usd_per_hour(explicit: float | None, profile: str, profiles: dict[str, float], device_name: str) -> float:
    """The machine's price: explicit, a named profile, or the profile that names the device's model.

    `auto` matches whole words of the device name ("NVIDIA L40S" is not an "l4"); a GPU with no
    profile gets NaN, so no cost is logged rather than a wrong one.
    """
    if explicit is not None:
        return explicit
    if profile != "auto":
        return profiles[profile]
    if device_name.startswith("CPU"):
        return profiles.get("cpu", math.nan)
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    matches = [name for name in profiles if name in words]
    if not matches:
        log.warning("no cost profile for %s: set cost.usd_per_hour (or cost.profile) to log costs", device_name)
        return math.nan
    return profiles[matches[0]]


def cost_metrics(timing: dict[str, float], table: pd.DataFrame, price_per_hour: float) -> dict[str, float]:
    """Dollars per query and per 1,000 tokens in each mode, and the saving."""
    per_second = price_per_hour / 3600
    metrics = {"usd_per_hour": price_per_hour}
    for mode in ("baseline", "spec"):
        total = timing[f"{mode}_total_s"]
        metrics[f"cost_per_query_usd_{mode}"] = per_second * total / len(table)
        metrics[f"cost_per_1k_tokens_usd_{mode}"] = per_second * total / table[f"{mode}_tokens"].sum() * 1000
    baseline = metrics["cost_per_query_usd_baseline"]
    metrics["cost_saving_pct"] = 100 * (1 - metrics["cost_per_query_usd_spec"] / baseline) if baseline else 0.0
    return metrics


def steps_table(outcomes: list[PromptOutcome]) -> pd.DataFrame:
    """One row per speculative step: the draft length used (adaptive k) and how much was accepted."""
    return pd.DataFrame(
        [
            {"pubid": o.pubid, "step": step, "k": k, "offered": offered, "accepted": accepted}
            for o in outcomes
            for step, (k, offered, accepted) in enumerate(
                zip(o.spec.k_per_step, o.spec.offered_per_step, o.spec.accepted_per_step, strict=True)
            )
        ],
        columns=["pubid", "step", "k", "offered", "accepted"],
    )
