"""specbench: measure speculative decoding of LLMs, honestly timed and tracked in MLflow."""

__version__ = "0.1.0"
