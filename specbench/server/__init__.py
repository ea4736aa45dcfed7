"""engine.backend=server: the same arrival trace replayed against OpenAI-compatible servers (vLLM, SGLang,
llama.cpp), one without speculation and one with it, so that a load run measures speculation inside the server
people deploy.

- `run`: one load run against servers, both modes, `repeats` times (`run_server_load`);
- `mode`: one mode served end to end (`serve_on_server`): start or reach its server, warm up, replay, read counters;
- `client`: the open-loop streaming client (`replay`): sends each request on time, notes each read and its time;
- `stream`: what a stream said, parsed after it (server-sent events, chunks, usage, errors);
- `records`: each request's record on disk as it ends, read back in trace order (`SpooledRequests`);
- `prometheus`: speculation counters from a server's /metrics, differenced over the trace;
- `managed`: servers started from a command, in their own process group, health-checked and stopped;
- `http`: plain GETs for health, models and metrics;
- `scripted`: a small server that streams at once and misbehaves on request, for the tests and the client's
  precision benchmark.
"""
