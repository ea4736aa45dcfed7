"""What a benchmark ran on, and the results file named after it."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def describe_machine() -> dict:
    """The CPU, its vector flags, the cores, the load when the benchmark started, the OS and Python."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    flags_line = re.search(r"flags\s*:\s*(.+)", cpuinfo)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "amx_tile"}),
        "load_average_1m_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def results_path(folder: Path, name: str, machine: dict, date: str, tag: str = "") -> Path:
    """`folder/<name>-<cpu>-<date>[-tag].json`."""
    cpu = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-")[:40]
    return folder / f"{name}-{cpu}-{date[:10]}{'-' + tag if tag else ''}.json"
