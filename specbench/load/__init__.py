"""Serving under load: everything `mode=load` adds beside the engine's continuous batching
(`engine.continuous`), which it drives.

- `trace`: seeded arrivals or a trace file, and the `requests.jsonl` artifact;
- `metrics`: TTFT, TPOT, ITL, E2EL, goodput, occupancy and the paired ratios of a served trace;
- `result`: what a load run served, on our engine or servers, and the figures both log;
- `crossover`: the request rate where speculation stops paying, searched on a log scale;
- `model`: Little's law over the measured verify-cost surface, predicting TPOT and the crossover rate;
- `k_schedule`: `k_schedule=load`, the k of each step from the cost surface and the batch's state;
- `pipeline`: one load run on our engine (the sibling of `specbench.pipeline.run_benchmark`);
- `job`: a load run, or a crossover search, logged to MLflow.

Only `pipeline` and `job` load or drive models.
"""
