"""Greedy disagreement in bfloat16, shown rather than explained: the verifier's top-two logit gap where the outputs
part (float32, one teacher-forced forward), the near-tie rule, its counts, and the console's line and warnings."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM

from specbench.engine import CachedModel
from specbench.engine.scoring import NEAR_TIE_UNITS, TopTwoGap, rounding_unit, top_two_gap
from specbench.metrics import near_tie_metrics, per_prompt_table
from specbench.pipeline import disagreement_warnings
from specbench.testing import make_model, train_tokenizer
from tests.test_cli import common_args, run_cli
from tests.test_metrics import outcome

FAST = ["cost_curve=false", "quality.perplexity=false", "quality.embedder=none"]


def test_the_rounding_unit_is_the_dtype_spacing_at_the_logit():
    assert rounding_unit(20.0, torch.bfloat16) == 2**-7 * 16  # bfloat16 numbers in [16, 32) lie 1/8 apart
    assert rounding_unit(-20.0, torch.bfloat16) == rounding_unit(20.0, torch.bfloat16)
    assert rounding_unit(0.75, torch.float32) == 2**-23 * 0.5
    for value in (0.3, 7.0, 20.0, 300.0):  # the next number up is exactly one unit away
        rounded = torch.tensor(value, dtype=torch.bfloat16)
        assert torch.nextafter(rounded, torch.tensor(1e9, dtype=torch.bfloat16)) - rounded == rounding_unit(
            rounded.item(), torch.bfloat16
        )
    near, wide = TopTwoGap(0.25, 20.0, 0.125), TopTwoGap(0.75, 20.0, 0.125)
    assert near.near_tie and not wide.near_tie and NEAR_TIE_UNITS == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gap_is_the_verifiers_own_top_two_at_that_position(tokenizer, dtype):
    model = make_model("llama", len(tokenizer), seed=3).to(dtype)
    prompt, prefix = [5, 17, 42, 8], [99, 3]
    logits = model(torch.tensor([prompt + prefix])).logits[0, -1].float()  # plain transformers, no cache
    first, second = logits.topk(2).values.tolist()
    gap = top_two_gap(CachedModel(model, len(tokenizer)), prompt, prefix)
    assert gap.gap == pytest.approx(first - second, abs=1e-6) and gap.top_logit == pytest.approx(first, abs=1e-6)
    assert gap.rounding_unit == torch.finfo(dtype).eps * 2 ** math.floor(math.log2(abs(first)))


def test_a_disagreement_not_at_a_near_tie_is_a_warning_naming_the_prompt():
    parted = outcome("81", 1.0, 1.0, [1, 0, 2])
    parted.spec.tokens = [0, 1, 7, 3, 4, 5, 6]  # parts at output token 2
    parted.first_difference_gap = TopTwoGap(gap=2.5, top_logit=20.0, rounding_unit=0.125)  # 20 units
    tied = outcome("82", 1.0, 1.0, [1, 0, 2])
    tied.spec.tokens = [0, 9, 2, 3, 4, 5, 6]
    tied.first_difference_gap = TopTwoGap(gap=0.125, top_logit=20.0, rounding_unit=0.125)
    (warning,) = disagreement_warnings([parted, tied], {"81": "question_id 81", "82": "question_id 82"})
    assert warning.startswith("warning: the speculative output of question_id 81 (repeat 0) differs from the ")
    assert "at output token 2" in warning and "20 rounding units" in warning
    agreeing = outcome("83", 1.0, 1.0, [1, 0, 2])
    table = per_prompt_table([parted, tied, agreeing])
    assert table["first_difference_near_tie"].tolist() == [False, True, None]
    assert table["first_difference_gap"].tolist()[:2] == [2.5, 0.125] and math.isnan(table["first_difference_gap"][2])
    assert near_tie_metrics(table) == {"disagreements_at_near_tie": 1, "disagreements_not_near_tie": 1}


@pytest.fixture(scope="module")
def wider_llama(tmp_path_factory) -> str:
    """A llama of hidden size 1024 and 4 layers: the shared tiny models (32 wide) never part in bfloat16."""
    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    folder = tmp_path_factory.mktemp("wider_llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_bfloat16_disagreements_are_counted_by_the_near_tie_rule(
    models_dir, pubmedqa_file, wider_llama, tmp_path, monkeypatch, capsys
):
    """A bfloat16 decode through the CLI, the verifier drafting for itself: the per-prompt gaps, the rule, the
    counts and the console agree. Outputs part where a verify of k+1 tokens rounds otherwise than one token at a
    time (on a Xeon with AVX512-BF16, 3 of this file's 8 prompts within 32 tokens, each 1 rounding unit from a
    tie); they are not asserted equal, only accounted for."""
    args = [
        arg
        for arg in common_args(models_dir, pubmedqa_file, tmp_path)
        if not arg.startswith(("dataset.num_samples", "generation.max_new_tokens"))
    ]
    args += [
        f"verifier.name_or_path={wider_llama}",
        f"draft.drafters.distilgpt2.name_or_path={wider_llama}",
        "dtype=bfloat16",
        "device=cpu",
        "dataset.start=6",  # the first of these two parts from the baseline at its second token
        "dataset.num_samples=2",
        "generation.max_new_tokens=8",
        "generation.stop_at_eos=false",
        *FAST,
    ]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    metrics = run.data.metrics
    table = pd.read_csv(MlflowClient().download_artifacts(run.info.run_id, "per_prompt.csv", str(tmp_path)))
    parted = table[~table["identical"]]
    assert len(parted) >= 1, "no output parted: nothing of the bookkeeping was exercised"
    assert table.loc[table["identical"], "first_difference_gap"].isna().all()  # only disagreements are scored
    eps = torch.finfo(torch.bfloat16).eps
    for row in parted.itertuples():
        assert row.first_difference_gap >= 0
        assert row.first_difference_unit == eps * 2 ** math.floor(math.log2(abs(row.first_difference_top_logit)))
        assert row.first_difference_near_tie == (row.first_difference_gap <= NEAR_TIE_UNITS * row.first_difference_unit)
    near = int(parted["first_difference_near_tie"].sum())
    assert (metrics["disagreements_at_near_tie"], metrics["disagreements_not_near_tie"]) == (near, len(parted) - near)
    assert metrics["disagreement_rate"] == pytest.approx(len(parted) / 2)
    (line,) = [line for line in out.splitlines() if line.startswith("  Disagreement")]
    assert line.split(None, 1)[1].startswith(f"{len(parted)} of 2 prompts")
    if len(parted) and near == len(parted):
        assert line.endswith(", all at near-ties (bfloat16 rounding)")
    warned = [line for line in out.splitlines() if line.startswith("warning: the speculative output of")]
    assert [line.split()[5:7] for line in warned] == [
        ["pubid", str(row.pubid)] for row in parted.itertuples() if not row.first_difference_near_tie
    ]
