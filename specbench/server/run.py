"""One load run against servers, without Hydra or MLflow: the sibling of `load.pipeline.run_load` for
engine.backend=server.

    result, artifacts = run_server_load(cfg, records, rate, out_dir)

No model is loaded (only `server.tokenizer`, when set): the prompts are the dataset's records
filled into `dataset.template` (as text: the server tokenizes, and with server.chat=true
applies its own chat template), the traces are built once (`mode.server_trace`; `load.traces`
of them) and each is served by each mode's server in turn, `repeats` times with the order of the modes alternating, as
for our engine. The figures are every backend's (`load.result.served_figures`: the load
metrics of the pooled serves and the per-serve spread of the crossover ratio), the servers'
own (`mode.server_figures`), and at temperature 0 the agreement of the two modes' texts (of
each mode's first serve, all its requests). `artifacts` are each mode's responses and server
logs, under `out_dir/repeat<i>` (`out_dir/repeat<i>-trace<j>` with several traces).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from specbench.config import ChatTemplate, SpecBenchConfig
from specbench.data import PromptBuilder, Record
from specbench.engine.results import ServeResult
from specbench.errors import ModelLoadError, first_line
from specbench.load.result import LoadResult, excluded_note, served_figures
from specbench.load.trace import MODES, serve_order
from specbench.server.mode import ModeOutcome, serve_on_server, server_figures, server_trace, text_disagreement


def prompt_texts(cfg: SpecBenchConfig, records: list[Record]) -> list[str]:
    """Each record filled into dataset.template, as the text a server gets (not cut: a server refuses a prompt
    longer than its context, and that request fails with the server's reason)."""
    builder = PromptBuilder(None, cfg.dataset.template, ChatTemplate.off, max_tokens=0)  # formatting needs no tokenizer
    return [builder.format(record, record.abstract()) for record in records]


@cache
def counting_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """`server.tokenizer`, loaded once a process (a crossover search serves many rates)."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load server.tokenizer={name} ({first_line(error)}): point it at a folder holding the served "
            "model's tokenizer, or at a hub id in the local cache."
        ) from error


def run_server_load(
    cfg: SpecBenchConfig, records: list[Record], rate: float | None, out_dir: Path
) -> tuple[LoadResult, list[Path]]:
    """Serve the traces at `rate` (None: load.trace_path's, or a fixed batch) on both modes' servers `repeats` times,
    and measure; the result and its artifacts. Raises ServerError when a server does not answer, exits or never
    becomes ready, and ModelLoadError when `server.tokenizer` cannot be loaded (before any server starts)."""
    tokenizer = counting_tokenizer(cfg.server.tokenizer) if cfg.server.tokenizer else None
    cfg = cfg if rate is None else replace(cfg, load=replace(cfg.load, rate=rate))
    record_ids = [record.pubid for record in records]
    traces = [server_trace(cfg, record_ids, cfg.seed + number) for number in range(cfg.load.traces)]
    texts = prompt_texts(cfg, records)
    outcomes: dict[str, list[ModeOutcome]] = {mode: [] for mode in MODES}
    for repeat, number, mode in serve_order(cfg.repeats, len(traces)):
        folder = out_dir / (f"repeat{repeat}" if len(traces) == 1 else f"repeat{repeat}-trace{number}")
        outcomes[mode].append(serve_on_server(cfg, traces[number], texts, mode, folder, tokenizer))
    served = {mode: [outcome.result for outcome in results] for mode, results in outcomes.items()}
    result = LoadResult.of(cfg, rate, traces, served)
    figures, notes = server_figures(outcomes)
    result.notes = notes + excluded_note(cfg)
    result.metrics = served_figures(cfg, result) | figures
    if rate is not None and not cfg.server.fixed_batch:
        result.metrics["request_rate"] = rate
    if not cfg.generation.do_sample:
        first: dict[str, ServeResult] = {mode: results[0] for mode, results in served.items()}
        result.metrics |= text_disagreement(first)
    artifacts = [path for results in outcomes.values() for outcome in results for path in outcome.artifacts]
    return result, artifacts
