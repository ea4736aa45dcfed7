"""Validation of settings that types cannot check, and the sweep's bookkeeping of job outcomes."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from specbench.config import (
    ConfigError,
    DatasetConfig,
    DraftConfig,
    DrafterConfig,
    SpecBenchConfig,
    VerifierConfig,
    validate,
)
from specbench.sweep import JOB_STATUS_FILE, job_statuses


def config(**drafters: DrafterConfig) -> SpecBenchConfig:
    return SpecBenchConfig(
        verifier=VerifierConfig(name="v", name_or_path="some/model"),
        draft=DraftConfig(name="d", drafters=drafters or {"d": DrafterConfig(name_or_path="some/draft")}),
        dataset=DatasetConfig(),
        device="cpu",
    )


def test_a_valid_config_passes():
    validate(config())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c, "k", 0), "k=0 is invalid"),
        (lambda c: setattr(c, "k_schedule", "fast"), "k_schedule=fast is unknown"),
        (lambda c: setattr(c.generation, "top_p", 1.5), "generation.top_p=1.5 is invalid"),
        (lambda c: setattr(c, "dtype", "int4"), "dtype=int4 is unknown"),
        (lambda c: setattr(c.engine, "compile", True), "add engine.cuda_graphs=true"),
        (lambda c: setattr(c.cost, "profile", "tpu"), "cost.profile=tpu is unknown"),
        (lambda c: setattr(c.dataset, "path", "/no/such.jsonl"), "does not exist"),
    ],
)
def test_bad_values_are_named_with_their_fix(change, message):
    cfg = config()
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_drafter_names_and_kinds():
    with pytest.raises(ConfigError, match="may not be named 'verifier'"):
        validate(config(verifier=DrafterConfig(name_or_path="x")))
    with pytest.raises(ConfigError, match="kind=beam is unknown"):
        validate(config(d=DrafterConfig(kind="beam")))
    validate(config(lookup=DrafterConfig(kind="prompt_lookup")))  # needs no name_or_path


def test_the_schema_rejects_unknown_keys():
    schema = OmegaConf.structured(SpecBenchConfig)
    with pytest.raises(Exception, match="generaton"):
        OmegaConf.merge(schema, {"generaton": {"max_new_tokens": 3}})


def test_jobs_that_left_no_status_count_as_lost(tmp_path):
    for job, status in (("0", {"name": "a", "status": "FINISHED", "run_id": "r0"}), ("1", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        if status:
            (tmp_path / job / JOB_STATUS_FILE).write_text(json.dumps(status))
    (tmp_path / "report").mkdir()  # not a job folder
    statuses = job_statuses(tmp_path)
    assert [s["status"] for s in statuses] == ["FINISHED", "LOST"]
