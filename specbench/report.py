"""The cross-run comparison: finished runs from MLflow as one table, comparison plots, files, and the parent run.

`python -m specbench.report --parent-run-id <id> --log-to-parent` compares the
runs of one sweep (a Hydra multirun) and logs the report to its parent run.
Each run measured its own baseline, so the plots draw every run's baseline next
to its speculative figure rather than one shared baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from specbench import tracking
from specbench.plots import FIGSIZE, markdown_table, new_figure, reference_line

CONFIG_HASH = "tags.specbench.config_hash"
ARTIFACT_DIR = "report"
# summary column: (MLflow metric key, scale); rates become percentages
METRIC_COLUMNS = {
    "latency p50 baseline (s)": ("baseline_latency_p50_s", 1),
    "latency p50 spec (s)": ("spec_latency_p50_s", 1),
    "latency p95 baseline (s)": ("baseline_latency_p95_s", 1),
    "latency p95 spec (s)": ("spec_latency_p95_s", 1),
    "tokens/s baseline": ("baseline_tokens_per_s", 1),
    "tokens/s spec": ("spec_tokens_per_s", 1),
    "speedup (x)": ("speedup", 1),
    "speedup CI low (x)": ("speedup_ci_low", 1),
    "speedup CI high (x)": ("speedup_ci_high", 1),
    "steady-state speedup (x)": ("steady_state_speedup", 1),
    "predicted speedup (x)": ("predicted_speedup", 1),
    "acceptance (%)": ("acceptance_rate", 100),
    "mean accepted tokens": ("mean_accepted_tokens", 1),
    "disagreement (%)": ("disagreement_rate", 100),
    "ROUGE-L vs baseline": ("rougeL_vs_baseline", 1),
    "BLEU vs baseline": ("bleu_vs_baseline", 1),
    "semantic similarity vs baseline": ("semantic_similarity_vs_baseline", 1),
    "cost/query baseline (USD)": ("cost_per_query_usd_baseline", 1),
    "cost/query spec (USD)": ("cost_per_query_usd_spec", 1),
    "cost saving (%)": ("cost_saving_pct", 1),
}


def load_runs(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    run_ids: list[str] | None = None,
    latest_per_config: bool = True,
) -> pd.DataFrame:
    """Finished benchmark runs (not sweep parents) as `mlflow.search_runs` rows, newest first.

    Points MLflow at `tracking_uri` (so `log_report` logs to the same store). With
    `latest_per_config`, a configuration measured several times keeps its latest run.
    """
    database = tracking.sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise ValueError(f"no MLflow store at {database}: pass --tracking-uri of the store the benchmarks logged to.")
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ValueError(
            f"experiment '{experiment}' does not exist in {tracking_uri}: pass --experiment with its name."
        )
    clauses = ["attributes.status = 'FINISHED'"]
    if parent_run_id:
        clauses.append(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    if run_ids:
        quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
        clauses.append(f"attributes.run_id IN ({quoted})")
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=" AND ".join(clauses),
        order_by=["attributes.start_time DESC"],
        output_format="pandas",
    )
    if "params.k" in runs:
        runs = runs[runs["params.k"].notna()]
    if latest_per_config and CONFIG_HASH in runs:
        runs = runs[runs[CONFIG_HASH].isna() | ~runs[CONFIG_HASH].duplicated()]
    if runs.empty or "params.k" not in runs:
        scope = f"under parent run {parent_run_id}" if parent_run_id else f"in experiment '{experiment}'"
        raise ValueError(
            f"no finished benchmark runs {scope}: check --experiment and --parent-run-id, or run a benchmark first."
        )
    return runs.reset_index(drop=True)


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with readable column names and units, sorted by draft then k; absent metrics are left out."""
    table = pd.DataFrame(
        {
            "draft": _param(runs, "draft.name"),
            "k": pd.to_numeric(_param(runs, "k"), errors="coerce").astype("Int64"),
            "verifier": _param(runs, "verifier.name"),
            "sampling": _param(runs, "generation.do_sample").str.lower().map({"true": "sampled", "false": "greedy"}),
        }
    )
    for column, (key, scale) in METRIC_COLUMNS.items():
        if f"metrics.{key}" in runs:
            table[column] = runs[f"metrics.{key}"].to_numpy() * scale
    return table.sort_values(["draft", "k", "verifier", "sampling"], kind="stable").reset_index(drop=True)


def draft_colors(names: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """One qualitative colour per distinct name, assigned in sorted order so every plot agrees."""
    unique = sorted(set(names))
    colormap = matplotlib.colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {name: colormap(index % colormap.N) for index, name in enumerate(unique)}


def comparison_figures(runs: pd.DataFrame) -> dict[str, Figure]:
    """Cross-run figures keyed by artifact path; one colour per draft (per "verifier / draft" when those vary)."""
    table = summary_table(runs)
    table["series"] = _series_labels(table)
    table = table.sort_values(["series", "k"], kind="stable").reset_index(drop=True)
    colors = draft_colors(table["series"])
    subtitle = ", ".join(
        f"{column}: {table[column][0]}" for column in ("verifier", "sampling") if table[column].nunique() == 1
    )

    def bars(title: str, ylabel: str, *columns: tuple[str, str, str | None]) -> Figure:
        return _bars_vs_baseline(table, colors, title, subtitle, ylabel, list(columns))

    return {
        "plots/speedup_vs_k.png": _speedup_vs_k(table, colors, subtitle),
        "plots/acceptance_vs_k.png": _acceptance_vs_k(table, colors, subtitle),
        "plots/latency.png": bars(
            "Latency per request",
            "latency per request (s)",
            ("speculative p50", "latency p50 spec (s)", "latency p50 baseline (s)"),
            ("speculative p95", "latency p95 spec (s)", "latency p95 baseline (s)"),
        ),
        "plots/throughput.png": bars(
            "Throughput", "generated tokens/s", ("speculative", "tokens/s spec", "tokens/s baseline")
        ),
        "plots/disagreement.png": bars(
            "Speculative outputs that differ from the baseline",
            "prompts whose output differs (%)",
            ("speculative", "disagreement (%)", None),
        ),
        "plots/cost.png": bars(
            "Cost per query",
            "cost per query (USD)",
            ("speculative", "cost/query spec (USD)", "cost/query baseline (USD)"),
        ),
    }


def write_report(runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write summary.md, summary.csv and plots/*.png under `out_dir`; return the paths written."""
    table = summary_table(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, csv = out_dir / "summary.md", out_dir / "summary.csv"
    markdown.write_text(_markdown(table) + "\n")
    table.to_csv(csv, index=False)
    paths = [markdown, csv]
    for artifact, figure in comparison_figures(runs).items():
        path = out_dir / artifact
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        paths.append(path)
    return paths


def log_report(runs: pd.DataFrame, run_id: str) -> None:
    """Log the files of `write_report` to the MLflow run `run_id` (e.g. the sweep's parent), under report/."""
    with tempfile.TemporaryDirectory() as folder:
        write_report(runs, Path(folder))
        MlflowClient().log_artifacts(run_id, folder, ARTIFACT_DIR)


def main(argv: list[str] | None = None) -> int:
    """Command line: compare runs, print the table, write the report (and log it to the sweep's parent run)."""
    parser = argparse.ArgumentParser(prog="specbench report", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--experiment", default="specbench", help="MLflow experiment name")
    parser.add_argument("--parent-run-id", help="only the runs of this sweep (its parent run id)")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>)")
    parser.add_argument("--log-to-parent", action="store_true", help="also log the report to the parent run")
    args = parser.parse_args(argv)
    try:
        if args.log_to_parent and not args.parent_run_id:
            raise ValueError("--log-to-parent needs --parent-run-id: pass the sweep's parent run id.")
        runs = load_runs(args.tracking_uri, args.experiment, args.parent_run_id)
        out_dir = args.out or Path("reports") / args.experiment
        paths = write_report(runs, out_dir)
        if args.log_to_parent:
            log_report(runs, args.parent_run_id)
    except (ValueError, MlflowException, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(_markdown(summary_table(runs)))
    print(f"\n{len(runs)} runs; wrote {len(paths)} files to {out_dir}: summary.md, summary.csv, plots/*.png")
    if args.log_to_parent:
        print(f"logged to run {args.parent_run_id} under {ARTIFACT_DIR}/")
    return 0


def _param(runs: pd.DataFrame, key: str) -> pd.Series:
    """A params column as strings (missing where a run lacks it)."""
    column = f"params.{key}"
    values = runs[column] if column in runs else pd.Series(pd.NA, index=runs.index)
    return values.astype("string").reset_index(drop=True)


def _markdown(table: pd.DataFrame) -> str:
    return markdown_table(list(table.columns), table.itertuples(index=False))


def _series_labels(table: pd.DataFrame) -> pd.Series:
    """The draft, prefixed by the verifier and followed by the sampling mode when those vary across runs."""
    parts = [column for column in ("verifier", "draft", "sampling") if column == "draft" or table[column].nunique() > 1]
    return table[parts].astype("string").fillna("?").agg(" / ".join, axis=1)


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric column, NaN throughout when the runs did not log it."""
    return table[name].to_numpy(float) if name in table else np.full(len(table), np.nan)


def _lines_vs_k(
    ax: Axes, table: pd.DataFrame, colors: dict, column: str, interval: tuple[str, str] | None = None, **style
) -> None:
    """One line per series of `column` against k, with error bars from the `interval` columns."""
    for series, group in table.groupby("series", sort=True):
        values = _column(group, column)
        yerr = None
        if interval is not None:
            low, high = (_column(group, name) for name in interval)
            yerr = np.clip([values - low, high - values], 0, None)
        ax.errorbar(_column(group, "k"), values, yerr=yerr, color=colors[series], capsize=3, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft tokens per step k")


def _series_handles(colors: dict) -> list[Line2D]:
    """Legend entries naming each series by its colour."""
    return [Line2D([], [], color=color, marker="o", label=series) for series, color in colors.items()]


def _speedup_vs_k(table: pd.DataFrame, colors: dict, subtitle: str) -> Figure:
    figure, (ax,) = new_figure("Speedup over the baseline vs k", subtitle)
    _lines_vs_k(ax, table, colors, "speedup (x)", ("speedup CI low (x)", "speedup CI high (x)"), marker="o")
    _lines_vs_k(ax, table, colors, "predicted speedup (x)", linestyle="--", marker="x")
    handles = _series_handles(colors)
    if "predicted speedup (x)" in table:
        handles.append(Line2D([], [], color="grey", linestyle="--", marker="x", label="predicted (dashed)"))
    handles.append(reference_line(ax, 1.0, "baseline"))
    ax.legend(handles=handles, fontsize=8)
    ax.set_ylabel("speedup over baseline (x)")
    return figure


def _acceptance_vs_k(table: pd.DataFrame, colors: dict, subtitle: str) -> Figure:
    figure, (rate, tokens) = new_figure("Acceptance vs k", subtitle, ncols=2, width=9)
    _lines_vs_k(rate, table, colors, "acceptance (%)", marker="o")
    rate.set(title="Drafted tokens accepted", ylabel="acceptance rate (%)", ylim=(0, 105))
    _lines_vs_k(tokens, table, colors, "mean accepted tokens", marker="o")
    tokens.set(title="Tokens per verifier pass", ylabel="mean accepted tokens per step")
    rate.legend(handles=_series_handles(colors))
    return figure


def _bars_vs_baseline(
    table: pd.DataFrame,
    colors: dict,
    title: str,
    subtitle: str,
    ylabel: str,
    bars: list[tuple[str, str, str | None]],
) -> Figure:
    """Per run, one bar per (name, speculative column, baseline column); each run's own baseline is a dashed segment."""
    figure, (ax,) = new_figure(title, subtitle, width=max(FIGSIZE[0], 2 + 0.4 * len(table) * len(bars)))
    x = np.arange(len(table))
    width = 0.8 / len(bars)
    handles = []
    for index, (name, spec, baseline) in enumerate(bars):
        hatch = "//" if index else None
        centers = x + (index - (len(bars) - 1) / 2) * width
        ax.bar(
            centers,
            _column(table, spec),
            width,
            color=[colors[s] for s in table["series"]],
            hatch=hatch,
            edgecolor="white",
        )
        handles.append(Patch(facecolor="lightgrey", edgecolor="dimgrey", hatch=hatch, label=name))
        if baseline is not None:
            segments = (centers - width / 2, centers + width / 2)
            ax.hlines(_column(table, baseline), *segments, colors="black", linestyles="--", linewidth=1.5)
    if any(baseline for *_, baseline in bars):
        handles.append(Line2D([], [], color="black", linestyle="--", label="baseline (same run)"))
    ax.margins(y=0.2)
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncols=len(handles))
    crowded = len(table) > 6
    ax.set_xticks(
        x,
        [f"{series}\nk={k}" for series, k in zip(table["series"], table["k"], strict=True)],
        rotation=30 if crowded else 0,
        ha="right" if crowded else "center",
        fontsize=8,
    )
    ax.set(xlabel="run (draft set, k)", ylabel=ylabel)
    return figure


if __name__ == "__main__":
    sys.exit(main())
