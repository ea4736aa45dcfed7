"""The typed config: every shipped option composes and validates, bad values are named with their fix."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import OmegaConf

from specbench.config import CONFIG_PACKAGE, KScheduleKind, register_configs
from specbench.config_errors import explain_config_error
from specbench.drafters import PromptLookupConfig, build_drafter, needs_model, register_drafter, typed_drafter
from specbench.engine import Proposal
from specbench.errors import ConfigError
from specbench.sweep import JOB_STATUS_FILE, job_statuses
from specbench.validation import typed_config

CONF = Path(str(files(CONFIG_PACKAGE)))
GROUPS = ("verifier", "draft", "dataset", "experiment")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
LAUNCHERS = sorted(path.stem for path in (CONF / "hydra" / "launcher").glob("*.yaml"))


@pytest.fixture
def composer():
    """Compose the installed configs as the CLI does, with overrides."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        yield lambda *overrides, **kwargs: compose("config", overrides=list(overrides), **kwargs)
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes_and_validates(composer, group, option):
    cfg = typed_config(composer(f"{group}={option}", "device=cpu"))
    assert cfg.k >= 1 and cfg.draft.drafters


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_config_composes_to_an_installed_launcher(composer, launcher):
    if launcher.startswith("ray") and importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("the Ray launcher is an optional extra (pip install -e '.[ray]')")
    cfg = composer(f"hydra/launcher={launcher}", return_hydra_config=True)
    assert get_class(cfg.hydra.launcher._target_).__name__.endswith("Launcher")


def test_bad_values_are_named_with_their_fix(composer):
    cases = [
        (["k=0"], "k=0 is invalid"),
        (["generation.top_p=1.5"], "generation.top_p=1.5 is invalid"),
        (["engine.compile=true"], "add engine.cuda_graphs=true"),
        (["cost.profile=tpu"], "cost.profile=tpu is unknown"),
        (["dataset.path=/no/such.jsonl"], "does not exist"),
        (["k_schedule=heuristic", "k=8", "k_max=4"], "k_max=4 is below k=8"),
        (["+draft.drafters.verifier.name_or_path=x"], "may not be named 'verifier'"),
        (["+draft.drafters.beam.kind=beam"], "kind=beam is unknown"),
        (["draft=prompt_lookup", "draft.drafters.prompt_lookup.max_ngram=0"], "max_ngram=0 is invalid"),
        (["draft=prompt_lookup", "+draft.drafters.prompt_lookup.name_or_path=x"], "name_or_path"),
        (["plugins=[no_such_module_here]"], "cannot import no_such_module_here"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            typed_config(composer(*overrides, "device=cpu"))


def test_enums_accept_their_names_and_a_constant_k_may_exceed_k_max(composer):
    cfg = typed_config(composer("k_schedule=heuristic", "dtype=bfloat16", "dataset.chat_template=off", "device=cpu"))
    assert cfg.k_schedule is KScheduleKind.heuristic and cfg.dtype.value == "bfloat16"
    assert cfg.dataset.chat_template.value == "off"
    assert typed_config(composer("k=20", "device=cpu")).k == 20  # k_max bounds the heuristic schedule only


def test_the_schema_rejects_unknown_keys_and_bad_enum_values(composer):
    with pytest.raises(Exception, match="generaton"):
        composer("generaton.max_new_tokens=3")
    with pytest.raises(Exception, match="k_schedule=fast") as error:
        composer("k_schedule=fast")
    assert explain_config_error(error.value) == (
        "k_schedule: Invalid value 'fast', expected one of [constant, heuristic, load]; "
        "give it a value of the right type."
    )


@dataclass
class RepeatConfig:
    kind: str = "repeat_last"
    times: int = 1


class RepeatLast:
    """Proposes the last token again: a drafter kind defined outside specbench."""

    def __init__(self, name: str) -> None:
        self.name = name

    def reset(self) -> None: ...

    def prefill(self, tokens: list[int]) -> None: ...

    def propose(self, tokens: list[int], k: int, chooser) -> Proposal:
        return Proposal([tokens[-1]] * k)


def test_drafters_are_typed_by_kind_and_new_kinds_can_be_registered():
    assert typed_drafter("x", {"kind": "prompt_lookup", "max_ngram": 2}) == PromptLookupConfig(max_ngram=2)
    with pytest.raises(ConfigError, match=r"draft\.drafters\.y"):
        typed_drafter("draft.drafters.y", {"kind": "prompt_lookup", "max_ngram": "many"})
    register_drafter("repeat_last", RepeatConfig, lambda name, config, model: RepeatLast(name))
    config = typed_drafter("draft.drafters.r", {"kind": "repeat_last", "times": 2})
    assert config == RepeatConfig(times=2) and not needs_model(config)
    drafter = build_drafter("r", config, None)
    assert drafter.propose([5, 7], 3, None).tokens == [7, 7, 7]


def test_the_resolved_config_logs_enum_names(composer):
    resolved = OmegaConf.to_container(composer("k_schedule=heuristic"), resolve=True, enum_to_str=True)
    assert resolved["k_schedule"] == "heuristic" and resolved["dataset"]["chat_template"] == "auto"


def test_jobs_that_left_no_status_count_as_lost(tmp_path):
    for job, status in (("0", {"name": "a", "status": "FINISHED", "run_id": "r0"}), ("1", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        if status:
            (tmp_path / job / JOB_STATUS_FILE).write_text(json.dumps(status))
    (tmp_path / "report").mkdir()  # not a job folder
    statuses = job_statuses(tmp_path)
    assert [s["status"] for s in statuses] == ["FINISHED", "LOST"]


SERVER_URLS = ("server.baseline_url=http://127.0.0.1:9/v1", "server.spec_url=http://127.0.0.1:8/v1")


def test_load_settings_compose_and_bad_ones_are_named_with_their_fix(composer, tmp_path):
    cfg = typed_config(composer("experiment=offline", "mode=load", "load.rate=0.2", "load.num_requests=24"))
    assert cfg.mode.value == "load" and cfg.load.rate == 0.2 and cfg.load.num_requests == 24
    assert typed_config(composer("device=cpu")).mode.value == "batch"  # the default
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"arrival_s": 1.0, "record_id": "a"}\n{"arrival_s": 0.5, "record_id": "b"}\n')
    ordered = tmp_path / "ordered.jsonl"
    ordered.write_text('{"arrival_s": 0.5, "record_id": "a"}\n')
    load = ["mode=load", "device=cpu"]
    cases = [
        (["load.rate=0"], r"^load\.rate=0\.0 is invalid: give a positive number"),
        (["load.rate=-1"], r"^load\.rate=-1\.0 is invalid"),
        (["load.rate=nan"], r"^load\.rate=nan is invalid"),
        (["load.burstiness=0"], r"^load\.burstiness=0\.0 is invalid"),
        (["load.num_requests=0"], r"^load\.num_requests=0 is invalid: send 1 or more requests"),
        (["load.traces=0"], r"^load\.traces=0 is invalid: serve 1 or more arrival traces per rate"),
        (
            ["load.traces=2", "engine.backend=server", *SERVER_URLS, "server.fixed_batch=true"],
            r"^load\.traces=2 draws other arrival times, but server\.fixed_batch=true sends every request at time 0",
        ),
        (["load.max_batch_size=0"], r"^load\.max_batch_size=0 is invalid"),
        (["load.exclude_first=-1"], r"^load\.exclude_first=-1 is invalid: leave out 0 to 15 of the trace's 16"),
        (["load.num_requests=4", "load.exclude_first=4"], r"^load\.exclude_first=4 is invalid: leave out 0 to 3 "),
        (
            ["load.arrival=trace", f"load.trace_path={ordered}", "load.exclude_first=1"],
            r"^load\.exclude_first=1 is invalid: leave out 0 to 0 of the trace's 1 requests",
        ),
        (["load.join_delay_factor=-1"], r"^load\.join_delay_factor=-1\.0 is invalid: give 0"),
        (
            ["load.join_delay_factor=2", "engine.backend=server", *SERVER_URLS],
            r"^load\.join_delay_factor spaces the joins of specbench's own scheduler",
        ),
        (
            ["load.coalesce_joins=true", "engine.backend=server", *SERVER_URLS],
            r"^load\.coalesce_joins gathers the joins of specbench's own scheduler; a server schedules its own",
        ),
        (
            ["load.coalesce_joins=true", "load.join_delay_factor=2"],
            r"^load\.coalesce_joins=true and load\.join_delay_factor=2\.0 are two ways to space the joins",
        ),
        (["load.find_crossover=true", "load.rate_min=1", "load.rate_max=0.5"], r"^load\.rate_min=1\.0 is not below"),
        (["load.find_crossover=true", "load.max_probes=1"], r"^load\.max_probes=1 is invalid"),
        (["slo.tpot_ms=-5"], r"^slo\.tpot_ms=-5\.0 is invalid: give a latency target of 0 ms or more"),
        (["slo.attainment=1.5"], r"^slo\.attainment=1\.5 is invalid"),
        (["load.crossover_metric=goodput"], r"^load\.crossover_metric=goodput counts requests meeting the SLOs"),
        (["load.arrival=trace"], r"^load\.arrival=trace replays a file: set load\.trace_path"),
        (["load.arrival=trace", "load.trace_path=/no/such.jsonl"], r"^load\.trace_path=/no/such\.jsonl does not exist"),
        (["load.arrival=trace", f"load.trace_path={trace}"], r"line 2 arrives at 0\.5 s, before the line above"),
        (
            ["load.arrival=trace", f"load.trace_path={trace}", "load.find_crossover=true"],
            r"^load\.find_crossover=true varies the request rate, which a trace file fixes",
        ),
        (
            ["load.arrival=trace", f"load.trace_path={ordered}", "load.traces=2"],
            r"^load\.traces=2 draws other arrival traces, but a trace file is one",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            typed_config(composer(*load, *overrides))
    typed_config(composer("load.rate=0", "slo.tpot_ms=-5", "device=cpu"))  # mode=batch ignores the load settings
    with pytest.raises(Exception, match=r"load\.rate") as error:
        composer("mode=load", "load.rate=fast")
    assert explain_config_error(error.value).startswith("load.rate: Value 'fast' of type 'str' could not be")
