"""benchmarks/fill_up_tail.py on a load run's `requests.jsonl`: the p99 over every request against the p99 over
the requests after the first `--skip`, worked by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fill_up_tail


def request_line(number: int, spec_tpot_s: float) -> dict:
    """Request `number` arriving at `number` s: 11 tokens in both modes, the baseline's 0.1 s apart."""
    times = {"admitted_s": number + 0.0, "first_token_s": number + 0.5, "num_tokens": 11, "error": None}
    return {
        "arrival_s": float(number),
        "baseline": times | {"finish_s": number + 0.5 + 10 * 0.1},
        "spec": times | {"finish_s": number + 0.5 + 10 * spec_tpot_s},
    }


def test_the_slow_first_request_is_the_p99_until_it_is_left_out(tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    lines = [request_line(0, 0.3), *(request_line(number, 0.1) for number in range(1, 4))]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    fill_up_tail.main([str(path), "--skip", "1", "--summary"])
    out = capsys.readouterr().out
    # numpy's linear p99 of TPOTs [0.3, 0.1, 0.1, 0.1] is 0.1 + 0.97 x 0.2 = 0.294 s, over the baseline's 0.1 s
    assert "requests.jsonl: spec 2.94 -> 1.00" in out
    assert "equal output lengths:\n  spec (1 series): 2.94x [2.94x, 2.94x] -> 1.00x [1.00x, 1.00x], lower in 1" in out
    assert "fixed k" not in out  # a load run has no fixed k beside its speculative mode
