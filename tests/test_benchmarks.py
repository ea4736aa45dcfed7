"""The benchmarks run in a bare clone: their dataset options load the prompts the CLI would, and both scripts
finish on tiny models from a copy of the repository with nothing beside it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from specbench.config import DatasetConfig
from specbench.data import load_records
from specbench.engine.results import ServedRequest, ServeResult
from specbench.engine.schedule import StepState
from specbench.errors import DataError
from tests.test_k_schedule_load import near_tie

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling modules, as `python benchmarks/x.py`

import cpu  # noqa: E402
import gc_in_run  # noqa: E402
import gpu_load  # noqa: E402
import load_model_check  # noqa: E402
from prompt_options import dataset_config, load_prompt_records  # noqa: E402

SAMPLE = ROOT / "specbench" / "samples" / "sample_qa.jsonl"


def test_the_shipped_sample_is_the_default():
    args = cpu.parse_args([])
    config, records = load_prompt_records(args, args.prompts)
    assert Path(config.path) == SAMPLE
    assert config.template == DatasetConfig.template and config.num_samples == 2
    assert records == load_records(DatasetConfig(path=str(SAMPLE), num_samples=2))


def test_a_local_file_and_the_hub(pubmedqa_file):
    args = cpu.parse_args(["--dataset-path", str(pubmedqa_file), "--prompts", "3"])
    _, records = load_prompt_records(args, args.prompts)
    assert [record.pubid for record in records] == ["1000", "1001", "1002"]

    hub = dataset_config(cpu.parse_args(["--dataset", "pubmedqa"]), 2)
    assert hub.path is None and (hub.hub_id, hub.hub_config) == ("qiaojin/PubMedQA", "pqa_labeled")
    with pytest.raises(DataError, match="from the HuggingFace hub"):  # the tests run offline
        load_records(hub)


def test_a_missing_file_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cpu.main(["--dataset-path", str(tmp_path / "nope.jsonl")])
    assert str(stop.value).startswith(f"error: cannot read dataset file {tmp_path / 'nope.jsonl'}")


def test_quick_changes_defaults_not_explicit_values():
    quick = cpu.parse_args(["--quick", "--prompts", "3"])
    assert (quick.prompts, quick.repeats, quick.ks, quick.skip_dtype_probe) == (3, 1, [4], True)
    full = cpu.parse_args([])
    assert (full.prompts, full.repeats, full.ks, full.skip_dtype_probe) == (2, 3, [2, 4, 6], False)


@pytest.fixture(scope="module")
def bare_clone(tmp_path_factory) -> Path:
    """The repository's files (as git sees them, uncommitted ones included) alone in an empty folder."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    clone = tmp_path_factory.mktemp("bare") / "specbench"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert sorted(path.name for path in clone.parent.iterdir()) == ["specbench"]
    return clone


def run_script(clone: Path, *args: str) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=clone, env=environment, capture_output=True, text=True, timeout=600
    )


def test_make_bench_script_runs_in_a_bare_clone(bare_clone, models_dir):
    """`make bench-quick`'s command, with tiny local models in place of the fetched Qwen pair."""
    out = bare_clone / "results"
    done = run_script(
        bare_clone,
        "benchmarks/cpu.py",
        "--quick",
        "--verifier-path",
        str(models_dir / "openai-community" / "gpt2-large"),
        "--draft-path",
        str(models_dir / "EleutherAI" / "gpt-neo-125M"),  # nn.Linear layers, for the int8 copy
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = out.glob("cpu-*-float32-quick.json")
    report = json.loads(result.read_text())
    assert report["prompts"] == str(bare_clone / "specbench" / "samples" / "sample_qa.jsonl")
    assert set(report["contenders"]) == {
        "ours_baseline", "hf_generate", "ours_fp32_k4", "hf_fp32_k4",
        "ours_int8_k4", "hf_int8_k4", "ours_lookup_k4", "hf_lookup_k4",
    }  # fmt: skip
    # float32 greedy: every contender, ours and transformers', reproduces verifier-only decoding
    assert all(row["identical_to_baseline"] for row in report["contenders"].values())
    assert (out / result.name.replace(".json", ".md")).is_file()


def test_gc_pause_script_runs_in_a_bare_clone(bare_clone, tmp_path):
    done = run_script(bare_clone, "benchmarks/gc_pause.py", "--repeats=1", f"--out={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = tmp_path.glob("gc-pause-*.json")
    report = json.loads(result.read_text())
    assert report["objects_tracked"] > 10_000 and report["machine"]["cores"] >= 1
    assert {name: figure["runs"] for name, figure in report["full_collection_ms"].items()} == {"open": 1, "frozen": 1}


def test_gc_in_run_logs_a_load_run_in_a_bare_clone(bare_clone, models_dir, pubmedqa_file, tmp_path):
    """A tiny load run under the collection log: it finishes, and the log saw the engine enter its timed regions."""
    command = [
        f"models_dir={models_dir}", "dtype=float32", f"dataset.path={pubmedqa_file}", "dataset.num_samples=2",
        "generation.max_new_tokens=8", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"hydra.run.dir={tmp_path}/outputs", "cost_batch_grid=[1,2]",
        "mode=load", "load.rate=40", "load.num_requests=4", "load.max_batch_size=2", "k=2",
    ]  # fmt: skip
    done = run_script(bare_clone, "benchmarks/gc_in_run.py", "--open-heap", f"--out={tmp_path}", "--", *command)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = tmp_path.glob("gc-in-run-*-open-heap.json")
    report = json.loads(result.read_text())
    assert report["exit_code"] == 0 and report["heap_in_timed_regions"] == "open"
    assert report["timed_regions"] >= 2  # at least the two modes' served traces
    assert sum(report["full_collections"].values()) == len(report["log"])
    # importing torch and transformers alone sets off full collections: each says what it walked past and where
    assert report["log"] and all(
        entry["walkable_objects"] > 0 and entry["frozen_objects"] >= 0 and entry["where"] for entry in report["log"]
    )
    assert all(
        0 <= entry["cpu_ms"] <= entry["ms"] + 1 and sum(entry["commonest_walkable_types"].values()) > 0
        for entry in report["log"]
    )


def test_gc_in_run_runs_a_benchmark_script_whose_quick_mode_keeps_explicit_values(bare_clone, tmp_path):
    """`gpu_load.py --quick` under the collection log: --quick's small shapes, but the rates given explicitly; the
    variants blind to the limits' scatter, corrected at the median at a full batch, and learned on another trace at
    the rate served beside the load-aware k, over two traces."""
    load = tmp_path / "load"
    done = run_script(
        bare_clone, "benchmarks/gc_in_run.py", f"--out={tmp_path}", "--script", "benchmarks/gpu_load.py",
        "--", "--quick", f"--out={load}", "--sections", "k_schedule", "--k-rates", "5", "--limits-blind-mode",
        "--median-full-mode", "--learned-mode", "--trace-seeds", "0", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = tmp_path.glob("gc-in-run-*-frozen-heap.json")
    report = json.loads(result.read_text())
    assert report["command"][0] == "benchmarks/gpu_load.py" and report["exit_code"] == 0
    assert report["timed_regions"] >= 5  # the baseline, k = 1 and 2 and the policy served once, and its warm-up
    served = json.loads((load / "gpu_load.json").read_text())
    assert (served["settings"]["k_rates"], served["settings"]["max_batch"]) == ("[5.0]", "4")
    assert "error" not in served["k_schedule"] and "alpha0.8_rate5" in served["k_schedule"]
    verdicts = served["k_schedule"]["alpha0.8_rate5"]["verdict"]
    assert set(verdicts) == {"load", "limitsblind", "medianfull", "learned"}  # the variants beside it
    pooled = served["k_schedule"]["alpha0.8_rate5_pooled"]  # both traces' serves pooled: one k fixed for the rate
    assert set(pooled) == {"load", "limitsblind", "medianfull", "learned"} and pooled["load"]["traces"] == 2
    low, high = pooled["load"]["load_over_baseline_interval"]
    assert low <= pooled["load"]["load_over_baseline"] <= high


def test_the_variant_blind_to_the_limits_scatter_goes_plain_where_the_load_aware_k_drafts():
    """`gpu_load.py --limits-blind-mode`: a full batch whose rows' limits spread, at a near tie (k = 1 a shade cheaper
    than a plain step on the mean), drafts under the load-aware k and goes plain under the variant; with equal
    limits both go plain."""
    policy, variant = near_tie(slots=64), near_tie(slots=64, kind=gpu_load.LimitsBlindK)
    spread = StepState(64, unread_tokens=0, remaining_tokens=32, output_tokens=64, output_tokens_std=18.5)
    assert (policy.k_for_step(spread), variant.k_for_step(spread)) == (1, 0)
    equal = replace(spread, output_tokens_std=0.0)
    assert (policy.k_for_step(equal), variant.k_for_step(equal)) == (0, 0)
    assert variant.priced_tokens(1, spread) == policy.priced_tokens(1, equal)


def test_the_variant_corrected_at_the_median_drafts_where_the_load_aware_k_is_cautious_at_a_full_batch():
    """`gpu_load.py --median-full-mode`: at a full batch with spread limits k = 1 is 1% cheaper than a plain step at
    the median correction; with steps measured 6% either side of the surface the policy corrects it at 1.06, the
    upper end of the median's interval, and goes plain, while the variant keeps the median and drafts."""
    spread = StepState(64, unread_tokens=0, remaining_tokens=32, output_tokens=64, output_tokens_std=18.5)
    policy, variant = near_tie(slots=64), near_tie(slots=64, kind=gpu_load.MedianAtFullBatchK)
    for schedule in (policy, variant):
        for ratio in (0.94, 1.06) * 8:
            schedule.observe_step(1, 64, 3.6 * ratio)
    assert policy.correction(1, 64) == pytest.approx(1.06) and variant.correction(1, 64) == pytest.approx(1.0)
    assert (policy.k_for_step(spread), variant.k_for_step(spread)) == (0, 1)


def test_the_pooled_verdict_fixes_one_k_for_the_rate_with_the_products_interval():
    """Over the serves of a rate pooled, as `mode=load load.traces=2` reports it, the fixed k is the one with the lowest
    pooled p99 TPOT, not each trace's best: here k = 2 (12 ms on both traces) over k = 4 (10 and 16), though k = 4
    won trace one; each ratio has an interval from the traces drawn, then their requests, around it."""

    def serve(tpot_ms: float) -> ServeResult:  # two requests of two tokens each, whose one gap is the TPOT
        requests = [ServedRequest(i, 0.0, 0.0, 0.0, tpot_ms / 1000, num_tokens=2) for i in range(2)]
        return ServeResult(requests, [], wall_s=tpot_ms / 1000)

    per_trace = {"baseline": (20.0, 20.0), "k2": (12.0, 12.0), "k4": (10.0, 16.0), "load": (11.0, 13.0)}
    serves = {mode: [serve(value) for value in values] for mode, values in per_trace.items()}
    [verdict] = gpu_load._verdict_pooled(serves, 1, ["load"], list(per_trace)).values()
    assert verdict["best_fixed"] == "k2" and (verdict["traces"], verdict["requests"]) == (2, 4)
    assert verdict["load_over_best_fixed"] == pytest.approx(13 / 12)  # the pooled p99 is each mode's slower trace
    assert verdict["load_over_baseline"] == pytest.approx(13 / 20)
    for name in ("baseline", "best_fixed"):
        low, high = verdict[f"load_over_{name}_interval"]
        assert low < verdict[f"load_over_{name}"] < high
    replayed = {mode: [serve(value) for value in values for _ in range(2)] for mode, values in per_trace.items()}
    [twice] = gpu_load._verdict_pooled(replayed, 2, ["load"], list(per_trace)).values()  # trace by trace, 2 repeats
    assert (twice["traces"], twice["requests"], twice["best_fixed"]) == (2, 8, "k2")
    assert twice["load_over_best_fixed"] == pytest.approx(13 / 12)


def test_gc_in_run_marks_every_module_that_freezes_the_heap():
    imports_it = re.compile(r"^from specbench\.engine\.timing import .*\bfrozen_heap\b", re.MULTILINE)
    importers = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "specbench").rglob("*.py")
        if imports_it.search(path.read_text(encoding="utf-8"))
    }
    assert importers == set(gc_in_run.TIMING_MODULES)


def test_concurrent_drafts_script_runs_in_a_bare_clone(bare_clone, models_dir, pubmedqa_file):
    draft = models_dir / "EleutherAI" / "gpt-neo-125M"
    done = run_script(
        bare_clone,
        "benchmarks/concurrent_drafts.py",
        "--repeats=1",
        f"--draft-path={draft}",
        f"--dataset-path={pubmedqa_file}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "two drafts x k=4: sequential" in done.stdout


RESULTS_TWELVE = "gpu-h200-2026-12-03-k-schedule-session-twelve.json"  # step series hold a mode named `load`


def test_the_load_model_check_reads_both_kinds_of_results(tmp_path):
    """`load_model_check.py` on a hand-made results file: one crossover probe and one step series."""
    surface = {
        "verify_ms": {"1": {"1": 10.0, "3": 12.0}, "8": {"1": 10.0, "3": 12.0}},
        "draft_ms": {"1": 1.0, "8": 1.0},
    }
    # the baseline at 10 requests/s: TPOT 20 ms over a 10 ms step, so joins took half the time: p = 0.5 / 10 = 50 ms
    probe = {f"{key}_{mode}": value for mode in ("baseline", "spec") for key, value in (
        ("ttft_ms_mean", 30.0), ("queue_ms_mean", 10.0), ("occupancy_mean", 2.0), ("tpot_ms_mean", 20.0),
        ("requests_per_s", 10.0))}  # fmt: skip
    # two requests admitted together at 0.1 s (one 20 ms join), each 5 tokens, 10 ms apart after the first
    requests = [[0.0, 100.0, 120.0, 160.0, 5], [50.0, 100.0, 120.0, 160.0, 5]]
    steps = [[time, 2, 0] for time in (120.0, 130.0, 140.0, 150.0, 160.0)]  # no join during them
    results = {
        "load": {**surface, "alpha0.5_k2_search1": {"probes": {"10": probe}}},
        "k_schedule": {
            "modes": ["baseline", "k2"],
            "alpha0.5_rate10": {
                "step_series": {mode: {"requests": requests, "steps": steps} for mode in ("baseline", "k2")}
            },
        },
    }
    path, out = tmp_path / "results.json", tmp_path / "check.json"
    path.write_text(json.dumps(results))
    done = run_script(ROOT, "benchmarks/load_model_check.py", str(path), "--surface", str(path), "--alpha", "0.5",
                      "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    probe_check = report["load/alpha0.5_k2_search1_rate10"]["baseline"]
    assert probe_check["implied_join_ms_per_request"] == pytest.approx(50.0)
    assert probe_check["admitted_to_first_token_ms"] == pytest.approx(20.0)
    series = report["k_schedule/alpha0.5_rate10_k2"]
    assert series["measured_ms"]["baseline"] == pytest.approx(10.0)
    assert series["join_share"]["p_ms"]["baseline"] == pytest.approx(10.0)  # one 20 ms join for two requests
    assert series["median_latency"]["p_ms"]["baseline"] == pytest.approx(20.0)
    # 10 ms steps at 2 rows: the baseline's surface step (10 ms), 0.71 of the 2-draft step (2 x 1 + 12 ms)
    fitted = series["served_steps"]["fitted"]
    assert fitted["baseline"]["ratio"] == pytest.approx(1.0) and fitted["k2"]["ratio"] == pytest.approx(10 / 14)
    assert load_model_check.sections(path, "k_schedule").keys() == {"k_schedule"}
    assert load_model_check.sections(ROOT / "benchmarks" / "results" / RESULTS_TWELVE, "load") == {}
