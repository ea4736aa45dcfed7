"""One run, without Hydra or MLflow: load what the config names, warm up, decode every prompt both ways.

Baseline and speculative decoding run back to back on each prompt
(interleaved, so drift in machine speed hits both alike), with the same seed,
after a warm-up outside the measurement.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specbench import hf_backend
from specbench.config import Backend, KSchedule, SpecBenchConfig
from specbench.data import Prompt, PromptBuilder, Record
from specbench.drafters import build_drafter, needs_model
from specbench.engine import (
    CachedModel,
    DecodeResult,
    DecodeSettings,
    Drafter,
    ModelDrafter,
    TokenChooser,
    decode_baseline,
    decode_speculative,
)
from specbench.engine.costs import StepCosts, measure_step_costs
from specbench.engine.scoring import output_log_likelihood
from specbench.errors import ConfigError
from specbench.metrics import PromptOutcome
from specbench.models import (
    ModelCache,
    ModelSpec,
    check_same_vocabulary,
    context_length,
    eos_token_ids,
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
    pool: ThreadPoolExecutor | None = None  # drafters propose in parallel threads when set
    models: dict[str, PreTrainedModel] = field(default_factory=dict)  # the loaded models by name, for other backends


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu} ({torch.get_num_threads()} threads)"


def prepare(cfg: SpecBenchConfig, records: list[Record], cache: ModelCache) -> RunSetup:
    """Resolve models, check tokenizers and build prompts (cheap), then load the models."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels, syncs and graph captures all go to this job's GPU
    specs = {"verifier": model_spec(cfg.verifier, cfg.dtype, device, cfg.models_dir)}
    for name, drafter in cfg.draft.drafters.items():
        if needs_model(drafter):
            specs[name] = model_spec(drafter, cfg.dtype, device, cfg.models_dir)
    tokenizer = cache.tokenizer(specs["verifier"])
    for name, spec in specs.items():
        if name != "verifier":
            check_same_vocabulary(tokenizer, cache.tokenizer(spec), name, cfg.verifier.name)
            if cfg.engine.backend is Backend.transformers:
                hf_backend.check_assistant(specs["verifier"], name, spec)
    context = min(context_length(spec) for spec in specs.values())
    # room after the prompt: the output, or the cost curve's passes over the first prompt if longer
    room = max(cfg.generation.max_new_tokens, curve_tokens(cfg))
    prompt_budget = context - room
    if prompt_budget < 1:
        raise ConfigError(
            f"generation.max_new_tokens={cfg.generation.max_new_tokens} leaves no room for a prompt in the "
            f"models' context of {context} tokens: lower generation.max_new_tokens."
        )
    builder = PromptBuilder(tokenizer, cfg.dataset.template, cfg.dataset.chat_template, prompt_budget)
    prompts = [builder.build(record) for record in records]

    cache.keep_only(set(specs.values()))
    gpu_memory_before_load = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    vocab_size = len(tokenizer)
    verifier_model = cache.model(specs["verifier"])
    # CUDA graphs: a static cache long enough for the longest prompt, its output and the widest
    # candidate tree (every drafter k_max deep), and one graph per decode feed length
    max_len = max(len(p.input_ids) for p in prompts) + room + len(cfg.draft.drafters) * longest_draft(cfg) + 2
    graphs = cfg.engine.cuda_graphs
    longest_verify = max(curve_tokens(cfg), longest_draft(cfg) + 1)
    verify_sizes = range(1, longest_verify + 1)

    def cached(model: PreTrainedModel, sizes: Sequence[int]) -> CachedModel:
        return CachedModel(
            model, vocab_size, max_len if graphs else None, sizes if graphs else (), compile=cfg.engine.compile
        )

    drafters: list[Drafter] = [
        build_drafter(name, drafter, cached(cache.model(specs[name]), (1, 2)) if name in specs else None)
        for name, drafter in cfg.draft.drafters.items()
    ]
    gen = cfg.generation
    settings = DecodeSettings(
        max_new_tokens=gen.max_new_tokens,
        eos_token_ids=eos_token_ids(verifier_model, tokenizer) if gen.stop_at_eos else frozenset(),
        do_sample=gen.do_sample,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
    )
    verifier = cached(verifier_model, verify_sizes)
    pool = ThreadPoolExecutor(len(drafters)) if cfg.engine.parallel_drafts and len(drafters) > 1 else None
    models = {name: cache.model(spec) for name, spec in specs.items()}
    return RunSetup(
        device,
        verifier,
        drafters,
        tokenizer,
        prompts,
        settings,
        specs,
        device_name(device),
        gpu_memory_before_load,
        pool,
        models,
    )


def _decoders(
    setup: RunSetup, cfg: SpecBenchConfig
) -> dict[str, Callable[[list[int], DecodeSettings, int], DecodeResult]]:
    """The two contenders by mode, as functions of (prompt ids, settings, seed)."""
    if cfg.engine.backend is Backend.transformers:
        return _transformers_decoders(setup, cfg)
    return {
        "baseline": lambda ids, settings, seed: decode_baseline(setup.verifier, ids, settings, seed),
        "spec": lambda ids, settings, seed: decode_speculative(
            setup.verifier,
            setup.drafters,
            ids,
            settings,
            cfg.k,
            seed,
            cfg.k_schedule.value,
            longest_draft(cfg),
            setup.pool,
        ),
    }


def _transformers_decoders(
    setup: RunSetup, cfg: SpecBenchConfig
) -> dict[str, Callable[[list[int], DecodeSettings, int], DecodeResult]]:
    """transformers' `generate()` with the run's one drafter (validation refuses draft sets for this backend)."""
    ((name, drafter),) = cfg.draft.drafters.items()
    assistant = setup.models[name] if needs_model(drafter) else None
    lookup_ngram = None if assistant is not None else drafter.max_ngram
    return hf_backend.TransformersDecoders(
        setup.models["verifier"], len(setup.tokenizer), cfg.k, name, assistant, lookup_ngram
    ).as_dict()


def warm_up(setup: RunSetup, cfg: SpecBenchConfig) -> None:
    """Decode short outputs both ways, and capture every CUDA graph, before anything is timed."""
    short = replace(setup.settings, max_new_tokens=min(cfg.warmup_tokens, setup.settings.max_new_tokens))
    for prompt in setup.prompts[: max(cfg.warmup_prompts, 1)]:
        for decode in _decoders(setup, cfg).values():
            decode(prompt.input_ids, short, cfg.seed)
    for model in [setup.verifier, *(d.model for d in setup.drafters if isinstance(d, ModelDrafter))]:
        model.capture_graphs()


def decode_prompts(setup: RunSetup, cfg: SpecBenchConfig, progress: bool = True) -> Iterator[PromptOutcome]:
    """Decode each prompt verifier-only and speculatively; yield both results as soon as they exist.

    The order alternates from prompt to prompt, so neither mode always runs first.
    """
    on_gpu = setup.device.type == "cuda"
    decoders = _decoders(setup, cfg)
    for index, prompt in enumerate(tqdm(setup.prompts, desc="prompts", unit="prompt", disable=not progress)):
        results, peaks = {}, {}
        for mode in list(decoders) if index % 2 == 0 else reversed(decoders):
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(setup.device)
            results[mode] = decoders[mode](prompt.input_ids, setup.settings, cfg.seed + index)
            peaks[mode] = torch.cuda.max_memory_allocated(setup.device) / 2**30 if on_gpu else None
        baseline, spec = results["baseline"], results["spec"]
        yield PromptOutcome(
            pubid=prompt.pubid,
            prompt_tokens=len(prompt.input_ids),
            truncated=prompt.truncated,
            baseline=baseline,
            spec=spec,
            baseline_text=setup.tokenizer.decode(baseline.tokens, skip_special_tokens=True),
            spec_text=setup.tokenizer.decode(spec.tokens, skip_special_tokens=True),
            baseline_peak_gpu_gb=peaks["baseline"],
            spec_peak_gpu_gb=peaks["spec"],
        )


def score_likelihoods(setup: RunSetup, outcomes: list[PromptOutcome]) -> None:
    """Fill in the verifier's log-likelihood of both outputs of every prompt (after timing is over)."""
    prompts = {prompt.pubid: prompt for prompt in setup.prompts}
    for outcome in tqdm(outcomes, desc="perplexity", unit="prompt", leave=False):
        prompt_ids = prompts[outcome.pubid].input_ids
        outcome.baseline_logprob = output_log_likelihood(setup.verifier, prompt_ids, outcome.baseline.tokens)
        outcome.spec_logprob = output_log_likelihood(setup.verifier, prompt_ids, outcome.spec.tokens)


def longest_draft(cfg: SpecBenchConfig) -> int:
    """The most tokens one drafter proposes in a step."""
    return cfg.k_max if cfg.k_schedule is KSchedule.heuristic else cfg.k


def curve_tokens(cfg: SpecBenchConfig) -> int:
    """The verify-cost curve covers n = 1 .. this many new tokens (the speedup model predicts k = 1 .. this - 1)."""
    return max(cfg.k, cfg.cost_curve_max_k) + 1


def measure_costs(setup: RunSetup, cfg: SpecBenchConfig) -> StepCosts:
    """Draft-step and verify-curve timings on the first prompt (the inputs of the speedup model)."""
    chooser = TokenChooser(setup.settings, cfg.seed)
    return measure_step_costs(setup.verifier, setup.drafters, setup.prompts[0].input_ids, chooser, curve_tokens(cfg))
