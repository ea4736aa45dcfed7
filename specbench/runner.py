"""One run, without Hydra or MLflow: load what the config names, warm up, decode every prompt both ways.

Prompts are decoded in batches of `batch_size` consecutive prompts (the last
batch may be smaller). Baseline and speculative decoding run back to back on
each batch (interleaved, so drift in machine speed hits both alike; the order
alternates from batch to batch), with the same seeds, after a warm-up outside
the measurement. With `repeats` > 1 the whole prompt set is timed that many
times over (warm-up once), to show machine noise apart from prompt variance.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specbench import hf_backend, llamacpp
from specbench.config import Backend, BenchmarkMode, Dtype, KScheduleKind, SpecBenchConfig
from specbench.data import Prompt, PromptBuilder, Record, build_prompts
from specbench.drafters import build_drafter, needs_model, shares_tokenizer
from specbench.dtype_probe import DtypeChoice, choose_run_dtype
from specbench.engine import (
    AdaptiveK,
    BatchResult,
    CachedModel,
    ConstantK,
    DecodeSettings,
    Drafter,
    KSchedule,
    decode_baseline,
    decode_speculative,
    needs_plain_causal_mask,
)
from specbench.engine.costs import StepCosts, measure_step_costs
from specbench.engine.drafters import drafter_models
from specbench.engine.oracle import OracleDrafter
from specbench.engine.scoring import output_log_likelihood
from specbench.errors import ConfigError
from specbench.metrics import BatchStats, PromptOutcome
from specbench.models import (
    ModelCache,
    ModelSpec,
    check_same_vocabulary,
    context_length,
    eos_token_ids,
    model_config,
    model_spec,
    resolve_device,
)

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """Everything one run decodes with."""

    device: torch.device
    verifier: CachedModel
    drafters: list[Drafter]
    tokenizer: PreTrainedTokenizerBase
    prompts: list[Prompt]
    settings: DecodeSettings
    specs: dict[str, ModelSpec]  # "verifier" and each model drafter's name
    device_name: str
    gpu_memory_before_load_gb: float | None  # after releasing the models this run does not use
    schedule: KSchedule  # the draft length per step
    batches: list[list[int]]  # prompt indices, `batch_size` consecutive prompts each
    pool: ThreadPoolExecutor | None = None  # drafters propose in parallel threads when set
    prompt_builder: PromptBuilder | None = None  # tokenizes prompts given as text (a load trace's)
    models: dict[str, PreTrainedModel] = field(default_factory=dict)  # the loaded models by name, for other backends
    dtype_choice: DtypeChoice | None = None  # the run's dtype (`auto` resolved), with the CPU probe's figures
    # other engines timed beside ours on the same prompts, by mode name (llama.cpp's own prompt lookup)
    contenders: dict[str, Decoder] = field(default_factory=dict)
    skipped_too_long: list[Record] = field(default_factory=list)  # left out by dataset.too_long=skip


def device_name(device: torch.device, threads: int | None = None) -> str:
    """The GPU's name, or the CPU's model and thread count (torch's unless `threads` is given)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu} ({threads or torch.get_num_threads()} threads)"


def prepare(cfg: SpecBenchConfig, records: list[Record], cache: ModelCache) -> RunSetup:
    """Resolve models, check tokenizers and build prompts (cheap), then load the models."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels, syncs and graph captures all go to this job's GPU
    fuse = cfg.engine.fuse_projections

    def specs_in(run_dtype: Dtype) -> dict[str, ModelSpec]:
        specs = {"verifier": model_spec(cfg.verifier, run_dtype, device, cfg.models_dir, fuse)}
        for name, drafter in cfg.draft.drafters.items():
            if needs_model(drafter):
                specs[name] = model_spec(drafter, run_dtype, device, cfg.models_dir, fuse)
        return specs

    specs = specs_in(cfg.dtype)
    tokenizer = cache.tokenizer(specs["verifier"])
    for name, spec in specs.items():
        if name != "verifier" and shares_tokenizer(cfg.draft.drafters[name]):
            check_same_vocabulary(tokenizer, cache.tokenizer(spec), name, cfg.verifier.name)
            if cfg.engine.backend is Backend.transformers:
                hf_backend.check_assistant(specs["verifier"], name, spec)
    _check_attention(cfg, specs)
    context = min(context_length(spec) for spec in specs.values())
    # room after the prompt: the output, or the cost curve's passes over the first prompt if longer
    room = max(cfg.generation.max_new_tokens, curve_tokens(cfg))
    prompt_budget = context - room
    if prompt_budget < 1:
        raise ConfigError(
            f"generation.max_new_tokens={cfg.generation.max_new_tokens} leaves no room for a prompt in the "
            f"models' context of {context} tokens: lower generation.max_new_tokens."
        )
    builder = PromptBuilder(tokenizer, cfg.dataset.template, cfg.dataset.chat_template, prompt_budget, context)
    prompts, skipped_too_long = build_prompts(builder, records, cfg.dataset)
    if cfg.batch_size > len(prompts):
        log.info(
            "batch_size=%d is more than the %d prompts: they are decoded as one batch", cfg.batch_size, len(prompts)
        )

    if cfg.engine.backend is Backend.llamacpp:
        cache.keep_only(set())  # llama.cpp reads the GGUF files itself: no torch model is loaded
        return _llamacpp_setup(cfg, specs, tokenizer, prompts, room, skipped_too_long)
    machine = device_name(device)
    dtype_choice = choose_run_dtype(
        cfg, device, machine, specs_in, cache, [prompt.input_ids for prompt in prompts], len(tokenizer)
    )
    specs = specs_in(Dtype(dtype_choice.dtype))
    cache.keep_only(set(specs.values()))
    gpu_memory_before_load = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    vocab_size = len(tokenizer)
    verifier_model = cache.model(specs["verifier"])
    # CUDA graphs: a static cache long enough for the longest prompt, its output and the widest
    # candidate tree (every drafter k_max deep), and one graph per decode feed length
    max_len = max(len(p.input_ids) for p in prompts) + room + len(cfg.draft.drafters) * longest_draft(cfg) + 2
    graphs = cfg.engine.cuda_graphs
    # the verify graphs cover the cost curve and the widest token tree, so draft sets are captured too
    longest_verify = max(curve_tokens(cfg), 1 + len(cfg.draft.drafters) * longest_draft(cfg))
    verify_sizes = range(1, longest_verify + 1)

    def cached(model: PreTrainedModel, sizes: Sequence[int]) -> CachedModel:
        return CachedModel(
            model, vocab_size, max_len if graphs else None, sizes if graphs else (), compile=cfg.engine.compile
        )

    drafters: list[Drafter] = [
        build_drafter(name, drafter, cached(cache.model(specs[name]), (1, 2)) if name in specs else None)
        for name, drafter in cfg.draft.drafters.items()
    ]
    settings = decode_settings(cfg, eos_token_ids(verifier_model, tokenizer))
    verifier = cached(verifier_model, verify_sizes)
    pool = ThreadPoolExecutor(len(drafters)) if cfg.engine.parallel_drafts and len(drafters) > 1 else None
    batches = [
        list(range(start, min(start + cfg.batch_size, len(prompts))))
        for start in range(0, len(prompts), cfg.batch_size)
    ]
    return RunSetup(
        device=device,
        verifier=verifier,
        drafters=drafters,
        tokenizer=tokenizer,
        prompts=prompts,
        settings=settings,
        specs=specs,
        device_name=machine,
        gpu_memory_before_load_gb=gpu_memory_before_load,
        schedule=k_schedule(cfg),
        batches=batches,
        pool=pool,
        models={name: cache.model(spec) for name, spec in specs.items()},
        prompt_builder=builder,
        dtype_choice=dtype_choice,
        skipped_too_long=skipped_too_long,
    )


def decode_settings(cfg: SpecBenchConfig, eos_token_ids: frozenset[int]) -> DecodeSettings:
    """What every decode of the run generates: `generation`'s settings, stopping at the verifier's stop tokens."""
    gen = cfg.generation
    return DecodeSettings(
        max_new_tokens=gen.max_new_tokens,
        eos_token_ids=eos_token_ids if gen.stop_at_eos else frozenset(),
        do_sample=gen.do_sample,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        # our engine's loops keep the verifier's log-probability of each token they emit (perplexity without a
        # second pass); transformers' generate() does not, and its outputs are scored afterwards
        logprobs=cfg.quality.perplexity and cfg.engine.backend is not Backend.transformers,
    )


def k_schedule(cfg: SpecBenchConfig) -> KSchedule:
    """The draft length per step: constant k, or the heuristic schedule between 1 and k_max."""
    return AdaptiveK(cfg.k, cfg.k_max) if cfg.k_schedule is KScheduleKind.heuristic else ConstantK(cfg.k)


def _llamacpp_setup(
    cfg: SpecBenchConfig,
    specs: dict[str, ModelSpec],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    room: int,
    skipped_too_long: list[Record],
) -> RunSetup:
    """engine.backend=llamacpp: llama.cpp contexts long enough for the longest prompt and what follows it (the
    output or the cost curve, and one step's drafts), one prompt per batch (validation keeps batch_size=1)."""
    context = max(len(prompt.input_ids) for prompt in prompts) + room + longest_draft(cfg) + 2
    models = llamacpp.load_models(cfg, specs, tokenizer, context)
    device = torch.device("cpu")
    return RunSetup(
        device=device,
        verifier=models.verifier,
        drafters=models.drafters,
        tokenizer=tokenizer,
        prompts=prompts,
        settings=decode_settings(cfg, models.eos_token_ids),
        specs={name: replace(spec, dtype=models.descriptions[name]) for name, spec in specs.items()},
        device_name=device_name(device, models.threads),
        gpu_memory_before_load_gb=None,
        schedule=k_schedule(cfg),
        batches=[[index] for index in range(len(prompts))],
        contenders=models.contenders,
        skipped_too_long=skipped_too_long,
    )


def _check_attention(cfg: SpecBenchConfig, specs: dict[str, ModelSpec]) -> None:
    """Refuse, before loading, what windowed attention cannot do under our masks: token trees, ragged batches."""
    windowed = [name for name, spec in specs.items() if needs_plain_causal_mask(model_config(spec))]
    if "verifier" in windowed and len(cfg.draft.drafters) > 1:
        raise ConfigError(
            f"verifier {cfg.verifier.name} has windowed attention, which cannot verify a draft set's token tree: "
            "use a draft with one drafter."
        )
    if windowed and cfg.batch_size > 1:
        raise ConfigError(
            f"{', '.join(windowed)} has windowed attention, which cannot decode ragged batches: use batch_size=1."
        )
    if windowed and cfg.mode is BenchmarkMode.load and cfg.load.max_batch_size > 1:
        raise ConfigError(
            f"{', '.join(windowed)} has windowed attention, which cannot decode ragged batches: "
            "use load.max_batch_size=1."
        )


Decoder = Callable[[list[list[int]], DecodeSettings, list[int]], BatchResult]


def _decoders(setup: RunSetup, cfg: SpecBenchConfig) -> dict[str, Decoder]:
    """The two contenders by mode, as functions of (prompts' ids, settings, one seed per prompt)."""
    if cfg.engine.backend is Backend.transformers:
        return _transformers_decoders(setup, cfg)
    return {
        "baseline": lambda prompts, settings, seeds: decode_baseline(setup.verifier, prompts, settings, seeds),
        "spec": lambda prompts, settings, seeds: decode_speculative(
            setup.verifier, setup.drafters, prompts, settings, setup.schedule, seeds, setup.pool
        ),
        **setup.contenders,
    }


def _models(setup: RunSetup) -> list[CachedModel]:
    return [setup.verifier, *drafter_models(setup.drafters)]


def _transformers_decoders(setup: RunSetup, cfg: SpecBenchConfig) -> dict[str, Decoder]:
    """transformers' `generate()` with the run's one drafter (validation refuses draft sets for this backend)."""
    ((name, drafter),) = cfg.draft.drafters.items()
    assistant = setup.models[name] if needs_model(drafter) else None
    lookup_ngram = None if assistant is not None else drafter.max_ngram
    return hf_backend.TransformersDecoders(
        setup.models["verifier"], len(setup.tokenizer), cfg.k, name, assistant, lookup_ngram
    ).as_dict()


def prepare_oracles(setup: RunSetup, prompts: Sequence[tuple[list[int], int]]) -> None:
    """Give every oracle drafter its references: the verifier's greedy output for each (prompt, length limit),
    decoded untimed before the run (a prompt asked for at several limits is decoded at the longest)."""
    oracles = [drafter for drafter in setup.drafters if isinstance(drafter, OracleDrafter)]
    if not oracles:
        return
    longest: dict[tuple[int, ...], int] = {}
    for ids, limit in prompts:
        longest[tuple(ids)] = max(longest.get(tuple(ids), 0), limit)
    settings = replace(setup.settings, logprobs=False)
    references = {}
    for prompt, limit in longest.items():
        (row,) = decode_baseline(setup.verifier, [list(prompt)], replace(settings, max_new_tokens=limit), [0]).rows
        references[prompt] = row.tokens
    for oracle in oracles:
        oracle.set_references(references)


def warm_up(setup: RunSetup, cfg: SpecBenchConfig) -> None:
    """Capture every CUDA graph, then decode `warmup_prompts` short outputs both ways, before anything is timed.

    The warm-up batches have the run's batch sizes, so the shapes the timing uses are the ones warmed.
    """
    prepare_oracles(setup, [(prompt.input_ids, cfg.generation.max_new_tokens) for prompt in setup.prompts])
    batch_sizes = sorted({len(batch) for batch in setup.batches})
    models = _models(setup)
    start = time.perf_counter()
    if any(model.graph_sizes for model in models):  # minutes with torch.compile: say what is happening
        what = "compiling and capturing" if cfg.engine.compile else "capturing"
        log.info("%s CUDA graphs (%d models, batch sizes %s, one per decode shape and attention width)", what,
                 len(models), batch_sizes)  # fmt: skip
    shortest = min(len(prompt.input_ids) for prompt in setup.prompts)
    # on the main thread, before any drafting pool runs
    graphs = sum(model.capture_graphs(batch_sizes, shortest) for model in models)
    if graphs:
        log.info("%d CUDA graphs ready in %.1f s", graphs, time.perf_counter() - start)
    short = replace(setup.settings, max_new_tokens=min(cfg.warmup_tokens, setup.settings.max_new_tokens))
    for number in range(math.ceil(cfg.warmup_prompts / cfg.batch_size)):
        batch = setup.batches[number % len(setup.batches)]
        for decode in _decoders(setup, cfg).values():
            decode([setup.prompts[index].input_ids for index in batch], short, [cfg.seed + index for index in batch])


def decode_prompts(setup: RunSetup, cfg: SpecBenchConfig, progress: bool = True) -> Iterator[PromptOutcome]:
    """Decode each batch verifier-only and speculatively, `cfg.repeats` times over; yield each prompt's results.

    The order alternates from batch to batch, and from repeat to repeat, so neither mode always runs first.
    Prompt i is decoded with seed `seed + i` in every repeat and whatever batch it is in.
    """
    on_gpu = setup.device.type == "cuda"
    decoders = _decoders(setup, cfg)
    with tqdm(total=cfg.repeats * len(setup.prompts), desc="prompts", unit="prompt", disable=not progress) as bar:
        for repeat in range(cfg.repeats):
            for number, batch in enumerate(setup.batches):
                prompts = [setup.prompts[index] for index in batch]
                results: dict[str, BatchResult] = {}
                peaks: dict[str, float | None] = {}
                for mode in list(decoders) if (number + repeat) % 2 == 0 else reversed(decoders):
                    if on_gpu:
                        torch.cuda.reset_peak_memory_stats(setup.device)
                    ids, seeds = [prompt.input_ids for prompt in prompts], [cfg.seed + index for index in batch]
                    results[mode] = decoders[mode](ids, setup.settings, seeds)
                    peaks[mode] = torch.cuda.max_memory_allocated(setup.device) / 2**30 if on_gpu else None
                batch_stats = {mode: BatchStats.of(result) for mode, result in results.items()}
                for row, prompt in enumerate(prompts):
                    baseline, spec = results["baseline"].rows[row], results["spec"].rows[row]
                    yield PromptOutcome(
                        pubid=prompt.pubid,
                        repeat=repeat,
                        batch=number,
                        prompt_tokens=len(prompt.input_ids),
                        truncated=prompt.truncated,
                        baseline=baseline,
                        spec=spec,
                        baseline_text=setup.tokenizer.decode(baseline.tokens, skip_special_tokens=True),
                        spec_text=setup.tokenizer.decode(spec.tokens, skip_special_tokens=True),
                        baseline_batch=batch_stats["baseline"],
                        spec_batch=batch_stats["spec"],
                        baseline_peak_gpu_gb=peaks["baseline"],
                        spec_peak_gpu_gb=peaks["spec"],
                        baseline_logprob=baseline.logprob,
                        spec_logprob=spec.logprob,
                        contenders={mode: results[mode].rows[row] for mode in setup.contenders},
                    )
                bar.update(len(batch))


def score_likelihoods(setup: RunSetup, outcomes: list[PromptOutcome]) -> None:
    """Fill in the verifier's log-likelihood of the outputs whose decode did not collect it (after timing is over).

    Our engine collects it while decoding; transformers' `generate()` does not return it cheaply, so
    its outputs are scored by one more verifier pass each.
    """
    prompts = {prompt.pubid: prompt for prompt in setup.prompts}
    scored: dict[tuple[str, tuple[int, ...]], float] = {}  # repeats (and agreeing modes) repeat outputs

    def score(pubid: str, tokens: list[int]) -> float:
        if (pubid, tuple(tokens)) not in scored:
            scored[pubid, tuple(tokens)] = output_log_likelihood(setup.verifier, prompts[pubid].input_ids, tokens)
        return scored[pubid, tuple(tokens)]

    unscored = [o for o in outcomes if o.baseline_logprob is None or o.spec_logprob is None]
    for outcome in tqdm(unscored, desc="perplexity", unit="prompt", leave=False):
        if outcome.baseline_logprob is None:
            outcome.baseline_logprob = score(outcome.pubid, outcome.baseline.tokens)
        if outcome.spec_logprob is None:
            outcome.spec_logprob = score(outcome.pubid, outcome.spec.tokens)


def longest_draft(cfg: SpecBenchConfig) -> int:
    """The most tokens one drafter proposes in a step."""
    return cfg.k if cfg.k_schedule is KScheduleKind.constant else cfg.k_max


def curve_tokens(cfg: SpecBenchConfig) -> int:
    """The verify-cost curve covers n = 1 .. this many new tokens (the speedup model predicts k = 1 .. this - 1)."""
    return max(cfg.k, cfg.cost_curve_max_k) + 1


def measure_costs(setup: RunSetup, cfg: SpecBenchConfig) -> StepCosts:
    """Step costs on the run's own prompts (ragged, as the decode batches them), the inputs of the speedup model:
    at the run's batch size the draft step and the verify curve n = 1..; over `cost_batch_grid`, one and k+1
    tokens (as far as time and memory allow)."""
    prompts = [prompt.input_ids for prompt in setup.prompts]
    log.info("measuring step costs: verify curve at batch size %d, then batch sizes up to %d", cfg.batch_size,
             max(cfg.cost_batch_grid, default=cfg.batch_size))  # fmt: skip
    start = time.perf_counter()
    run_curve = {cfg.batch_size: range(1, curve_tokens(cfg) + 1)}
    costs = measure_step_costs(setup.verifier, setup.drafters, prompts, setup.settings, run_curve)
    grid = {size: (1, cfg.k + 1) for size in cfg.cost_batch_grid if size != cfg.batch_size}
    if cfg.engine.backend is Backend.llamacpp:  # its contexts decode one prompt at a time
        grid = {}
    elif any(model.plain_mask_only for model in _models(setup)):  # windowed attention: batch size 1 only
        grid = {size: shape for size, shape in grid.items() if size == 1}
    if grid:
        more = measure_step_costs(
            setup.verifier, setup.drafters, prompts, setup.settings, grid, budget_s=cfg.cost_grid_budget_s
        )
        costs.verify_s |= more.verify_s
        costs.draft_s |= more.draft_s
    log.info("step costs measured in %.1f s (batch sizes %s)", time.perf_counter() - start, sorted(costs.verify_s))
    return costs
