"""Serving under load, the parts that need no engine: the arrival trace, the latency metrics, the crossover
search, and the speedup model at the occupancy an arrival rate produces.

- `trace`: seeded arrivals or a trace file, and the `requests.jsonl` artifact;
- `metrics`: TTFT, TPOT, ITL, E2EL, goodput, occupancy and the paired ratios of a served trace;
- `crossover`: the request rate where speculation stops paying, searched on a log scale;
- `model`: Little's law over the measured verify-cost surface, predicting TPOT and the crossover rate.
"""
