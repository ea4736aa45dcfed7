"""Predefined sweeps (primary Hydra configs), installed as the package `specbench.sweeps`."""
