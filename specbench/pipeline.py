"""One benchmark run from a typed config to one result: decode, score, measure, model.

    setup = prepare(cfg, models)          # runner: data -> prompts, models loaded
    result = run_benchmark(cfg, setup)    # decode both ways, quality, metrics, speedup model

The result holds every number and table a run produces; `tracking` logs it and
`plots` draws it. Nothing here knows Hydra or MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from specbench import answers, categories, contenders, intervals, metrics, quality, speedup_model
from specbench.config import KScheduleKind, SpecBenchConfig
from specbench.engine.scoring import NEAR_TIE_UNITS, TopTwoGap, top_two_gap
from specbench.metrics import PromptOutcome
from specbench.runner import RunSetup, decode_prompts, measure_costs, score_likelihoods, warm_up

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Everything one run measured."""

    title: str
    k: int
    batch_size: int
    drafters: list[str]
    metrics: dict[str, float]
    per_prompt: pd.DataFrame
    steps: pd.DataFrame
    generations: list[dict]
    verify_curve: pd.DataFrame | None = None  # the verifier's cost of n new tokens, n = 1.., at the run's batch size
    verify_surface: pd.DataFrame | None = None  # every verifier pass measured: b rows x n new tokens
    predicted_curve: pd.DataFrame | None = None  # the speedup model's prediction for each k
    notes: list[str] = field(default_factory=list)  # lines under the summary table (and the console's figures)
    tags: dict[str, str] = field(default_factory=dict)  # e.g. how the intervals were computed
    sampled: bool = False  # outputs differ from the baseline's by design: disagreement is no headline figure
    dtype: str = ""  # the verifier's compute dtype, whose rounding explains greedy near-ties


def run_title(cfg: SpecBenchConfig) -> str:
    """A run's name in figures and logs."""
    batch = f", batch {cfg.batch_size}" if cfg.batch_size > 1 else ""
    return f"{cfg.verifier.name} + {cfg.draft.name}, k={cfg.k}{batch}"


def run_benchmark(
    cfg: SpecBenchConfig, setup: RunSetup, keep_partial: Callable[[pd.DataFrame], None] | None = None
) -> RunResult:
    """Warm up, decode every prompt both ways, then score the texts, measure step costs and fit the model.

    If decoding stops (an error, Ctrl-C), `keep_partial` gets the per-prompt table of
    the prompts already decoded before the exception propagates.
    """
    warm_up(setup, cfg)
    outcomes: list[PromptOutcome] = []
    try:
        for outcome in decode_prompts(setup, cfg):
            outcomes.append(outcome)
    except BaseException:
        if outcomes and keep_partial is not None:
            keep_partial(metrics.per_prompt_table(outcomes))
        raise
    if cfg.quality.perplexity:
        score_likelihoods(setup, outcomes)
    if not cfg.generation.do_sample:
        score_first_differences(setup, outcomes)
    table = metrics.per_prompt_table(outcomes)
    categories.add_category_column(table, setup.prompts)
    answers.add_answer_columns(table, outcomes, setup.prompts)
    references, candidates = [o.baseline_text for o in outcomes], [o.spec_text for o in outcomes]
    scores = quality.score_texts(references, candidates, quality.load_embedder(cfg.quality.embedder))
    table["rougeL"], table["bleu"] = scores.rouge_l, scores.bleu
    if scores.semantic_similarity is not None:
        table["semantic_similarity"] = scores.semantic_similarity

    timing = metrics.timing_metrics(table)
    results = timing | metrics.repeat_metrics(table) | metrics.acceptance_metrics(table, outcomes)
    results |= metrics.likelihood_metrics(table)
    results |= contenders.contender_metrics(outcomes)
    results |= quality.quality_metrics(scores, references, candidates)
    results |= categories.category_metrics(table, outcomes) | answers.accuracy_metrics(table)
    results |= metrics.bootstrap_intervals(table, cfg.seed) | prompt_set_metrics(setup)
    if not cfg.generation.do_sample:
        results |= metrics.near_tie_metrics(table)
    price = metrics.usd_per_hour(cfg.cost.usd_per_hour, cfg.cost.profile, cfg.cost.profiles, setup.device_name)
    results |= metrics.cost_metrics(timing, table, price)
    result = RunResult(
        title=run_title(cfg),
        k=cfg.k,
        batch_size=cfg.batch_size,
        drafters=list(cfg.draft.drafters),
        metrics=results,
        per_prompt=table,
        steps=metrics.steps_table(outcomes),
        generations=[_generation(outcome) for outcome in outcomes],
        notes=prompt_set_notes(setup) + disagreement_warnings(outcomes, {p.pubid: p.name for p in setup.prompts}),
        sampled=cfg.generation.do_sample,
        dtype=str(setup.verifier.compute_dtype).removeprefix("torch."),
    )
    if "interval_units" in results:
        result.tags["interval_method"] = intervals.interval_method(int(results["interval_units"]))
    if cfg.cost_curve:
        costs = measure_costs(setup, cfg)
        results |= speedup_model.cost_metrics(costs, cfg.k, cfg.batch_size)
        result.verify_curve = speedup_model.verify_curve_table(costs, cfg.batch_size)
        result.verify_surface = speedup_model.verify_surface_table(costs)
        reason = speedup_model.out_of_scope(len(setup.drafters), cfg.k_schedule is KScheduleKind.heuristic)
        if reason:
            result.notes.append(reason)
        else:
            results |= speedup_model.prediction_metrics(costs, outcomes, cfg.k, cfg.batch_size)
            if note := speedup_model.no_k_pays(results, costs, cfg.batch_size):
                result.notes.append(note)
            results["speedup_prediction_ratio"] = results["steady_state_speedup"] / results["predicted_speedup"]
            result.predicted_curve = speedup_model.predicted_speedup_curve(results, costs, cfg.batch_size, outcomes)
    return result


def _generation(outcome: PromptOutcome) -> dict:
    """Both outputs of one prompt, as text and token ids."""
    return {
        "pubid": outcome.pubid,
        "repeat": outcome.repeat,
        "identical": outcome.baseline.tokens == outcome.spec.tokens,
        "baseline_text": outcome.baseline_text,
        "spec_text": outcome.spec_text,
        "baseline_tokens": outcome.baseline.tokens,
        "spec_tokens": outcome.spec.tokens,
    }


def score_first_differences(setup: RunSetup, outcomes: list[PromptOutcome]) -> None:
    """Fill in, for each greedy decode whose output differs from the baseline's, the verifier's top-two logit gap
    at the first differing token: one teacher-forced forward over the prompt and the baseline's output before it
    (after timing; repeats that part alike are scored once)."""
    prompts = {prompt.pubid: prompt for prompt in setup.prompts}
    scored: dict[tuple[str, tuple[int, ...]], TopTwoGap] = {}
    for outcome in outcomes:
        position = metrics.first_difference(outcome.baseline.tokens, outcome.spec.tokens)
        if position < 0:
            continue
        key = (outcome.pubid, tuple(outcome.baseline.tokens[:position]))
        if key not in scored:
            scored[key] = top_two_gap(setup.verifier, prompts[outcome.pubid].input_ids, list(key[1]))
        outcome.first_difference_gap = scored[key]


def disagreement_warnings(outcomes: list[PromptOutcome], names: dict[str, str]) -> list[str]:
    """A warning, logged and returned, for each greedy disagreement that the near-tie rule does not explain;
    `names`: each prompt's name by id (`Prompt.name`)."""
    warnings = []
    for outcome in outcomes:
        gap = outcome.first_difference_gap
        if gap is None or gap.near_tie:
            continue
        position = metrics.first_difference(outcome.baseline.tokens, outcome.spec.tokens)
        warnings.append(
            f"warning: the speculative output of {names[outcome.pubid]} (repeat {outcome.repeat}) differs from the "
            f"baseline's at output token {position}, where the verifier's top two logits are {gap.gap:.3g} apart, "
            f"{gap.gap / gap.rounding_unit:.3g} rounding units of its dtype: not a near-tie (at most "
            f"{NEAR_TIE_UNITS}), so rounding does not explain it."
        )
        log.warning(warnings[-1].removeprefix("warning: "))
    return warnings


def prompt_set_metrics(setup: RunSetup) -> dict[str, float]:
    """How dataset.too_long changed the prompt set: prompts skipped and prompts cut from their start, overall and by
    category (when the records have categories)."""
    groups = {
        "prompts_skipped_too_long": [record.category for record in setup.skipped_too_long],
        "prompts_truncated": [prompt.category for prompt in setup.prompts if prompt.cut_from_start],
    }
    results: dict[str, float] = {}
    for key, members in groups.items():
        results[key] = len(members)
        for category in filter(None, dict.fromkeys(members)):
            results[f"{key}_cat_{categories.metric_suffix(category)}"] = members.count(category)
    return results


def prompt_set_notes(setup: RunSetup) -> list[str]:
    """The prompts dataset.too_long left out or cut, by name, so the set measured is never silently the file's."""
    notes = []
    if setup.skipped_too_long:
        names = ", ".join(record.name for record in setup.skipped_too_long)
        notes.append(
            f"Left out as too long for the models' context (dataset.too_long=skip), the next records taking "
            f"their places: {names}."
        )
    cut = [prompt.name for prompt in setup.prompts if prompt.cut_from_start]
    if cut:
        notes.append(f"Cut from their start to fit the models' context (dataset.too_long=truncate): {', '.join(cut)}.")
    return notes
