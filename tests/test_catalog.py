"""The metric catalog: the README's table is generated from it, and lookups cover families and intervals."""

from __future__ import annotations

from pathlib import Path

from specbench.catalog import METRICS, metric, replace_readme_table, report_metrics, summary_metrics

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_metric_table_is_the_catalog():
    text = README.read_text()
    assert replace_readme_table(text) == text, "run `python -m specbench.catalog README.md`"


def test_lookup_finds_pairs_families_and_intervals():
    assert metric("baseline_tokens_per_s") is metric("spec_tokens_per_s")
    assert metric("acceptance_rate_pos_3").key == "acceptance_rate_pos_{i}"
    assert metric("acceptance_rate_ci_low").key == "acceptance_rate"  # not the per-drafter family
    assert metric("acceptance_rate_distilgpt2").key == "acceptance_rate_{draft}"
    assert metric("no_such_metric") is None


def test_every_entry_is_documented_and_keys_are_unique():
    keys = [entry.key for entry in METRICS] + [entry.baseline for entry in METRICS if entry.baseline]
    assert len(keys) == len(set(keys))
    assert all(entry.doc and entry.label for entry in METRICS)
    assert {entry.key for entry in report_metrics()} <= {entry.key for entry in summary_metrics()}


def test_values_are_formatted_in_their_unit():
    assert metric("acceptance_rate").format(0.6412) == "64.1%"
    assert metric("cost_per_query_usd_spec").format(0.000189) == "$0.000189"
    assert metric("speedup").format(1.5934) == "1.59"
    assert metric("speedup").format(float("nan")) == "—"
    assert metric("cost_saving_pct").format(-37.2) == "-37.2%"
