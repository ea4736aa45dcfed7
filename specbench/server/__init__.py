"""engine.backend=server: the same arrival trace replayed against OpenAI-compatible servers (vLLM, SGLang,
llama.cpp), one without speculation and one with it, so that a load run measures speculation inside the server
people deploy.

- `mode`: one mode served end to end (`serve_mode`): start or reach its server, warm up, replay, read counters;
- `client`: the open-loop streaming client (`replay`) and its per-request records;
- `records`: those records on disk as requests end, read back in trace order (`SpooledRequests`);
- `prometheus`: speculation counters from a server's /metrics, differenced over the trace;
- `managed`: servers started from a command, in their own process group, health-checked and stopped;
- `scripted`: a small server that streams at once and misbehaves on request, for the tests and the client's
  precision benchmark.
"""
