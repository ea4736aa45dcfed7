"""Hydra config groups of specbench, installed as the package `specbench.conf` (see pyproject.toml)."""
