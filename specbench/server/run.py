"""One load run against servers, without Hydra or MLflow: the sibling of `load.pipeline.run_load` for
engine.backend=server.

    result, artifacts = run_server_load(cfg, records, rate, out_dir, tokenizer)

No model is loaded: the prompts are the dataset's records filled into `dataset.template`
(as text: the server tokenizes, and with server.chat=true applies its own chat template),
the traces are built once (`mode.server_trace`; `load.traces` of them) and each is served
by each mode's server in turn, `repeats` times with the order of the modes alternating, as
for our engine. The figures are the load metrics of the pooled serves
(`load.metrics.load_metrics`), the servers' own (`mode.server_figures`), and at temperature 0
the agreement of the two modes' texts. `artifacts` are each mode's responses and server
logs, under `out_dir/repeat<i>` (`out_dir/repeat<i>-trace<j>` with several traces).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from specbench.config import ChatTemplate, SpecBenchConfig
from specbench.data import PromptBuilder, Record
from specbench.engine.results import ServeResult
from specbench.load.metrics import load_metrics
from specbench.load.pipeline import LoadResult, excluded_note, served_counts
from specbench.load.trace import MODES
from specbench.server.mode import ModeOutcome, serve_on_server, server_figures, server_trace, text_disagreement


def prompt_texts(cfg: SpecBenchConfig, records: list[Record]) -> list[str]:
    """Each record filled into dataset.template, as the text a server gets (not cut: a server refuses a prompt
    longer than its context, and that request fails with the server's reason)."""
    builder = PromptBuilder(None, cfg.dataset.template, ChatTemplate.off, max_tokens=0)  # formatting needs no tokenizer
    return [builder.format(record, record.abstract()) for record in records]


def server_title(cfg: SpecBenchConfig, rate: float | None) -> str:
    """A server load run's name in figures and logs."""
    load = "a fixed batch" if cfg.server.fixed_batch else f"{rate:g} requests/s" if rate is not None else "trace file"
    model = cfg.server.model or "the served model"
    return f"{model} on its servers (engine.backend=server), {load}"


def run_server_load(
    cfg: SpecBenchConfig, records: list[Record], rate: float | None, out_dir: Path, tokenizer: Any = None
) -> tuple[LoadResult, list[Path]]:
    """Serve the traces at `rate` (None: load.trace_path's, or a fixed batch) on both modes' servers `repeats` times,
    and measure; the result and its artifacts. Raises ServerError when a server does not answer, exits or never
    becomes ready."""
    cfg = cfg if rate is None else replace(cfg, load=replace(cfg.load, rate=rate))
    record_ids = [record.pubid for record in records]
    traces = [server_trace(cfg, record_ids, cfg.seed + number) for number in range(cfg.load.traces)]
    texts = prompt_texts(cfg, records)
    outcomes: dict[str, list[ModeOutcome]] = {mode: [] for mode in MODES}
    for repeat in range(cfg.repeats):
        for number, trace in enumerate(traces):
            folder = out_dir / (f"repeat{repeat}" if len(traces) == 1 else f"repeat{repeat}-trace{number}")
            for mode in MODES if repeat % 2 == 0 else reversed(MODES):
                outcomes[mode].append(serve_on_server(cfg, trace, texts, mode, folder, tokenizer))
    served = {mode: [outcome.result for outcome in results] for mode, results in outcomes.items()}
    result = LoadResult(server_title(cfg, rate), rate, traces, served, {}, exclude_first=cfg.load.exclude_first)
    figures, notes = server_figures(outcomes)
    result.notes = notes + excluded_note(cfg)
    result.metrics = load_metrics(result.pooled(), cfg.slo, cfg.seed, result.pooled_traces()) | figures
    result.metrics |= served_counts(cfg, traces)
    if rate is not None and not cfg.server.fixed_batch:
        result.metrics["request_rate"] = rate
    if not cfg.generation.do_sample:
        first: dict[str, ServeResult] = {mode: results[0] for mode, results in served.items()}
        result.metrics |= text_disagreement(first)
    artifacts = [path for results in outcomes.values() for outcome in results for path in outcome.artifacts]
    return result, artifacts
