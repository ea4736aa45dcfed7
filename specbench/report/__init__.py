"""The cross-run comparison: finished runs from MLflow as one table, comparison plots, files, and the parent run.

- `query`: which runs, and the summary table;
- `figures`: the comparison plots;
- `files`: writing the report and logging it to a run (a sweep's parent);
- `command`: `specbench report`.

Each run measured its own baseline, so the plots draw every run's baseline next
to its speculative figure rather than one shared baseline.
"""

from specbench.report.figures import comparison_figures
from specbench.report.files import log_report, write_report
from specbench.report.query import load_runs, summary_table

__all__ = ["comparison_figures", "load_runs", "log_report", "summary_table", "write_report"]
