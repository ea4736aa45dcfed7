"""From per-prompt decodes to the figures users compare: latency, throughput, acceptance, cost, quality.

Metric names are stable MLflow keys, so runs compare across versions. Rates
over a run are ratios of sums (total tokens / total time), not means of
per-prompt ratios, and a speedup is a ratio of token rates (speculative tokens/s
over baseline tokens/s). When both modes emit the same tokens (greedy), that is
the ratio of total times. When they stop at different lengths (sampling, a
bfloat16 near-tie), the token rate takes out the length's effect on the time
spent decoding, but not on the costs paid once per request (the prefill up to
the first token, the drafts' reading of the prompt): spread over more tokens,
they favour the mode that emitted more. `decode_speedup` and
`steady_state_speedup` leave those costs out. With `repeats` > 1 the table
holds every prompt once per repeat; headline figures pool all repeats,
`*_repeat_*` figures show the spread between repeats. Confidence intervals
resample batches of prompts (prompts, at batch size 1), then repeats within
each drawn batch (`bootstrap_intervals`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from specbench.engine import BatchResult, DecodeResult
from specbench.engine.scoring import TopTwoGap
from specbench.intervals import interval, resample_cells

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What a decoded batch shares among its rows: its wall time and the verifier's padded work."""

    wall_s: float
    verifier_positions: int = 0
    padded_positions: int = 0

    @classmethod
    def of(cls, result: BatchResult) -> BatchStats:
        """The shared figures of an engine batch result."""
        return cls(result.wall_s, result.verifier_positions, result.padded_positions)


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
    baseline_batch: BatchStats
    spec_batch: BatchStats
    repeat: int = 0  # which pass over the prompt set (0 .. repeats - 1)
    batch: int = 0  # which batch of the prompt set the prompt was decoded in
    baseline_logprob: float | None = None
    spec_logprob: float | None = None
    baseline_peak_gpu_gb: float | None = None
    spec_peak_gpu_gb: float | None = None
    contenders: dict[str, DecodeResult] = field(default_factory=dict)  # other engines' decodes, by mode name
    first_difference_gap: TopTwoGap | None = None  # the verifier's top-two gap where the outputs part (greedy)


def per_prompt_table(outcomes: list[PromptOutcome]) -> pd.DataFrame:
    """One row per prompt with both modes' timings and the speculative counts."""
    rows = []
    for outcome in outcomes:
        row: dict[str, object] = {
            "pubid": outcome.pubid,
            "repeat": outcome.repeat,
            "batch": outcome.batch,
            "prompt_tokens": outcome.prompt_tokens,
            "truncated": outcome.truncated,
        }
        for mode, result, batch in (
            ("baseline", outcome.baseline, outcome.baseline_batch),
            ("spec", outcome.spec, outcome.spec_batch),
        ):
            row[f"{mode}_batch_s"] = batch.wall_s
            row[f"{mode}_verifier_positions"] = batch.verifier_positions
            row[f"{mode}_padded_positions"] = batch.padded_positions
            row[f"{mode}_tokens"] = len(result.tokens)
            row[f"{mode}_latency_s"] = result.latency_s
            row[f"{mode}_ttft_s"] = result.ttft_s
            row[f"{mode}_ms_per_token"] = 1000 * result.latency_s / len(result.tokens)
            row[f"{mode}_tokens_per_s"] = len(result.tokens) / result.latency_s
            row[f"{mode}_verifier_calls"] = result.verifier_calls
            row[f"{mode}_peak_gpu_gb"] = getattr(outcome, f"{mode}_peak_gpu_gb")
        spec = outcome.spec
        row |= {
            "speedup": row["spec_tokens_per_s"] / row["baseline_tokens_per_s"],
            "steps": spec.steps,
            "proposed": spec.proposed,
            "accepted": spec.accepted,
            "acceptance_rate": spec.accepted / spec.proposed if spec.proposed else math.nan,
            "mean_accepted_tokens": step_tokens(spec) / spec.steps if spec.steps else math.nan,
            "mean_k": _mean_k([spec]),
            "draft_time_s": spec.draft_time_s,
            "draft_prefill_s": spec.draft_prefill_s,
            "verify_time_s": spec.verify_time_s,
            "identical": outcome.baseline.tokens == spec.tokens,
            "first_difference": first_difference(outcome.baseline.tokens, spec.tokens),
            **_gap_columns(outcome.first_difference_gap),
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


def _gap_columns(gap: TopTwoGap | None) -> dict[str, object]:
    """The verifier's top-1 minus top-2 logit where the outputs part, its top logit, its dtype's rounding unit at
    that logit, and whether the gap is a near-tie (`TopTwoGap`); empty when the outputs agree or were not scored."""
    if gap is None:
        numbers = ("first_difference_gap", "first_difference_top_logit", "first_difference_unit")
        return dict.fromkeys(numbers, math.nan) | {"first_difference_near_tie": None}
    return {
        "first_difference_gap": gap.gap,
        "first_difference_top_logit": gap.top_logit,
        "first_difference_unit": gap.rounding_unit,
        "first_difference_near_tie": gap.near_tie,
    }


def _mean_k(results: list[DecodeResult]) -> float:
    """Mean k the schedule asked for, over the steps that could draft (not a last, verifier-only step)."""
    ks = [k for r in results for k, depth in zip(r.k_per_step, r.depth_per_step, strict=True) if depth > 0]
    return float(np.mean(ks)) if ks else math.nan


def batch_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per decoded batch (and repeat): its tokens, wall time, time to first token, drafts' prefill and
    the verifier's padded work, per mode. Throughput and speedups are ratios of these sums."""
    shared = ["batch_s", "verifier_positions", "padded_positions"]
    aggregations = {f"{mode}_{name}": "first" for mode in ("baseline", "spec") for name in shared}
    aggregations |= {"baseline_tokens": "sum", "spec_tokens": "sum", "baseline_ttft_s": "max", "spec_ttft_s": "max"}
    aggregations |= {"draft_prefill_s": "max", "pubid": "size"}
    batches = table.groupby(["repeat", "batch"], sort=True).agg(aggregations)
    return batches.rename(columns={"pubid": "rows"}).reset_index()


def step_tokens(result: DecodeResult) -> int:
    """Tokens emitted by speculative steps: all but one per verifier call that verified no drafts (a prefill).

    Our engine's prefill chooses the first token on its own; transformers' first call also verifies drafts.
    """
    return len(result.tokens) - (result.verifier_calls - result.steps)


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token, -1 when the sequences are equal."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return -1 if len(a) == len(b) else min(len(a), len(b))


def _percentile(values: np.ndarray, q: float) -> np.ndarray:
    return np.percentile(values, q, axis=-1)


def token_rate_ratio(spec_tokens, spec_s, baseline_tokens, baseline_s):
    """Speculative tokens/s over baseline tokens/s (a speedup); works elementwise on arrays, NaN without time."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (np.asarray(spec_tokens, float) / spec_s) / (np.asarray(baseline_tokens, float) / baseline_s)
    return np.where(np.isfinite(ratio), ratio, np.nan)


def timing_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Latency percentiles (per request), time to first token, throughput and speedups (per batch), both modes.

    A request's latency runs from its batch's start to its own last token; throughput is the tokens of all rows
    over the wall time of all batches, so at batch size 1 the two coincide.
    """
    batches = batch_table(table)
    metrics: dict[str, float] = {}
    for mode in ("baseline", "spec"):
        latency = table[f"{mode}_latency_s"].to_numpy()
        per_token = table[f"{mode}_ms_per_token"].to_numpy()
        metrics[f"{mode}_latency_p50_s"] = float(_percentile(latency, 50))
        metrics[f"{mode}_latency_p95_s"] = float(_percentile(latency, 95))
        metrics[f"{mode}_ms_per_token_p50"] = float(_percentile(per_token, 50))
        metrics[f"{mode}_ms_per_token_p95"] = float(_percentile(per_token, 95))
        metrics[f"{mode}_ttft_p50_s"] = float(_percentile(table[f"{mode}_ttft_s"].to_numpy(), 50))
        metrics[f"{mode}_total_s"] = float(batches[f"{mode}_batch_s"].sum())
        metrics[f"{mode}_tokens_per_s"] = table[f"{mode}_tokens"].sum() / metrics[f"{mode}_total_s"]
        peak = table[f"{mode}_peak_gpu_gb"]
        if peak.notna().any():
            metrics[f"peak_gpu_mem_gb_{mode}"] = float(peak.max())
        positions = batches[f"{mode}_verifier_positions"].sum()
        share = batches[f"{mode}_padded_positions"].sum() / positions if positions else 0.0
        metrics["padded_token_share" if mode == "spec" else "padded_token_share_baseline"] = float(share)
    metrics["speedup"] = metrics["spec_tokens_per_s"] / metrics["baseline_tokens_per_s"]
    # after the first token: the tokens decoded step by step, over each batch's time after its prefill
    decoded = {mode: (table[f"{mode}_tokens"] - 1).sum() for mode in ("baseline", "spec")}
    decode_s = {mode: (batches[f"{mode}_batch_s"] - batches[f"{mode}_ttft_s"]).sum() for mode in ("baseline", "spec")}
    metrics["decode_speedup"] = float(
        token_rate_ratio(decoded["spec"], decode_s["spec"], decoded["baseline"], decode_s["baseline"])
    )
    # what Leviathan et al.'s model describes: decoding steps only, without the drafts reading the prompt
    steady_s = decode_s["spec"] - batches["draft_prefill_s"].sum()
    metrics["steady_state_speedup"] = float(
        token_rate_ratio(decoded["spec"], steady_s, decoded["baseline"], decode_s["baseline"])
    )
    metrics["draft_prefill_s_mean"] = float(batches["draft_prefill_s"].mean())
    return metrics


def repeat_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Spread of the whole-set figures between repeats: min, median, max and sample std of each repeat's value.

    Each repeat's throughput and speedup are ratios of sums over that pass; nothing is logged for one repeat.
    """
    if table["repeat"].nunique() < 2:
        return {}
    sums = batch_table(table).groupby("repeat")[["baseline_tokens", "baseline_batch_s", "spec_tokens", "spec_batch_s"]]
    sums = sums.sum()
    figures = {
        "speedup": token_rate_ratio(
            sums["spec_tokens"], sums["spec_batch_s"], sums["baseline_tokens"], sums["baseline_batch_s"]
        ),
        "baseline_tokens_per_s": sums["baseline_tokens"] / sums["baseline_batch_s"],
        "spec_tokens_per_s": sums["spec_tokens"] / sums["spec_batch_s"],
    }
    metrics = {}
    for name, values in figures.items():
        values = np.asarray(values, float)
        metrics |= {
            f"{name}_repeat_min": float(values.min()),
            f"{name}_repeat_median": float(np.median(values)),
            f"{name}_repeat_max": float(values.max()),
            f"{name}_repeat_std": float(values.std(ddof=1)),
        }
    return metrics


def acceptance_metrics(table: pd.DataFrame, outcomes: list[PromptOutcome]) -> dict[str, float]:
    """Acceptance overall, by draft position and per drafter; disagreement with the baseline."""
    proposed = table["proposed"].sum()
    steps = table["steps"].sum()
    metrics: dict[str, float] = {
        "acceptance_rate": table["accepted"].sum() / proposed if proposed else math.nan,
        "mean_accepted_tokens": sum(step_tokens(o.spec) for o in outcomes) / steps if steps else math.nan,
        "mean_k": _mean_k([o.spec for o in outcomes]),
        # token ids, not texts: two id sequences can decode to the same text
        "disagreement_rate": 1.0 - table["identical"].mean(),
        "exact_match_rate": float(table["identical"].mean()),
        "num_prompts": int((table["repeat"] == 0).sum()),
        "num_repeats": int(table["repeat"].nunique()),
        "truncated_prompts": int(table.loc[table["repeat"] == 0, "truncated"].sum()),
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


def near_tie_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Greedy disagreements (decodes whose outputs differ) split by the near-tie rule at their first difference.

    Needs the gap columns of every disagreeing row (`first_difference_gap`, filled for greedy runs).
    """
    disagreeing = table[~table["identical"].astype(bool)]
    near_tie = disagreeing["first_difference_near_tie"].astype(bool)
    return {"disagreements_at_near_tie": int(near_tie.sum()), "disagreements_not_near_tie": int((~near_tie).sum())}


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
    """95% intervals of the speedup, the acceptance rate and the latency percentiles, and `interval_units`.

    The unit is a batch of the prompt set (a prompt, at batch size 1), because its rows share their
    timing; a cell is a unit in one repeat. Every figure is computed on the same two-level resamples
    (`resample_cells`), and the interval follows `interval_method`. Resamples whose cells proposed no
    draft token have no acceptance rate and are left out of its interval. No interval from one unit.
    """
    units, repeats = table["batch"].nunique(), table["repeat"].nunique()
    if units < 2:
        return {}
    picks = resample_cells(units, repeats, seed)
    everything = np.arange(units * repeats)[None, :]
    cells = batch_table(table).sort_values(["batch", "repeat"])  # row unit * repeats + repeat
    counts = table.groupby(["batch", "repeat"], sort=True)[["accepted", "proposed"]].sum()

    def summed(column: pd.Series, chosen: np.ndarray) -> np.ndarray:  # the column's sum over each row's cells
        return column.to_numpy(dtype=float)[chosen].sum(axis=1)

    def speedup(chosen: np.ndarray) -> np.ndarray:
        spec = summed(cells["spec_tokens"], chosen), summed(cells["spec_batch_s"], chosen)
        baseline = summed(cells["baseline_tokens"], chosen), summed(cells["baseline_batch_s"], chosen)
        return token_rate_ratio(*spec, *baseline)

    def acceptance(chosen: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return summed(counts["accepted"], chosen) / summed(counts["proposed"], chosen)  # NaN: none proposed

    figures = {"speedup": (speedup, False)}
    if counts["proposed"].sum() > 0:
        figures["acceptance_rate"] = (acceptance, True)
    latency_cells = table.sort_values(["batch", "repeat"]).groupby(["batch", "repeat"], sort=True)
    for mode in ("baseline", "spec"):
        latencies = [group[f"{mode}_latency_s"].to_numpy() for _, group in latency_cells]
        for q in (50, 95):

            def percentile(chosen: np.ndarray, latencies=latencies, q=q) -> np.ndarray:
                return np.array([np.percentile(np.concatenate([latencies[c] for c in row]), q) for row in chosen])

            figures[f"{mode}_latency_p{q}_s"] = (percentile, False)
    intervals: dict[str, float] = {"interval_units": units}
    for name, (statistic, share) in figures.items():
        estimate = float(statistic(everything)[0])
        intervals[f"{name}_ci_low"], intervals[f"{name}_ci_high"] = interval(estimate, statistic(picks), units, share)
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
    """Dollars per query and per 1,000 tokens in each mode, and the saving per token.

    A query's cost follows its output length, which sampling can make differ between the
    modes; the cost per 1,000 tokens (and so the saving) does not.
    """
    per_second = price_per_hour / 3600
    metrics = {"usd_per_hour": price_per_hour}
    for mode in ("baseline", "spec"):
        total = timing[f"{mode}_total_s"]
        metrics[f"cost_per_query_usd_{mode}"] = per_second * total / len(table)
        metrics[f"cost_per_1k_tokens_usd_{mode}"] = per_second * total / table[f"{mode}_tokens"].sum() * 1000
    baseline = metrics["cost_per_1k_tokens_usd_baseline"]
    metrics["cost_saving_pct"] = 100 * (1 - metrics["cost_per_1k_tokens_usd_spec"] / baseline) if baseline else 0.0
    return metrics


def steps_table(outcomes: list[PromptOutcome]) -> pd.DataFrame:
    """One row per speculative step: the schedule's k, the depth drafted (k cut to the room left; 0: a last,
    verifier-only step), the longest proposal and how much was accepted."""
    return pd.DataFrame(
        [
            {
                "pubid": o.pubid,
                "repeat": o.repeat,
                "step": step,
                "k": k,
                "depth": depth,
                "offered": offered,
                "accepted": accepted,
            }
            for o in outcomes
            for step, (k, depth, offered, accepted) in enumerate(
                zip(
                    o.spec.k_per_step,
                    o.spec.depth_per_step,
                    o.spec.offered_per_step,
                    o.spec.accepted_per_step,
                    strict=True,
                )
            )
        ],
        columns=["pubid", "repeat", "step", "k", "depth", "offered", "accepted"],
    )
