"""`dtype=auto` on a CPU: the probe times float32 against bfloat16 on the run's real (tiny) models.

The probe's timer is injected, so which dtype wins is the test's to say: the choice follows it,
the run's models are the winner's, the figures are cached and reused until the key changes, a
set dtype is never probed, and `auto` off the CPU keeps its fixed choice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import torch

import specbench.dtype_probe
from specbench.config import (
    DatasetConfig,
    DraftConfig,
    Dtype,
    GenerationConfig,
    QualityConfig,
    SpecBenchConfig,
    VerifierConfig,
)
from specbench.data import load_records
from specbench.drafters import ModelDrafterConfig, PromptLookupConfig
from specbench.dtype_probe import (
    PREFILL_TOKENS,
    STEPS,
    DtypeChoice,
    StepTimes,
    Workload,
    bfloat16_copy,
    choose,
    needs_probe,
    time_steps,
)
from specbench.engine import CachedModel, ModelDrafter, PromptLookupDrafter
from specbench.models import ModelCache, ModelSpec, load_model
from specbench.runner import prepare
from specbench.testing import one_torch_thread
from tests.test_cli import common_args, run_cli

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

VERIFIER, DRAFT = "openai-community/gpt2-large", "distilbert/distilgpt2"
FAST = ["cost_curve=false", "quality.perplexity=false", "quality.embedder=none"]
# (float32, bfloat16) ms of verify_1, verify_k1, draft, and per prompt token the verifier's and drafters' prefills
BFLOAT16_FASTER = (StepTimes(10, 20, 2, 1, 0.5), StepTimes(6, 12, 2, 0.6, 0.3))
FLOAT32_FASTER = (StepTimes(6, 12, 2, 0.6, 0.3), StepTimes(10, 20, 2, 1, 0.5))


class FakeTimer:
    """Hands out the figures it was given, one per dtype probed, and notes the dtype of every model it timed."""

    def __init__(self, figures: tuple[StepTimes, StepTimes]) -> None:
        self.figures = figures
        self.timed: list[dict[str, torch.dtype]] = []  # per call: model name -> dtype of its weights
        self.prompts: list[list[int]] = []
        self.prefills: list[list[int]] = []

    def __call__(self, verifier: CachedModel, drafters: list, prompt_ids, prefill_ids, k: int, batch_size: int):
        models = {"verifier": verifier.model.dtype}
        models |= {drafter.name: drafter.model.model.dtype for drafter in drafters if isinstance(drafter, ModelDrafter)}
        self.timed.append(models)
        self.prompts.append(prompt_ids)
        self.prefills.append(prefill_ids)
        return self.figures[len(self.timed) - 1]


@pytest.fixture
def probe_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "dtype-cache"
    monkeypatch.setenv("SPECBENCH_DTYPE_CACHE", str(folder))
    return folder


def inject(monkeypatch, figures: tuple[StepTimes, StepTimes]) -> FakeTimer:
    timer = FakeTimer(figures)
    monkeypatch.setattr(specbench.dtype_probe, "time_steps", timer)
    return timer


def tiny_config(models_dir: Path, pubmedqa_file: Path, draft: DraftConfig | None = None, **overrides):
    cfg = SpecBenchConfig(
        verifier=VerifierConfig(name="gpt2_large", name_or_path=VERIFIER),
        draft=draft or DraftConfig(name="distilgpt2", drafters={"distilgpt2": ModelDrafterConfig(DRAFT)}),
        dataset=DatasetConfig(path=str(pubmedqa_file), num_samples=1),
        generation=GenerationConfig(max_new_tokens=4),
        quality=QualityConfig(embedder="none", perplexity=False),
        models_dir=str(models_dir),
        device="cpu",
        k=3,
        cost_curve=False,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def prepared(cfg: SpecBenchConfig, cache: ModelCache | None = None):
    return prepare(cfg, load_records(cfg.dataset), cache or ModelCache())


@pytest.mark.parametrize(("figures", "chosen"), [(BFLOAT16_FASTER, "bfloat16"), (FLOAT32_FASTER, "float32")])
def test_the_run_decodes_in_the_dtype_the_timer_favours(
    figures, chosen, models_dir, pubmedqa_file, probe_cache, monkeypatch
):
    timer = inject(monkeypatch, figures)
    cache = ModelCache()
    setup = prepared(tiny_config(models_dir, pubmedqa_file), cache)

    # both dtypes were timed, each on its own models, on a short prefix of the first prompt, and on a prefill as
    # long as the prompts (the first prompt's tokens)
    assert timer.timed == [
        {"verifier": torch.float32, "distilgpt2": torch.float32},
        {"verifier": torch.bfloat16, "distilgpt2": torch.bfloat16},
    ]
    first_prompt = setup.prompts[0].input_ids
    assert timer.prompts == [first_prompt[: specbench.dtype_probe.PROBE_TOKENS]] * 2
    assert timer.prefills == [first_prompt[:PREFILL_TOKENS]] * 2 and len(first_prompt) > PREFILL_TOKENS
    # the run decodes with the winner's models; the loser's are released
    assert setup.dtype_choice.dtype == chosen and not setup.dtype_choice.cached
    expected = getattr(torch, chosen)
    assert {spec.dtype for spec in setup.specs.values()} == {chosen}
    assert setup.verifier.model.dtype == expected and setup.drafters[0].model.model.dtype == expected
    assert set(cache._models) == set(setup.specs.values())
    assert setup.dtype_choice.metrics() == {
        f"dtype_probe_ms_{dtype}_{step}": getattr(times, step)
        for dtype, times in zip(("float32", "bfloat16"), figures, strict=True)
        for step in STEPS
    }
    assert setup.dtype_choice.workload == Workload(len(first_prompt), 4, 1, 3)  # one prompt, max_new_tokens 4, k 3
    assert [path.suffix for path in probe_cache.iterdir()] == [".json"]


def test_cached_figures_are_reused_until_the_machine_or_models_change(
    models_dir, pubmedqa_file, probe_cache, tmp_path, monkeypatch
):
    own_models = tmp_path / "models"
    for hub_id in (VERIFIER, DRAFT):
        shutil.copytree(models_dir / hub_id, own_models / hub_id)
    config = (own_models / DRAFT / "config.json").read_text()
    cfg = tiny_config(own_models, pubmedqa_file)
    timer = inject(monkeypatch, BFLOAT16_FASTER)
    first = prepared(cfg).dtype_choice
    assert len(timer.timed) == 2 and first.dtype == "bfloat16"

    timer = inject(monkeypatch, FLOAT32_FASTER)  # a new probe would now choose float32
    again = prepared(cfg).dtype_choice  # a later run in a fresh process: nothing loaded yet
    assert timer.timed == [] and again.cached and again.dtype == "bfloat16"
    assert again.times == first.times and again.cache_file == first.cache_file
    assert "cached by an earlier run" in again.describe() and "probed now" in first.describe()

    changes = [
        lambda: setattr(cfg, "k", 2),  # the verify step covers k+1 tokens
        lambda: setattr(cfg, "batch_size", 2),  # each step, 2 rows
        lambda: torch.set_num_threads(2),  # the module runs on one thread
        lambda: (own_models / DRAFT / "config.json").write_text(config + "\n"),  # the draft's files changed
    ]
    for number, change in enumerate(changes):
        change()
        timer = inject(monkeypatch, FLOAT32_FASTER)
        choice = prepared(cfg).dtype_choice
        assert len(timer.timed) == 2 and not choice.cached and choice.dtype == "float32"
        assert len(list(probe_cache.iterdir())) == number + 2
    torch.set_num_threads(1)


def test_a_set_dtype_is_not_probed(models_dir, pubmedqa_file, probe_cache, monkeypatch):
    timer = inject(monkeypatch, BFLOAT16_FASTER)
    for dtype in (Dtype.float32, Dtype.bfloat16):
        setup = prepared(tiny_config(models_dir, pubmedqa_file, dtype=dtype))
        assert setup.dtype_choice == DtypeChoice(dtype.value)
        assert {spec.dtype for spec in setup.specs.values()} == {dtype.value}
    # every model pins its own dtype: nothing follows `auto`
    cfg = tiny_config(models_dir, pubmedqa_file, draft=DraftConfig("prompt_lookup", {"lookup": PromptLookupConfig()}))
    cfg.verifier.dtype = Dtype.float32
    assert prepared(cfg).dtype_choice == DtypeChoice("float32")
    assert timer.timed == [] and not probe_cache.exists()


def test_a_model_that_pins_its_dtype_keeps_it_while_the_others_are_probed(
    models_dir, pubmedqa_file, probe_cache, monkeypatch
):
    timer = inject(monkeypatch, BFLOAT16_FASTER)
    cfg = tiny_config(models_dir, pubmedqa_file)
    cfg.verifier.dtype = Dtype.float32
    setup = prepared(cfg)
    assert [models["verifier"] for models in timer.timed] == [torch.float32, torch.float32]
    assert [models["distilgpt2"] for models in timer.timed] == [torch.float32, torch.bfloat16]
    assert setup.specs["verifier"].dtype == "float32" and setup.specs["distilgpt2"].dtype == "bfloat16"


def test_only_auto_on_a_cpu_is_probed():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert needs_probe(Dtype.auto, cpu)
    assert not needs_probe(Dtype.auto, gpu)  # resolve_dtype: bfloat16 where the GPU supports it, as before
    assert not any(needs_probe(dtype, device) for dtype in Dtype if dtype is not Dtype.auto for device in (cpu, gpu))


DECODE_ONLY = Workload(prompt_tokens=0, new_tokens=64, batch_size=1, k=4)


@pytest.mark.parametrize(
    ("float32", "bfloat16", "chosen"),
    [
        (StepTimes(10, 20, 2, 1, 1), StepTimes(8, 16, 1.6, 1, 1), "bfloat16"),  # both modes 20% faster
        (StepTimes(10, 20, 2, 1, 1), StepTimes(9.8, 19.6, 1.96, 1, 1), "float32"),  # 2% faster: under the 5% needed
        (StepTimes(10, 20, 2, 1, 1), StepTimes(12, 10, 1, 1, 1), "bfloat16"),  # speculation halves, the baseline +20%
        (StepTimes(10, 20, 2, 1, 1), StepTimes(7, 40, 4, 1, 1), "float32"),  # the baseline -30%, speculation doubles
        (StepTimes(10, 20, 2, 1, 1), StepTimes(10, 20, 2, 1, 1), "float32"),  # a tie keeps float32 (greedy equality)
    ],
)
def test_the_rule_weighs_both_modes_relative_changes(float32, bfloat16, chosen):
    assert choose({"float32": float32, "bfloat16": bfloat16}, DECODE_ONLY) == chosen


# An AVX2-only CPU: bfloat16 halves a decode step (memory-bound) but makes a prefill 5x dearer (compute-bound).
AVX2_FLOAT32, AVX2_BFLOAT16 = StepTimes(440, 1330, 100, 25, 8), StepTimes(220, 910, 60, 125, 40)


@pytest.mark.parametrize(
    ("workload", "chosen"),
    [
        (Workload(prompt_tokens=8, new_tokens=256, batch_size=1, k=4), "bfloat16"),  # short prompts, long outputs
        (Workload(prompt_tokens=400, new_tokens=64, batch_size=1, k=4), "float32"),  # PubMedQA-like prompts
        (Workload(prompt_tokens=40, new_tokens=256, batch_size=16, k=4), "float32"),  # a batch shares its steps
    ],
)
def test_a_prompts_prefill_is_weighed_against_its_decode_steps(workload, chosen):
    assert choose({"float32": AVX2_FLOAT32, "bfloat16": AVX2_BFLOAT16}, workload) == chosen


def test_speculation_must_gain_whatever_the_acceptance():
    # bfloat16 halves every step but triples the prefill: with all k drafts accepted (20 steps) speculation's
    # request costs 400 ms against 300, with none accepted (100 steps) 800 against 1100
    float32, bfloat16 = StepTimes(10, 10, 0, 1, 0), StepTimes(5, 5, 0, 3, 0)
    workload = Workload(prompt_tokens=100, new_tokens=100, batch_size=1, k=4)
    assert bfloat16.spec_request(4, 100, 20, 1) / float32.spec_request(4, 100, 20, 1) == pytest.approx(400 / 300)
    assert choose({"float32": float32, "bfloat16": bfloat16}, workload) == "float32"  # sqrt(800/1100 x 4/3) > 0.95


def same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    return ours.keys() == theirs.keys() and all(
        ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]) for name in ours
    )


def test_the_bfloat16_copy_is_what_loading_in_bfloat16_gives(models_dir):
    source = str(models_dir / VERIFIER)
    float32 = load_model(ModelSpec(source, None, "float32", "cpu"))
    loaded = load_model(ModelSpec(source, None, "bfloat16", "cpu"))
    copied = bfloat16_copy(float32)
    assert same_tensors(dict(copied.named_parameters()), dict(loaded.named_parameters()))
    assert same_tensors(dict(copied.named_buffers()), dict(loaded.named_buffers()))
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, loaded(ids).logits)
        assert float32.dtype == torch.float32 and copied.dtype == torch.bfloat16  # the original is untouched


def test_the_real_timer_times_every_step(models_dir, tokenizer):
    verifier = CachedModel(load_model(ModelSpec(str(models_dir / VERIFIER), None, "float32", "cpu")), len(tokenizer))
    draft = CachedModel(load_model(ModelSpec(str(models_dir / DRAFT), None, "float32", "cpu")), len(tokenizer))
    prompt = tokenizer("Does early surgery reduce mortality in elderly patients?")["input_ids"]
    drafters = [ModelDrafter("draft", draft), PromptLookupDrafter()]
    times = time_steps(verifier, drafters, prompt, prompt * 3, k=3, batch_size=2)
    assert all(getattr(times, step) > 0 for step in STEPS)
    assert verifier.lengths == [0] and draft.lengths == [0]  # left empty, as the cost measurement leaves them
    assert time_steps(verifier, [PromptLookupDrafter()], prompt, prompt, k=3, batch_size=1).draft_prefill_per_token == 0


def test_auto_through_the_cli_logs_the_choice_and_its_figures(
    models_dir, pubmedqa_file, tmp_path, probe_cache, monkeypatch, capsys
):
    """The real timer: which dtype wins is the machine's to say (the runs above check the choice follows it)."""
    args = [arg for arg in common_args(models_dir, pubmedqa_file, tmp_path) if not arg.startswith("dtype=")]
    code, _, err = run_cli([*args, "dataset.num_samples=1", "warmup_prompts=0", *FAST], monkeypatch, capsys)
    assert code == 0, err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    params, metrics = run.data.params, run.data.metrics
    assert (params["dtype"], params["dtype_probe"]) == ("auto", "measured")
    assert params["dtype_chosen"] in ("float32", "bfloat16")
    assert run.data.tags["model.verifier"].endswith(f"({params['dtype_chosen']}, cpu)")
    probed = {key: value for key, value in metrics.items() if key.startswith("dtype_probe_ms_")}
    assert len(probed) == 10 and all(value > 0 for value in probed.values())
    assert len(list(probe_cache.iterdir())) == 1
