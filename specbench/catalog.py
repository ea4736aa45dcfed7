"""Every metric specbench logs: its MLflow key, label, unit, format and direction, in one place.

`summary.md`, the cross-run report, the plots' labels and the README's metric
table all read from here. Keys with a `{...}` part name a family (one key per
draft position, drafter, ...). `python -m specbench.catalog README.md` rewrites
the README's metric table from this list.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HIGHER, LOWER = "higher", "lower"
# the speedup model's predictions at batch sizes above this many times the prompt count are marked `_extrapolated`
EXTRAPOLATED_BEYOND = 4
SPREAD_STATS = ("min", "median", "max")  # a figure over repeats as reports show it: min / median / max


@dataclass(frozen=True)
class Metric:
    """One logged figure (or family of figures)."""

    key: str  # MLflow key of the speculative (or only) value; `{name}` parts mark a family
    label: str
    unit: str = ""  # "s", "ms", "tokens/s", "x", "%", "USD", ...
    fmt: str = "num"  # num | rate (a 0..1 share shown in %) | pct (already in %) | usd | int
    better: str | None = None  # higher | lower | None (neither)
    doc: str = ""
    baseline: str | None = None  # MLflow key of the verifier-only counterpart, when there is one
    summary: bool = False  # a row of a run's summary.md
    report: bool = False  # a column of the cross-run report
    spread: bool = False  # the median of a `_repeat_` family, shown as "min / median / max"

    def format(self, value: float | None) -> str:
        """The value in its unit for a table, or "—" when missing."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        scale, prefix, suffix = {"rate": (100.0, "", "%"), "pct": (1.0, "", "%"), "usd": (1.0, "$", "")}.get(
            self.fmt, (1.0, "", "")
        )
        number = float(value) * scale
        if self.fmt == "int" or (self.fmt == "num" and number.is_integer() and abs(number) < 1e6):
            text = f"{number:,.0f}" if abs(number) >= 1000 else f"{number:.0f}"
        else:
            text = f"{number:,.0f}" if abs(number) >= 1000 else f"{number:.3g}"
        return f"{prefix}{text}{suffix}"

    def format_spread(self, values: Mapping[str, float | None], key: str) -> str:
        """The "min / median / max" of the `_repeat_` family whose median is `key`, or "—" when one is missing."""
        stem = key.removesuffix("_median")
        texts = [self.format(values.get(f"{stem}_{stat}")) for stat in SPREAD_STATS]
        return "—" if "—" in texts else " / ".join(texts)

    @property
    def column(self) -> str:
        """Column name in the cross-run report: the label and its unit."""
        unit = {"rate": "%", "pct": "%", "usd": "USD"}.get(self.fmt, self.unit)
        return f"{self.label} ({unit})" if unit else self.label


def _pair(stem: str, label: str, unit: str, better: str | None, doc: str, **extra) -> Metric:
    """A metric measured in both modes, keyed `spec_<stem>` and `baseline_<stem>`."""
    return Metric(f"spec_{stem}", label, unit, better=better, doc=doc, baseline=f"baseline_{stem}", **extra)


def _per_mode(stem: str, label: str, unit: str, better: str | None, doc: str, **extra) -> Metric:
    """A load-run metric of both modes, keyed `<stem>_spec` and `<stem>_baseline`."""
    return Metric(f"{stem}_spec", label, unit, better=better, doc=doc, baseline=f"{stem}_baseline", **extra)


LATENCIES = {
    "ttft": ("Time to first token", "first token - arrival (queue and prefill included)"),
    "tpot": ("Time per output token", "(E2EL - TTFT) / (output tokens - 1), outputs of 2 tokens or more"),
    "itl": (
        "Inter-chunk latency",
        "gaps between consecutive chunks a client receives, pooled; under speculation a chunk holds the accepted "
        "tokens plus the verifier's, so compare the modes on TPOT",
    ),
    "e2el": ("End-to-end latency", "finish - arrival"),
    "queue": ("Queueing time", "admitted (prefill began; a server: request sent) - arrival"),
}
LATENCY_STATS = {"p50": "median", "p90": "90th percentile", "p99": "99th percentile", "mean": "mean"}


def _latencies() -> list[Metric]:
    """`{latency}_ms_{stat}_{mode}` of load runs: every latency at every statistic, over requests that did not fail."""
    return [
        _per_mode(
            f"{name}_ms_{stat}",
            f"{label} {stat}",
            "ms",
            LOWER,
            f"load runs: {meaning}, {LATENCY_STATS[stat]} over requests",
            summary=stat == "p99" and name != "queue",
            report=stat == "p99" and name in ("tpot", "e2el"),
        )
        for name, (label, meaning) in LATENCIES.items()
        for stat in LATENCY_STATS
    ]


def _predicted_per_mode(stem: str, label: str, unit: str, doc: str, **extra) -> Metric:
    return _per_mode(f"predicted_{stem}", f"{label} (predicted)", unit, None, f"load model: {doc}", **extra)


LOAD_METRICS: tuple[Metric, ...] = (
    *_latencies(),
    _per_mode(
        "requests_per_s",
        "Completed requests per second",
        "requests/s",
        HIGHER,
        "load runs: completed requests / duration (trace start to last finish)",
        summary=True,
    ),
    _per_mode(
        "output_tokens_per_s",
        "Output tokens per second",
        "tokens/s",
        HIGHER,
        "load runs: output tokens of completed requests / duration (trace start to last finish)",
        summary=True,
    ),
    _per_mode(
        "goodput_rps",
        "Goodput",
        "requests/s",
        HIGHER,
        "load runs with SLOs: requests meeting every SLO set (slo.ttft_ms, slo.tpot_ms, slo.e2el_ms) / duration "
        "(DistServe, as vLLM computes it; a one-token output has TPOT 0)",
        summary=True,
        report=True,
    ),
    _per_mode(
        "slo_attainment",
        "SLO attainment",
        "",
        HIGHER,
        "load runs with SLOs: share of all requests (failed ones included) meeting every SLO set",
        fmt="rate",
    ),
    _per_mode(
        "failed_requests",
        "Failed requests",
        "",
        LOWER,
        "load runs: requests that ended in an error, left out of every other figure",
        fmt="int",
        summary=True,
    ),
    _per_mode(
        "occupancy_mean",
        "Occupancy, mean",
        "rows",
        None,
        "load runs: running requests, time-weighted over the duration (idle time counts 0): the sum of (finish - "
        "admitted) over the duration, Little's law's L (with load.exclude_first, the requests left out count for "
        "their time in the window)",
        summary=True,
    ),
    _per_mode(
        "occupancy_max",
        "Occupancy, max",
        "rows",
        None,
        "load runs: most requests running at once, from their [admitted, finish) intervals",
        fmt="int",
    ),
    _per_mode(
        "joins_per_request",
        "Joins per request",
        "",
        None,
        "load runs on our engine: the scheduler's admissions (requests admitted at the same instant joined as one "
        "prefill) per served request; 1 when every request joined alone",
    ),
    Metric(
        "acceptance_rate_occupancy_{low}_{high}",
        "Acceptance at occupancy low-high",
        fmt="rate",
        better=HIGHER,
        doc="load runs: accepted / proposed draft tokens over the speculative steps that ran low to high rows "
        "(buckets 1, 2-3, 4-7, ...)",
    ),
    Metric(
        "tpot_p99_ratio",
        "TPOT p99, spec / baseline",
        "x",
        better=LOWER,
        doc="load runs: tpot_ms_p99_spec / tpot_ms_p99_baseline over the requests both modes served; its interval "
        "is a bootstrap over those requests, paired by request id (with load.traces > 1: over the traces, then "
        "their requests, a t interval below 20 traces)",
        summary=True,
        report=True,
    ),
    Metric(
        "e2el_p99_ratio",
        "E2EL p99, spec / baseline",
        "x",
        better=LOWER,
        doc="load runs: e2el_ms_p99_spec / e2el_ms_p99_baseline, paired bootstrap interval as for TPOT",
        summary=True,
    ),
    Metric(
        "goodput_ratio",
        "Goodput, spec / baseline",
        "x",
        better=HIGHER,
        doc="load runs with SLOs: goodput_rps_spec / goodput_rps_baseline, paired bootstrap interval as for TPOT",
        summary=True,
    ),
    Metric(
        "paired_requests",
        "Requests behind the ratios",
        fmt="int",
        doc="load runs: requests both modes served, which the ratios' bootstrap resamples",
        summary=True,
    ),
    Metric(
        "crossover_rate",
        "Crossover rate",
        "requests/s",
        doc="load.find_crossover: the request rate where speculation stops beating the baseline on "
        "load.crossover_metric, interpolated on log rate between the probes around it (not logged when it lies "
        "outside load.rate_min..load.rate_max)",
        summary=True,
        report=True,
    ),
    Metric(
        "crossover_rate_low",
        "Crossover rate, interval low",
        "requests/s",
        doc="where the ratio's bootstrap bound least favourable to speculation first crosses 1 (not logged when "
        "below load.rate_min)",
        summary=True,
    ),
    Metric(
        "crossover_rate_high",
        "Crossover rate, interval high",
        "requests/s",
        doc="where the bound most favourable to speculation last crosses 1 (not logged when above load.rate_max)",
        summary=True,
    ),
    Metric("crossover_probes", "Crossover probes", fmt="int", doc="request rates the crossover search served"),
    _per_mode(
        "max_rate_under_slo",
        "Max rate under the SLOs",
        "requests/s",
        HIGHER,
        "load.find_crossover with SLOs: the highest probed rate where at least slo.attainment of the requests meet "
        "every SLO (not logged when every probe or none meets them)",
        summary=True,
    ),
    _per_mode(
        "min_rate_over_slo",
        "Min rate over the SLOs",
        "requests/s",
        HIGHER,
        "load.find_crossover with SLOs: the next probed rate, where fewer than slo.attainment meet them; the limit "
        "lies between max_rate_under_slo and it",
    ),
    Metric(
        "predicted_crossover_rate",
        "Crossover rate (predicted)",
        "requests/s",
        doc="load model: where the predicted p99 TPOT (or p99 E2EL) of the two modes cross",
        summary=True,
    ),
    _predicted_per_mode(
        "occupancy", "Occupancy", "rows", "the occupancy solving Little's law b = rate x time in the batch"
    ),
    _predicted_per_mode(
        "tpot_ms", "Time per output token", "ms", "step time at the occupancy / tokens per step / decode share"
    ),
    _predicted_per_mode("e2el_ms", "End-to-end latency", "ms", "prefill + decode steps x step time (not saturated)"),
    _predicted_per_mode(
        "tpot_ms_p99",
        "Time per output token p99",
        "ms",
        "step time x the steps the row unlucky at p99 of acceptances needs / its decode tokens / decode share (the "
        "baseline's: its mean)",
    ),
    _predicted_per_mode(
        "e2el_ms_p99",
        "End-to-end latency p99",
        "ms",
        "prefill + the steps the row unlucky at p99 of acceptances needs x step time / decode share (not saturated)",
    ),
    _predicted_per_mode(
        "output_tokens_per_s", "Output tokens per second", "tokens/s", "requests admitted per second x output tokens"
    ),
    _predicted_per_mode(
        "capacity_rps", "Capacity", "requests/s", "the most requests per second the mode sustains with a full batch"
    ),
    _predicted_per_mode(
        "saturated", "Saturated", "", "1 when the rate exceeds the capacity (the queue grows)", fmt="int"
    ),
    Metric(
        "request_rate",
        "Request rate",
        "requests/s",
        doc="load runs: the arrival rate the trace was generated at (poisson, gamma, constant)",
        summary=True,
    ),
    Metric(
        "num_requests",
        "Requests",
        fmt="int",
        doc="load runs: requests in the trace (in each of load.traces), each served in both modes (`repeats` times)",
        summary=True,
    ),
    Metric(
        "excluded_requests",
        "Requests left out",
        fmt="int",
        doc="load runs with load.exclude_first: the first requests of each serve, served but left out of the figures",
    ),
    Metric("repeats", "Repeats", fmt="int", doc="load runs: times each trace was replayed in each mode"),
    Metric("traces", "Arrival traces", fmt="int", doc="load runs: arrival traces served (load.traces)"),
    *(
        Metric(
            f"{ratio}_repeat_{{stat}}",
            f"{label} over repeats",
            "x",
            doc=f"load runs with repeats > 1 or load.traces > 1, load.crossover_metric={metric}: {ratio} of each "
            "replay of each trace (stat: min, median, max)",
        )
        for ratio, label, metric in (
            ("tpot_p99_ratio", "TPOT p99, spec / baseline", "tpot_p99"),
            ("e2el_p99_ratio", "E2EL p99, spec / baseline", "e2el_p99"),
            ("goodput_ratio", "Goodput, spec / baseline", "goodput"),
        )
    ),
    Metric(
        "oracle_acceptance_pos_1",
        "Oracle acceptance at position 1",
        fmt="rate",
        doc="draft=oracle: steps whose first draft token was accepted, over the steps on the reference path "
        "(the output so far equal to the baseline's); its interval is Wilson's (binomial, 95%); it should "
        "contain oracle.acceptance",
        summary=True,
    ),
    Metric("oracle_acceptance_target", "Oracle acceptance set", fmt="rate", doc="draft=oracle: oracle.acceptance"),
    Metric(
        "oracle_off_path_steps",
        "Oracle steps off the path",
        fmt="int",
        doc="draft=oracle: row-steps drafted after the row's output parted from the reference (a bfloat16 "
        "near-tie); left out of oracle_acceptance_pos_1",
        summary=True,
    ),
    Metric(
        "k_schedule_alpha",
        "k_schedule=load: its acceptance estimate",
        fmt="rate",
        doc="k_schedule=load: the per-token acceptance the schedule had estimated by the end of the run (accepted "
        "drafts / (accepted drafts + steps that ended on a rejection), a prior worth 4 steps at 0.5 included)",
    ),
    Metric(
        "k_schedule_alpha_bound",
        "k_schedule=load: the acceptance it priced drafting at",
        fmt="rate",
        doc="k_schedule=load: the upper end of that estimate's 95% Wilson interval, at which it priced drafting; far "
        "above k_schedule_alpha when the run drafted little (few drafts to learn from)",
    ),
    Metric(
        "server_draft_tokens",
        "Server: draft tokens",
        fmt="int",
        doc="engine.backend=server: draft tokens the spec server proposed during the run (its /metrics counters' "
        "growth, vLLM's spec_decode_num_draft_tokens; or llama-server's per-response counts)",
    ),
    Metric(
        "server_accepted_tokens",
        "Server: accepted draft tokens",
        fmt="int",
        doc="engine.backend=server: of those, the tokens the server accepted (acceptance_rate is their ratio)",
    ),
    Metric(
        "server_drafts",
        "Server: drafts",
        fmt="int",
        doc="engine.backend=server: speculation steps the server counted (vLLM's spec_decode_num_drafts); "
        "mean_accepted_tokens = 1 + accepted / drafts",
    ),
    Metric("predicted_tpot_ratio", "TPOT, spec / baseline (predicted)", "x", doc="load model: predicted TPOT ratio"),
    Metric("predicted_e2el_ratio", "E2EL, spec / baseline (predicted)", "x", doc="load model: predicted E2EL ratio"),
    Metric(
        "predicted_tpot_p99_ratio",
        "TPOT p99, spec / baseline (predicted)",
        "x",
        doc="load model: predicted p99 TPOT ratio (beside tpot_p99_ratio)",
    ),
    Metric(
        "predicted_e2el_p99_ratio",
        "E2EL p99, spec / baseline (predicted)",
        "x",
        doc="load model: predicted p99 E2EL ratio (beside e2el_p99_ratio)",
    ),
)


REPEAT_STATS = {
    "min": "lowest",
    "median": "median",
    "max": "highest",
    "std": "sample standard deviation (n - 1)",
}


def _over_repeats(stem: str, label: str, unit: str, what: str, paired: bool, report: bool = False) -> list[Metric]:
    """The `<stem>_repeat_<stat>` family (for both modes when `paired`): one figure per pass, summarised."""
    entries = []
    for stat, meaning in REPEAT_STATS.items():
        median = stat == "median"
        entry_label = f"{label} over repeats (min-median-max)" if median else f"{label} over repeats, {stat}"
        extra = {"summary": median, "report": report and median, "spread": median}
        doc = f"{meaning} over repeats of {what} of one pass over the prompt set (logged when repeats > 1)"
        if paired:
            entries.append(_pair(f"{stem}_repeat_{stat}", entry_label, unit, None, doc, **extra))
        else:
            entries.append(Metric(f"{stem}_repeat_{stat}", entry_label, unit, doc=doc, **extra))
    return entries


METRICS: tuple[Metric, ...] = (
    Metric(
        "num_prompts",
        "Prompts",
        fmt="int",
        doc="prompts in the set, each decoded in both modes (`repeats` times)",
        summary=True,
    ),
    Metric("num_repeats", "Repeats", fmt="int", doc="passes over the prompt set (`repeats`)"),
    Metric(
        "truncated_prompts",
        "Truncated prompts",
        fmt="int",
        doc="prompts cut to fit the context: a PubMedQA abstract shortened (the question kept whole), or a text cut "
        "from its start (dataset.too_long=truncate)",
    ),
    Metric(
        "prompts_skipped_too_long",
        "Prompts skipped as too long",
        fmt="int",
        doc="records left out with dataset.too_long=skip, too long for the models' context even without an "
        "abstract; the next records (of their category, with per_category) took their places; named in the "
        "console and summary.md",
    ),
    Metric(
        "prompts_truncated",
        "Prompts cut from their start",
        fmt="int",
        doc="prompts whose text was cut from its start to fit the context (dataset.too_long=truncate), keeping "
        "its end; named in the console and summary.md",
    ),
    Metric(
        "prompts_skipped_too_long_cat_{category}",
        "Prompts skipped as too long, of a category",
        fmt="int",
        doc="prompts_skipped_too_long among the records of one category",
    ),
    Metric(
        "prompts_truncated_cat_{category}",
        "Prompts cut from their start, of a category",
        fmt="int",
        doc="prompts_truncated among the prompts of one category",
    ),
    # timing
    _pair(
        "latency_p50_s",
        "Latency p50 per request",
        "s",
        LOWER,
        "request latency, median over prompts and repeats (prefill included)",
        summary=True,
        report=True,
    ),
    _pair(
        "latency_p95_s",
        "Latency p95 per request",
        "s",
        LOWER,
        "request latency, 95th percentile over prompts and repeats",
        summary=True,
        report=True,
    ),
    _pair(
        "ms_per_token_p50",
        "Time per token p50",
        "ms",
        LOWER,
        "request latency / generated tokens, median over prompts and repeats",
        summary=True,
    ),
    _pair("ms_per_token_p95", "Time per token p95", "ms", LOWER, "request latency / generated tokens, 95th percentile"),
    _pair(
        "ttft_p50_s", "Time to first token p50", "s", LOWER, "time to first token (the prefill), median", summary=True
    ),
    _pair(
        "tokens_per_s",
        "Throughput",
        "tokens/s",
        HIGHER,
        "generated tokens / total wall time of the batches (prefill included), all prompts and repeats pooled; "
        "at batch size 1, total request time",
        summary=True,
        report=True,
    ),
    _pair(
        "total_s",
        "Total decode time",
        "s",
        LOWER,
        "sum of the batches' wall times over all prompts and repeats (at batch size 1, of request latencies)",
    ),
    Metric(
        "speedup",
        "Speedup",
        "x",
        better=HIGHER,
        doc="speculative tokens/s / baseline tokens/s (ratios of sums; equals total baseline time / total "
        "speculative time when both modes emit the same tokens). When they stop at different lengths (sampling, a "
        "bfloat16 near-tie), the token rate takes length out of the decoding time but not out of the costs paid "
        "once per request (time to first token, the drafts' prefill), which favour the mode that emits more: "
        "decode_speedup and steady_state_speedup leave them out",
        summary=True,
        report=True,
    ),
    Metric(
        "decode_speedup",
        "Decode speedup, after first token",
        "x",
        better=HIGHER,
        doc="the same over the decoding after the first token: (tokens - 1) / (latency - time to first token)",
        summary=True,
    ),
    Metric(
        "steady_state_speedup",
        "Steady-state speedup, without prefills",
        "x",
        better=HIGHER,
        doc="the decode speedup without the drafts' one-off reading of the prompt in the speculative time "
        "(what the speedup model describes)",
        summary=True,
        report=True,
    ),
    *_over_repeats("speedup", "Speedup", "x", "the speedup", paired=False, report=True),
    *_over_repeats("tokens_per_s", "Throughput", "tokens/s", "each mode's throughput", paired=True),
    # llama.cpp's own prompt-lookup speculation, timed beside ours (engine.backend=llamacpp, prompt-lookup draft)
    Metric(
        "native_lookup_tokens_per_s",
        "llama.cpp's own prompt lookup: throughput",
        "tokens/s",
        better=HIGHER,
        doc="llama-cpp-python's Llama.generate with its LlamaPromptLookupDecoding draft model (greedy, the run's k "
        "and max_ngram) on the same prompts, interleaved with both modes (engine.backend=llamacpp with a "
        "prompt-lookup draft)",
        summary=True,
    ),
    Metric(
        "speedup_native_lookup",
        "llama.cpp's own prompt lookup: speedup",
        "x",
        better=HIGHER,
        doc="native_lookup_tokens_per_s / baseline_tokens_per_s: llama.cpp's own speculation over our llama.cpp "
        "baseline (compare with speedup, ours)",
        summary=True,
        report=True,
    ),
    Metric(
        "native_lookup_exact_match_rate",
        "llama.cpp's own prompt lookup: exact match",
        fmt="rate",
        better=HIGHER,
        doc="share of prompts where llama.cpp's own prompt lookup emitted exactly the baseline's tokens",
    ),
    Metric(
        "draft_prefill_s_mean",
        "Draft prefill per prompt",
        "s",
        better=LOWER,
        doc="the drafts' reading of the prompt, mean per prompt",
    ),
    Metric(
        "padded_token_share",
        "Padded share of verifier work",
        fmt="rate",
        better=LOWER,
        doc="share of the token positions the verifier computed after the prefill that were padding: a row's "
        "unused slots of a step, or rows already finished (0 at batch size 1 with one drafter); in a load run, "
        "over every serve whole, the empty slots of CUDA graphs' slot buckets included (our engine only)",
        baseline="padded_token_share_baseline",
        summary=True,
    ),
    Metric(
        "peak_gpu_mem_gb_spec",
        "Peak GPU memory",
        "GB",
        better=LOWER,
        doc="peak GPU memory of each mode",
        baseline="peak_gpu_mem_gb_baseline",
    ),
    Metric(
        "gpu_mem_before_load_gb",
        "GPU memory before loading",
        "GB",
        doc="memory still held when the run starts loading (models of earlier jobs it does not use are released first)",
    ),
    # acceptance
    Metric(
        "acceptance_rate",
        "Acceptance rate",
        fmt="rate",
        better=HIGHER,
        doc="accepted / proposed draft tokens (for a draft set: the accepted path / the deepest proposal)",
        summary=True,
        report=True,
    ),
    Metric(
        "mean_accepted_tokens",
        "Mean accepted tokens per step",
        better=HIGHER,
        doc="tokens emitted per speculative verifier call, the verifier's own token included (at most k+1)",
        summary=True,
        report=True,
    ),
    Metric("mean_k", "Mean draft length", doc="mean k asked for per step (varies under k_schedule=heuristic)"),
    Metric(
        "acceptance_rate_pos_{i}",
        "Acceptance at draft position i",
        fmt="rate",
        better=HIGHER,
        doc="share of steps that kept draft position i",
    ),
    Metric(
        "acceptance_rate_by_position",
        "Acceptance by draft position (series)",
        fmt="rate",
        better=HIGHER,
        doc="the acceptance_rate_pos_{i} values as one metric at step i, so MLflow's chart view draws a curve "
        "per run (its latest value is the deepest position's)",
    ),
    # under load (mode=load); before the per-drafter families, which would match acceptance by occupancy
    *LOAD_METRICS,
    # per category (records with a category: `dataset=prompts`); before the per-drafter families, which would match
    Metric(
        "speedup_cat_{category}",
        "Speedup of a category",
        "x",
        better=HIGHER,
        doc="speedup over the prompts of one category (a ratio of sums, like the run's)",
    ),
    *(
        Metric(
            f"speedup_repeat_{stat}_cat_{{category}}",
            f"Speedup of a category over repeats, {stat}",
            "x",
            doc=f"{REPEAT_STATS[stat]} over repeats of a category's speedup in one pass (logged when repeats > 1)",
        )
        for stat in SPREAD_STATS
    ),
    Metric(
        "acceptance_rate_cat_{category}",
        "Acceptance rate of a category",
        fmt="rate",
        better=HIGHER,
        doc="acceptance rate over the prompts of one category",
    ),
    Metric(
        "mean_accepted_tokens_cat_{category}",
        "Mean accepted tokens of a category",
        better=HIGHER,
        doc="tokens per speculative verifier call over the prompts of one category",
    ),
    Metric(
        "spec_tokens_per_s_cat_{category}",
        "Throughput of a category",
        "tokens/s",
        better=HIGHER,
        doc="speculative tokens/s over the prompts of one category",
    ),
    Metric(
        "acceptance_rate_{draft}",
        "Acceptance rate of a drafter",
        fmt="rate",
        better=HIGHER,
        doc="per drafter of a set: its accepted share",
    ),
    Metric(
        "win_rate_{draft}",
        "Win rate of a drafter",
        fmt="rate",
        doc="how often its candidate was (one of) the longest accepted",
    ),
    Metric(
        "draft_time_s_{draft}",
        "Drafting time of a drafter",
        "s",
        better=LOWER,
        doc="its drafting time over all prompts (drafters proposing in parallel threads on a GPU: each reading "
        "waits for the whole device, so it includes the others' concurrent work)",
    ),
    # fidelity to the baseline
    Metric(
        "disagreement_rate",
        "Disagreement rate",
        fmt="rate",
        better=LOWER,
        doc="share of decodes whose speculative token ids differ from the baseline token ids (stricter than "
        "comparing texts, which different ids can spell alike); near 100% by design when sampling, where the "
        "console and the report's headline leave it out",
        summary=True,
        report=True,
    ),
    Metric(
        "disagreements_at_near_tie",
        "Disagreements at a near-tie",
        fmt="int",
        doc="greedy decodes whose output differs from the baseline's where the verifier's top two logits (the "
        "baseline's prefix, one teacher-forced forward, upcast to float32) are within 4 rounding units of its "
        "dtype at the top logit's magnitude (eps x 2^floor(log2 |logit|)): rounding explains them; per decode in "
        "per_prompt.csv (first_difference_gap, first_difference_unit, first_difference_near_tie)",
        summary=True,
    ),
    Metric(
        "disagreements_not_near_tie",
        "Disagreements not at a near-tie",
        fmt="int",
        better=LOWER,
        doc="greedy decodes whose output differs from the baseline's at a wider gap: rounding does not explain "
        "them, the console warns naming each; the lossless claim rests on this being 0",
        summary=True,
    ),
    Metric(
        "exact_match_rate",
        "Exact match rate",
        fmt="rate",
        better=HIGHER,
        doc="share of prompts whose speculative token ids equal the baseline token ids",
    ),
    Metric(
        "rougeL_vs_baseline",
        "ROUGE-L vs baseline",
        better=HIGHER,
        doc="rouge-score ROUGE-L F1 of the speculative text against the baseline text",
        summary=True,
        report=True,
    ),
    Metric(
        "bleu_vs_baseline",
        "BLEU vs baseline",
        better=HIGHER,
        doc="sacrebleu corpus BLEU (0..1) of the speculative texts against the baseline texts",
        summary=True,
        report=True,
    ),
    Metric(
        "semantic_similarity_vs_baseline",
        "Semantic similarity vs baseline",
        better=HIGHER,
        doc="all-MiniLM-L6-v2 cosine of the two texts, mean over prompts",
        summary=True,
        report=True,
    ),
    Metric(
        "perplexity_spec",
        "Perplexity (verifier)",
        doc="the verifier's perplexity of each mode's outputs; for sampled runs this, not disagreement, "
        "shows quality is kept",
        baseline="perplexity_baseline",
        summary=True,
    ),
    # task accuracy (records with a gold yes / no / maybe answer: PubMedQA)
    Metric(
        "accuracy_spec",
        "Accuracy (yes/no/maybe)",
        fmt="rate",
        better=HIGHER,
        doc="share of prompts with a gold answer whose output gives that decision (specbench.answers parses it); "
        "equal when the outputs are (greedy float32 on the tested models), the quality figure under sampling or bf16",
        baseline="accuracy_baseline",
        summary=True,
        report=True,
    ),
    Metric(
        "unparsed_rate_spec",
        "Unparsed answers",
        fmt="rate",
        better=LOWER,
        doc="share of prompts with a gold answer whose output gives no decision that can be read (counted wrong)",
        baseline="unparsed_rate_baseline",
        summary=True,
    ),
    Metric(
        "mean_logprob_spec",
        "Mean log-likelihood per token",
        doc="the verifier's mean log-probability per output token",
        baseline="mean_logprob_baseline",
    ),
    # cost
    Metric(
        "usd_per_hour", "Machine price", "USD/h", fmt="usd", doc="from cost.usd_per_hour or the device's cost profile"
    ),
    Metric(
        "cost_per_query_usd_spec",
        "Cost per query",
        fmt="usd",
        better=LOWER,
        doc="price x total time / prompts; it follows output length, which sampling can make differ between "
        "the modes: compare cost per 1k tokens",
        baseline="cost_per_query_usd_baseline",
        summary=True,
        report=True,
    ),
    Metric(
        "cost_per_1k_tokens_usd_spec",
        "Cost per 1k tokens",
        fmt="usd",
        better=LOWER,
        doc="price x total time / generated tokens x 1000",
        baseline="cost_per_1k_tokens_usd_baseline",
        summary=True,
    ),
    Metric(
        "cost_saving_pct",
        "Cost saving",
        fmt="pct",
        better=HIGHER,
        doc="1 - speculative / baseline cost per 1k tokens (= 1 - 1 / speedup)",
        summary=True,
        report=True,
    ),
    # the speedup model
    Metric(
        "predicted_speedup",
        "Predicted speedup",
        "x",
        better=HIGHER,
        doc="Leviathan et al.: (1 - a^(k+1)) / ((1 - a)(k c + v)), v the measured cost of verifying k+1 tokens "
        "over one; at batch size > 1, times what waiting for each batch's longest row costs each mode (the expected "
        "largest of the run's per-prompt counts); one drafter at a constant k only (not logged for draft sets or "
        "k_schedule=heuristic)",
        summary=True,
        report=True,
    ),
    Metric(
        "best_k_predicted",
        "Best k (predicted)",
        fmt="int",
        doc="the k the model predicts fastest over the measured verify-cost curve",
        summary=True,
    ),
    Metric(
        "predicted_speedup_best_k",
        "Predicted speedup at best k",
        "x",
        better=HIGHER,
        doc="the model's speedup at that k (it assumes every draft token is accepted independently with alpha)",
        summary=True,
    ),
    Metric(
        "speedup_prediction_ratio", "Measured / predicted speedup", "x", doc="steady_state_speedup / predicted_speedup"
    ),
    Metric(
        "predicted_speedup_batch_{b}_extrapolated",
        "Predicted speedup at batch size b is extrapolated",
        fmt="int",
        doc=f"1 when b is more than {EXTRAPOLATED_BEYOND}x the prompts measured: b rows then mostly repeat the few "
        "prompts, whose longest output understates a real batch's, so the prediction is optimistic (console and "
        "report mark it)",
    ),
    Metric(
        "predicted_speedup_batch_{b}",
        "Predicted speedup at batch size b",
        "x",
        doc="the model at batch size b, with c and v measured at b rows (one and k+1 tokens per row), alpha from "
        "this run, and a batch of b prompts waiting for its longest row: the expected largest of b per-prompt "
        "verifier calls in each mode, drawn with replacement from this run's prompts (computed exactly, no "
        "random draws); b over cost_batch_grid, as far as cost_grid_budget_s and memory allow",
    ),
    Metric(
        "crossover_batch_predicted",
        "Crossover batch size (predicted)",
        fmt="int",
        better=HIGHER,
        doc="the smallest measured batch size at which the predicted speedup falls below 1 (not logged when it "
        "never does within the measured batch sizes)",
        summary=True,
        report=True,
    ),
    Metric(
        "crossover_batch_predicted_extrapolated",
        "Crossover batch size is extrapolated",
        fmt="int",
        doc=f"1 when that batch size is more than {EXTRAPOLATED_BEYOND}x the prompts measured (as "
        "predicted_speedup_batch_{b}_extrapolated)",
    ),
    Metric(
        "draft_verifier_cost_ratio",
        "Draft / verifier cost ratio c",
        doc="one draft step over one verifier step (a draft set's drafters summed)",
    ),
    Metric(
        "acceptance_to_pay",
        "Acceptance that would pay",
        fmt="rate",
        doc="when the speedup model predicts no k pays at the measured acceptance: the lowest per-token acceptance "
        "alpha at which some k would reach a speedup of 1 (the run's summary says why, in one sentence)",
        summary=True,
    ),
    Metric(
        "alpha_iid",
        "Per-token acceptance alpha",
        doc="the per-token acceptance that explains the measured accepted tokens per full k-token step (logged "
        "with predicted_speedup)",
    ),
    Metric("verify_step_ms", "Verifier step", "ms", doc="one verifier forward over one new token per row"),
    Metric(
        "verify_cost_ratio_{n}_tokens",
        "Verify cost of n tokens",
        "x",
        doc="one verifier pass over n = k+1 tokens per row / over one token per row, at the run's batch size",
    ),
    Metric("draft_step_ms_{draft}", "Draft step of a drafter", "ms", doc="one drafting step of each model drafter"),
    Metric(
        "dtype_probe_ms_{dtype}_{step}",
        "dtype probe: one step",
        "ms",
        doc="dtype=auto on a CPU: one step (verify_1: a verifier step over 1 token, verify_k1: over k+1 tokens, "
        "draft: a drafting step; prefill_per_token and draft_prefill_per_token: a one-row prefill by the verifier "
        "and by the draft models, per prompt token) in float32 and bfloat16, the figures the run's dtype (param "
        "dtype_chosen) was chosen from; logged when probed, or read from the probe's cache (param dtype_probe)",
    ),
    Metric(
        "interval_units",
        "Units of the 95% intervals",
        fmt="int",
        doc="independent units the intervals resample: batches (prompts at batch size 1), each with num_repeats "
        "repeats; from 20 on a percentile bootstrap, below a t interval (tag interval_method)",
    ),
    Metric(
        "system/{name}",
        "System metric",
        doc="MLflow's system metrics with tracking.system_metrics=true: CPU, memory, disk, network, and GPU "
        "with pynvml (nvidia-ml-py), sampled every 10 s",
    ),
)

INTERVAL_SUFFIXES = ("_ci_low", "_ci_high")

_BY_KEY = {metric.key: metric for metric in METRICS}
_FAMILIES = [(re.compile(re.sub(r"\\\{\w+\\\}", r".+", re.escape(m.key)) + "$"), m) for m in METRICS if "{" in m.key]


def metric(key: str) -> Metric | None:
    """The catalog entry of an MLflow key (families, baseline counterparts and intervals included), None if unknown."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    for suffix in INTERVAL_SUFFIXES:
        if key.endswith(suffix):
            return metric(key.removesuffix(suffix))
    for entry in METRICS:
        if entry.baseline == key:
            return entry
    return next((entry for pattern, entry in _FAMILIES if pattern.match(key)), None)


def summary_metrics() -> list[Metric]:
    """The headline metrics of one run, in catalog order: the rows of summary.md."""
    return [entry for entry in METRICS if entry.summary]


def report_metrics() -> list[Metric]:
    """The metrics compared across runs, in catalog order: the columns of the report's table."""
    return [entry for entry in METRICS if entry.report]


# What a user decides on, in this order: the end-of-run console summary and the columns of the MLflow runs table.
HEADLINE_METRICS = ("speedup", "acceptance_rate", "spec_tokens_per_s", "disagreement_rate", "cost_saving_pct")


def headline_metrics() -> list[Metric]:
    """The metrics a user decides on; one measured in both modes shows its baseline too."""
    return [_BY_KEY[key] for key in HEADLINE_METRICS]


def readme_table() -> str:
    """The README's metric table (keys, unit, meaning)."""
    rows = ["| metric | unit | better | meaning |", "| --- | --- | --- | --- |"]
    for entry in METRICS:
        keys = f"`{entry.key}`" + (f", `{entry.baseline}`" if entry.baseline else "")
        unit = {"rate": "share", "usd": "USD"}.get(entry.fmt, entry.unit)
        rows.append(f"| {keys} | {unit} | {entry.better or ''} | {entry.doc} |")
    rows.append(
        "| `*_ci_low`, `*_ci_high` | as the metric | | 95% interval of the speedup, acceptance rate and latency "
        "percentiles from a two-level bootstrap: batches (prompts, at batch size 1) drawn with replacement, then "
        "repeats within each drawn batch. From 20 batches the bootstrap's percentiles; below, a t interval on the "
        "log scale (logit for the acceptance rate) with the bootstrap's standard error and n - 1 degrees of "
        "freedom. The run's `interval_method` tag names the method; consoles and reports print n "
        "(`interval_units` x `num_repeats`) beside each interval |"
    )
    return "\n".join(rows)


README_START, README_END = (
    "<!-- metrics table: python -m specbench.catalog README.md -->",
    "<!-- end of metrics table -->",
)


def replace_readme_table(text: str) -> str:
    """`text` with the block between the README markers replaced by `readme_table()`."""
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    return f"{text[:start]}\n{readme_table()}\n{text[end:]}"


if __name__ == "__main__":
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(replace_readme_table(readme.read_text()))
