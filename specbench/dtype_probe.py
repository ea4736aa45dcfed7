"""`dtype: auto` on a CPU: float32 or bfloat16, whichever serves this run's requests faster on this machine.

Whether bfloat16 pays on a CPU depends on the CPU (native bfloat16 instructions such as AVX512_BF16 or
AMX, or none) and on the kernels torch has for it, so it is measured, never assumed. It can also differ
between decoding and prefilling: without native instructions, a one-row product converts its weights
and is bound by memory (bfloat16 reads half the bytes), while a prefill's many rows are bound by the
products themselves, where converting costs most (4.6x-7.3x float32's on an AVX2-only EPYC). At load,
each model is loaded once in float32 and a bfloat16 copy is cast from it (the weights, buffers and
logits that loading in bfloat16 gives). Each dtype's models are then timed (median of `REPEATS` after a
warm-up) on the three steps decoding is made of, on a short prefix of the first prompt at the run's
batch size, and on a prefill:
- `verify_1`: one verifier step over one new token (the baseline's step);
- `verify_k1`: one verifier pass over k+1 new tokens (speculation's verify);
- `draft`: one drafting step (a draft set's drafters summed);
- `prefill_per_token`, `draft_prefill_per_token`: a one-row prefill of the first prompt's first
  `PREFILL_TOKENS` tokens (fewer if the prompts are shorter) by the verifier, and by the drafters'
  models summed, per prompt token. A longer prompt is priced at that rate.

The rule. One request of P prompt tokens and N new tokens, in a batch of b rows, costs the baseline
`P * prefill_per_token + N * verify_1 / b`, and speculation `P * (prefill_per_token +
draft_prefill_per_token) + S * (k * draft + verify_k1) / b` over its S steps, with N / (k + 1) <= S <= N
depending on acceptance, not on the dtype. P is the prompts' mean length and N `max_new_tokens`.
`baseline_ratio` is the baseline's cost in bfloat16 over float32, and `spec_ratio` speculation's at
whichever S bounds is worse for bfloat16 (it must pay whatever the acceptance). bfloat16 is chosen when the
geometric mean of the two ratios is below `1 - BFLOAT16_MIN_GAIN`: when the modes agree, if it saves at
least that much on average; when they disagree, the mode with the larger relative change decides.
Otherwise float32, which also keeps greedy outputs exactly equal.

The figures are cached per machine (CPU, thread count, torch version, the models' files and settings, k,
batch size, the prefill's length) in `cache_dir()`, so later runs on the same machine choose without
probing. Tests replace `time_steps`, the probe's timer, to say which dtype wins.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedModel

from specbench.config import Dtype, SpecBenchConfig
from specbench.drafters import build_drafter
from specbench.engine import CachedModel, DecodeSettings, Drafter
from specbench.engine.costs import measure_step_costs, timed_runs
from specbench.engine.drafters import drafter_models
from specbench.engine.timing import Clock
from specbench.models import ModelCache, ModelSpec, model_revision, resolve_dtype

log = logging.getLogger(__name__)

CANDIDATES = (Dtype.float32, Dtype.bfloat16)
BFLOAT16_MIN_GAIN = 0.05  # bfloat16 must save at least this share of the time, on average over both modes
PROBE_TOKENS = 32  # the decode steps follow this much of the first prompt
PREFILL_TOKENS = 64  # the prefill's length at most: enough rows to be bound by the products, a few seconds
REPEATS = 3
STEPS = ("verify_1", "verify_k1", "draft", "prefill_per_token", "draft_prefill_per_token")


@dataclass(frozen=True)
class StepTimes:
    """Milliseconds of one decode's steps in one dtype, and of its prefills per prompt token."""

    verify_1: float  # one verifier step over one new token
    verify_k1: float  # one verifier pass over k+1 new tokens
    draft: float  # one drafting step (a draft set's drafters summed)
    prefill_per_token: float  # the verifier's prefill of one prompt, per prompt token
    draft_prefill_per_token: float  # the drafters' prefills of one prompt (0 without a draft model)

    def baseline_request(self, prompt_tokens: float, new_tokens: int, batch_size: int) -> float:
        """One request's share of the baseline's time: its prefill and its row of `new_tokens` steps."""
        return prompt_tokens * self.prefill_per_token + new_tokens * self.verify_1 / batch_size

    def spec_request(self, k: int, prompt_tokens: float, steps: float, batch_size: int) -> float:
        """One request's share of speculation's time: its prefills and its row of `steps` steps (k drafts and the
        verify)."""
        prefill = prompt_tokens * (self.prefill_per_token + self.draft_prefill_per_token)
        return prefill + steps * (k * self.draft + self.verify_k1) / batch_size


def needs_probe(run_dtype: Dtype, device: torch.device) -> bool:
    """Only `auto` on a CPU is measured; a set dtype is kept, and `auto` on a GPU is bfloat16 where supported."""
    return run_dtype is Dtype.auto and device.type == "cpu"


@dataclass(frozen=True)
class Workload:
    """What the rule weighs the figures by: a request's prompt and output, and the rows decoded together."""

    prompt_tokens: float  # the prompts' mean length
    new_tokens: int  # max_new_tokens
    batch_size: int
    k: int


def choose(times: Mapping[str, StepTimes], workload: Workload) -> str:
    """float32 or bfloat16 from the probe's figures (the rule in the module's docstring)."""
    float32, bfloat16 = times[Dtype.float32.value], times[Dtype.bfloat16.value]
    prompt, new, rows, k = workload.prompt_tokens, workload.new_tokens, workload.batch_size, workload.k
    baseline_ratio = bfloat16.baseline_request(prompt, new, rows) / float32.baseline_request(prompt, new, rows)
    spec_ratio = max(  # the cost ratio moves monotonically with the steps: its bounds are at theirs
        bfloat16.spec_request(k, prompt, steps, rows) / float32.spec_request(k, prompt, steps, rows)
        for steps in (new / (k + 1), new)
    )
    return Dtype.bfloat16.value if math.sqrt(baseline_ratio * spec_ratio) < 1 - BFLOAT16_MIN_GAIN else "float32"


@dataclass(frozen=True)
class DtypeChoice:
    """The run's dtype, and the probe's figures when `auto` was measured on a CPU."""

    dtype: str  # the run's dtype, `auto` resolved
    times: Mapping[str, StepTimes] = field(default_factory=dict)  # by dtype; empty when nothing was probed
    workload: Workload | None = None  # what the figures were weighed by, when probed
    cache_file: Path | None = None  # where the figures are kept
    cached: bool = False  # the figures came from the cache, not from a probe in this run

    def metrics(self) -> dict[str, float]:
        """`dtype_probe_ms_{dtype}_{step}` for each probed dtype and step."""
        return {
            f"dtype_probe_ms_{dtype}_{step}": getattr(step_times, step)
            for dtype, step_times in self.times.items()
            for step in STEPS
        }

    def describe(self) -> str:
        """One console line: the choice, both dtypes' figures, what they were weighed by, and where they came from."""
        float32, bfloat16 = (self.times[dtype.value] for dtype in CANDIDATES)
        workload = self.workload
        labels = {
            "verify_1": "verify 1 token",
            "verify_k1": f"verify {workload.k + 1} tokens",
            "draft": "draft",
            "prefill_per_token": "prefill a prompt token",
            "draft_prefill_per_token": "draft prefill a prompt token",
        }
        figures = ", ".join(
            f"{label} {getattr(float32, step):.2f} / {getattr(bfloat16, step):.2f}" for step, label in labels.items()
        )
        weighed = (
            f"weighed for {workload.prompt_tokens:.0f} prompt tokens and {workload.new_tokens} new tokens a request"
            f" at {workload.batch_size} rows"
        )
        origin = (
            f"cached by an earlier run in {self.cache_file} (delete it to probe again)"
            if self.cached
            else f"probed now, kept in {self.cache_file}"
        )
        return f"dtype auto -> {self.dtype}: ms, float32 / bfloat16: {figures}; {weighed}; {origin}"


def cache_dir() -> Path:
    """``$SPECBENCH_DTYPE_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/specbench/dtype``."""
    if env := os.environ.get("SPECBENCH_DTYPE_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specbench" / "dtype"


def choose_run_dtype(
    cfg: SpecBenchConfig,
    device: torch.device,
    machine: str,
    specs_in: Callable[[Dtype], dict[str, ModelSpec]],
    cache: ModelCache,
    prompts: Sequence[list[int]],
    vocab_size: int,
) -> DtypeChoice:
    """The run's dtype: `cfg.dtype` resolved, probed on a CPU (or read from the cache) when it is `auto`.

    `specs_in(dtype)` gives the run's model specs with that run dtype; `machine` names the CPU and
    its thread count; `prompts` are the run's prompts' ids. When the probe runs, both dtypes' models
    are left in `cache`.
    """
    if not needs_probe(cfg.dtype, device):
        return DtypeChoice(resolve_dtype(cfg.dtype, device))
    candidates = {dtype.value: specs_in(dtype) for dtype in CANDIDATES}
    if len({tuple(specs.values()) for specs in candidates.values()}) == 1:  # every model pins its own dtype
        return DtypeChoice(resolve_dtype(cfg.dtype, device))
    workload = Workload(
        statistics.mean(len(ids) for ids in prompts), cfg.generation.max_new_tokens, cfg.batch_size, cfg.k
    )
    prefill_ids = (list(prompts[0]) * PREFILL_TOKENS)[: min(PREFILL_TOKENS, math.ceil(workload.prompt_tokens))]
    key = _cache_key(machine, cfg.k, cfg.batch_size, len(prefill_ids), candidates)
    path = cache_dir() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    times = _read_cache(path, key)
    cached = times is not None
    if times is None:
        log.info("dtype auto: timing float32 against bfloat16 on this CPU (%s)", machine)
        times = _measure(cfg, candidates, cache, prompts[0][:PROBE_TOKENS], prefill_ids, vocab_size)
        _write_cache(path, key, times)
    choice = DtypeChoice(choose(times, workload), times, workload, path, cached)
    log.info(choice.describe())
    return choice


def time_steps(
    verifier: CachedModel,
    drafters: list[Drafter],
    prompt_ids: list[int],
    prefill_ids: list[int],
    k: int,
    batch_size: int,
) -> StepTimes:
    """The probe's timer: the speedup model's step-cost measurement at `batch_size` rows after `prompt_ids`, and
    one-row prefills of `prefill_ids` by the verifier and the drafters' models."""
    settings = DecodeSettings(max_new_tokens=k + 1)
    costs = measure_step_costs(verifier, drafters, [prompt_ids], settings, {batch_size: (1, k + 1)}, repeats=REPEATS)
    return StepTimes(
        verify_1=costs.verify_s[batch_size][1] * 1e3,
        verify_k1=costs.verify_s[batch_size][k + 1] * 1e3,
        draft=sum(costs.draft_s[batch_size].values()) * 1e3,
        prefill_per_token=_prefill_ms_per_token(verifier, prefill_ids),
        draft_prefill_per_token=sum(_prefill_ms_per_token(model, prefill_ids) for model in drafter_models(drafters)),
    )


def _prefill_ms_per_token(model: CachedModel, prompt_ids: list[int]) -> float:
    """Milliseconds per prompt token of a one-row prefill (the median of `REPEATS` after a warm-up)."""
    seconds = timed_runs(Clock(model.devices), lambda: model.prefill([prompt_ids]), lambda: None, REPEATS)
    model.reset()
    return statistics.median(seconds[1:]) * 1e3 / len(prompt_ids)


def bfloat16_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of a float32 model with bfloat16 parameters (buffers kept, as loading in bfloat16 keeps them)."""
    memo = {
        id(parameter): torch.nn.Parameter(parameter.detach().to(torch.bfloat16), requires_grad=False)
        for parameter in model.parameters()
        if parameter.is_floating_point()
    }
    copied = copy.deepcopy(model, memo)
    copied.config.dtype = torch.bfloat16
    return copied


def _measure(
    cfg: SpecBenchConfig,
    candidates: dict[str, dict[str, ModelSpec]],
    cache: ModelCache,
    prompt_ids: list[int],
    prefill_ids: list[int],
    vocab_size: int,
) -> dict[str, StepTimes]:
    """Load the float32 models, cast the bfloat16 ones from them, and time each dtype's steps."""
    cache.keep_only({spec for specs in candidates.values() for spec in specs.values()})
    float32 = candidates[Dtype.float32.value]
    times = {}
    for dtype, specs in candidates.items():
        models = {}
        for name, spec in specs.items():
            cast = spec.dtype == Dtype.bfloat16.value and float32[name].dtype == Dtype.float32.value
            models[name] = cache.model(spec, load=partial(_cast_copy, cache, float32[name]) if cast else None)
        drafters = [
            build_drafter(name, drafter, CachedModel(models[name], vocab_size) if name in models else None)
            for name, drafter in cfg.draft.drafters.items()
        ]
        verifier = CachedModel(models["verifier"], vocab_size)
        times[dtype] = time_steps(verifier, drafters, prompt_ids, prefill_ids, cfg.k, cfg.batch_size)
    return times


def _cast_copy(cache: ModelCache, float32_spec: ModelSpec, bfloat16_spec: ModelSpec) -> PreTrainedModel:
    return bfloat16_copy(cache.model(float32_spec))


def _cache_key(
    machine: str, k: int, batch_size: int, prefill_tokens: int, candidates: dict[str, dict[str, ModelSpec]]
) -> dict:
    """What the figures depend on: the CPU and its threads, torch, the shapes, and each model's settings and files."""
    models = {
        name: {
            "specs": {dtype: dataclasses.asdict(specs[name]) for dtype, specs in candidates.items()},
            "files": model_revision(spec),  # local files: count, bytes, last change; hub models: the commit
        }
        for name, spec in candidates[Dtype.float32.value].items()
    }
    threads = torch.get_num_threads()
    shapes = {"k": k, "batch_size": batch_size, "prefill_tokens": prefill_tokens}
    return {"machine": machine, "threads": threads, "torch": torch.__version__, **shapes, "models": models}


def _read_cache(path: Path, key: dict) -> dict[str, StepTimes] | None:
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != json.loads(json.dumps(key)):  # a hash collision, or a file edited by hand
            return None
        return {dtype: StepTimes(**entry["times"][dtype]) for dtype in (d.value for d in CANDIDATES)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, key: dict, times: dict[str, StepTimes]) -> None:
    entry = {
        "key": key,
        "times": {dtype: dataclasses.asdict(step_times) for dtype, step_times in times.items()},
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(entry, handle, indent=1, sort_keys=True)
    os.replace(handle.name, path)  # whole files only, if two jobs probe at once
