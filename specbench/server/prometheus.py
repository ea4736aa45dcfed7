"""Speculation counters read from a server's Prometheus `/metrics`, before and after a mode's trace.

vLLM counts, per engine (summed here over its labels):
- `vllm:spec_decode_num_drafts`: speculative steps (one per request per step);
- `vllm:spec_decode_num_draft_tokens`: tokens proposed;
- `vllm:spec_decode_num_accepted_tokens`: of which accepted;
- `vllm:spec_decode_num_accepted_tokens_per_pos{position="i"}`: drafts whose token at
  position i (from 0) was accepted.

The acceptance over the trace is the difference of the counters (the warm-up is read
before and so left out):
- `acceptance_rate` = accepted / proposed tokens;
- `mean_accepted_tokens` = 1 + accepted / drafts (the verifier's own token included, as
  our engine counts it);
- `acceptance_rate_pos_{i}` (i from 1) = accepted at position i / drafts.

SGLang exposes speculation only as gauges over its last logging interval
(`sglang:spec_accept_length`, `sglang:spec_accept_rate`), which cannot be differenced over
a trace; llama-cpp-python's server has no `/metrics`, and llama.cpp's `llama-server`
counts no drafts there (it reports them per response instead, `timings.draft_n` and
`draft_n_accepted`, which the client keeps per request). For those, one line says so
and nothing is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from specbench.server.http import get

DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"
SGLANG_GAUGE = "sglang:spec_accept_length"
SCRAPE_TIMEOUT_S = 10.0


@dataclass
class Scrape:
    """One reading of a server's /metrics: its speculation counters, or why there are none."""

    counters: dict[str, float] = field(default_factory=dict)  # family -> value summed over labels
    accepted_per_position: dict[int, float] = field(default_factory=dict)  # position (from 0) -> value
    missing: str | None = None  # why the counters are absent (one line)


def scrape(root_url: str, api_key: str | None = None) -> Scrape:
    """Read the speculation counters at `root_url`/metrics."""
    try:
        status, text = get(f"{root_url}/metrics", api_key, SCRAPE_TIMEOUT_S)
    except OSError as error:
        return Scrape(missing=f"{root_url}/metrics could not be read ({type(error).__name__})")
    if status != 200:
        return Scrape(missing=f"{root_url} has no Prometheus /metrics (HTTP {status})")
    return parse(text)


def parse(text: str) -> Scrape:
    """The speculation counters of a Prometheus exposition."""
    reading = Scrape()
    sglang = False
    for family in text_string_to_metric_families(text):
        name = family.name.removesuffix("_total")  # an exposition without TYPE lines keeps the suffix
        sglang |= name == SGLANG_GAUGE
        if name not in (DRAFTS, DRAFT_TOKENS, ACCEPTED_TOKENS, ACCEPTED_PER_POSITION):
            continue
        if name != ACCEPTED_PER_POSITION:
            reading.counters.setdefault(name, 0.0)  # a family without samples yet counts 0
        for sample in family.samples:
            if name == ACCEPTED_PER_POSITION:
                position = int(sample.labels["position"])
                reading.accepted_per_position[position] = reading.accepted_per_position.get(position, 0) + sample.value
            else:
                reading.counters[name] = reading.counters.get(name, 0) + sample.value
    if DRAFT_TOKENS not in reading.counters:
        reading.missing = (
            "SGLang reports speculation only as gauges over its last logging interval (sglang:spec_accept_length), "
            "not counters"
            if sglang
            else f"its /metrics has no speculation counters ({DRAFT_TOKENS})"
        )
    return reading


def acceptance_metrics(readings: list[tuple[Scrape, Scrape]]) -> dict[str, float]:
    """The acceptance over one or more traces (repeats), from the speculative server's readings before and after
    each; empty when a reading has no counters."""
    if any(before.missing or after.missing for before, after in readings):
        return {}

    def grown(name: str) -> float:
        return sum(after.counters.get(name, 0.0) - before.counters.get(name, 0.0) for before, after in readings)

    drafts, proposed, accepted = grown(DRAFTS), grown(DRAFT_TOKENS), grown(ACCEPTED_TOKENS)
    metrics = {"server_draft_tokens": proposed, "server_accepted_tokens": accepted}
    if proposed > 0:
        metrics["acceptance_rate"] = accepted / proposed
    if drafts > 0:
        metrics["server_drafts"] = drafts
        metrics["mean_accepted_tokens"] = 1 + accepted / drafts
        positions = sorted({position for _, after in readings for position in after.accepted_per_position})
        for position in positions:
            kept = sum(
                after.accepted_per_position.get(position, 0.0) - before.accepted_per_position.get(position, 0.0)
                for before, after in readings
            )
            metrics[f"acceptance_rate_pos_{position + 1}"] = kept / drafts
    return metrics


def drafted_tokens(readings: list[tuple[Scrape, Scrape]]) -> float:
    """Draft tokens a server proposed over its traces (0 without counters): a baseline server should not."""
    if any(before.missing or after.missing for before, after in readings):
        return 0.0
    return sum(
        after.counters.get(DRAFT_TOKENS, 0.0) - before.counters.get(DRAFT_TOKENS, 0.0) for before, after in readings
    )
