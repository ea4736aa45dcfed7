"""engine.backend=server against real servers: llama.cpp's OpenAI-compatible server on a tiny GGUF the tests write,
plain and with its prompt-lookup draft, and a small scripted server that misbehaves on purpose (HTTP 500 and 429,
a dropped stream, no answer before the timeout, a stream cut short, an error mid-stream). Servers started from a
command, servers that are down or exit at start, the speculation counters of /metrics, and the bad settings."""

from __future__ import annotations

import json
import re
import shlex
import socket
import sys
import tracemalloc
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from specbench.config import CONFIG_PACKAGE, SloConfig, SpecBenchConfig, register_configs
from specbench.data import Record
from specbench.errors import ConfigError, ModelLoadError, ServerError
from specbench.load.metrics import mode_metrics
from specbench.load.result import load_title
from specbench.load.trace import TraceRequest, write_requests
from specbench.server import prometheus
from specbench.server.client import RequestSettings, replay
from specbench.server.managed import free_port, started_server
from specbench.server.mode import serve_on_server, server_figures, server_trace, text_disagreement
from specbench.server.records import complete_tokens
from specbench.server.run import run_server_load
from specbench.server.scripted import ScriptedServer
from specbench.testing import train_tokenizer, write_gguf_llama
from specbench.validation import typed_config

PYTHON = shlex.quote(sys.executable)
SCRIPTED_CMD = f"{PYTHON} -m specbench.server.scripted --port {{port}}"


def binding_installed() -> bool:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return False
    return True


needs_binding = pytest.mark.skipif(
    not binding_installed(),
    reason='llama-cpp-python\'s server is not installed: pip install "llama-cpp-python[server]==0.3.36"',
)


@pytest.fixture(scope="module")
def composer():
    """Compose the installed configs as the CLI does, typed and validated."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        yield lambda *overrides: typed_config(compose("config", overrides=["device=cpu", *overrides]))
    GlobalHydra.instance().clear()


def url_config(composer, baseline_url: str, spec_url: str, *overrides: str) -> SpecBenchConfig:
    return composer(
        "mode=load", "engine.backend=server", f"server.baseline_url={baseline_url}", f"server.spec_url={spec_url}",
        *overrides,
    )  # fmt: skip


def scripts(*prompts: str, gap_s: float = 0.01) -> list[TraceRequest]:
    """A trace whose requests send these scripted prompts, `gap_s` apart."""
    return [TraceRequest(index, index * gap_s, text=prompt) for index, prompt in enumerate(prompts)]


# --- the scripted server: faults ---------------------------------------------------------------------------------

FAULTS = {
    1: ("status=500", r"^HTTP 500: .*scripted HTTP 500"),
    2: ("status=429", r"^HTTP 429 \(rate limited\)"),
    3: ("drop=2 chunks=6", r"^the connection failed after 2 text chunks \(ClientPayloadError: Response payload is not"),
    4: ("hang=1", r"^no complete answer within server.timeout_s=2 s \(0 text chunks received\)"),
    5: ("no_finish=1 chunks=3", r"^the stream ended without a finish_reason after 3 text chunks"),
    6: ("error_after=1", r"^the server reported an error mid-stream: scripted mid-stream error"),
}


def test_every_fault_is_a_failed_request_with_its_reason_and_the_run_goes_on(composer, tmp_path):
    prompts = ["chunks=4", *(script for script, _ in FAULTS.values()), "chunks=5 tokens=2"]
    trace = scripts(*prompts)
    with ScriptedServer() as url:
        cfg = url_config(composer, url, url, "server.timeout_s=2", "warmup_prompts=1", "warmup_tokens=2")
        outcome = serve_on_server(cfg, trace, [], "baseline", tmp_path)
    requests = list(outcome.result.requests)
    assert [request.request_id for request in requests] == list(range(len(prompts)))
    for index, (_, reason) in FAULTS.items():
        assert requests[index].error is not None
        assert re.search(reason, requests[index].error), requests[index].error
    # the requests before and after the faults were served in full; the last one's chunks are 2 tokens each
    assert requests[0].error is None and requests[0].num_tokens == 4 and requests[0].chunk_sizes == [1] * 4
    assert requests[7].error is None and requests[7].num_tokens == 10 and requests[7].chunk_sizes == [2] * 5
    metrics = mode_metrics(outcome.result, "baseline", SloConfig(e2el_ms=60_000))
    assert metrics["failed_requests_baseline"] == len(FAULTS)
    assert metrics["requests_per_s_baseline"] == pytest.approx(2 / outcome.result.wall_s)
    assert metrics["slo_attainment_baseline"] == pytest.approx(2 / len(prompts))  # goodput leaves failures out
    # each reason is on disk: the mode's responses and the run's requests.jsonl
    lines = [json.loads(line) for line in (tmp_path / "responses_baseline.jsonl").read_text().splitlines()]
    assert [line["error"] for line in lines] == [request.error for request in requests]
    assert lines[7]["text"] == " w0 w1 w2 w3 w4"
    write_requests(tmp_path / "requests.jsonl", trace, {"baseline": outcome.result})
    logged = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [line["baseline"].get("error") for line in logged] == [request.error for request in requests]


def test_a_failed_warm_up_stops_the_mode_before_the_trace(composer, tmp_path):
    with ScriptedServer() as url:
        cfg = url_config(composer, url, url, "warmup_prompts=1")
        with pytest.raises(ServerError, match=r"the spec server at .* failed the warm-up request \(HTTP 500"):
            serve_on_server(cfg, scripts("status=500", "chunks=2"), [], "spec", tmp_path)
    assert not (tmp_path / "responses_spec.jsonl").exists()


def test_chat_streams_count_content_chunks_only(composer, tmp_path):
    with ScriptedServer() as url:
        cfg = url_config(composer, url, url, "server.chat=true", "warmup_prompts=0")
        outcome = serve_on_server(cfg, scripts("chunks=3 tokens=2"), [], "baseline", tmp_path)
    (request,) = outcome.result.requests
    # the opening role chunk and the closing empty delta carry no text: three chunks, the first is the first token
    assert request.error is None and len(request.chunk_times_s) == 3 and request.chunk_sizes == [2, 2, 2]
    assert request.first_token_s == request.chunk_times_s[0] and request.finish_s == request.chunk_times_s[-1]
    assert outcome.result.requests.line(0)["text"] == " w0 w1 w2"


def test_the_loop_is_open_and_max_concurrency_holds_later_arrivals(tmp_path):
    slow_then_quick = scripts("chunks=3 interval_ms=500", "chunks=1", gap_s=0.05)
    settings = RequestSettings(model="scripted", max_tokens=8)
    with ScriptedServer() as url:
        open_loop = list(replay(url, slow_then_quick, [], settings, tmp_path / "open.jsonl").requests)
        one_at_a_time = RequestSettings(model="scripted", max_tokens=8, max_concurrency=1)
        closed = list(replay(url, slow_then_quick, [], one_at_a_time, tmp_path / "closed.jsonl").requests)
    # open: the second request was sent at its arrival and done before the first, which pauses 2 x 500 ms
    assert open_loop[1].admitted_s < open_loop[0].finish_s and open_loop[1].finish_s < open_loop[0].finish_s
    # one in flight: the second waits for the first to end, and that wait is its queueing time
    assert closed[1].admitted_s >= closed[0].finish_s
    for request in open_loop + closed:
        assert request.error is None
        assert request.arrival_s <= request.admitted_s <= request.first_token_s <= request.finish_s


def test_token_counts_prefer_the_server_then_the_tokenizer(tmp_path):
    tokenizer = train_tokenizer()
    with ScriptedServer() as url:
        result = replay(url, scripts("chunks=4 tokens=3"), [], RequestSettings("scripted", 8), tmp_path / "a.jsonl")
        counted = replay(url, scripts("chunks=4 tokens=3"), [], RequestSettings("scripted", 8), tmp_path / "b.jsonl",
                         tokenizer)  # fmt: skip
    (plain,), (with_tokenizer,) = result.requests, counted.requests
    # the server's running usage gives each chunk's count and the total, tokenizer or not
    assert plain.num_tokens == with_tokenizer.num_tokens == 12 and plain.chunk_sizes == [3, 3, 3, 3]
    assert plain.tokens == [] and with_tokenizer.tokens == tokenizer.encode(" w0 w1 w2 w3", add_special_tokens=False)
    # without usage: the tokenizer's tokens, each counted in the chunk where it starts
    raw = {"text": "ab cd", "chunk_chars": [1, 2, 2], "usage_chunk_sizes": None, "usage_tokens": None}
    record = complete_tokens(raw, tokenizer)
    expected = tokenizer("ab cd", add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in expected["offset_mapping"]]
    assert record["tokens"] == expected["input_ids"] and record["num_tokens"] == len(starts)
    assert record["chunk_sizes"] == [sum(0 <= s < 1 for s in starts), sum(1 <= s < 3 for s in starts),
                                     sum(s >= 3 for s in starts)]  # fmt: skip
    # neither: one token a chunk
    assert complete_tokens(raw)["chunk_sizes"] == [1, 1, 1] and complete_tokens(raw)["num_tokens"] == 3


def test_texts_that_differ_between_modes_are_counted(tmp_path):
    settings = RequestSettings("scripted", 8)
    with ScriptedServer() as url:
        baseline = replay(url, scripts("chunks=2", "chunks=3", "status=500"), [], settings, tmp_path / "b.jsonl")
        spec = replay(url, scripts("chunks=2", "chunks=4", "chunks=1"), [], settings, tmp_path / "s.jsonl")
    # request 2 failed in one mode, so 2 pairs: one equal, one not
    expected = {"disagreement_rate": 0.5, "exact_match_rate": 0.5}
    assert text_disagreement({"baseline": baseline, "spec": spec}) == expected


def test_records_stream_to_disk_so_memory_does_not_grow_with_the_trace(tmp_path):
    def peak_bytes(url: str, count: int) -> int:
        trace = [TraceRequest(index, 0.0, text="chunks=40") for index in range(count)]
        tracemalloc.start()
        result = replay(url, trace, [], RequestSettings("scripted", 8, max_concurrency=4), tmp_path / "r.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert sum(request.error is None for request in result.requests) == count
        return peak

    # the server in a process of its own, so that only the client's memory is traced
    with started_server(SCRIPTED_CMD, "baseline", None, tmp_path / "server.log", 60) as server:
        peak_bytes(server.base_url, 10)  # imports and first connections
        small, large = peak_bytes(server.base_url, 40), peak_bytes(server.base_url, 160)
    # 120 more requests kept in memory would add ~3 KB each (40 chunk times, the text, the dict)
    assert large < 1.25 * small, (small, large)


# --- servers that do not answer, exit or never become ready ----------------------------------------------------


def test_a_server_down_at_start_gets_one_sentence_and_no_request(composer, tmp_path):
    down = f"http://127.0.0.1:{free_port()}/v1"
    cfg = url_config(composer, down, down)
    refused = r"^the baseline server at .* does not answer \(ConnectionRefusedError"
    with pytest.raises(ServerError, match=refused) as error:
        serve_on_server(cfg, scripts("chunks=2"), [], "baseline", tmp_path)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing was sent, nothing recorded
    with ScriptedServer() as url:
        wrong = url.replace("/v1", "/api/v1")
        with pytest.raises(ServerError, match=r"answered GET .*/api/v1/models with HTTP 404: point server.spec_url"):
            serve_on_server(url_config(composer, wrong, wrong), scripts("chunks=2"), [], "spec", tmp_path)


def test_a_started_server_that_exits_ends_the_run_with_its_last_log_lines(composer, tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nprint('loading weights')\nprint('no GPU found')\nsys.exit(3)\n")
    cfg = composer("mode=load", "engine.backend=server", f"server.baseline_cmd='{PYTHON} {crash} --port {{port}}'",
                   f"server.spec_cmd='{SCRIPTED_CMD}'")  # fmt: skip
    with pytest.raises(ServerError, match=r"^the baseline server \(.*\) exited with code 3: see its log") as error:
        serve_on_server(cfg, scripts("chunks=2"), [], "baseline", tmp_path)
    assert str(error.value).endswith("loading weights\nno GPU found")
    assert not (tmp_path / "responses_baseline.jsonl").exists()


def test_a_started_server_that_never_becomes_ready_is_stopped_after_start_timeout(composer, tmp_path):
    # a web server, but not an OpenAI one: /health and /v1/models are 404
    never_ready = f"{PYTHON} -m http.server {{port}} --bind 127.0.0.1"
    late = r"did not answer .*/health or /v1/models within server.start_timeout_s=1 s"
    with pytest.raises(ServerError, match=late), started_server(never_ready, "spec", None, tmp_path / "x.log", 1.0):
        pass
    log = (tmp_path / "x.log").read_text()
    port = int(log.split("http.server ")[1].split()[0])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # stopped: nothing listens there any more


# --- speculation counters ---------------------------------------------------------------------------------------


def three_scripted_records() -> list[Record]:
    """Prompts that script the fake server's answers: 3 chunks of 3 tokens, 2 of 5, 4 of 1."""
    scripts = ("chunks=3 tokens=3", "chunks=2 tokens=5", "chunks=4 tokens=1")
    return [Record(name, script, ()) for name, script in zip("abc", scripts, strict=True)]


def test_a_run_pools_the_spec_servers_counters_over_repeats_and_alternates_the_modes(composer, tmp_path):
    # each chunk of T tokens is one draft of 4 tokens with T - 1 accepted; each repeat restarts both servers, whose
    # warm-up (the first prompt) is read before the trace
    cfg = composer("mode=load", "engine.backend=server", f"server.baseline_cmd='{SCRIPTED_CMD}'",
                   f"server.spec_cmd='{SCRIPTED_CMD} --spec-k 4 # {{\"a\": 1}}'", "warmup_prompts=1", "repeats=2",
                   "load.arrival=constant", "load.rate=100", "load.num_requests=3",
                   "dataset.template='{question}'")  # fmt: skip
    records = three_scripted_records()
    result, artifacts = run_server_load(cfg, records, 100.0, tmp_path)
    drafts = 2 * (3 + 2 + 4)
    accepted = 2 * (3 * 2 + 2 * 4)
    assert {key: value for key, value in result.metrics.items() if "draft" in key or "accept" in key} == pytest.approx(
        {
            "server_drafts": drafts,
            "server_draft_tokens": 4 * drafts,
            "server_accepted_tokens": accepted,
            "acceptance_rate": accepted / (4 * drafts),
            "mean_accepted_tokens": 1 + accepted / drafts,
            "acceptance_rate_pos_1": 10 / drafts,
            "acceptance_rate_pos_2": 10 / drafts,
            "acceptance_rate_pos_3": 4 / drafts,
            "acceptance_rate_pos_4": 4 / drafts,
        }
    )
    assert result.notes == []
    assert result.metrics["failed_requests_baseline"] == result.metrics["failed_requests_spec"] == 0
    assert result.metrics["disagreement_rate"] == 0 and result.metrics["request_rate"] == 100
    assert [len(result.served[mode]) for mode in ("baseline", "spec")] == [2, 2]
    assert sorted(str(path.relative_to(tmp_path)) for path in artifacts) == sorted(
        f"repeat{repeat}/{name}_{mode}.{ext}"
        for repeat in (0, 1)
        for mode in ("baseline", "spec")
        for name, ext in (("responses", "jsonl"), ("server", "log"))
    )
    written = {path: path.stat().st_mtime_ns for path in artifacts if path.name.startswith("responses")}
    assert written[tmp_path / "repeat0/responses_baseline.jsonl"] < written[tmp_path / "repeat0/responses_spec.jsonl"]
    assert written[tmp_path / "repeat1/responses_spec.jsonl"] < written[tmp_path / "repeat1/responses_baseline.jsonl"]
    assert (tmp_path / "repeat0" / "server_spec.log").read_text().startswith("==> specbench started: ")


def test_server_tokenizer_counts_in_a_run_and_one_that_cannot_load_stops_it_first(composer, tmp_path):
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    overrides = ("mode=load", "engine.backend=server", f"server.baseline_cmd='{SCRIPTED_CMD}'",
                 f"server.spec_cmd='{SCRIPTED_CMD}'", "warmup_prompts=0", "load.arrival=constant", "load.rate=100",
                 "load.num_requests=3", "dataset.template='{question}'")  # fmt: skip
    cfg = composer(*overrides, f"server.tokenizer={tmp_path / 'tokenizer'}")
    result, _ = run_server_load(cfg, three_scripted_records(), 100.0, tmp_path / "served")
    texts = [" w0 w1 w2", " w0 w1", " w0 w1 w2 w3"]  # the scripted chunks of records a, b and c
    for mode in ("baseline", "spec"):
        (served,) = result.served[mode]
        assert [record.tokens for record in served.requests] == [
            tokenizer.encode(text, add_special_tokens=False) for text in texts
        ]
        assert [record.num_tokens for record in served.requests] == [9, 10, 4]  # the server's usage still counts
    missing = composer(*overrides, f"server.tokenizer={tmp_path / 'missing'}")
    with pytest.raises(ModelLoadError, match=r"^cannot load server.tokenizer=.*missing \(") as error:
        run_server_load(missing, three_scripted_records(), 100.0, tmp_path / "never")
    assert "\n" not in str(error.value) and not (tmp_path / "never").exists()


def test_several_traces_are_each_served_by_both_servers_and_resampled_whole(composer, tmp_path):
    # chunks 2 ms apart: chunks sent at once may reach the client in one read, and a TPOT of 0 has no ratio
    paced = f"{SCRIPTED_CMD} --interval-ms 2"
    cfg = composer("mode=load", "engine.backend=server", f"server.baseline_cmd='{paced}'",
                   f"server.spec_cmd='{paced} --spec-k 4 # {{\"a\": 1}}'", "warmup_prompts=1",
                   "load.traces=2", "load.rate=100", "load.num_requests=3",
                   "dataset.template='{question}'")  # fmt: skip
    records = three_scripted_records()
    result, artifacts = run_server_load(cfg, records, 100.0, tmp_path)
    assert [len(result.served[mode]) for mode in ("baseline", "spec")] == [2, 2]
    arrivals = [[request.arrival_s for request in trace] for trace in result.traces]
    assert len(arrivals) == 2 and arrivals[0] != arrivals[1]  # arrival seeds 0 and 1
    assert result.metrics["traces"] == 2 and result.metrics["num_requests"] == 3
    assert result.metrics["paired_requests"] == 6 and result.metrics["server_drafts"] == 2 * (3 + 2 + 4)
    assert {path.parent.name for path in artifacts} == {"repeat0-trace0", "repeat0-trace1"}
    # each serve's ratio alone gives the spread, as on our engine: its p99 TPOTs, mode by mode
    per_serve = [mode_metrics(result.served["spec"][serve], "spec")["tpot_ms_p99_spec"]
                 / mode_metrics(result.served["baseline"][serve], "baseline")["tpot_ms_p99_baseline"]
                 for serve in range(2)]  # fmt: skip
    spread = {stat: result.metrics[f"tpot_p99_ratio_repeat_{stat}"] for stat in ("min", "median", "max")}
    assert spread == pytest.approx({"min": min(per_serve), "median": sum(per_serve) / 2, "max": max(per_serve)})
    assert result.title.endswith("on its servers (engine.backend=server), 100 requests/s")
    search = load_title(cfg, "rates 1-4 requests/s")  # a crossover search's parent run, against servers too
    assert search.endswith("on its servers (engine.backend=server), rates 1-4 requests/s")


def test_a_baseline_that_drafts_or_a_server_without_counters_is_said_in_one_line(composer, tmp_path):
    with ScriptedServer(spec_k=2) as drafting, ScriptedServer() as plain:
        cfg = url_config(composer, drafting, plain, "warmup_prompts=0")
        baseline = serve_on_server(cfg, scripts("chunks=3"), [], "baseline", tmp_path)
        spec = serve_on_server(cfg, scripts("chunks=2 draft=8 accepted=5"), [], "spec", tmp_path)
        with pytest.raises(FileExistsError):  # spec's requests are read from its responses file
            serve_on_server(cfg, scripts("chunks=2"), [], "spec", tmp_path)
        silent = serve_on_server(cfg, scripts("chunks=2"), [], "spec", tmp_path / "again")
    assert server_figures({"baseline": [baseline]}) == (
        {}, ["the baseline server drafted 6 tokens: it speculates, check its command"]
    )  # fmt: skip
    # no speculation counters, but llama-server style per-response draft counts
    assert server_figures({"spec": [spec]}) == (
        {"server_draft_tokens": 8, "server_accepted_tokens": 5, "acceptance_rate": 5 / 8}, []
    )  # fmt: skip
    metrics, notes = server_figures({"spec": [silent]})
    assert metrics == {}
    assert notes == [
        "the spec server's acceptance is not logged: its /metrics has no speculation counters "
        "(vllm:spec_decode_num_draft_tokens), and its responses count no drafts"
    ]
    sglang = '# TYPE sglang:spec_accept_length gauge\nsglang:spec_accept_length{model_name="m"} 3.2\n'
    assert prometheus.parse(sglang).missing.startswith("SGLang reports speculation only as gauges")


# --- llama.cpp's OpenAI-compatible server ----------------------------------------------------------------------

PROMPTS = ["the quick brown fox jumps over the lazy dog and the quick brown fox", "hello world, hello world, hello"]
MAX_TOKENS = 16


def llama_cpp_cmd(gguf: Path, *options: str) -> str:
    return (f"{PYTHON} -m llama_cpp.server --model {gguf} --port {{port}} --n_ctx 256 --n_threads 1 "
            + " ".join(options))  # fmt: skip


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return write_gguf_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


@needs_binding
def test_llama_cpp_server_plain_and_with_prompt_lookup_serve_the_binding_s_own_greedy_text(composer, gguf, tmp_path):
    from llama_cpp import Llama

    plain = llama_cpp_cmd(gguf, "--interrupt_requests false")
    lookup = f"{plain} --draft_model prompt-lookup-decoding --draft_model_num_pred_tokens 4"
    cfg = composer(
        "mode=load", "engine.backend=server", f"generation.max_new_tokens={MAX_TOKENS}", "warmup_tokens=4",
        f"server.baseline_cmd='{plain}'", f"server.spec_cmd='{lookup}'",
        "load.arrival=constant", "load.rate=20", "load.num_requests=4",
    )  # fmt: skip
    tokenizer = train_tokenizer()
    trace = server_trace(cfg, ["a", "b"])
    outcomes = {mode: serve_on_server(cfg, trace, PROMPTS, mode, tmp_path, tokenizer) for mode in ("baseline", "spec")}
    # the server samples greedily after its default repeat penalty (1.1): the binding's own decode, in-process
    model = Llama(str(gguf), n_ctx=256, n_threads=1, verbose=False)
    expected = [model.create_completion(p, max_tokens=MAX_TOKENS, temperature=0.0, repeat_penalty=1.1)["choices"][0]
                ["text"] for p in PROMPTS]  # fmt: skip
    for mode, outcome in outcomes.items():
        requests = outcome.result.requests
        assert [request.error for request in requests] == [None] * len(trace), mode
        assert list(requests.texts()) == [expected[request.prompt_index] for request in trace], mode
        for request in requests:
            assert request.arrival_s <= request.admitted_s <= request.first_token_s <= request.finish_s
            assert request.chunk_times_s == sorted(request.chunk_times_s)
            assert len(request.chunk_sizes) == len(request.chunk_times_s)
            # no usage in its stream: the tokenizer counts the text, each token in the chunk where it starts
            assert sum(request.chunk_sizes) == request.num_tokens == len(request.tokens) > 0
        assert (tmp_path / f"server_{mode}.log").read_text().startswith("==> specbench started")
    assert text_disagreement({mode: outcome.result for mode, outcome in outcomes.items()})["disagreement_rate"] == 0
    metrics, notes = server_figures({mode: [outcome] for mode, outcome in outcomes.items()})
    assert metrics == {} and len(notes) == 1
    assert notes[0].startswith("the spec server's acceptance is not logged: http://127.0.0.1:")
    assert "has no Prometheus /metrics (HTTP 404)" in notes[0]


@needs_binding
def test_llama_cpp_server_cuts_streams_short_unless_told_not_to_and_the_client_counts_it(gguf, tmp_path):
    # by default llama-cpp-python's server ends a stream ([DONE], no finish_reason) when another request arrives
    with started_server(llama_cpp_cmd(gguf), "baseline", None, tmp_path / "server.log", 120) as server:
        # the first streams 200 tokens (it has not finished when the second arrives, however busy the machine)
        overlapping = [TraceRequest(0, 0.0, 0, max_new_tokens=200), TraceRequest(1, 0.02, 1)]
        settings = RequestSettings("tiny", MAX_TOKENS)
        result = replay(server.base_url, overlapping, PROMPTS, settings, tmp_path / "r.jsonl")
    errors = [request.error for request in result.requests]
    assert errors[0] and "without a finish_reason" in errors[0], errors


# --- settings ---------------------------------------------------------------------------------------------------

# the README's recipes, as a shell passes them and as a config file
VLLM_LINE = (
    r"""mode=load engine.backend=server "server.baseline_cmd='vllm serve M --port {port}'" """
    r""""server.spec_cmd='vllm serve M --port {port} --speculative-config """
    r"""\\'{\"model\": \"D\", \"num_speculative_tokens\": 4}\\''" """
)
VLLM_YAML = """# @package _global_
mode: load
engine:
  backend: server
server:
  baseline_cmd: vllm serve M --port {port}
  spec_cmd: >-
    vllm serve M --port {port}
    --speculative-config '{"model": "D", "num_speculative_tokens": 4}'
"""


def test_the_readme_recipes_compose_and_fixed_batches_are_sent_at_time_0(composer, tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "vllm_pair.yaml").write_text(VLLM_YAML)
    from_file = composer(f"hydra.searchpath=[file://{tmp_path}]", "experiment=vllm_pair")
    from_line = composer(*shlex.split(VLLM_LINE))
    for cfg in (from_file, from_line):
        assert shlex.split(cfg.server.spec_cmd) == [
            "vllm", "serve", "M", "--port", "{port}", "--speculative-config",
            '{"model": "D", "num_speculative_tokens": 4}',
        ]  # fmt: skip
    fixed = composer("mode=batch", "engine.backend=server", "server.baseline_url=http://a:8000/v1",
                     "server.spec_url=http://b:8000", "server.fixed_batch=true")  # fmt: skip
    trace = server_trace(fixed, ["r0", "r1", "r2"])
    assert [(request.arrival_s, request.record_id) for request in trace] == [(0.0, "r0"), (0.0, "r1"), (0.0, "r2")]


BAD = [
    (["server.baseline_url=http//gpu-a:8000/v1", "server.spec_url=http://b/v1"], "is not a server URL"),
    (["server.baseline_url=http://a:99999/v1", "server.spec_url=http://b/v1"], "baseline_url=http://a:99999/v1 is not"),
    (["server.baseline_url=http://a/v1"], "server.spec_url and server.spec_cmd are both unset while the baseline"),
    (["server.spec_cmd='vllm serve M --port {port}'"], "server.baseline_url and server.baseline_cmd are both unset"),
    ([], "needs a server per mode"),
    (["server.baseline_cmd='vllm serve M'", "server.spec_url=http://b/v1"], "has no {port} and server.baseline_url"),
    (["server.baseline_cmd='x --port {port}'", "server.baseline_url=http://a/v1", "server.spec_url=http://b/v1"],
     "says otherwise: drop one"),
    (["server.baseline_url=http://a/v1", "server.spec_url=http://b/v1", "server.max_concurrency=0"],
     "server.max_concurrency=0 is invalid"),
    (["server.baseline_url=http://a/v1", "server.spec_url=http://b/v1", "server.timeout_s=-1"],
     "server.timeout_s=-1.0 is invalid: give a positive number of seconds"),
    (["server.baseline_url=http://a/v1", "server.spec_url=http://b/v1", "server.start_timeout_s=-5"],
     "server.start_timeout_s=-5.0 is invalid"),
    (["server.baseline_url=http://a/v1", "server.spec_url=http://b/v1", "mode=batch"],
     "engine.backend=server sends requests to a server over time, which is mode=load"),
    (["server.baseline_url=http://a/v1", "server.spec_url=http://b/v1", "server.fixed_batch=true",
      "load.find_crossover=true"], "no request rate to search"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[message[:40] for _, message in BAD])
def test_bad_server_settings_get_one_sentence(composer, overrides, message):
    base = [] if "mode=batch" in overrides else ["mode=load"]
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        composer(*base, "engine.backend=server", *overrides)
    assert "\n" not in str(error.value)


def test_the_client_overhead_benchmark_measures_every_chunk_of_both_arrangements(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import client_overhead

    path = client_overhead.main(["--streams", "3", "--chunks", "4", "--interval-ms", "5", "--repeats", "1",
                                 "--out", str(tmp_path)])  # fmt: skip
    report = json.loads(path.read_text())
    assert report["machine"]["cores"] >= 1 and len(report["runs"]) == 1
    for arrangement in ("staggered", "lockstep"):
        figures = report["runs"][0][arrangement]
        assert figures["chunks"] == 3 * 4 and 0 < figures["p50"] <= figures["p99"] <= figures["max"]
